//! The gated MLP's activation and down projection under mixed precision, `y = (silu(g) · u) · Wᵀ`,
//! as one recorded step of burn's autodiff that keeps `g` and `u` (and a handle to the
//! parameter `W`), not their product `h`:
//!
//! ```text
//! forward:   h = silu(g) · u;  y = h · (W as half)ᵀ                    [y as the model's float type]
//! backward:  s = silu(g);  h = s · u again;  ∂W = (∂y as half)ᵀ · h  as W's type
//!            ∂h = (∂y as half) · (W as half);  ∂g, ∂u from ∂h as the gate's own step (`gate`),
//!            ∂u = ∂h · s reusing s
//! ```
//!
//! As two steps (`gate`'s, then `half_product`'s), the gate kept `g` and `u` and the product kept
//! its half-type input `h` for `∂W`: three `[tokens, intermediate]` tensors a layer, the largest
//! activations of a step. Recomputing `h` in the backward pass (one element-wise kernel) drops
//! the third: 64 MiB a layer for Llama-3.2-1B at 4 × 1024 tokens, 1 GiB a step. The values are
//! the two steps', bit for bit: the same kernels on the same operands. Only for a dense down
//! projection without an adapter (a LoRA adapter keeps `h` for its own gradient anyway).
//! `ALIGNMENT_GATED_DOWN_STEP=0` runs the two steps, for measuring.

use crate::half_product::{cast, rows};
use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::gemm::float_matmul;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, DType, FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive};

/// `(silu(gate) · up) · weightᵀ` for `gate, up: [batch, seq, intermediate]` in `half` and the
/// parameter `weight: [hidden, intermediate]`, the result in the model's float type: one recorded
/// step when `B` is the autodiff of a backend built into this crate and `half` is narrower than
/// its float type; the tensors back otherwise (and with the switch off).
#[allow(clippy::type_complexity)]
pub(crate) fn silu_gate_down<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    half: FloatDType,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 2>)> {
    static STEP: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_GATED_DOWN_STEP");
    let half_type = DType::from(half);
    let applies = STEP.is_on()
        && alignment_core::precision::float_type::<B>() != half
        && gate.dims() == up.dims()
        && gate.dtype() == half_type
        && up.dtype() == half_type
        && gate.dims()[2] == weight.dims()[1];
    if !applies {
        return Err((gate, up, weight));
    }
    visit_autodiff::<B, _>(Recorded { gate, up, weight, half }).map_err(|r| (r.gate, r.up, r.weight))
}

/// The step's inputs on the caller's backend `B`.
struct Recorded<B: Backend> {
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    half: FloatDType,
}

impl<B: Backend> AutodiffVisitor for Recorded<B> {
    type Output = Tensor<B, 3>;

    fn visit<I: Backend>(self) -> Tensor<B, 3> {
        let g = retype::<_, Tensor<Autodiff<I>, 3>>(self.gate).into_primitive().tensor();
        let u = retype::<_, Tensor<Autodiff<I>, 3>>(self.up).into_primitive().tensor();
        let w = retype::<_, Tensor<Autodiff<I>, 2>>(self.weight).into_primitive().tensor();
        let half = self.half;
        let [batch, seq, _] = g.primitive.shape().dims::<3>();
        let out_features = w.primitive.shape().dims::<2>()[0];
        let float_type = alignment_core::precision::float_type::<I>();
        let forward = |g: FloatTensor<I>, u: FloatTensor<I>, w: FloatTensor<I>| {
            let h = crate::gate::forward::<I>(g, u);
            let y = float_matmul::<I>(rows::<I>(h), I::float_transpose(cast::<I>(w, half)));
            cast::<I>(I::float_reshape(y, Shape::new([batch, seq, out_features])), float_type)
        };
        // The inputs stay held until the step is registered: a backward pass on any thread frees
        // the graph's nodes that no tensor holds.
        let held = (g.rc.clone(), u.rc.clone(), w.rc.clone());
        let prepared = <GatedDownBackward as Backward<I, 3>>::prepare::<NoCheckpointing>(
            GatedDownBackward,
            [g.node.clone(), u.node.clone(), w.node.clone()],
        );
        let y = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = forward(g.primitive.clone(), u.primitive.clone(), w.primitive.clone());
                prep.finish(GatedDownState { gate: g.primitive, up: u.primitive, weight: w.primitive, half }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(g.primitive, u.primitive, w.primitive)),
        };
        drop(held);
        retype(Tensor::<Autodiff<I>, 3>::from_primitive(TensorPrimitive::Float(y)))
    }
}

/// What the backward pass keeps: `g` and `u` (half type), the parameter (a handle to the model's
/// own tensor) and the half type.
#[derive(Clone, Debug)]
struct GatedDownState<I: Backend> {
    gate: FloatTensor<I>,
    up: FloatTensor<I>,
    weight: FloatTensor<I>,
    half: FloatDType,
}

#[derive(Debug)]
struct GatedDownBackward;

