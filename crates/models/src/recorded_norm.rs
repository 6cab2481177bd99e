//! RMSNorm as one recorded step of burn's autodiff that keeps `x` and one inverse RMS per row
//! for the backward pass, and recomputes the normalised activation there.
//!
//! ```text
//! forward:   r = 1 / sqrt(mean(x²) + eps),   y = (x · r) · w
//! backward:  g = ∂y · w,   ∂x = r · g − x · r³ · mean(g ⊙ x),   ∂w = Σ_rows ∂y ⊙ (x · r)
//! ```
//!
//! burn's operations keep the normalised f32 activation `x · r` of every norm beside `x` (the
//! operand of the product by `w`): 32 MiB per norm for Llama-3.2-1B at 4 × 1024, 33 norms. Their
//! backward pass is about fifteen kernels, against five here. The forward values are burn's
//! operations', operation for operation. Used under the autodiff of burn's GPU backends
//! (`gpu_steps`); libtorch has torch's fused kernel (`tch_norm`), and the CPU keeps burn's
//! operations.

use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

/// `x / sqrt(mean(x², last dim) + eps) · scale` for `x: [batch, seq, hidden]` and `scale:
/// [hidden]`, as one recorded step when `B` is an autodiff backend; the tensors back otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn rms_norm<B: Backend>(x: Tensor<B, 3>, scale: Tensor<B, 1>, eps: f64) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 1>)> {
    visit_autodiff::<B, _>(NormInputs { x, scale, eps }).map_err(|inputs| (inputs.x, inputs.scale))
}

/// The step's inputs on the caller's backend `B`.
struct NormInputs<B: Backend> {
    x: Tensor<B, 3>,
    scale: Tensor<B, 1>,
    eps: f64,
}

impl<B: Backend> AutodiffVisitor for NormInputs<B> {
    type Output = Tensor<B, 3>;

    fn visit<I: Backend>(self) -> Tensor<B, 3> {
        let x = retype::<_, Tensor<Autodiff<I>, 3>>(self.x).into_primitive().tensor();
        let scale = retype::<_, Tensor<Autodiff<I>, 1>>(self.scale).into_primitive().tensor();
        let nodes = [x.node.clone(), scale.node.clone()];
        // The inputs stay held until the step is registered: a backward pass on any thread frees
        // the graph's nodes that no tensor holds.
        let held = (x.rc.clone(), scale.rc.clone());
        let x = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(x.primitive));
        let scale = Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(scale.primitive));
        // As `RmsNorm::forward` computes it with burn's operations.
        let inverse_rms = (x.clone().square().mean_dim(2) + self.eps).sqrt().recip();
        let y = (x.clone() * inverse_rms.clone()) * scale.clone().unsqueeze::<3>();
        let prepared = <NormBackward as Backward<I, 2>>::prepare::<NoCheckpointing>(NormBackward, nodes);
        let y = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(NormState { x, inverse_rms, scale }, y.into_primitive().tensor()),
            OpsKind::UnTracked(prep) => prep.finish(y.into_primitive().tensor()),
        };
        drop(held);
        retype(Tensor::<Autodiff<I>, 3>::from_primitive(TensorPrimitive::Float(y)))
    }
}

/// What the backward pass keeps: the input, its rows' inverse RMS `[batch, seq, 1]`, and the
/// scale (a parameter, held by the model anyway).
#[derive(Clone, Debug)]
struct NormState<I: Backend> {
    x: Tensor<I, 3>,
    inverse_rms: Tensor<I, 3>,
    scale: Tensor<I, 1>,
}

#[derive(Debug)]
struct NormBackward;

impl<I: Backend> Backward<I, 2> for NormBackward {
    type State = NormState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let NormState { x, inverse_rms: r, scale } = ops.state;
        let dy = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let [x_node, scale_node] = ops.parents;
        if let Some(node) = scale_node {
            let [batch, seq, hidden] = x.dims();
            let d_scale = (dy.clone() * (x.clone() * r.clone())).reshape([batch * seq, hidden]).sum_dim(0).reshape([hidden]);
            grads.register::<I>(node.id, d_scale.into_primitive().tensor());
        }
        if let Some(node) = x_node {
            let g = dy * scale.unsqueeze::<3>();
            let mean_gx = (g.clone() * x.clone()).mean_dim(2);
            let dx = g * r.clone() - x * (mean_gx * r.clone() * r.clone() * r);
            grads.register::<I>(node.id, dx.into_primitive().tensor());
        }
    }
}

// The checks run on the CPU backend (the step is used on the GPU backends; its arithmetic is the
// same tensor operations on any backend).
#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use crate::test_support::max_relative_difference as relative;
    use alignment_core::backend::CpuAutodiff;
    use burn::tensor::Distribution;

    type T<const D: usize> = Tensor<CpuAutodiff, D>;

    /// `RmsNorm::forward`'s burn operations.
    fn by_burns_operations(x: T<3>, scale: T<1>, eps: f64) -> T<3> {
        let mean_square = x.clone().square().mean_dim(2);
        x * (mean_square + eps).sqrt().recip() * scale.unsqueeze::<3>()
    }

    /// The output equals burn's operations' bit for bit, and the gradients of `Σ y ⊙ c` with
    /// respect to `x` and the weight agree within 1e-5: with the weight as the scale and as
    /// Gemma's `1 + w`, with `x` tracked, the weight tracked (a frozen input), or both.
    #[test]
    fn the_step_gives_burns_operations_values_and_gradients() {
        let device = Default::default();
        let (batch, seq, hidden, eps) = (2, 3, 8, 1e-5);
        let x0 = T::<3>::random([batch, seq, hidden], Distribution::Normal(0.5, 2.0), &device);
        let w0 = T::<1>::random([hidden], Distribution::Normal(0.0, 1.0), &device);
        let c = T::<3>::random([batch, seq, hidden], Distribution::Normal(0.0, 1.0), &device);
        for unit_offset in [false, true] {
            for (track_x, track_w) in [(true, true), (true, false), (false, true)] {
                let case = format!("unit offset {unit_offset}, x tracked {track_x}, w tracked {track_w}");
                let x = if track_x { x0.clone().require_grad() } else { x0.clone() };
                let w = if track_w { w0.clone().require_grad() } else { w0.clone() };
                // A graph is consumed by its backward pass: each side builds its own scale.
                let scale = || if unit_offset { w.clone() + 1.0 } else { w.clone() };
                let expected = by_burns_operations(x.clone(), scale(), eps);
                let expected_grads = (expected.clone() * c.clone()).sum().backward();
                let y = rms_norm(x.clone(), scale(), eps).unwrap_or_else(|_| panic!("recorded on the CPU's autodiff"));
                let grads = (y.clone() * c.clone()).sum().backward();
                assert_eq!(y.into_data(), expected.into_data(), "{case}: output");
                if track_x {
                    let difference = relative(x.grad(&grads).unwrap(), x.grad(&expected_grads).unwrap());
                    assert!(difference < 1e-5, "{case}: ∂x differs by {difference:e}");
                }
                if track_w {
                    let difference = relative(w.grad(&grads).unwrap(), w.grad(&expected_grads).unwrap());
                    assert!(difference < 1e-5, "{case}: ∂w differs by {difference:e}");
                }
            }
        }
    }
}
