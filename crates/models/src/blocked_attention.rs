//! Attention as one recorded autodiff step that keeps no probabilities for the backward pass:
//! it keeps q, k and v (in the products' type, each kv head once) and the mask, and recomputes
//! the probabilities a block of queries at a time (the memory-efficient attention of Rabe &
//! Staats, flash attention's backward, in tensor operations).
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
//! cost is the scores' product and softmax once more in the backward pass. Under mixed precision
//! the products run in the half type, as `precision::matmul_in` runs them (q, k and v are cast
//! once, not per block), and the softmax in f32. Grouped-query heads are not repeated: each kv
//! head meets its group of query heads in one product ([`AttentionState`]).
//!
//! Under a causal mask (every mask `attention::AttentionMask` builds is one) a block of queries
//! meets only the keys up to its last query: the keys after them are masked for every query of
//! the block, so their scores, products and softmax are skipped, as flash attention skips
//! masked tiles (about half of the work at eight blocks). A query that sees a key gets the same
//! values, since a masked key's probability is an exact zero beside any unmasked one. A query
//! that sees none (a padding position) gets the mean of the values its block reads rather than
//! of all values: an arbitrary output either way, which reaches no loss (its position has no
//! label, and nothing attends to it), so its gradient is zero in training.
//!
//! The softmax and its backward pass are [`crate::block_softmax`]'s: one CubeCL kernel each on
//! burn's GPU backends, tensor operations elsewhere.
//!
//! Used where memory binds: the autodiff of burn's GPU backends (`cuda`, `wgpu`: `gpu_steps`).
//! The libtorch route calls torch's fused attention instead (`tch_attention`), and the CPU keeps
//! burn's operations (memory is plentiful there, and the recomputation would cost time).

use crate::block_softmax::BlockSoftmax;
use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::gemm::matmul;
use alignment_core::precision::cast_to;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::PadMode;
use burn::tensor::{backend::Backend, Bool, FloatDType, Tensor, TensorPrimitive};

/// Scores computed at a time, `batch · heads · rows · keys` (64 MiB in f32).
pub(crate) const BLOCK_SCORES: usize = 1 << 24;

/// Query rows per block for `batch · heads` score matrices of `keys` columns.
pub(crate) fn rows_per_block(batch: usize, heads: usize, keys: usize) -> usize {
    (BLOCK_SCORES / (batch * heads * keys).max(1)).max(1)
}

/// `softmax(mask(q kᵀ · scale)) v` for `q: [batch, heads, queries, head_dim]`, `k`, `v: [batch,
/// kv_heads, keys, head_dim]` (query head `i` meets kv head `i / (heads / kv_heads)`, as after
/// transformers' `repeat_kv`, which this step does not need) and `masked: [batch, 1, queries,
/// keys]` (`true`: masked), as one recorded step with blocks of `rows` queries, when `B` is the
/// autodiff of a backend built into this crate; q, k and v back otherwise. With `causal`, the
/// caller promises that the mask hides every key after a query's own position (the last query
/// sits at the last key), and each block reads only the keys up to its last query.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Tensor<B, 4, Bool>,
    causal: bool,
    scale: f64,
    dtype: Option<FloatDType>,
    rows: usize,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    assert_eq!(q.dims()[1] % k.dims()[1], 0, "query heads are whole groups of kv heads");
    assert!(q.dims()[2] <= k.dims()[2], "as many keys as queries at least");
    visit_autodiff::<B, _>(AttentionInputs { q, k, v, masked, causal, scale, dtype, rows }).map_err(|r| (r.q, r.k, r.v))
}

/// The step's inputs on the caller's backend `B`.
struct AttentionInputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Tensor<B, 4, Bool>,
    causal: bool,
    scale: f64,
    dtype: Option<FloatDType>,
    rows: usize,
}

