//! Device memory as torch's CUDA caching allocator counts it (`--features tch`): what
//! `torch.cuda.max_memory_allocated` and `max_memory_reserved` report in Python, so a run on the
//! libtorch route and the PyTorch baseline are measured by the same counters. nvidia-smi also
//! counts the CUDA context and cuBLAS's workspace and samples rather than tracks the peak; these
//! counters are exact and hold only tensors' memory. The C++ side is `csrc/device_memory.cpp`.

use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    fn alignment_cuda_available() -> c_int;
    fn alignment_cuda_device_count() -> c_int;
    fn alignment_cuda_memory_stats(device: c_int, out: *mut i64) -> *mut c_char;
    fn alignment_cuda_reset_peak_memory(device: c_int) -> *mut c_char;
    fn free(ptr: *mut c_void);
}

/// An error of torch's CUDA allocator statistics, with torch's message.
#[derive(Debug, thiserror::Error)]
#[error("torch's CUDA allocator statistics (GPU {device}): {message}")]
pub struct DeviceMemoryError {
    /// The GPU asked about.
    pub device: usize,
    /// torch's message.
    pub message: String,
}

/// One GPU's memory in torch's caching allocator, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Held by live tensors now.
    pub allocated: u64,
    /// The most held by live tensors at once since the process started or the last
    /// [`reset_peaks`].
    pub peak_allocated: u64,
    /// Taken from the driver by the allocator now (live tensors and its cache).
    pub reserved: u64,
    /// The most taken from the driver at once, as `peak_allocated`.
    pub peak_reserved: u64,
}

/// Turns an error string from `csrc/device_memory.cpp` into a result, freeing it.
fn checked(error: *mut c_char, device: usize) -> Result<(), DeviceMemoryError> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from strdup, freed once.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { free(error.cast()) };
    Err(DeviceMemoryError { device, message })
}

/// The GPUs torch sees (none on a CPU-only libtorch or a machine without one).
fn devices() -> std::ops::Range<usize> {
    // SAFETY: no arguments; the C++ side catches its exceptions.
    if unsafe { alignment_cuda_available() } == 0 {
        return 0..0;
    }
    // SAFETY: as above.
    0..unsafe { alignment_cuda_device_count() }.max(0) as usize
}

/// GPU `device`'s allocator statistics.
pub fn device_memory(device: usize) -> Result<DeviceMemory, DeviceMemoryError> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has room for the four values the C++ side writes.
    checked(unsafe { alignment_cuda_memory_stats(device as c_int, out.as_mut_ptr()) }, device)?;
    let bytes = |v: i64| v.max(0) as u64;
    Ok(DeviceMemory { allocated: bytes(out[0]), peak_allocated: bytes(out[1]), reserved: bytes(out[2]), peak_reserved: bytes(out[3]) })
}

/// Every GPU this process has taken memory on, with its statistics: in a multi-process run, each
/// rank's own GPU. Empty where torch sees no GPU.
pub fn used_devices() -> Result<Vec<(usize, DeviceMemory)>, DeviceMemoryError> {
    let mut used = Vec::new();
    for device in devices() {
        let memory = device_memory(device)?;
        if memory.peak_reserved > 0 {
            used.push((device, memory));
        }
    }
    Ok(used)
}

/// Starts every GPU's peaks again from what is held now (`torch.cuda.reset_peak_memory_stats`),
/// so that a later [`device_memory`] measures what came after (the steps, not the setup).
pub fn reset_peaks() -> Result<(), DeviceMemoryError> {
    for device in devices() {
        // SAFETY: a device index torch reported; the C++ side catches its exceptions.
        checked(unsafe { alignment_cuda_reset_peak_memory(device as c_int) }, device)?;
    }
    Ok(())
}

/// One line for a log: each used GPU's peak allocated and reserved memory, `None` where there
/// is none (torch sees no GPU, or this process used none).
pub fn summary() -> Option<String> {
    let mib = |b: u64| b as f64 / 1048576.0;
    match used_devices() {
        Ok(used) if used.is_empty() => None,
        Ok(used) => Some(
            used.iter()
                .map(|(device, m)| {
                    format!(
                        "GPU {device}: peak {:.0} MiB allocated, {:.0} MiB reserved (torch's allocator)",
                        mib(m.peak_allocated),
                        mib(m.peak_reserved)
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_follow_a_tensor_on_a_gpu_and_report_nothing_without_one() {
        // The tests run on torch's CPU: torch sees no GPU, so nothing is used and nothing fails.
        // On a machine with one, the device run (bench_train) reads these counters instead.
        if tch::Cuda::is_available() {
            let before = device_memory(0).expect("statistics of GPU 0");
            let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
            let after = device_memory(0).expect("statistics of GPU 0");
            assert!(after.allocated >= before.allocated + (4 << 20), "{before:?} → {after:?}");
            drop(t);
            reset_peaks().expect("resetting the peaks");
            let reset = device_memory(0).expect("statistics of GPU 0");
            assert_eq!(reset.peak_allocated, reset.allocated);
        } else {
            assert_eq!(devices(), 0..0);
            assert!(used_devices().expect("no GPU, no error").is_empty());
            assert!(summary().is_none());
            reset_peaks().expect("no GPU: nothing to reset");
        }
    }
}