impl<I: Backend> Backward<I, 3> for GatedDownBackward {
    type State = GatedDownState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let GatedDownState { gate: g, up: u, weight, half } = ops.state;
        let [g_node, u_node, w_node] = ops.parents;
        let shape = g.shape().dims::<3>();
        let weight_type: FloatDType = weight.dtype().into();
        let dy = rows::<I>(cast::<I>(grads.consume::<I>(&ops.node), half));
        // silu(g) once, for h and for ∂u.
        let silu = crate::gate::silu::<I>(g.clone());
        if let Some(node) = w_node {
            let h = I::float_mul(silu.clone(), u.clone());
            let dw = float_matmul::<I>(I::float_transpose(dy.clone()), rows::<I>(h));
            grads.register::<I>(node.id, cast::<I>(dw, weight_type));
        }
        if g_node.is_some() || u_node.is_some() {
            let dh = float_matmul::<I>(dy, cast::<I>(weight, half));
            let dh = I::float_reshape(dh, Shape::new(shape));
            let (dg, du) = crate::gate::backward_given_silu::<I>(g, u, dh, Some(silu));
            if let Some(node) = g_node {
                grads.register::<I>(node.id, dg);
            }
            if let Some(node) = u_node {
                grads.register::<I>(node.id, du);
            }
        }
    }
}

// The checks run on the CPU backend and on torch's CPU.
#[cfg(all(test, any(feature = "ndarray", feature = "tch")))]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type T3<I> = Tensor<Autodiff<I>, 3>;
    type T2<I> = Tensor<Autodiff<I>, 2>;

    /// Output and gradients of `Σ y ⊙ r` for the recorded step against the two steps it replaces
    /// (the gate's, then the down projection's half-type product), for every combination of
    /// tracked inputs; the largest relative difference. Types are checked equal.
    fn against_the_two_steps<I: Backend>(device: &I::Device, half: FloatDType) -> f32 {
        let g = T3::<I>::random([2, 3, 16], Distribution::Normal(0.0, 3.0), device).cast(half);
        let u = T3::<I>::random([2, 3, 16], Distribution::Normal(0.0, 1.0), device).cast(half);
        let w = T2::<I>::random([5, 16], Distribution::Normal(0.0, 1.0), device);
        let r = T3::<I>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), device);
        let relative = crate::test_support::max_relative_difference::<I, 3>;
        let mut worst = 0f32;
        for (track_g, track_u, track_w) in [(true, true, true), (true, true, false), (false, false, true), (true, false, true)] {
            let run = |f: &dyn Fn(T3<I>, T3<I>, T2<I>) -> T3<I>| {
                let g = if track_g { g.clone().require_grad() } else { g.clone() };
                let u = if track_u { u.clone().require_grad() } else { u.clone() };
                let w = if track_w { w.clone().require_grad() } else { w.clone() };
                let y = f(g.clone(), u.clone(), w.clone());
                let grads = (y.clone().cast(FloatDType::F32) * r.clone()).sum().backward();
                (y.inner(), g.grad(&grads), u.grad(&grads), w.grad(&grads))
            };
            let (y, dg, du, dw) =
                run(&|g, u, w| silu_gate_down(g, u, w, half).unwrap_or_else(|_| panic!("autodiff takes the recorded step")));
            let (y_ref, dg_ref, du_ref, dw_ref) =
                run(&|g, u, w| crate::layers::project_param_in(crate::model::silu_times(g, u), w, Some(half)));
            assert_eq!(y.dtype(), y_ref.dtype(), "the result's type");
            assert_eq!(
                (dg.is_some(), du.is_some(), dw.is_some()),
                (track_g, track_u, track_w),
                "a gradient exactly for each tracked input"
            );
            worst = worst.max(relative(y, y_ref));
            for (a, b) in [(dg, dg_ref), (du, du_ref)] {
                if let (Some(a), Some(b)) = (a, b) {
                    assert_eq!(a.dtype(), DType::from(half), "∂g and ∂u in the half type");
                    worst = worst.max(relative(a, b));
                }
            }
            if let (Some(a), Some(b)) = (dw, dw_ref) {
                assert_eq!(a.dtype(), DType::F32, "∂W in W's type");
                worst = worst.max(relative(a.unsqueeze(), b.unsqueeze()));
            }
        }
        worst
    }

    /// The generic path (the one CUDA and wgpu take) on the CPU backend, f64 standing for the
    /// half type (the CPU backend has no bf16).
    #[cfg(feature = "ndarray")]
    #[test]
    fn the_recorded_gate_and_down_projection_equal_the_two_steps_on_any_backend() {
        type I = burn::backend::NdArray<f32>;
        let difference = against_the_two_steps::<I>(&Default::default(), FloatDType::F64);
        assert!(difference <= 1e-6, "differs by {difference}");
    }

    /// On torch in bf16, the route of `bf16: true` on libtorch: the same kernels on the same
    /// operands, so the same bits.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_recorded_gate_and_down_projection_give_the_two_steps_bits_in_bf16() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert_eq!(against_the_two_steps::<I>(&device, FloatDType::BF16), 0.0);
    }
}
