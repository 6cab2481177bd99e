// A training step captured once as a CUDA graph and replayed: torch's `at::cuda::CUDAGraph`
// (what `torch.cuda.graph` wraps), which tch does not wrap. Capture records the kernels the
// step's torch calls launch, with the memory they use taken from a pool private to the graph;
// a replay launches them all again with one call, so the host's cost of issuing thousands of
// operations a step disappears. Capture needs a stream other than the legacy default one, so the
// step is warmed up and captured on a stream from torch's pool made current by
// `alignment_side_stream_enter`. Compiled only where CUDA's runtime headers are given
// (build.rs, ALIGNMENT_CUDA_INCLUDE); crates/trainer/src/tch_graph.rs is the Rust side.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <exception>

extern "C" {

// Makes a stream from torch's pool the calling thread's current stream on GPU `device`, after the
// work queued so far has finished; `*guard` restores the previous stream when given to
// `alignment_side_stream_leave`. Returns nullptr, or an error message the caller frees with `free`.
char* alignment_side_stream_enter(int device, void** guard) {
    try {
        auto index = static_cast<c10::DeviceIndex>(device);
        c10::cuda::getCurrentCUDAStream(index).synchronize();
        *guard = new c10::cuda::CUDAStreamGuard(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index));
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Waits for the side stream's work, then restores the stream that was current before `enter`.
char* alignment_side_stream_leave(void* guard) {
    try {
        auto* g = static_cast<c10::cuda::CUDAStreamGuard*>(guard);
        g->current_stream().synchronize();
        delete g;
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Starts capturing the current stream's work into a new graph, `*graph`. Nothing launched until
// `alignment_graph_capture_end` runs: it is recorded. First, as `torch.cuda.graph` does, the
// device is synchronised and the allocator's cached blocks released, so that the graph's private
// pool does not come on top of memory the warm-up steps left cached. With `share_pool_with` (a
// graph captured before, or nullptr), the new graph allocates from that graph's pool, as
// `torch.cuda.graph(pool=other.pool())`: its intermediates reuse the blocks the other's freed.
// Safe for graphs that never read each other's memory: each reads its own inputs and the state
// outside the pool, and whatever it leaves in the pool is copied out before another replays.
char* alignment_graph_capture_begin(void** graph, void* share_pool_with) {
    try {
        c10::cuda::device_synchronize();
        c10::cuda::CUDACachingAllocator::emptyCache();
        auto* g = new at::cuda::CUDAGraph();
        try {
            if (share_pool_with != nullptr) {
                g->capture_begin(static_cast<at::cuda::CUDAGraph*>(share_pool_with)->pool());
            } else {
                g->capture_begin();
            }
        } catch (...) {
            delete g;
            throw;
        }
        *graph = g;
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Ends the capture `graph` began and instantiates it.
char* alignment_graph_capture_end(void* graph) {
    try {
        static_cast<at::cuda::CUDAGraph*>(graph)->capture_end();
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Launches every kernel `graph` captured, on the current stream.
char* alignment_graph_replay(void* graph) {
    try {
        static_cast<at::cuda::CUDAGraph*>(graph)->replay();
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Frees `graph` and returns its private pool to torch's allocator.
void alignment_graph_free(void* graph) {
    delete static_cast<at::cuda::CUDAGraph*>(graph);
}

}  // extern "C"
