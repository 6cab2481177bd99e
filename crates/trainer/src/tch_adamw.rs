//! AdamW on libtorch (`--features tch`) as torch's fused kernel: one pass per parameter that
//! updates the parameter and both moments in place (`torch.optim.AdamW(fused=True)`'s
//! `torch._fused_adamw_`, on the CPU or the GPU), instead of the dozen out-of-place torch calls
//! of the tensor formulation (`optimizer::adamw_on_tensors`), each a pass over the parameter's
//! memory. tch does not wrap `_fused_adamw_`: `csrc/fused_adamw.cpp` is the one C++ entry, built
//! by `build.rs` against torch-sys's libtorch.
//!
//! Same update as the tensor formulation (the test below, to f32 rounding: torch computes the
//! bias corrections in double), so checkpoints move between the two. Tensors shared with
//! something else (burn-tch's storage count) are copied first, so nothing else sees the update.

use crate::optimizer::{AdamWConfig, Moments};
use alignment_core::backend::retype;
use burn::backend::libtorch::{LibTorch, TchTensor};
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use std::ffi::{c_char, c_void, CStr};

type Torch = LibTorch<f32>;

extern "C" {
    /// `csrc/fused_adamw.cpp`; the tensors are `at::Tensor*`, what tch's handles point to.
    fn alignment_fused_adamw(
        param: *mut c_void,
        grad: *mut c_void,
        exp_avg: *mut c_void,
        exp_avg_sq: *mut c_void,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn free(ptr: *mut c_void);
}

/// Whether `B` is the libtorch backend (f32) this update is written for.
pub(crate) fn applies<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<Torch>()
}

/// The torch tensor under `tensor`, contiguous, and when `writable` held by nothing else (copied
/// when shared), so it can be updated in place.
fn torch_tensor<B: Backend, const D: usize>(tensor: Tensor<B, D>, writable: bool) -> tch::Tensor {
    let primitive: TchTensor = retype::<_, Tensor<Torch, D>>(tensor).into_primitive().tensor();
    let shared = !primitive.can_mut();
    let t = primitive.tensor;
    let t = if writable && shared { t.copy() } else { t };
    if t.is_contiguous() {
        t
    } else {
        t.contiguous()
    }
}

fn wrap<B: Backend, const D: usize>(t: tch::Tensor) -> Tensor<B, D> {
    retype(Tensor::<Torch, D>::from_primitive(TensorPrimitive::Float(TchTensor::new(t))))
}

/// `p` after one AdamW update (step `t`, learning rate `lr`, decay when `decays`) with its
/// clipped, flattened gradient, and the new moments: `optimizer::adamw_on_tensors`'s contract.
/// Only for `B = LibTorch<f32>` (see [`applies`]).
pub(crate) fn update<B: Backend, const D: usize>(
    p: Tensor<B, D>,
    g_flat: Tensor<B, 1>,
    moments: Moments<B>,
    c: &AdamWConfig,
    lr: f64,
    t: i32,
    decays: bool,
) -> (Tensor<B, D>, Moments<B>) {
    let (mut p, mut g) = (torch_tensor(p, true), torch_tensor(g_flat, false));
    let (mut m, mut v) = (torch_tensor(moments.exp_avg, true), torch_tensor(moments.exp_avg_sq, true));
    let weight_decay = if decays { c.weight_decay } else { 0.0 };
    // SAFETY: the four pointers are the at::Tensor handles of live tch tensors owned here; the
    // call reads g and updates p, m and v in place, none of which anything else holds.
    let error = unsafe {
        alignment_fused_adamw(
            p.as_mut_ptr().cast(),
            g.as_mut_ptr().cast(),
            m.as_mut_ptr().cast(),
            v.as_mut_ptr().cast(),
            f64::from(t),
            lr,
            c.beta1,
            c.beta2,
            weight_decay,
            c.epsilon,
        )
    };
    if !error.is_null() {
        // SAFETY: a NUL-terminated string from strdup, freed once.
        let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
        unsafe { free(error.cast()) };
        panic!("torch's fused AdamW failed: {message}");
    }
    (wrap(p), Moments { exp_avg: wrap(m), exp_avg_sq: wrap(v) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{adamw_on_tensors, AdamWScalars};
    use burn::backend::libtorch::LibTorchDevice;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<Torch, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn max_relative(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn fused_kernel_equals_the_tensor_operations_and_leaves_shared_tensors_alone() {
        let device = LibTorchDevice::Cpu;
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        for (t, decays) in [(1, true), (7, false), (1000, true)] {
            let p = Tensor::<Torch, 2>::random([37, 129], Distribution::Normal(0.0, 1.0), &device);
            // A transposed gradient, flattened as the optimizer hands it over.
            let g = Tensor::<Torch, 2>::random([129, 37], Distribution::Normal(0.0, 0.1), &device).transpose();
            let n = 37 * 129;
            let m = Tensor::<Torch, 1>::random([n], Distribution::Normal(0.0, 0.01), &device);
            let v = Tensor::<Torch, 1>::random([n], Distribution::Uniform(0.0, 0.001), &device);
            let (p_before, m_before) = (values(p.clone()), values(m.clone()));

            let s = AdamWScalars::new(&config, 3e-4, t, decays);
            let moments = Moments { exp_avg: m.clone(), exp_avg_sq: v.clone() };
            let (p_ref, m_ref) = adamw_on_tensors(p.clone(), g.clone().reshape([n]), moments, &s, &[]);
            // `p` and `m` are still held here (clones share their storage): the update must copy them.
            let (p_fused, m_fused) =
                update(p.clone(), g.reshape([n]), Moments { exp_avg: m.clone(), exp_avg_sq: v }, &config, 3e-4, t, decays);

            assert_eq!(values(p), p_before, "a tensor sharing the parameter's storage was changed");
            assert_eq!(values(m), m_before, "a tensor sharing exp_avg's storage was changed");
            let (a, b) = (values(p_fused), values(p_ref));
            assert!(a != p_before, "step {t}: the parameter did not move");
            // Relative to the update's size, not the parameter's: the update is what may differ.
            let delta: Vec<f32> = a.iter().zip(&p_before).map(|(x, y)| x - y).collect();
            let delta_ref: Vec<f32> = b.iter().zip(&p_before).map(|(x, y)| x - y).collect();
            assert!(max_relative(&delta, &delta_ref) < 1e-3, "step {t}: update {}", max_relative(&delta, &delta_ref));
            assert!(max_relative(&a, &b) < 1e-6, "step {t}: parameters {}", max_relative(&a, &b));
            assert!(max_relative(&values(m_fused.exp_avg), &values(m_ref.exp_avg)) < 1e-6, "step {t}: exp_avg");
            assert!(max_relative(&values(m_fused.exp_avg_sq), &values(m_ref.exp_avg_sq)) < 1e-6, "step {t}: exp_avg_sq");
        }
    }
}
