// libtorch's Kineto profiler (what `torch.profiler.profile` drives from Python), started and
// stopped from Rust so that a training step on the libtorch backend can be profiled per torch
// operator and, on CUDA, per device kernel (CUPTI) — the same trace format the PyTorch baseline
// exports, read by one script (scripts/gpu/profile_table.py). tch does not wrap the profiler;
// crates/trainer/src/tch_profiler.rs is the Rust side (built by build.rs with `--features tch`).
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstring>
#include <exception>
#include <set>
#include <string>

namespace {

using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

ProfilerConfig config() {
    // Input shapes make the trace tell one GEMM from another; no stacks, memory or FLOPs.
    return ProfilerConfig(ProfilerState::KINETO, /*report_input_shapes=*/true);
}

std::set<ActivityType> activities(bool cuda) {
    std::set<ActivityType> set{ActivityType::CPU};
    if (cuda) {
        set.insert(ActivityType::CUDA);
    }
    return set;
}

}  // namespace

extern "C" {

// Starts recording torch operators on this thread (and, with `cuda`, every CUDA kernel and copy).
// Returns nullptr, or an error message the caller frees with `free`.
char* alignment_profiler_start(int cuda) {
    try {
        torch::autograd::profiler::prepareProfiler(config(), activities(cuda != 0));
        torch::autograd::profiler::enableProfiler(config(), activities(cuda != 0));
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// Stops recording and writes the Chrome trace (JSON) to `path`. Returns nullptr or an error.
char* alignment_profiler_stop(const char* path) {
    try {
        auto result = torch::autograd::profiler::disableProfiler();
        if (!result) {
            return strdup("the profiler was not running");
        }
        result->save(std::string(path));
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

}  // extern "C"
