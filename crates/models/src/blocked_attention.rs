//! Attention as one recorded autodiff step that keeps no probabilities for the backward pass:
//! it keeps q, k, v and the mask, and recomputes the probabilities a block of queries at a time
//! (the memory-efficient attention of Rabe & Staats, flash attention's backward, in tensor
//! operations).
//!
//! ```text
//! forward, per block of queries:   P = softmax(mask(q kᵀ · scale)),   out = P v
//! backward, per block of queries:  P recomputed,  ∂v += Pᵀ ∂out,  ∂P = ∂out vᵀ,
//!                                  ∂S = P ⊙ (∂P − rowsum(P ⊙ ∂P)), zero where masked, · scale,
//!                                  ∂q = ∂S k,  ∂k += ∂Sᵀ q
//! ```
//!
//! burn's operations keep the `[batch, heads, queries, keys]` probabilities of every layer until
//! its backward step (f32: 537 MB per layer for Llama-3.2-1B at 1024 × 4, 8.6 GB per step), and
//! burn 0.21's autodiff never takes a fused attention kernel. Here a block's scores exist only
//! while the block is computed, forward and backward: ≈ [`BLOCK_SCORES`] values at a time. The
//! cost is the scores' product and softmax once more in the backward pass. Products run in the
//! half type under mixed precision as [`matmul_in`] runs them, as burn's operations do.
//!
//! Used where memory binds: the autodiff of burn's GPU backends (`cuda`, `wgpu`). The libtorch
//! route calls torch's fused attention instead (`tch_attention`), and the CPU keeps burn's
//! operations (memory is plentiful there, and the recomputation would cost time).

use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::precision::matmul_in;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Bool, FloatDType, Tensor, TensorPrimitive};

/// Scores computed at a time, `batch · heads · rows · keys` (64 MiB in f32).
pub(crate) const BLOCK_SCORES: usize = 1 << 24;

/// Query rows per block for `batch · heads` score matrices of `keys` columns.
pub(crate) fn rows_per_block(batch: usize, heads: usize, keys: usize) -> usize {
    (BLOCK_SCORES / (batch * heads * keys).max(1)).max(1)
}

/// Whether attention takes this step on `B`: the autodiff of burn's GPU backends built in.
pub(crate) fn applies<B: Backend>() -> bool {
    #[allow(unused_mut)]
    let mut backends: Vec<std::any::TypeId> = Vec::new();
    #[cfg(feature = "cuda")]
    backends.extend([
        std::any::TypeId::of::<Autodiff<alignment_core::backend::Gpu>>(),
        std::any::TypeId::of::<Autodiff<alignment_core::backend::GpuBf16>>(),
    ]);
    #[cfg(feature = "wgpu")]
    backends.push(std::any::TypeId::of::<Autodiff<alignment_core::backend::Wgpu>>());
    backends.contains(&std::any::TypeId::of::<B>())
}

/// `softmax(mask(q kᵀ · scale)) v` for `q: [batch, heads, queries, head_dim]`, `k`, `v: [batch,
/// heads, keys, head_dim]` (kv heads already repeated) and `masked: [batch, 1, queries, keys]`
/// (`true`: masked), as one recorded step with blocks of `rows` queries, when `B` is the autodiff
/// of a backend built into this crate; q, k and v back otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Tensor<B, 4, Bool>,
    scale: f64,
    dtype: Option<FloatDType>,
    rows: usize,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    visit_autodiff::<B, _>(AttentionState { q, k, v, masked, scale, dtype, rows }).map_err(|r| (r.q, r.k, r.v))
}

/// The step on the caller's backend `B`, visited with the inner backend `I` of `B = Autodiff<I>`,
/// where it becomes the backward pass's state on `I`.
impl<B: Backend> AutodiffVisitor for AttentionState<B> {
    type Output = Tensor<B, 4>;

