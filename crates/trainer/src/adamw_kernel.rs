//! AdamW's update as one CubeCL kernel per parameter on burn's GPU backends (`cuda`, `wgpu`),
//! updating the parameter and its moments in place, as PyTorch's fused AdamW does.
//!
//! The tensor formulation (`optimizer::adamw_on_tensors`) runs, under burn's fusion, as about
//! four kernels per parameter (the clipping product, the decay, the moments, the update: seen in
//! CubeCL's profile on lavapipe), each reading and writing whole tensors into new buffers. Here
//! one thread per element reads the gradient, the clipping factor, the parameter and both
//! moments once and writes the three back over themselves: 20 bytes read and 12 written per f32
//! element, no allocation. The arithmetic is [`crate::optimizer::adamw_on_slices`']s, element by
//! element in its order, in f32 (a bf16 parameter and moments are read into f32 and rounded once
//! when written, where the tensor operations round every intermediate).
//!
//! A parameter or moment another handle shares (or a strided view) is copied first, so no other
//! tensor sees the update. Like `models::nf4_kernel`, the inputs are taken out of the fusion
//! stream and the results registered back into it (`alignment_core::fused_product::register`).

use crate::optimizer::{AdamWScalars, Moments};
use alignment_core::backend::{retype, visit_fused_cube, FusedCubeVisitor};
use alignment_core::cube_rows::writable;
use alignment_core::env_switch::EnvSwitch;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, CubeDim};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;

/// The kernel, in CubeCL's language (its `Tensor` is a kernel argument, not burn's).
mod kernel {
    // The `#[cube]` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// One thread per element: `adamw_on_slices`' loop body. `clip` holds one value (1 without
    /// clipping); `decays` is whether the parameter takes weight decay (`decay = lr · wd`).
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_update<F: Float>(
        param: &mut Tensor<F>,
        grad: &Tensor<F>,
        exp_avg: &mut Tensor<F>,
        exp_avg_sq: &mut Tensor<F>,
        clip: &Tensor<F>,
        decay: f32,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        sqrt_bias2: f32,
        epsilon: f32,
        step_size: f32,
        #[comptime] decays: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= param.len() {
            terminate!();
        }
        let g = f32::cast_from(grad[i]) * f32::cast_from(clip[0]);
        let mut p = f32::cast_from(param[i]);
        if decays {
            p = p - p * decay;
        }
        let m = f32::cast_from(exp_avg[i]) * beta1 + g * one_minus_beta1;
        let v = f32::cast_from(exp_avg_sq[i]) * beta2 + (g * g) * one_minus_beta2;
        let denom = v.sqrt() / sqrt_bias2 + epsilon;
        param[i] = F::cast_from(p - (m / denom) * step_size);
        exp_avg[i] = F::cast_from(m);
        exp_avg_sq[i] = F::cast_from(v);
    }
}

/// Launches the kernel over `param`'s elements, updating `param`, `exp_avg` and `exp_avg_sq`
/// (made [`writable`] first) and returning them.
fn launch<R: CubeRuntime>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    moments: [CubeTensor<R>; 2],
    clip: CubeTensor<R>,
    s: &AdamWScalars,
) -> [CubeTensor<R>; 3] {
    let dtype = param.dtype;
    let same_type = |t: CubeTensor<R>| burn_cubecl::kernel::cast(t, dtype);
    let [exp_avg, exp_avg_sq] = moments.map(|m| writable(same_type(m)));
    let param = writable(param);
    let (grad, clip) = (burn_cubecl::kernel::into_contiguous(same_type(grad)), burn_cubecl::kernel::into_contiguous(same_type(clip)));
    // What makes the unchecked launch safe: every tensor holds the parameter's element count
    // (the clipping factor one value), laid out row-major.
    let len = |t: &CubeTensor<R>| t.meta.shape().num_elements();
    let elements = len(&param);
    for (name, t) in [("gradient", &grad), ("exp_avg", &exp_avg), ("exp_avg_sq", &exp_avg_sq)] {
        assert_eq!(len(t), elements, "AdamW: the {name} has {} elements for a parameter of {elements}", len(t));
    }
    assert_eq!(len(&clip), 1, "AdamW: one clipping factor");
    let client = param.client.clone();
    let cube_dim = CubeDim::new(&client, elements);
    let cube_count = calculate_cube_count_elemwise(&client, elements, cube_dim);
    let address_type = [&param, &grad, &exp_avg, &exp_avg_sq].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
    // SAFETY: `i < param.len()` is checked in the kernel; the other tensors hold as many
    // contiguous elements and `clip` one (asserted above).
    unsafe {
        kernel::adamw_update::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type,
            param.clone().into_tensor_arg(),
            grad.into_tensor_arg(),
            exp_avg.clone().into_tensor_arg(),
            exp_avg_sq.clone().into_tensor_arg(),
            clip.into_tensor_arg(),
            s.decay.unwrap_or(0.0),
            s.beta1,
            s.one_minus_beta1,
            s.beta2,
            s.one_minus_beta2,
            s.sqrt_bias2,
            s.epsilon,
            s.step_size,
            s.decay.is_some(),
            dtype.into(),
        );
    }
    [param, exp_avg, exp_avg_sq]
}

