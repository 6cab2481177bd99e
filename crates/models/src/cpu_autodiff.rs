//! The CPU backend's linear map under autodiff (training), as one recorded step whose products
//! run on views, without burn's copies.
//!
//! burn 0.21's autodiff matmul on burn-ndarray reshapes its operands to 3-D, and burn-ndarray's
//! `reshape` copies whatever is not already in standard layout — a transposed weight in the
//! forward pass, `∂y` and the saved activations in the backward pass (`to_vec_mapped` was 16 %
//! of a SmolLM2 training step, single-threaded, before this step). Here
//!
//! ```text
//! forward:   y  = x Wᵀ         x: [rows, in], W: [out, in]
//! backward:  ∂x = ∂y W         (when x is tracked; saves W)
//!            ∂W = ∂yᵀ x        (when W is tracked; saves x)
//! ```
//!
//! are each one `matrixmultiply` GEMM (threaded, what burn-ndarray itself calls) reading the
//! operands through their strides, so a transpose is free. Only for `Autodiff<NdArray<f32>>`:
//! any other backend gets its tensors back and runs burn's matmul. The values equal burn's up to
//! the summation order inside the GEMM (tests: `tests/cpu_autodiff.rs`).

use crate::cpu::{f32_values, retype};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use ndarray::{linalg::general_mat_mul, Array2, ArrayView2, CowArray, Ix2};

type Cpu = NdArray<f32>;
type Train = Autodiff<Cpu>;

/// `x Wᵀ` for `x: [batch, seq, in]` and `W: [out, in]` on `Autodiff<NdArray<f32>>`, recorded as
/// one step; gives the tensors back on any other backend (or an unexpected storage).
#[allow(clippy::type_complexity)]
pub(crate) fn project<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)> {
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<Train>() {
        return Err((x, w));
    }
    let (x, w): (Tensor<Train, 3>, Tensor<Train, 2>) = (retype(x), retype(w));
    let [batch, seq, _] = x.dims();
    let out = w.dims()[0];
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let Some(y) = product(&x.primitive, &w.primitive, Side::Plain, Side::Transposed) else {
        let x = Tensor::<Train, 3>::from_primitive(TensorPrimitive::Float(x));
        let w = Tensor::<Train, 2>::from_primitive(TensorPrimitive::Float(w));
        return Err((retype(x), retype(w)));
    };
    let y =
        NdArrayTensor::from(y.into_shape_with_order((batch, seq, out)).expect("[rows, out] in standard layout").into_dyn().into_shared());
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    let prepared = <ProjectBackward as Backward<Cpu, 2>>::prepare::<NoCheckpointing>(ProjectBackward, [x.node.clone(), w.node.clone()]);
    let y = match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let saved_x = w_tracked.then(|| x.primitive.clone());
            let saved_w = x_tracked.then(|| w.primitive.clone());
            prep.finish(ProjectState { x: saved_x, w: saved_w, x_shape: [batch, seq] }, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    let y = Tensor::<Train, 3>::from_primitive(TensorPrimitive::Float(y));
    Ok(retype(y))
}

/// How a GEMM reads one operand: as stored or transposed (through its strides, no copy).
#[derive(Clone, Copy)]
enum Side {
    Plain,
    Transposed,
}

/// `a' b'` where each operand is the tensor's values flattened to a matrix (all leading dims ×
/// the last) and read as `side` says; `None` when a tensor is not f32.
fn product(a: &NdArrayTensor, b: &NdArrayTensor, a_side: Side, b_side: Side) -> Option<Array2<f32>> {
    let (a, b) = (matrix(a)?, matrix(b)?);
    let (a, b) = (oriented(a.view(), a_side), oriented(b.view(), b_side));
    let mut y = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    general_mat_mul(1.0, &a, &b, 0.0, &mut y);
    Some(y)
}

fn oriented(m: ArrayView2<'_, f32>, side: Side) -> ArrayView2<'_, f32> {
    match side {
        Side::Plain => m,
        Side::Transposed => m.reversed_axes(),
    }
}

/// The tensor's f32 values as `[leading dims, last dim]`: a view when they are in standard
/// layout (the usual case), a copy otherwise.
fn matrix(t: &NdArrayTensor) -> Option<CowArray<'_, f32, Ix2>> {
    let values = f32_values(t)?;
    let cols = values.shape().last().copied().unwrap_or(1);
    let rows = values.shape()[..values.ndim().saturating_sub(1)].iter().product();
    Some(values.into_shape_with_order((rows, cols)).expect("standard layout flattens to [leading dims, last dim]"))
}

/// What the backward step needs: `x` when `W` wants a gradient, `W` when `x` does.
#[derive(Debug, Clone)]
struct ProjectState {
    x: Option<NdArrayTensor>,
    w: Option<NdArrayTensor>,
    /// `[batch, seq]` of `x`, to shape `∂x`.
    x_shape: [usize; 2],
}

/// The backward step of [`project`]: `∂x = ∂y W`, `∂W = ∂yᵀ x`.
#[derive(Debug)]
struct ProjectBackward;

impl Backward<Cpu, 2> for ProjectBackward {
    type State = ProjectState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let state = ops.state;
        let [x_node, w_node] = ops.parents;
        let grad_y = grads.consume::<Cpu>(&ops.node);
        if let (Some(node), Some(w)) = (x_node, &state.w) {
            let grad_x = product(&grad_y, w, Side::Plain, Side::Plain).expect("f32 tensors");
            let [batch, seq] = state.x_shape;
            let inner = grad_x.ncols();
            let grad_x = grad_x.into_shape_with_order((batch, seq, inner)).expect("[rows, in] in standard layout");
            grads.register::<Cpu>(node.id, NdArrayTensor::from(grad_x.into_dyn().into_shared()));
        }
        if let (Some(node), Some(x)) = (w_node, &state.x) {
            let grad_w = product(&grad_y, x, Side::Transposed, Side::Plain).expect("f32 tensors");
            grads.register::<Cpu>(node.id, NdArrayTensor::from(grad_w.into_dyn().into_shared()));
        }
    }
}
