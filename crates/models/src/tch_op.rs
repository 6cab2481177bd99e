//! A torch computation as one recorded step of burn's autodiff on the libtorch backend: the
//! forward pass runs in torch with gradients tracked from leaves that share burn's storage, and
//! the backward pass asks torch's autograd for the inputs' gradients.
//!
//! ```text
//! forward:   leaves (sharing burn's storage)  →  torch function (with grad)  →  out (detached for burn)
//! backward:  ∂inputs = torch.autograd.grad(out, leaves, grad_outputs = ∂out)
//! ```
//!
//! burn keeps the torch graph in the step's state, so what stays alive for the backward pass is
//! what torch's kernel saves (flash attention's log-sum-exp, a fused norm's inverse RMS), not
//! the intermediates of burn's decomposition. Used by `tch_attention` and `tch_norm`. Only the
//! inputs burn tracks are leaves that require a gradient (a frozen norm weight under LoRA gets
//! none computed), and the backward pass seeds torch's autograd with burn's `∂out` itself
//! (`csrc/autograd_grad.cpp`; tch's own entry seeds with ones, which cost a product and a
//! reduction over the whole output each way).
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
use std::ffi::{c_char, c_void, CStr};

extern "C" {
    /// `csrc/autograd_grad.cpp`; the tensors are `at::Tensor*`, what tch's handles point to.
    fn alignment_autograd_grad(
        output: *mut c_void,
        grad_output: *mut c_void,
        inputs: *const *mut c_void,
        n: usize,
        grads: *mut *mut c_void,
    ) -> *mut c_char;
    fn free(ptr: *mut c_void);
}

/// `torch.autograd.grad(output, inputs, grad_outputs = [grad_output])`, freeing the graph.
fn autograd_grad(output: &tch::Tensor, grad_output: &tch::Tensor, inputs: &[&tch::Tensor]) -> Vec<tch::Tensor> {
    let handles: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut grads = vec![std::ptr::null_mut::<c_void>(); inputs.len()];
    // SAFETY: live tensor handles for the call; `grads` has room for one new handle per input.
    let error = unsafe {
        alignment_autograd_grad(
            output.as_ptr() as *mut c_void,
            grad_output.as_ptr() as *mut c_void,
            handles.as_ptr(),
            handles.len(),
            grads.as_mut_ptr(),
        )
    };
    if !error.is_null() {
        // SAFETY: a NUL-terminated message from strdup, freed once.
        let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
        unsafe { free(error.cast()) };
        // The graph was built by this module from tracked leaves: a failure is a bug here, not
        // bad user data.
        panic!("torch's autograd refused a recorded call's backward pass: {message}");
    }
    // SAFETY: each handle is a new `at::Tensor*` the C++ side allocated for us to own.
    grads.into_iter().map(|handle| unsafe { tch::Tensor::from_ptr(handle.cast()) }).collect()
}

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
            // Leaves sharing burn's storage, requiring a gradient where burn tracks the input; the
            // graph from them to `out` lives in the state.
            let leaves: [tch::Tensor; N] = std::array::from_fn(|i| {
                let leaf = inputs[i].primitive.tensor.detach();
                if inputs[i].node.requirement.is_none() {
                    leaf
                } else {
                    leaf.set_requires_grad(true)
                }
            });
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
        // burn's ∂out pulled back through the function's backward to the tracked inputs (the
        // parents burn keeps are those it tracks, the leaves that require a gradient).
        let grad_out = if grad_out.kind() == out.kind() { grad_out } else { grad_out.to_kind(out.kind()) };
        let (nodes, tracked): (Vec<_>, Vec<&tch::Tensor>) =
            ops.parents.into_iter().zip(leaves.iter()).filter_map(|(node, leaf)| node.map(|node| (node, leaf))).unzip();
        let grads_in = tch::with_grad(|| autograd_grad(&out, &grad_out, &tracked));
        for (node, grad) in nodes.into_iter().zip(grads_in) {
            grads.register::<LibTorch<E>>(node.id, TchTensor::new(grad));
        }
    }
}