/// A fused CubeCL backend (`Fusion<CubeBackend<…>>`), and the kernel on it.
trait FusedCube: Backend {
    fn update<const D: usize>(
        p: Tensor<Self, D>,
        grad: Tensor<Self, D>,
        clip: Tensor<Self, 1>,
        moments: Moments<Self>,
        s: &AdamWScalars,
    ) -> (Tensor<Self, D>, Moments<Self>);
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedCube for Fusion<CubeBackend<R, F, I, BT>> {
    fn update<const D: usize>(
        p: Tensor<Self, D>,
        grad: Tensor<Self, D>,
        clip: Tensor<Self, 1>,
        moments: Moments<Self>,
        s: &AdamWScalars,
    ) -> (Tensor<Self, D>, Moments<Self>) {
        type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;
        let p = p.into_primitive().tensor();
        let client = p.client.clone();
        let resolve = |t| client.resolve_tensor_float::<Cube<R, F, I, BT>>(t);
        let param = resolve(p);
        let grad = resolve(grad.into_primitive().tensor());
        let clip = resolve(clip.into_primitive().tensor());
        let moments = [moments.exp_avg, moments.exp_avg_sq].map(|m| resolve(m.into_primitive().tensor()));
        let [param, exp_avg, exp_avg_sq] = launch(param, grad, moments, clip, s);
        let register = |t| TensorPrimitive::Float(alignment_core::fused_product::register::<R, F, I, BT>(&client, t));
        let moments =
            Moments { exp_avg: Tensor::from_primitive(register(exp_avg)), exp_avg_sq: Tensor::from_primitive(register(exp_avg_sq)) };
        (Tensor::from_primitive(register(param)), moments)
    }
}

/// Whether the one-process step updates with the kernel on `B`: `B` is one of the fused CubeCL
/// backends this crate is built with, and `ALIGNMENT_ADAMW_KERNEL=0` does not keep the tensor
/// operations (for measuring one against the other).
pub(crate) fn enabled<B: Backend>() -> bool {
    static KERNEL: EnvSwitch = EnvSwitch::new("ALIGNMENT_ADAMW_KERNEL");
    alignment_core::backend::is_fused_cube::<B>() && KERNEL.is_on()
}

/// `p` after one AdamW update with the raw gradient `grad` times the `[1]` clipping factor
/// `clip` (ones without clipping), and the new moments, by the kernel. Only where [`enabled`].
pub(crate) fn update<B: Backend, const D: usize>(
    p: Tensor<B, D>,
    grad: Tensor<B, D>,
    clip: Tensor<B, 1>,
    moments: Moments<B>,
    s: &AdamWScalars,
) -> (Tensor<B, D>, Moments<B>) {
    /// The call, for the backend's parts.
    struct Update<'a, B: Backend, const D: usize> {
        p: Tensor<B, D>,
        grad: Tensor<B, D>,
        clip: Tensor<B, 1>,
        moments: Moments<B>,
        s: &'a AdamWScalars,
    }
    impl<B: Backend, const D: usize> FusedCubeVisitor for Update<'_, B, D> {
        type Output = (Tensor<B, D>, Moments<B>);
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> Self::Output {
            type Fused<R, F, I, BT> = Fusion<CubeBackend<R, F, I, BT>>;
            let moments = Moments { exp_avg: retype(self.moments.exp_avg), exp_avg_sq: retype(self.moments.exp_avg_sq) };
            let (p, moments) = Fused::<R, F, I, BT>::update::<D>(retype(self.p), retype(self.grad), retype(self.clip), moments, self.s);
            (retype(p), Moments { exp_avg: retype(moments.exp_avg), exp_avg_sq: retype(moments.exp_avg_sq) })
        }
    }
    match visit_fused_cube::<B, _>(Update { p, grad, clip, moments, s }) {
        Ok(updated) => updated,
        Err(_) => unreachable!("adamw_kernel::update on a backend where it does not apply"),
    }
}