/// The step on the caller's backend `B`, visited with the inner backend `I` of `B = Autodiff<I>`,
/// where its inputs become the backward pass's state on `I`.
impl<B: Backend> AutodiffVisitor for AttentionInputs<B> {
    type Output = Tensor<B, 4>;

    fn visit<I: Backend>(self) -> Tensor<B, 4> {
        let [q, k, v]: [Tensor<Autodiff<I>, 4>; 3] = [retype(self.q), retype(self.k), retype(self.v)];
        let masked: Tensor<Autodiff<I>, 4, Bool> = retype(self.masked);
        let [q, k, v] = [q, k, v].map(|t| t.into_primitive().tensor());
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        // q, k and v stay held until the step is registered: a backward pass on any thread frees
        // the graph's nodes that no tensor holds, and theirs would go with their parents' path.
        let inner =
            |t: &burn::tensor::ops::FloatTensor<Autodiff<I>>| Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(t.primitive.clone()));
        let masked = Tensor::<I, 4, Bool>::from_primitive(masked.into_primitive());
        let state = AttentionState::new(inner(&q), inner(&k), inner(&v), masked, self.causal, self.scale, self.dtype, self.rows);
        let prepared = <AttentionBackward as Backward<I, 3>>::prepare::<NoCheckpointing>(AttentionBackward, nodes);
        let out = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = state.forward();
                prep.finish(state, out.into_primitive().tensor())
            }
            OpsKind::UnTracked(prep) => prep.finish(state.forward().into_primitive().tensor()),
        };
        drop((q, k, v));
        retype(Tensor::<Autodiff<I>, 4>::from_primitive(TensorPrimitive::Float(out)))
    }
}

/// One block of queries.
#[derive(Clone, Copy, Debug)]
struct Block {
    /// Its first query.
    start: usize,
    /// Its number of queries.
    len: usize,
    /// The keys it reads, from the first: all of them, or under a causal mask those up to its
    /// last query.
    keys: usize,
}

/// What the backward pass keeps: q, k and v in the products' type, each once (no repeated kv
/// heads, no f32 copies), and the mask, which burn's operations keep too; no probabilities.
///
/// A block of queries meets its kv heads as one batched product without repeating them: the
/// `heads = kv_heads · group` query heads of a block, `[batch, heads, len, head_dim]`, are read
/// as `[batch, kv_heads, group · len, head_dim]`, each kv head's group of query heads stacked
/// as rows. The scores come out as `[batch, kv_heads, group · len, keys]`, which is `[batch,
/// heads, len, keys]` for the mask and the softmax; ∂k and ∂v sum over a group inside their
/// products.
#[derive(Clone, Debug)]
struct AttentionState<I: Backend> {
    /// Each block's queries, grouped by kv head: `[batch, kv_heads, group · len, head_dim]`.
    q_blocks: Vec<Tensor<I, 4>>,
    /// `[batch, kv_heads, keys, head_dim]`, contiguous.
    k: Tensor<I, 4>,
    v: Tensor<I, 4>,
    masked: Tensor<I, 4, Bool>,
    blocks: Vec<Block>,
    heads: usize,
    scale: f64,
    /// The products' type (the inputs' own without mixed precision).
    product_type: FloatDType,
    /// The inputs' type: the output's, the softmax's and the gradients'.
    float: FloatDType,
}

