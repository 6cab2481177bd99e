//! The labelled tokens' log-probabilities, `log p(y_t) = z[t, y_t] − logsumexp(z[t, :])`, as
//! one recorded step of burn's autodiff, whose backward pass is the softmax's own:
//!
//! ```text
//! forward:   lse = logsumexp(z)        logp = z[y] − lse                       keeps z, lse, y
//! backward:  ∂z  = ∂logp · (onehot(y) − exp(z − lse))
//! ```
//!
//! Composed from burn's operations, the same quantity kept `exp(z − max)` for the backward pass,
//! and that pass built the logits' gradient from four logits-sized tensors (the broadcast
//! gradient of the sum, its product with the kept `exp`, the gather's scattered gradient, and
//! their sum) while every layer's activations were still alive: the step's peak. Here the
//! backward pass computes `exp(z − lse)`, scales it and adds the one-hot part in place where the
//! backend can (burn-tch and CubeCL update a tensor whose handle is unique), so the head's
//! gradient needs the logits and about one tensor like them. The forward values are the composed
//! ones, operation for operation.

use crate::logprobs::logsumexp_vocab;
use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

/// `([batch, seq]` log-probabilities of `targets` under `logits` `[batch, seq, vocab]`,
/// differentiable; `[batch, seq, 1]` logsumexp of the logits, without gradient)`. `targets` must
/// lie in `0..vocab` (ignored positions gathered at a safe id and masked by the caller).
pub(crate) fn token_logps<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 3>) {
    match visit_autodiff::<B, _>(Recorded { logits, targets }) {
        Ok(out) => out,
        Err(Recorded { logits, targets }) => {
            let (logp, lse) = forward(logits, targets);
            (logp, lse.detach())
        }
    }
}

/// `(z[y] − lse, lse)` by burn's operations: the forward pass of both paths.
fn forward<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let lse = logsumexp_vocab(logits.clone());
    let picked = logits.gather(2, targets.unsqueeze_dim::<3>(2));
    ((picked - lse.clone()).squeeze_dim(2), lse)
}

/// The recorded step, run on the autodiff backend's inner backend.
struct Recorded<B: Backend> {
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
}

impl<B: Backend> AutodiffVisitor for Recorded<B> {
    type Output = (Tensor<B, 2>, Tensor<B, 3>);

    fn visit<I: Backend>(self) -> Self::Output {
        let logits: Tensor<Autodiff<I>, 3> = retype(self.logits);
        let targets: Tensor<Autodiff<I>, 2, Int> = retype(self.targets);
        let z = logits.into_primitive().tensor();
        let targets = Tensor::<I, 2, Int>::from_primitive(targets.into_primitive());
        let inner = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(z.primitive.clone()));
        let (logp, lse) = forward(inner, targets.clone());
        let logp = logp.into_primitive().tensor();
        let prepared = <TokenLogpsBackward as Backward<I, 1>>::prepare::<NoCheckpointing>(TokenLogpsBackward, [z.node.clone()]);
        let logp = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                TokenLogpsState::<I> { logits: z.primitive, lse: lse.clone().into_primitive().tensor(), targets: targets.into_primitive() },
                logp,
            ),
            OpsKind::UnTracked(prep) => prep.finish(logp),
        };
        let logp = Tensor::<Autodiff<I>, 2>::from_primitive(TensorPrimitive::Float(logp));
        (retype(logp), retype(Tensor::<Autodiff<I>, 3>::from_inner(lse)))
    }
}

/// What the backward pass needs: the logits, their logsumexp and the gathered ids.
#[derive(Clone, Debug)]
struct TokenLogpsState<I: Backend> {
    logits: FloatTensor<I>,
    lse: FloatTensor<I>,
    targets: IntTensor<I>,
}

#[derive(Debug)]
struct TokenLogpsBackward;

impl<I: Backend> Backward<I, 1> for TokenLogpsBackward {
    type State = TokenLogpsState<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let Some(node) = node else { return };
        let TokenLogpsState { logits, lse, targets } = ops.state;
        let (logits, lse) =
            (Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(logits)), Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(lse)));
        let grad = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grad)).unsqueeze_dim::<3>(2);
        let targets = Tensor::<I, 2, Int>::from_primitive(targets).unsqueeze_dim::<3>(2);
        // ∂z = ∂logp · onehot(y) − ∂logp · softmax(z)
        let dz = (logits - lse).exp() * grad.clone().neg();
        let dz = dz.scatter(2, targets, grad, IndexingUpdateOp::Add);
        grads.register::<I>(node.id, dz.into_primitive().tensor());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type T = Autodiff<burn::backend::NdArray<f32>>;

    #[test]
    fn the_recorded_log_probabilities_equal_burns_operations_with_their_gradient() {
        let device = Default::default();
        let logits = Tensor::<T, 3>::random([2, 5, 13], Distribution::Normal(0.0, 3.0), &device);
        let targets = Tensor::<T, 2, Int>::from_data([[0, 12, 3, 3, 7], [1, 1, 0, 9, 12]], &device);
        let weights = Tensor::<T, 2>::random([2, 5], Distribution::Normal(0.0, 1.0), &device);
        let run = |recorded: bool| {
            let z = logits.clone().require_grad();
            let (logp, lse) = if recorded {
                token_logps(z.clone(), targets.clone())
            } else {
                let lse = logsumexp_vocab(z.clone());
                ((z.clone().gather(2, targets.clone().unsqueeze_dim::<3>(2)) - lse.clone()).squeeze_dim(2), lse)
            };
            let grads = (logp.clone() * weights.clone()).sum().backward();
            (logp.inner(), lse.inner(), z.grad(&grads).expect("the logits are tracked"))
        };
        let ((logp, lse, dz), (logp_ref, lse_ref, dz_ref)) = (run(true), run(false));
        assert_eq!(logp.into_data(), logp_ref.into_data(), "the forward values are the composed ones");
        assert_eq!(lse.into_data(), lse_ref.into_data());
        dz.into_data().assert_approx_eq::<f32>(&dz_ref.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    }

    #[test]
    fn without_autodiff_the_same_values() {
        let device = Default::default();
        let logits = Tensor::<T, 3>::random([1, 3, 7], Distribution::Normal(0.0, 1.0), &device);
        let targets = Tensor::<T, 2, Int>::from_data([[6, 0, 2]], &device);
        let (tracked, _) = token_logps(logits.clone(), targets.clone());
        let (plain, _) = token_logps(logits.inner(), targets.inner());
        assert_eq!(tracked.inner().into_data(), plain.into_data());
    }
}
