//! Mixed precision (`bf16: true`): matrix products in a half-precision type, everything else in
//! the tensors' own f32, as `torch.autocast` does for the Hugging Face Trainer.
//!
//! ```text
//! a · b  →  (a as bf16) · (b as bf16)  →  as f32
//! ```
//! The parameters stay f32 (the master weights), so their gradients and the AdamW moments are
//! f32 too: the backward step of each cast brings its gradient back to the operand's type. The
//! norms, the softmax, the residual stream and the loss never leave f32. The gated MLP's
//! intermediate (the gate and up projections, the activation and their product) stays in the
//! half type between its products, as autocast leaves it ([`matmul_as`], `models::Mlp`): the
//! largest activations of a step, halved in memory and traffic. Attention's probabilities on
//! burn's decomposition are f32 (libtorch's fused attention keeps them in the half type).
//!
//! A backend without arithmetic in the half type (burn-ndarray) cannot run this: callers ask
//! [`supported`] first and say when they compute in f32 instead.

use crate::gemm::matmul;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

/// `a · b` (burn's batched `matmul`, by cuBLAS on burn-cuda: [`crate::gemm`]) computed in `dtype`: both operands cast to it and the
/// product cast back to `a`'s type. `None`, or `a` already of that type: a plain `matmul`.
pub fn matmul_in<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>, dtype: Option<FloatDType>) -> Tensor<B, D> {
    let out = a.dtype();
    match dtype {
        Some(compute) if out != DType::from(compute) => cast_to(matmul_as(a, b, dtype), out.into()),
        _ => matmul(a, b),
    }
}

/// `a · b` computed in `dtype` and left in it: both operands cast to it (when not already of
/// it), no cast back. For a product whose consumer computes in the half type too, as autocast
/// returns a linear layer's output in bf16. `None`: a plain `matmul`.
pub fn matmul_as<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>, dtype: Option<FloatDType>) -> Tensor<B, D> {
    match dtype {
        Some(compute) => matmul(cast_to(a, compute), cast_to(b, compute)),
        None => matmul(a, b),
    }
}

/// `t` in `dtype`; `t` itself when already of it (under autodiff a cast is a recorded step even
/// when it changes nothing).
pub fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.dtype() == DType::from(dtype) {
        t
    } else {
        t.cast(dtype)
    }
}

/// `B`'s own float type (its `FloatElem`): f32 under mixed precision, the type a loss computes
/// in when the logits arrive in the half type.
pub fn float_type<B: Backend>() -> FloatDType {
    <B::FloatElem as burn::tensor::Element>::dtype().into()
}

/// Whether `B` on `device` has general arithmetic (and matrix products) in `dtype`.
pub fn supported<B: Backend>(dtype: FloatDType, device: &B::Device) -> bool {
    B::supports_dtype(device, dtype.into())
}

/// The half type a mixed-precision step on `B` computes its products in: bf16 where the backend
/// has it (CUDA), else f16 (e.g. Vulkan through wgpu), else `None` (the CPU backend).
pub fn half_type<B: Backend>(device: &B::Device) -> Option<FloatDType> {
    [FloatDType::BF16, FloatDType::F16].into_iter().find(|&dtype| supported::<B>(dtype, device))
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    #[test]
    fn products_in_another_type_come_back_in_the_operands_type_with_their_gradients() {
        let device = Default::default();
        let a = Tensor::<CpuAutodiff, 3>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let b = Tensor::<CpuAutodiff, 3>::random([2, 5, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
        // f64 stands for the half type here: the CPU backend has no bf16, and the path (casts in
        // the forward pass, their backward steps) is the same.
        let mixed = matmul_in(a.clone(), b.clone(), Some(FloatDType::F64));
        let plain = a.clone().matmul(b.clone());
        assert_eq!(mixed.dtype(), DType::F32);
        mixed.clone().into_data().assert_approx_eq::<f32>(&plain.into_data(), burn::tensor::Tolerance::absolute(1e-5));
        let grads = (mixed * 0.5).sum().backward();
        let (ga, gb) = (a.grad(&grads).unwrap(), b.grad(&grads).unwrap());
        assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::F32), "gradients come back in the parameters' type");
        let expected_ga = Tensor::<Cpu, 3>::ones([2, 3, 4], &device).matmul(b.inner().swap_dims(1, 2)) * 0.5;
        ga.into_data().assert_approx_eq::<f32>(&expected_ga.into_data(), burn::tensor::Tolerance::absolute(1e-5));
        assert_eq!(gb.dims(), [2, 5, 4]);
    }

    #[test]
    fn the_cpu_backend_has_no_half_type() {
        assert_eq!(half_type::<Cpu>(&Default::default()), None);
        assert!(supported::<Cpu>(FloatDType::F64, &Default::default()));
    }
}
