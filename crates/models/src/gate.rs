//! The gated MLP's `silu(g) · u` as one recorded step of burn's autodiff, keeping only `g` and
//! `u` for the backward pass.
//!
//! burn computes `silu(g)` as `g · sigmoid(g)` and multiplies by `u`: its graph keeps `g`,
//! `sigmoid(g)`, `silu(g)` and `u`, four `[tokens, intermediate]` tensors per layer — the
//! largest activations of a step (PyTorch's eager `F.silu(g) * u` keeps three). Recorded as one
//! step, the backward pass recomputes the sigmoid from `g`:
//!
//! ```text
//! forward:   h  = silu(g) · u
//! backward:  ∂u = ∂h · silu(g)          ∂g = ∂h · u · s · (1 + g · (1 − s)),   s = sigmoid(g)
//! ```
//!
//! On libtorch both passes are torch's own kernels (`silu`, `silu_backward`, which compute in
//! f32 inside and round once): two kernels forward and four backward, where burn's operations
//! issue three and about seven. Elsewhere they are burn's operations on the inner backend (on
//! CUDA, fused by burn's fusion). The CPU backend runs its own threaded pass first (`cpu_gate`).

use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

/// `silu(gate) · up` as one recorded step when `B` is the autodiff of a backend built into this
/// crate (and as torch's `silu` on libtorch without autodiff); the tensors back on any other.
#[allow(clippy::type_complexity)]
pub(crate) fn silu_gate<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return Err((gate, up));
    }
    #[cfg(feature = "tch")]
    if is_torch::<B>() {
        let h = forward::<B>(gate.into_primitive().tensor(), up.into_primitive().tensor());
        return Ok(Tensor::from_primitive(TensorPrimitive::Float(h)));
    }
    visit_autodiff::<B, _>(Recorded { gate, up }).map_err(|Recorded { gate, up }| (gate, up))
}

/// The recorded step, run on the autodiff backend's inner backend.
struct Recorded<B: Backend> {
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
}

impl<B: Backend> AutodiffVisitor for Recorded<B> {
    type Output = Tensor<B, 3>;

    fn visit<I: Backend>(self) -> Tensor<B, 3> {
        let (g, u): (Tensor<Autodiff<I>, 3>, Tensor<Autodiff<I>, 3>) = (retype(self.gate), retype(self.up));
        let h = record_primitives::<I>(g.into_primitive().tensor(), u.into_primitive().tensor());
        retype(Tensor::<Autodiff<I>, 3>::from_primitive(TensorPrimitive::Float(h)))
    }
}

/// [`record`] on burn's primitives: the forward pass on the inner backend, `(g, u)` as the state.
fn record_primitives<I: Backend>(g: FloatTensor<Autodiff<I>>, u: FloatTensor<Autodiff<I>>) -> FloatTensor<Autodiff<I>> {
    let prepared = <SiluGateBackward as Backward<I, 2>>::prepare::<NoCheckpointing>(SiluGateBackward, [g.node.clone(), u.node.clone()]);
    match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let h = forward::<I>(g.primitive.clone(), u.primitive.clone());
            prep.finish((g.primitive, u.primitive), h)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward::<I>(g.primitive, u.primitive)),
    }
}

/// Whether `I`'s float tensors are torch's (`LibTorch<E>` for any `E`).
#[cfg(feature = "tch")]
fn is_torch<I: Backend>() -> bool {
    std::any::TypeId::of::<FloatTensor<I>>() == std::any::TypeId::of::<burn::backend::libtorch::TchTensor>()
}

/// `silu(g) · u` on the inner backend.
pub(crate) fn forward<I: Backend>(g: FloatTensor<I>, u: FloatTensor<I>) -> FloatTensor<I> {
    I::float_mul(silu::<I>(g), u)
}

/// `silu(g)` on the inner backend, as [`forward`] computes it: torch's `silu` on libtorch,
/// `g · sigmoid(g)` elsewhere.
pub(crate) fn silu<I: Backend>(g: FloatTensor<I>) -> FloatTensor<I> {
    #[cfg(feature = "tch")]
    if is_torch::<I>() {
        use burn::backend::libtorch::TchTensor;
        let g: TchTensor = retype(g);
        return retype(TchTensor::new(g.tensor.silu()));
    }
    I::float_mul(g.clone(), I::sigmoid(g))
}

/// `(∂g, ∂u)` from `∂h` on the inner backend.
pub(crate) fn backward<I: Backend>(g: FloatTensor<I>, u: FloatTensor<I>, dh: FloatTensor<I>) -> (FloatTensor<I>, FloatTensor<I>) {
    backward_given_silu::<I>(g, u, dh, None)
}

