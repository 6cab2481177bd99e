// The peak of the bytes a process holds through malloc and its relatives (malloc_usable_size of
// every live block), printed at exit: a measure of a step's memory that the allocator's caching
// and fragmentation do not blur, unlike peak RSS, and the same for our binary and for PyTorch's
// eager loop (both allocate through libc). Preloaded by scripts/peak_heap.sh.
//
// Each function forwards to glibc's own implementation (`__libc_*`, so no dlsym at start-up) and
// adds or subtracts the block's usable size; the peak is kept with a compare-and-swap.
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

static _Atomic long long live_bytes;
static _Atomic long long peak_bytes;

static void count_in(void *block) {
    if (!block) return;
    long long size = (long long)malloc_usable_size(block);
    long long now = atomic_fetch_add(&live_bytes, size) + size;
    long long peak = atomic_load(&peak_bytes);
    while (now > peak && !atomic_compare_exchange_weak(&peak_bytes, &peak, now)) {
    }
}

static void count_out(void *block) {
    if (block) atomic_fetch_sub(&live_bytes, (long long)malloc_usable_size(block));
}

void *malloc(size_t n) {
    void *block = __libc_malloc(n);
    count_in(block);
    return block;
}

void *calloc(size_t count, size_t n) {
    void *block = __libc_calloc(count, n);
    count_in(block);
    return block;
}

void free(void *block) {
    count_out(block);
    __libc_free(block);
}

void *realloc(void *block, size_t n) {
    long long before = block ? (long long)malloc_usable_size(block) : 0;
    void *moved = __libc_realloc(block, n);
    if (moved) {
        atomic_fetch_sub(&live_bytes, before);
        count_in(moved);
    } else if (n == 0) {
        atomic_fetch_sub(&live_bytes, before);  // realloc(p, 0) freed p
    }
    return moved;
}

void *memalign(size_t alignment, size_t n) {
    void *block = __libc_memalign(alignment, n);
    count_in(block);
    return block;
}

void *aligned_alloc(size_t alignment, size_t n) { return memalign(alignment, n); }

int posix_memalign(void **out, size_t alignment, size_t n) {
    if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
    void *block = __libc_memalign(alignment, n);
    if (!block) return ENOMEM;
    count_in(block);
    *out = block;
    return 0;
}

void *valloc(size_t n) { return memalign((size_t)sysconf(_SC_PAGESIZE), n); }

void *pvalloc(size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return memalign(page, (n + page - 1) / page * page);
}

// Written to $PEAK_HEAP_OUT when set (appended, one line per process), else to stderr.
__attribute__((destructor)) static void report(void) {
    const char *path = getenv("PEAK_HEAP_OUT");
    FILE *out = path ? fopen(path, "a") : NULL;
    fprintf(out ? out : stderr, "peak_heap_bytes %lld pid %d\n", (long long)atomic_load(&peak_bytes), (int)getpid());
    if (out) fclose(out);
}