    fn visit<I: Backend>(self) -> Tensor<B, 4> {
        let [q, k, v]: [Tensor<Autodiff<I>, 4>; 3] = [retype(self.q), retype(self.k), retype(self.v)];
        let masked: Tensor<Autodiff<I>, 4, Bool> = retype(self.masked);
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let inner = |t: burn::tensor::ops::FloatTensor<Autodiff<I>>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(t.primitive));
        let state = AttentionState {
            q: inner(q),
            k: inner(k),
            v: inner(v),
            masked: Tensor::<I, 4, Bool>::from_primitive(masked.into_primitive()),
            scale: self.scale,
            dtype: self.dtype,
            rows: self.rows,
        };
        let prepared = <AttentionBackward as Backward<I, 3>>::prepare::<NoCheckpointing>(AttentionBackward, nodes);
        let out = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = state.forward();
                prep.finish(state, out.into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => prep.finish(state.forward().into_primitive().tensor()),
        };
        retype(Tensor::<Autodiff<I>, 4>::from_primitive(TensorPrimitive::Float(out)))
    }
}

/// The step's inputs and settings; on the inner backend, what the backward pass keeps (inputs
/// burn's operations would keep too, no probabilities).
#[derive(Clone, Debug)]
struct AttentionState<I: Backend> {
    q: Tensor<I, 4>,
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    masked: Tensor<I, 4, Bool>,
    scale: f64,
    dtype: Option<FloatDType>,
    rows: usize,
}