/// [`backward`] reusing `silu(g)` where the caller has computed it already ([`silu`]; the
/// gated down projection recomputes it for its weight gradient), else computing it.
pub(crate) fn backward_given_silu<I: Backend>(
    g: FloatTensor<I>,
    u: FloatTensor<I>,
    dh: FloatTensor<I>,
    silu_g: Option<FloatTensor<I>>,
) -> (FloatTensor<I>, FloatTensor<I>) {
    #[cfg(feature = "tch")]
    if is_torch::<I>() {
        use burn::backend::libtorch::TchTensor;
        let silu_g: TchTensor = retype(silu_g.unwrap_or_else(|| silu::<I>(g.clone())));
        let (g, u, dh): (TchTensor, TchTensor, TchTensor) = (retype(g), retype(u), retype(dh));
        let du = &dh.tensor * &silu_g.tensor;
        let dg = g.tensor.silu_backward(&(&dh.tensor * &u.tensor));
        return (retype(TchTensor::new(dg)), retype(TchTensor::new(du)));
    }
    let s = I::sigmoid(g.clone());
    let silu = silu_g.unwrap_or_else(|| I::float_mul(g, s.clone()));
    let du = I::float_mul(dh.clone(), silu.clone());
    // s · (1 + g · (1 − s)) = s + silu · (1 − s)
    let one_minus_s = I::float_add_scalar(I::float_neg(s.clone()), 1.0.into());
    let slope = I::float_add(s, I::float_mul(silu, one_minus_s));
    let dg = I::float_mul(I::float_mul(dh, u), slope);
    (dg, du)
}

/// The backward step of [`silu_gate`]; its state is `(g, u)`.
#[derive(Debug)]
struct SiluGateBackward;

impl<I: Backend> Backward<I, 2> for SiluGateBackward {
    type State = (FloatTensor<I>, FloatTensor<I>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (g, u) = ops.state;
        let [g_node, u_node] = ops.parents;
        let dh = grads.consume::<I>(&ops.node);
        let (dg, du) = backward::<I>(g, u, dh);
        if let Some(node) = g_node {
            grads.register::<I>(node.id, dg);
        }
        if let Some(node) = u_node {
            grads.register::<I>(node.id, du);
        }
    }
}

// The checks run on the CPU backend and on torch's CPU.
#[cfg(all(test, any(feature = "ndarray", feature = "tch")))]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::Distribution;

    /// Output and both gradients of `Σ silu_times(g, u) ⊙ w` against burn's `silu(g) · u`, with
    /// `g` tracked, `u` tracked, or both, on the autodiff of `I`; the largest relative difference.
    fn against_burns_operations<I: Backend>(
        device: &I::Device,
        recorded: impl Fn(Tensor<Autodiff<I>, 3>, Tensor<Autodiff<I>, 3>) -> Tensor<Autodiff<I>, 3>,
    ) -> f32 {
        type T<I> = Tensor<Autodiff<I>, 3>;
        let shape = [2, 3, 40];
        let g = T::<I>::random(shape, Distribution::Normal(0.0, 3.0), device);
        let u = T::<I>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let w = T::<I>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let relative = crate::test_support::max_relative_difference::<I, 3>;
        let mut worst = 0f32;
        for (track_g, track_u) in [(true, true), (true, false), (false, true)] {
            let run = |f: &dyn Fn(T<I>, T<I>) -> T<I>| {
                let g = if track_g { g.clone().require_grad() } else { g.clone() };
                let u = if track_u { u.clone().require_grad() } else { u.clone() };
                let h = f(g.clone(), u.clone());
                let grads = (h.clone() * w.clone()).sum().backward();
                (h.inner(), g.grad(&grads), u.grad(&grads))
            };
            let (h, dg, du) = run(&recorded);
            let (h_ref, dg_ref, du_ref) = run(&|g, u| silu(g) * u);
            assert_eq!((dg.is_some(), du.is_some()), (track_g, track_u), "a gradient exactly for each tracked input");
            worst = worst.max(relative(h, h_ref));
            for (ours, theirs) in [(dg, dg_ref), (du, du_ref)] {
                if let (Some(a), Some(b)) = (ours, theirs) {
                    worst = worst.max(relative(a, b));
                }
            }
        }
        worst
    }

    /// The generic path (burn's operations on the inner backend, the one CUDA and wgpu take), on
    /// the CPU backend.
    #[cfg(feature = "ndarray")]
    #[test]
    fn the_recorded_gate_equals_burns_operations_on_any_backend() {
        type I = burn::backend::NdArray<f32>;
        let difference = against_burns_operations::<I>(&Default::default(), |g, u| {
            silu_gate(g, u).unwrap_or_else(|_| panic!("the CPU backend's autodiff takes the recorded path"))
        });
        assert!(difference <= 1e-5, "differs by {difference}");
    }

    /// torch's `silu` and `silu_backward`, through the dispatch the model takes.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_gate_is_torchs_silu_recorded_and_equals_burns_operations() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let difference =
            against_burns_operations::<I>(&device, |g, u| silu_gate(g, u).unwrap_or_else(|_| panic!("libtorch takes the recorded path")));
        assert!(difference <= 1e-5, "differs by {difference}");
        // Without autodiff (inference) the same call.
        let g = Tensor::<I, 3>::random([1, 2, 8], Distribution::Normal(0.0, 2.0), &device);
        let u = Tensor::<I, 3>::random([1, 2, 8], Distribution::Normal(0.0, 1.0), &device);
        let plain = silu_gate(g.clone(), u.clone()).unwrap_or_else(|_| panic!("libtorch takes torch's silu"));
        let reference = silu(g) * u;
        let difference = (plain - reference.clone()).abs().max().into_scalar() / reference.abs().max().into_scalar();
        assert!(difference <= 1e-6, "inference differs by {difference}");
    }
}
