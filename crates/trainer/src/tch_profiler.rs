//! libtorch's Kineto profiler around a stretch of work on the libtorch backend (`--features tch`):
//! every torch operator, and on CUDA every kernel and copy with its device time, written as the
//! Chrome trace `torch.profiler` exports, so ours and the PyTorch baseline are read by the same
//! script (`scripts/gpu/profile_table.py`). The profiler itself is `csrc/profiler.cpp`.
//!
//! Only operators issued on the thread that started the profiler are recorded (burn-tch issues
//! every operation, the backward pass included, on the calling thread); CUDA kernels are
//! recorded whichever thread launched them.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

extern "C" {
    fn alignment_profiler_start(cuda: c_int) -> *mut c_char;
    fn alignment_profiler_stop(path: *const c_char) -> *mut c_char;
    fn free(ptr: *mut c_void);
}

/// An error of libtorch's profiler, with its message.
#[derive(Debug, thiserror::Error)]
#[error("libtorch's profiler: {0}")]
pub struct ProfilerError(String);

/// Turns an error string from `csrc/profiler.cpp` into a result, freeing it.
fn checked(error: *mut c_char) -> Result<(), ProfilerError> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from strdup, freed once.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { free(error.cast()) };
    Err(ProfilerError(message))
}

/// A running profiler; [`TorchProfiler::finish`] writes its trace. Dropping it without
/// finishing stops it and discards the trace.
#[must_use = "the trace is written by `finish`"]
pub struct TorchProfiler {
    running: bool,
}

impl TorchProfiler {
    /// Starts recording torch operators on this thread, and with `cuda` CUDA kernels too.
    pub fn start(cuda: bool) -> Result<Self, ProfilerError> {
        // SAFETY: no arguments but a flag; the C++ side catches its exceptions.
        checked(unsafe { alignment_profiler_start(c_int::from(cuda)) })?;
        Ok(Self { running: true })
    }

    /// Stops recording and writes the Chrome trace (JSON) to `path`.
    pub fn finish(mut self, path: &Path) -> Result<PathBuf, ProfilerError> {
        self.running = false;
        let c_path = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| ProfilerError(format!("{}: a path with a NUL byte", path.display())))?;
        // SAFETY: a NUL-terminated path that outlives the call.
        checked(unsafe { alignment_profiler_stop(c_path.as_ptr()) })?;
        Ok(path.to_path_buf())
    }
}

impl Drop for TorchProfiler {
    fn drop(&mut self) {
        if self.running {
            let discard = std::env::temp_dir().join(format!("alignment-profile-discarded-{}.json", std::process::id()));
            if let Ok(c_path) = CString::new(discard.to_string_lossy().as_bytes()) {
                // SAFETY: as in `finish`; the trace is written and removed at once.
                let _ = checked(unsafe { alignment_profiler_stop(c_path.as_ptr()) });
                let _ = std::fs::remove_file(discard);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::libtorch::{LibTorch, LibTorchDevice};
    use burn::tensor::{Distribution, Tensor};

    #[test]
    fn the_trace_names_the_torch_operators_burn_issued() {
        let device = LibTorchDevice::Cpu;
        let a = Tensor::<LibTorch<f32>, 2>::random([64, 32], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<LibTorch<f32>, 2>::random([32, 16], Distribution::Normal(0.0, 1.0), &device);
        let profiler = TorchProfiler::start(false).unwrap();
        let product = a.matmul(b).exp().sum();
        let value = product.into_scalar();
        let dir = tempfile::tempdir().unwrap();
        let path = profiler.finish(&dir.path().join("trace.json")).unwrap();
        assert!(value.is_finite());
        let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let names: Vec<&str> = trace["traceEvents"]
            .as_array()
            .expect("a Chrome trace has traceEvents")
            .iter()
            .filter(|e| e["cat"] == "cpu_op")
            .filter_map(|e| e["name"].as_str())
            .collect();
        // burn-tch computes `exp` in place when it owns the tensor (`aten::exp_`).
        for op in ["aten::matmul", "aten::exp", "aten::sum"] {
            assert!(names.iter().any(|name| name.trim_end_matches('_') == op), "{op} missing from the trace's operators: {names:?}");
        }
    }
}