impl<I: Backend> AttentionState<I> {
    /// `(start, len)` of each block of queries.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (queries, rows) = (self.q.dims()[2], self.rows);
        (0..queries).step_by(rows).map(move |start| (start, rows.min(queries - start)))
    }

    /// A block's probabilities, `[batch, heads, len, keys]`, by the operations of
    /// `Attention::forward`'s unfused path; and its mask, broadcast to them.
    fn probabilities(&self, start: usize, len: usize) -> (Tensor<I, 4>, Tensor<I, 4, Bool>) {
        let [batch, heads, _, _] = self.q.dims();
        let keys = self.k.dims()[2];
        let q = self.q.clone().narrow(2, start, len);
        let masked = self.masked.clone().narrow(2, start, len).expand([batch, heads, len, keys]);
        let scores = matmul_in(q, self.k.clone().swap_dims(2, 3), self.dtype) * self.scale;
        (softmax(scores.mask_fill(masked.clone(), crate::attention::MASKED_SCORE), 3), masked)
    }

    fn forward(&self) -> Tensor<I, 4> {
        let blocks: Vec<Tensor<I, 4>> =
            self.blocks().map(|(start, len)| matmul_in(self.probabilities(start, len).0, self.v.clone(), self.dtype)).collect();
        Tensor::cat(blocks, 2)
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let state = ops.state;
        let d_out = Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
        let add = |sum: Option<Tensor<I, 4>>, term: Tensor<I, 4>| {
            Some(match sum {
                Some(sum) => sum + term,
                None => term,
            })
        };
        for (start, len) in state.blocks() {
            let (p, masked) = state.probabilities(start, len);
            let d_out = d_out.clone().narrow(2, start, len);
            let dp = matmul_in(d_out.clone(), state.v.clone().swap_dims(2, 3), state.dtype);
            dv = add(dv, matmul_in(p.clone().swap_dims(2, 3), d_out, state.dtype));
            let row_dot = (p.clone() * dp.clone()).sum_dim(3);
            let ds = (p * (dp - row_dot)).mask_fill(masked, 0.0) * state.scale;
            dq.push(matmul_in(ds.clone(), state.k.clone(), state.dtype));
            dk = add(dk, matmul_in(ds.swap_dims(2, 3), state.q.clone().narrow(2, start, len), state.dtype));
        }
        let [q_node, k_node, v_node] = ops.parents;
        let grads_of = [(q_node, Some(Tensor::cat(dq, 2))), (k_node, dk), (v_node, dv)];
        for (node, grad) in grads_of {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

// The checks run on the CPU backend (the step is used on the GPU backends; its arithmetic is the
// same tensor operations on any backend).
#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use alignment_core::backend::CpuAutodiff;
    use burn::tensor::{Distribution, ElementConversion, TensorData};

    type T = Tensor<CpuAutodiff, 4>;

    /// `Attention::forward`'s unfused path.
    fn by_burns_operations(q: T, k: T, v: T, masked: Tensor<CpuAutodiff, 4, Bool>, scale: f64, dtype: Option<FloatDType>) -> T {
        let [batch, heads, queries, _] = q.dims();
        let keys = k.dims()[2];
        let scores = matmul_in(q, k.swap_dims(2, 3), dtype) * scale;
        let masked = masked.expand([batch, heads, queries, keys]);
        matmul_in(softmax(scores.mask_fill(masked, crate::attention::MASKED_SCORE), 3), v, dtype)
    }

    fn relative(a: Tensor<burn::backend::NdArray<f32>, 4>, b: Tensor<burn::backend::NdArray<f32>, 4>) -> f32 {
        let scale = b.clone().abs().max().into_scalar().elem::<f32>().max(1e-12);
        (a - b).abs().max().into_scalar().elem::<f32>() / scale
    }

    /// Output and the gradients of q, k and v of `Σ out ⊙ r` equal burn's operations', for
    /// blocks of one row, of a size that leaves a partial last block, and of the whole sequence;
    /// with causal and padding masks (a padding query's row entirely masked), and with products
    /// in f64 (standing for the half type, as `tests/backend_check.rs` does on the CPU).
    #[test]
    fn blocks_give_burns_operations_values_and_gradients() {
        let device = Default::default();
        let (batch, heads, queries, head_dim) = (2, 3, 7, 4);
        let scale = (head_dim as f64).powf(-0.5);
        // Causal, and row 1's last two positions are padding (keys masked for every query, and
        // those queries see no key at all).
        let masked: Vec<bool> = (0..batch)
            .flat_map(|b| (0..queries).flat_map(move |i| (0..queries).map(move |j| j > i || (b == 1 && (j >= 5 || i >= 5)))))
            .collect();
        let masked = Tensor::<CpuAutodiff, 4, Bool>::from_data(TensorData::new(masked, [batch, 1, queries, queries]), &device);
        let random = || T::random([batch, heads, queries, head_dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let (q, k, v) = (random(), random(), random());
        let r = T::random([batch, heads, queries, head_dim], Distribution::Normal(0.0, 1.0), &device);
        for dtype in [None, Some(FloatDType::F64)] {
            let expected = by_burns_operations(q.clone(), k.clone(), v.clone(), masked.clone(), scale, dtype);
            let expected_grads = (expected.clone() * r.clone()).sum().backward();
            for rows in [1, 3, queries] {
                let out = attention(q.clone(), k.clone(), v.clone(), masked.clone(), scale, dtype, rows)
                    .unwrap_or_else(|_| panic!("recorded on the CPU's autodiff"));
                let grads = (out.clone() * r.clone()).sum().backward();
                assert!(relative(out.inner(), expected.clone().inner()) < 1e-6, "rows {rows}, {dtype:?}: output");
                for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                    let (got, want) = (t.grad(&grads).unwrap(), t.grad(&expected_grads).unwrap());
                    let difference = relative(got, want);
                    assert!(difference < 1e-5, "rows {rows}, {dtype:?}: ∂{name} differs by {difference:e}");
                }
            }
        }
    }

    #[test]
    fn blocks_hold_a_bounded_number_of_scores() {
        assert_eq!(rows_per_block(4, 32, 1024), 128);
        assert_eq!(rows_per_block(1, 1, 1 << 30), 1, "at least one row");
        assert!(!applies::<CpuAutodiff>(), "the CPU keeps burn's operations");
    }
}
