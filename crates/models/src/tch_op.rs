//! A torch computation as one recorded step of burn's autodiff on the libtorch backend: the
//! forward pass runs in torch with gradients tracked from leaves that share burn's storage, and
//! the backward pass asks torch's autograd for the inputs' gradients.
//!
//! ```text
//! forward:   leaves (sharing burn's storage)  →  torch function (with grad)  →  out (detached for burn)
//! backward:  ∂inputs = torch.autograd.grad(Σ out · ∂out, leaves)
//! ```
//!
//! burn keeps the torch graph in the step's state, so what stays alive for the backward pass is
//! what torch's kernel saves (flash attention's log-sum-exp, a fused norm's inverse RMS), not
//! the intermediates of burn's decomposition. Used by `tch_attention` and `tch_norm`.
//!
//! The state also holds burn's own handles to the inputs and the output. burn-tch updates a
//! tensor in place when it believes it holds the only handle to its storage (its count knows
//! nothing of torch's leaves), and torch's graph saves its inputs: without them the residual
//! addition after a norm (`x + mlp(norm(x))`) overwrote the `x` torch had saved, and torch's
//! autograd refused the backward pass ("modified by an inplace operation").

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::{LibTorch, TchElement, TchTensor};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;

/// `function(inputs)` as one tracked step of `Autodiff<LibTorch<E>>`: torch computes the output
/// (with autograd when any input is tracked) and, in the backward pass, the gradients of the
/// tracked inputs.
pub(crate) fn record<E: TchElement, const N: usize>(
    inputs: [FloatTensor<Autodiff<LibTorch<E>>>; N],
    function: impl Fn(&[tch::Tensor; N]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch<E>>> {
    let prepared = <TorchBackward as Backward<LibTorch<E>, N>>::prepare::<NoCheckpointing>(
        TorchBackward,
        std::array::from_fn(|i| inputs[i].node.clone()),
    );
    match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            // Leaves sharing burn's storage; the graph from them to `out` lives in the state.
            let leaves: [tch::Tensor; N] = std::array::from_fn(|i| inputs[i].primitive.tensor.detach().set_requires_grad(true));
            let out = tch::with_grad(|| function(&leaves));
            let value = TchTensor::new(out.detach());
            let held = Held(inputs.iter().map(|t| t.primitive.clone()).chain([value.clone()]).collect());
            prep.finish(TorchState { leaves: Shared(leaves), out: Shared([out]), _held: held }, value)
        }
        OpsKind::UnTracked(prep) => {
            let plain: [tch::Tensor; N] = std::array::from_fn(|i| inputs[i].primitive.tensor.shallow_clone());
            prep.finish(TchTensor::new(tch::no_grad(|| function(&plain))))
        }
    }
}

/// torch tensors held by a burn state: burn wants `Clone + Send + Debug`, torch's handles clone
/// shallowly (the same tensor, the same autograd node).
struct Shared<const N: usize>([tch::Tensor; N]);

impl<const N: usize> Clone for Shared<N> {
    fn clone(&self) -> Self {
        Self(std::array::from_fn(|i| self.0[i].shallow_clone()))
    }
}

impl<const N: usize> std::fmt::Debug for Shared<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|t| t.size())).finish()
    }
}

/// burn's handles to a recorded call's inputs and output, kept until its backward pass so that
/// burn-tch never updates their storage in place while torch's graph may read it.
#[derive(Clone)]
struct Held(Vec<TchTensor>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} held tensors", self.0.len())
    }
}

/// The torch graph of one recorded call: its leaves and its output.
#[derive(Clone, Debug)]
struct TorchState<const N: usize> {
    leaves: Shared<N>,
    out: Shared<1>,
    _held: Held,
}

#[derive(Debug)]
struct TorchBackward;

impl<E: TchElement, const N: usize> Backward<LibTorch<E>, N> for TorchBackward {
    type State = TorchState<N>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<LibTorch<E>>(&ops.node).tensor;
        let TorchState { leaves: Shared(leaves), out: Shared([out]), .. } = ops.state;
        // ∂/∂inputs of Σ out · ∂out is ∂out pulled back through the function's backward.
        let grads_in = tch::with_grad(|| {
            let objective = (&out * grad_out.detach()).sum(out.kind());
            tch::Tensor::run_backward(&[objective], &leaves, false, false)
        });
        for (node, grad) in ops.parents.into_iter().zip(grads_in) {
            if let Some(node) = node {
                grads.register::<LibTorch<E>>(node.id, TchTensor::new(grad));
            }
        }
    }
}
