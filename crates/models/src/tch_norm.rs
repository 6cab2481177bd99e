//! RMSNorm on burn's libtorch backend as one torch call, `torch._fused_rms_norm` (one kernel
//! forward and one backward on CUDA; torch's own decomposition elsewhere), its backward pass
//! computed by torch's autograd inside one recorded burn step (`crate::tch_op::record`).
//!
//! burn's autodiff runs `x / sqrt(mean(x²) + eps) · scale` as six kernels forward and about
//! fifteen backward, and keeps the normalised f32 activations of every norm for the backward
//! pass; the fused kernel reads `x` once each way and keeps only `x` and one inverse RMS per row.
//! Only for `LibTorch<f32>` and `LibTorch<bf16>` and their autodiff: any other backend gets its
//! tensors back.

use alignment_core::backend::retype;
use burn::backend::libtorch::{LibTorch, TchTensor};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, bf16, Tensor, TensorPrimitive};
use std::any::TypeId;

/// `x / sqrt(mean(x², last dim) + eps) · scale` for `x: [batch, seq, hidden]` and
/// `scale: [hidden]` on the libtorch backends; the tensors back on any other.
pub(crate) fn rms_norm<B: Backend>(x: Tensor<B, 3>, scale: Tensor<B, 1>, eps: f64) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 1>)> {
    let hidden = x.dims()[2] as i64;
    let run = move |[x, scale]: &[tch::Tensor; 2]| x.internal_fused_rms_norm([hidden], Some(scale), eps).0;
    macro_rules! on {
        ($e:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<LibTorch<$e>>>() {
                type Train = Autodiff<LibTorch<$e>>;
                let x = retype::<_, Tensor<Train, 3>>(x).into_primitive().tensor();
                let scale = retype::<_, Tensor<Train, 1>>(scale).into_primitive().tensor();
                let out = crate::tch_op::record([x, scale], run);
                return Ok(retype(Tensor::<Train, 3>::from_primitive(TensorPrimitive::Float(out))));
            }
            if TypeId::of::<B>() == TypeId::of::<LibTorch<$e>>() {
                let x = retype::<_, Tensor<LibTorch<$e>, 3>>(x).into_primitive().tensor().tensor;
                let scale = retype::<_, Tensor<LibTorch<$e>, 1>>(scale).into_primitive().tensor().tensor;
                let out = tch::no_grad(|| run(&[x, scale]));
                return Ok(retype(Tensor::<LibTorch<$e>, 3>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)))));
            }
        };
    }
    on!(f32);
    on!(bf16);
    Err((x, scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type Train = Autodiff<LibTorch<f32>>;

    /// burn's decomposition, as `RmsNorm::forward` runs it on every other backend.
    fn decomposed(x: Tensor<Train, 3>, scale: Tensor<Train, 1>, eps: f64) -> Tensor<Train, 3> {
        let mean_square = x.clone().square().mean_dim(2);
        x * (mean_square + eps).sqrt().recip() * scale.unsqueeze::<3>()
    }

    fn max_relative<const D: usize>(a: Tensor<LibTorch<f32>, D>, b: Tensor<LibTorch<f32>, D>) -> f32 {
        let scale = b.clone().abs().max().into_scalar().max(1e-6);
        (a - b).abs().max().into_scalar() / scale
    }

    #[test]
    fn the_fused_norm_equals_the_decomposition_with_its_gradients() {
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let eps = 1e-5;
        let x = Tensor::<Train, 3>::random([2, 5, 12], Distribution::Normal(0.0, 2.0), &device);
        let weight = Tensor::<Train, 1>::random([12], Distribution::Normal(0.0, 1.0), &device);
        let upstream = Tensor::<Train, 3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
        // Gemma's `1 + w` as well as the plain weight: the scale's gradient reaches `w` through burn.
        for unit_offset in [false, true] {
            let run = |fused: bool| {
                let (x, w) = (x.clone().require_grad(), weight.clone().require_grad());
                let scale = if unit_offset { w.clone() + 1.0 } else { w.clone() };
                // As in a decoder layer, `h + f(norm(h))`: once the norm has its input, burn-tch
                // holds the residual's storage through one handle and would add into it in
                // place, over the input torch's graph saved.
                let h = x.clone() * 1.5;
                let out = if fused {
                    rms_norm(h.clone(), scale, eps).unwrap_or_else(|_| panic!("libtorch takes the fused path"))
                } else {
                    decomposed(h.clone(), scale, eps)
                };
                let y = h + out.clone() * upstream.clone();
                let grads = y.sum().backward();
                (out.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
            };
            let ((out, dx, dw), (out_ref, dx_ref, dw_ref)) = (run(true), run(false));
            // Inference (no autodiff) takes the same call.
            let scale = if unit_offset { weight.clone().inner() + 1.0 } else { weight.clone().inner() };
            let inference = rms_norm(x.clone().inner() * 1.5, scale, eps).unwrap_or_else(|_| panic!("fused"));
            assert_eq!(max_relative(inference, out.clone()), 0.0, "inference and training give the same output");
            for (name, difference) in
                [("out", max_relative(out, out_ref)), ("∂x", max_relative(dx, dx_ref)), ("∂w", max_relative(dw, dw_ref))]
            {
                assert!(difference <= 1e-5, "unit offset {unit_offset}: {name} differs by {difference}");
            }
        }
    }

    /// Only the inputs burn tracks are asked for a gradient (a frozen weight under LoRA; an
    /// untracked input beside a trained weight), and each gradient reaches its own input.
    #[test]
    fn only_tracked_inputs_get_gradients_each_its_own() {
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let x = Tensor::<Train, 3>::random([2, 5, 12], Distribution::Normal(0.0, 2.0), &device);
        let weight = Tensor::<Train, 1>::random([12], Distribution::Normal(0.0, 1.0), &device);
        let upstream = Tensor::<Train, 3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
        for (track_x, track_w) in [(true, false), (false, true)] {
            let run = |fused: bool| {
                let x = if track_x { x.clone().require_grad() } else { x.clone() };
                let w = if track_w { weight.clone().require_grad() } else { weight.clone() };
                let out = if fused {
                    rms_norm(x.clone(), w.clone(), 1e-5).unwrap_or_else(|_| panic!("libtorch takes the fused path"))
                } else {
                    decomposed(x.clone(), w.clone(), 1e-5)
                };
                let grads = (out * upstream.clone()).sum().backward();
                (x.grad(&grads), w.grad(&grads))
            };
            let ((dx, dw), (dx_ref, dw_ref)) = (run(true), run(false));
            assert_eq!((dx.is_some(), dw.is_some()), (track_x, track_w), "gradients exactly for the tracked inputs");
            if let (Some(dx), Some(dx_ref)) = (dx, dx_ref) {
                assert!(max_relative(dx, dx_ref) <= 1e-5, "∂x with a frozen weight");
            }
            if let (Some(dw), Some(dw_ref)) = (dw, dw_ref) {
                assert!(max_relative(dw, dw_ref) <= 1e-5, "∂w with an untracked input");
            }
        }
    }
}
