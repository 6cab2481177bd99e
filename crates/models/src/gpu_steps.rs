//! Where the recorded steps written for GPU memory run (`blocked_attention`, `recorded_norm`):
//! under the autodiff of burn's GPU backends built into this crate. Each keeps less for the
//! backward pass than burn's operations would, and recomputes the rest there; on the CPU,
//! memory is plentiful and the recomputation would only cost time, and libtorch has torch's
//! own fused kernels (`tch_attention`, `tch_norm`).

use alignment_core::env_switch::EnvSwitch;
use burn::tensor::backend::Backend;

/// `ALIGNMENT_GPU_STEPS=0` runs attention and the norms by burn's operations on the GPU backends
/// too: to measure the recorded steps against them, or to tell whether a wrong result on a device
/// comes from them (`scripts/gpu/device_run.sh cuda-bisect`).
static GPU_STEPS: EnvSwitch = EnvSwitch::new("ALIGNMENT_GPU_STEPS");

/// Whether `B` is the autodiff of `cuda`, `cuda-bf16` or `wgpu`, as built into this crate, and
/// the steps are not switched off.
pub(crate) fn applies<B: Backend>() -> bool {
    alignment_core::backend::is_fused_cube_autodiff::<B>() && GPU_STEPS.is_on()
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    #[test]
    fn the_cpu_keeps_burns_operations() {
        assert!(!super::applies::<alignment_core::backend::CpuAutodiff>());
    }
}