impl<I: Backend> AttentionState<I> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: Tensor<I, 4>,
        k: Tensor<I, 4>,
        v: Tensor<I, 4>,
        masked: Tensor<I, 4, Bool>,
        causal: bool,
        scale: f64,
        dtype: Option<FloatDType>,
        rows: usize,
    ) -> Self {
        let [_, heads, queries, _] = q.dims();
        let float = FloatDType::from(q.dtype());
        let product_type = dtype.unwrap_or(float);
        // Cast once here rather than in every block's products (q, k and v were cast per block,
        // forward and backward); contiguous, so that each product reads them in place.
        let [q, k, v] = [q, k, v].map(|t| contiguous(cast_to(t, product_type)));
        let [_, kv_heads, keys, _] = k.dims();
        // The query at `i` sits at key position `past + i`.
        let past = keys - queries;
        let blocks: Vec<Block> = (0..queries)
            .step_by(rows.max(1))
            .map(|start| {
                let len = rows.min(queries - start);
                Block { start, len, keys: if causal { past + start + len } else { keys } }
            })
            .collect();
        let q_blocks = blocks.iter().map(|b| grouped(q.clone().narrow(2, b.start, b.len), kv_heads)).collect();
        Self { q_blocks, k, v, masked, blocks, heads, scale, product_type, float }
    }

    /// `t` in the products' type.
    fn to_product_type(&self, t: Tensor<I, 4>) -> Tensor<I, 4> {
        cast_to(t, self.product_type)
    }

    /// The blocks from the last to the first: under a causal mask the last reads the most keys.
    /// Taking the largest temporaries first lets the smaller ones reuse their memory; in the
    /// other order CubeCL's pools kept buffers of every block's size (seen on lavapipe: +340 MiB
    /// of peak memory at 2 × 1024 tokens).
    fn largest_first(&self) -> impl Iterator<Item = usize> {
        (0..self.blocks.len()).rev()
    }

    /// The keys (or values) a block reads: `[batch, kv_heads, its keys, head_dim]`.
    fn visible(&self, t: &Tensor<I, 4>, block: usize) -> Tensor<I, 4> {
        t.clone().narrow(2, 0, self.blocks[block].keys)
    }

    /// A block's scores `q kᵀ`, unscaled, in the products' type, grouped: `[batch, kv_heads,
    /// group · len, its keys]`.
    fn scores(&self, block: usize) -> Tensor<I, 4> {
        matmul(self.q_blocks[block].clone(), self.visible(&self.k, block).swap_dims(2, 3))
    }

    /// A block's softmax: where its rows meet the mask, and in which type.
    fn softmax(&self, block: usize) -> BlockSoftmax {
        BlockSoftmax { heads: self.heads, start: self.blocks[block].start, scale: self.scale, float: self.float }
    }

    fn forward(&self) -> Tensor<I, 4> {
        // Largest blocks first (see `largest_first`).
        let mut blocks: Vec<Tensor<I, 4>> = self
            .largest_first()
            .map(|block| {
                let p = self.softmax(block).probabilities(self.scores(block), &self.masked);
                cast_to(ungrouped(matmul(p, self.visible(&self.v, block)), self.heads), self.float)
            })
            .collect();
        blocks.reverse();
        Tensor::cat(blocks, 2)
    }
}

/// `[batch, heads, len, dim]` as `[batch, kv_heads, group · len, dim]`: query head `g · group +
/// r` becomes rows `r · len ..` of kv head `g`'s matrix.
fn grouped<I: Backend>(t: Tensor<I, 4>, kv_heads: usize) -> Tensor<I, 4> {
    let [batch, heads, len, dim] = t.dims();
    t.reshape([batch, kv_heads, heads / kv_heads * len, dim])
}

/// The inverse of [`grouped`]: `[batch, kv_heads, group · len, dim]` as `[batch, heads, len, dim]`.
fn ungrouped<I: Backend>(t: Tensor<I, 4>, heads: usize) -> Tensor<I, 4> {
    let [batch, kv_heads, rows, dim] = t.dims();
    t.reshape([batch, heads, rows * kv_heads / heads, dim])
}

/// `t` laid out row-major (a copy when it is a strided view, as the heads of a projection are).
fn contiguous<I: Backend>(t: Tensor<I, 4>) -> Tensor<I, 4> {
    let dims = t.dims();
    t.reshape([dims.iter().product::<usize>()]).reshape(dims)
}

