//! The process's own memory as Linux reports it (`/proc/self/status`), for the memory
//! summaries of training runs and the memory benchmark.

/// A `/proc/self/status` memory field in bytes (`VmRSS`: resident now, `VmHWM`: peak
/// resident), `None` where the file or field is unavailable (not Linux).
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory of the process so far (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}

/// Makes the C allocator keep freed memory for reuse instead of handing it back to the kernel.
///
/// A training step on the CPU frees and allocates the same large buffers (activations, logits,
/// gradients of tens to hundreds of MB) over and over. glibc serves allocations above its mmap
/// threshold (at most 32 MiB) with fresh `mmap`s and unmaps them on free, and trims the heap's
/// top above 128 KiB: every step then faults its pages in again, zeroing each (transparent huge
/// pages included) — 28 % of a SmolLM2-135M step's time before this (docs/performance.md). With
/// mmap off and trimming off, freed blocks stay in the heap and are reused. The cost: resident
/// memory does not shrink below the run's peak until the process ends, which a training or
/// evaluation process reaches anyway. Called first thing by the command-line binaries; a no-op
/// outside glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the process allocates much,
    // and valid at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
