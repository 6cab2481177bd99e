// torch's CUDA caching allocator's statistics (what `torch.cuda.max_memory_allocated` and
// `max_memory_reserved` read from Python), which tch does not wrap: so a run on the libtorch
// route reports its device memory as the PyTorch baseline does, exactly rather than sampled by
// nvidia-smi, and without the CUDA context nvidia-smi also counts. The allocator is reached
// through c10's device-generic interface, so this compiles and links against a CPU-only
// libtorch too (where it reports CUDA unavailable). crates/trainer/src/tch_device_memory.rs is
// the Rust side (built by build.rs with `--features tch`).
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/cuda.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

constexpr auto kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

extern "C" {

// Whether torch sees a CUDA device: 1 or 0.
int alignment_cuda_available() {
    try {
        return torch::cuda::is_available() ? 1 : 0;
    } catch (const std::exception&) {
        return 0;
    }
}

// How many GPUs torch sees.
int alignment_cuda_device_count() {
    try {
        return static_cast<int>(torch::cuda::device_count());
    } catch (const std::exception&) {
        return 0;
    }
}

// GPU `device`'s allocator statistics into `out`, in bytes: allocated now, allocated at the peak,
// reserved now, reserved at the peak (all streams and pools together). Returns nullptr, or an
// error message the caller frees with `free`.
char* alignment_cuda_memory_stats(int device, int64_t* out) {
    try {
        auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
        out[0] = stats.allocated_bytes[kAggregate].current;
        out[1] = stats.allocated_bytes[kAggregate].peak;
        out[2] = stats.reserved_bytes[kAggregate].current;
        out[3] = stats.reserved_bytes[kAggregate].peak;
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Starts GPU `device`'s peaks again from what is allocated and reserved now
// (`torch.cuda.reset_peak_memory_stats`). Returns nullptr, or an error message as above.
char* alignment_cuda_reset_peak_memory(int device) {
    try {
        c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

}  // extern "C"