#[derive(Debug)]
struct AttentionBackward;

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let state = ops.state;
        let d_out = Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let [_, kv_heads, keys, _] = state.k.dims();
        let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
        // A block's ∂k or ∂v covers its keys; the keys after them get nothing from it.
        let add = |sum: Option<Tensor<I, 4>>, term: Tensor<I, 4>| {
            let read = term.dims()[2];
            let term = if read < keys { term.pad([(0, keys - read), (0, 0)], PadMode::Constant(0.0)) } else { term };
            Some(match sum {
                Some(sum) => sum + term,
                None => term,
            })
        };
        let to_float = |t: Tensor<I, 4>| cast_to(t, state.float);
        for block in state.largest_first() {
            let Block { start, len, .. } = state.blocks[block];
            let d_out = grouped(state.to_product_type(d_out.clone().narrow(2, start, len)), kv_heads);
            let dp = matmul(d_out.clone(), state.visible(&state.v, block).swap_dims(2, 3));
            let (p, ds) = state.softmax(block).gradients(state.scores(block), dp, &state.masked);
            dv = add(dv, to_float(matmul(p.swap_dims(2, 3), d_out)));
            dq.push(to_float(ungrouped(matmul(ds.clone(), state.visible(&state.k, block)), state.heads)));
            dk = add(dk, to_float(matmul(ds.swap_dims(2, 3), state.q_blocks[block].clone())));
        }
        let [q_node, k_node, v_node] = ops.parents;
        dq.reverse();
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
    use crate::test_support::max_relative_difference as relative;
    use alignment_core::backend::CpuAutodiff;
    use alignment_core::precision::matmul_in;
    use burn::tensor::activation::softmax;
    use burn::tensor::{Distribution, TensorData};

    type T = Tensor<CpuAutodiff, 4>;

    /// `Attention::forward`'s unfused path.
    fn by_burns_operations(q: T, k: T, v: T, masked: Tensor<CpuAutodiff, 4, Bool>, scale: f64, dtype: Option<FloatDType>) -> T {
        let [batch, heads, queries, _] = q.dims();
        let keys = k.dims()[2];
        let scores = matmul_in(q, k.swap_dims(2, 3), dtype) * scale;
        let masked = masked.expand([batch, heads, queries, keys]);
        matmul_in(softmax(scores.mask_fill(masked, crate::attention::MASKED_SCORE), 3), v, dtype)
    }

    /// Output and the gradients of q, k and v of `Σ out ⊙ r` equal burn's operations' (on kv
    /// heads repeated by `repeat_kv`, as `Attention::forward` runs them), for blocks of one row,
    /// of a size that leaves a partial last block, and of the whole sequence; for one kv head
    /// per query head, groups of two and one kv head for all four; with a causal mask read as
    /// one (each block reading the keys up to its last query), the same mask read whole, a mask
    /// that is not causal, and queries after two cached keys; padding throughout (a padding
    /// query's row entirely masked); inputs laid out as the model's heads are (views of
    /// `[batch, positions, heads, head_dim]`), and with products in f64 (standing for the half
    /// type, as `tests/backend_check.rs` does on the CPU).
    #[test]
    fn blocks_give_burns_operations_values_and_gradients() {
        let device = Default::default();
        let (batch, heads, head_dim, keys) = (2, 4, 4, 7);
        let scale = (head_dim as f64).powf(-0.5);
        // Row 1's last two positions are padding (keys masked for every query, and those queries
        // see no key at all); `causal` adds the future keys.
        let mask = |past: usize, causal: bool| {
            let queries = keys - past;
            let masked: Vec<bool> = (0..batch)
                .flat_map(|b| (past..keys).flat_map(move |i| (0..keys).map(move |j| (causal && j > i) || (b == 1 && (j >= 5 || i >= 5)))))
                .collect();
            Tensor::<CpuAutodiff, 4, Bool>::from_data(TensorData::new(masked, [batch, 1, queries, keys]), &device)
        };
        let heads_of = |t: &T| t.clone().swap_dims(1, 2);
        // (keys cached before the queries, causal mask, read as causal)
        for (past, causal_mask, causal) in [(0, true, true), (0, true, false), (0, false, false), (2, true, true)] {
            let queries = keys - past;
            let masked = mask(past, causal_mask);
            let random = |heads, len| T::random([batch, len, heads, head_dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
            // Padding queries see no key: read as causal, their output is the mean of the
            // values their block reads, not of all values (module doc). In training nothing
            // reaches a loss from them, so they are left out of the comparison and the loss.
            let sees_a_key: Vec<f32> =
                (0..batch).flat_map(|b| (past..keys).map(move |i| if causal && b == 1 && i >= 5 { 0.0 } else { 1.0 })).collect();
            let sees_a_key = T::from_data(TensorData::new(sees_a_key, [batch, 1, queries, 1]), &device);
            let r = T::random([batch, heads, queries, head_dim], Distribution::Normal(0.0, 1.0), &device) * sees_a_key.clone();
            for kv_heads in [heads, 2, 1] {
                let (q, k, v) = (random(heads, queries), random(kv_heads, keys), random(kv_heads, keys));
                let group = heads / kv_heads;
                for dtype in [None, Some(FloatDType::F64)] {
                    let expected = by_burns_operations(
                        heads_of(&q),
                        crate::attention::repeat_kv(heads_of(&k), group),
                        crate::attention::repeat_kv(heads_of(&v), group),
                        masked.clone(),
                        scale,
                        dtype,
                    );
                    let expected_grads = (expected.clone() * r.clone()).sum().backward();
                    for rows in [1, 3, queries] {
                        let out = attention(heads_of(&q), heads_of(&k), heads_of(&v), masked.clone(), causal, scale, dtype, rows)
                            .unwrap_or_else(|_| panic!("recorded on the CPU's autodiff"));
                        let grads = (out.clone() * r.clone()).sum().backward();
                        let case = format!(
                            "past {past}, causal mask {causal_mask} read as causal {causal}, {kv_heads} kv heads, rows {rows}, {dtype:?}"
                        );
                        let output_difference =
                            relative((out.clone() * sees_a_key.clone()).inner(), (expected.clone() * sees_a_key.clone()).inner());
                        assert!(output_difference < 1e-6, "{case}: output differs by {output_difference:e}");
                        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                            let (got, want) = (
                                t.grad(&grads).unwrap_or_else(|| panic!("{case}: no ∂{name}")),
                                t.grad(&expected_grads).unwrap_or_else(|| panic!("{case}: no expected ∂{name}")),
                            );
                            let difference = relative(got, want);
                            assert!(difference < 1e-5, "{case}: ∂{name} differs by {difference:e}");
                        }
                    }
                }
            }
        }
    }

    /// Under a causal mask each block reads the keys up to its last query, after any cached ones.
    #[test]
    fn causal_blocks_read_the_keys_up_to_their_last_query() {
        let device = Default::default();
        let zeros = |len| Tensor::<alignment_core::backend::Cpu, 4>::zeros([1, 2, len, 4], &device);
        let masked = Tensor::<alignment_core::backend::Cpu, 4, Bool>::empty([1, 1, 5, 7], &device);
        let keys_read = |causal| {
            AttentionState::new(zeros(5), zeros(7), zeros(7), masked.clone(), causal, 1.0, None, 2)
                .blocks
                .iter()
                .map(|b| b.keys)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys_read(true), [4, 6, 7], "blocks of queries 0-1, 2-3 and 4 after 2 cached keys");
        assert_eq!(keys_read(false), [7, 7, 7]);
    }

    #[test]
    fn blocks_hold_a_bounded_number_of_scores() {
        assert_eq!(rows_per_block(4, 32, 1024), 128);
        assert_eq!(rows_per_block(1, 1, 1 << 30), 1, "at least one row");
    }
}
