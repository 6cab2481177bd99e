//! The gated MLP's `silu(g) · u` on the CPU backend (burn-ndarray, f32) in one threaded pass,
//! forward and backward.
//!
//! burn 0.21 computes `sigmoid(x)` as `exp(-log(exp(-x) + 1))` and `silu` as `x · sigmoid(x)`,
//! and burn-ndarray runs each of those steps as its own single-threaded pass over a fresh array:
//! six passes with two `exp` and one `log` per element for the sigmoid, two products, and about
//! as many again in the backward pass — over `[tokens, intermediate]` in every layer. Here
//!
//! ```text
//! forward:   s = 1 / (1 + exp(-g))      h = (g · s) · u
//! backward:  ∂u = ∂h · (g · s)          ∂g = ∂h · u · s · (1 + g · (1 - s))
//! ```
//! run as one pass each, split across threads: one `exp` per element, the sigmoid as PyTorch
//! computes it. Under `Autodiff<NdArray<f32>>` (training) the product is one recorded step that
//! keeps `g` and `u` (burn's graph kept `g`, `sigmoid(g)`, `silu(g)` and `u`); on `NdArray<f32>`
//! (inference, and checkpointing's forward pass) it is the forward pass alone. Any other backend
//! gets its tensors back and runs burn's operations. The values equal burn's to f32 rounding
//! (`tests/cpu_autodiff.rs`).

use crate::cpu::{f32_values, retype};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use ndarray::{ArrayD, CowArray, IxDyn};
use rayon::prelude::*;
use std::any::TypeId;

type Cpu = NdArray<f32>;
type Train = Autodiff<Cpu>;

/// Elements per task: large enough to amortise scheduling, small enough to balance the cores.
const CHUNK: usize = 1 << 14;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `(g · σ(g)) · u`, element by element.
fn forward_values(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut h = vec![0f32; g.len()];
    h.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(u.par_chunks(CHUNK)).for_each(|((h, g), u)| {
        for i in 0..h.len() {
            h[i] = g[i] * sigmoid(g[i]) * u[i];
        }
    });
    h
}

/// `(∂g, ∂u)` from `∂h`, element by element.
fn backward_values(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
        let start = c * CHUNK;
        for i in 0..dg.len() {
            let (g, u, dh) = (g[start + i], u[start + i], dh[start + i]);
            let s = sigmoid(g);
            du[i] = dh * (g * s);
            dg[i] = dh * u * (s * (1.0 + g * (1.0 - s)));
        }
    });
    (dg, du)
}

fn slice<'a>(a: &'a CowArray<'_, f32, IxDyn>) -> &'a [f32] {
    a.as_slice().expect("standard layout")
}

fn tensor(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    NdArrayTensor::from(ArrayD::from_shape_vec(IxDyn(shape), values).expect("one value per element").into_shared())
}

/// `silu(gate) · up` for `[batch, seq, intermediate]` tensors of equal shape, on `NdArray<f32>`
/// or (recorded as one step) `Autodiff<NdArray<f32>>`; gives the tensors back on any other
/// backend or storage.
#[allow(clippy::type_complexity)]
pub(crate) fn silu_gate<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)> {
    if gate.dims() != up.dims() {
        return Err((gate, up));
    }
    if TypeId::of::<B>() == TypeId::of::<Cpu>() {
        let (g, u): (Tensor<Cpu, 3>, Tensor<Cpu, 3>) = (retype(gate), retype(up));
        let (gp, up_) = (g.clone().into_primitive().tensor(), u.clone().into_primitive().tensor());
        let (Some(gv), Some(uv)) = (f32_values(&gp), f32_values(&up_)) else {
            return Err((retype(g), retype(u)));
        };
        let h = tensor(forward_values(slice(&gv), slice(&uv)), gv.shape());
        return Ok(retype(Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(h))));
    }
    if TypeId::of::<B>() != TypeId::of::<Train>() {
        return Err((gate, up));
    }
    let (g, u): (Tensor<Train, 3>, Tensor<Train, 3>) = (retype(gate), retype(up));
    let (gp, up_) = (g.clone().into_primitive().tensor(), u.clone().into_primitive().tensor());
    let h = match (f32_values(&gp.primitive), f32_values(&up_.primitive)) {
        (Some(gv), Some(uv)) => tensor(forward_values(slice(&gv), slice(&uv)), gv.shape()),
        _ => return Err((retype(g), retype(u))),
    };
    let prepared =
        <SiluGateBackward as Backward<Cpu, 2>>::prepare::<NoCheckpointing>(SiluGateBackward, [gp.node.clone(), up_.node.clone()]);
    let h = match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((gp.primitive.clone(), up_.primitive.clone()), h),
        OpsKind::UnTracked(prep) => prep.finish(h),
    };
    Ok(retype(Tensor::<Train, 3>::from_primitive(TensorPrimitive::Float(h))))
}

/// The backward step of [`silu_gate`]; its state is `(gate, up)`.
#[derive(Debug)]
struct SiluGateBackward;

impl Backward<Cpu, 2> for SiluGateBackward {
    type State = (NdArrayTensor, NdArrayTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (g, u) = ops.state;
        let [g_node, u_node] = ops.parents;
        let dh = grads.consume::<Cpu>(&ops.node);
        let (gv, uv, dhv) = (f32_values(&g).expect("f32"), f32_values(&u).expect("f32"), f32_values(&dh).expect("f32"));
        let (dg, du) = backward_values(slice(&gv), slice(&uv), slice(&dhv));
        let shape = gv.shape().to_vec();
        if let Some(node) = g_node {
            grads.register::<Cpu>(node.id, tensor(dg, &shape));
        }
        if let Some(node) = u_node {
            grads.register::<Cpu>(node.id, tensor(du, &shape));
        }
    }
}
