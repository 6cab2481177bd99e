//! Per-sequence log-probabilities of labelled tokens: the quantity every objective is built from.
//!
//! A causal LM's logits at position `t` predict the token at `t + 1`. Labels are given in the
//! input-ids layout (`[batch, seq]`, the same shape as the ids) with [`IGNORE_INDEX`] on tokens
//! that are not scored (prompt, padding); the shift happens here, as in transformers'
//! `ForCausalLMLoss` and TRL's fused LM head (`trl/trainer/utils.py`, `add_fused_lm_head`:
//! `hidden_states[:, :-1]`, `labels[:, 1:]`). The first label of a row is therefore never scored.
//!
//! # How the log-softmax is gathered
//!
//! `log p(y_t) = z[t, y_t] - logsumexp(z[t, :])`: one `logsumexp` over the vocabulary per position
//! (`[batch, seq, 1]`) minus the gathered logit (`[batch, seq, 1]`), as TRL's
//! `selective_log_softmax` does for float32. The full `[batch, seq, vocab]` log-softmax is never
//! materialised. The gather and the `logsumexp` are one recorded autodiff step
//! (`token_logps.rs`) that keeps the logits and computes the softmax's gradient itself, for one
//! label set (SFT, DPO) or several over the same logits (ORPO's two), which share the
//! `logsumexp` and one backward pass. The max used to stabilise the `logsumexp` is detached,
//! which leaves its value and gradient unchanged. Rather than slicing the logits to `[:, :-1]` (a copy, and a full-size
//! `slice_assign` in the backward pass), the *labels* are shifted left and padded with
//! `IGNORE_INDEX`, so the last position is computed and masked out.
//!
//! Precision: in float32 this matches TRL to ~1e-6. In bfloat16 the subtraction of two large
//! numbers loses precision (TRL falls back to `log_softmax` row by row for bf16); run the head in
//! float32 when training in bf16.
//!
//! The per-token diagnostics TRL logs (mean logit, entropy, top-1 accuracy) are computed from a
//! detached copy of the logits, outside the autodiff graph, and so is the one statistic only some
//! losses ask for ([`ExtraStats`]: WPO's `log Σ_v p_v²`); on libtorch, from the forward pass's
//! own log-probabilities, in the same reading of the logits (`tch_logits.rs`).

use crate::token_logps::{token_logps, token_logps_and_stats};
use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::precision::{cast_to, float_type};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Bool, Int, Tensor};

/// Label value of tokens that are not scored (prompt, padding), as in PyTorch's `ignore_index`
/// and transformers' data collators.
pub const IGNORE_INDEX: i64 = -100;

/// Per-row results of scoring labelled tokens under a model's logits.
///
/// Everything is per row (`[batch]`). Only [`sum`](Self::sum) carries gradient; the rest are
/// detached statistics for metrics.
#[derive(Debug, Clone)]
pub struct SequenceLogps<B: Backend> {
    /// `[batch]` sum over the scored tokens of `log p(label_t | tokens before t)`. Differentiable.
    pub sum: Tensor<B, 1>,
    /// `[batch]` number of scored tokens (labels other than [`IGNORE_INDEX`] after the shift), as
    /// floats.
    pub num_tokens: Tensor<B, 1>,
    /// `[batch]` mean over the scored tokens of the vocabulary-mean logit (TRL's per-token
    /// `mean_logits`), `0` for a row without scored tokens. Detached. Weighted by
    /// [`num_tokens`](Self::num_tokens) it gives DPO's `logits/chosen` and `logits/rejected`.
    pub mean_logits: Tensor<B, 1>,
    /// `[batch]` mean of the logits over every position but the last (prompt, completion and
    /// padding alike) and the whole vocabulary: what ORPO's `logits/chosen` / `logits/rejected`
    /// average (`policy_chosen_logits.mean()` over `logits[:, :-1, :]`). Depends on padding, as
    /// TRL's does. Detached.
    pub mean_logits_all: Tensor<B, 1>,
    /// `[batch]` sum over the scored tokens of the entropy of the next-token distribution (TRL's
    /// `entropy` metric divides the batch total by the token count). Detached.
    pub entropy_sum: Tensor<B, 1>,
    /// `[batch]` number of scored tokens whose label is the model's most likely next token (ties
    /// go to the lowest token id, as TRL's `is_top1` and `argmax`). Feeds `mean_token_accuracy`.
    /// Detached.
    pub num_correct: Tensor<B, 1>,
    /// `[batch]` sum over the scored tokens of `log Σ_v p_v²`, the log-probability that two draws
    /// from the next-token distribution agree (TRL's `log_sum_sq_probs`, which DPO's WPO weights
    /// subtract from the token log-probs). Detached. `None` unless asked for with
    /// [`ExtraStats::log_sum_sq_probs`].
    pub log_sum_sq_probs: Option<Tensor<B, 1>>,
}

/// Per-token statistics computed only when an objective asks for them (each costs one more pass
/// over the `[rows, seq, vocab]` probabilities). The default asks for none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtraStats {
    /// Fill [`SequenceLogps::log_sum_sq_probs`] (DPO's `use_weighting`).
    pub log_sum_sq_probs: bool,
}

impl<B: Backend> SequenceLogps<B> {
    /// `[batch]` length-averaged log-probability `sum / num_tokens` (a row without tokens gives 0):
    /// what ORPO scores and what IPO's length normalisation amounts to. Differentiable.
    pub fn mean(&self) -> Tensor<B, 1> {
        self.sum.clone() / self.num_tokens.clone().clamp_min(1.0)
    }

    /// `[1]` cross entropy averaged over all scored tokens of the batch: `-Σ sum / Σ num_tokens`
    /// (a batch without tokens gives 0). This is transformers' `ForCausalLMLoss` with
    /// `ignore_index=-100` and PyTorch's `CrossEntropyLoss()` mean. Differentiable.
    pub fn mean_nll(&self) -> Tensor<B, 1> {
        -self.sum.clone().sum() / self.num_tokens.clone().sum().clamp_min(1.0)
    }

    /// `[1]` summed cross entropy of all scored tokens of the batch. Differentiable.
    pub fn sum_nll(&self) -> Tensor<B, 1> {
        -self.sum.clone().sum()
    }

    /// The same statistics with [`sum`](Self::sum) detached from the autodiff graph (for metrics
    /// kept after the backward pass).
    pub fn detach(&self) -> Self {
        Self { sum: self.sum.clone().detach(), ..self.clone() }
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.sum.dims()[0]
    }

    /// Splits the rows at `index`: `(rows[..index], rows[index..])`. For a trainer that runs
    /// chosen and rejected completions through one forward pass, concatenated along the batch
    /// (chosen first), as TRL does.
    ///
    /// # Panics
    /// If `index` exceeds the batch size.
    pub fn split_at(self, index: usize) -> (Self, Self) {
        let n = self.batch_size();
        assert!(index <= n, "split_at({index}) of a batch of {n}");
        let part = |t: &Tensor<B, 1>, start: usize, len: usize| t.clone().narrow(0, start, len);
        let take = |start: usize, len: usize| Self {
            sum: part(&self.sum, start, len),
            num_tokens: part(&self.num_tokens, start, len),
            mean_logits: part(&self.mean_logits, start, len),
            mean_logits_all: part(&self.mean_logits_all, start, len),
            entropy_sum: part(&self.entropy_sum, start, len),
            num_correct: part(&self.num_correct, start, len),
            log_sum_sq_probs: self.log_sum_sq_probs.as_ref().map(|t| part(t, start, len)),
        };
        (take(0, index), take(index, n - index))
    }
}

/// Scores `labels` under `logits`: per-row summed log-probabilities, token counts and the
/// detached statistics TRL logs.
///
/// - `logits`: `[batch, seq, vocab]`, position `t` predicting token `t + 1`.
/// - `labels`: `[batch, seq]`, the input ids with [`IGNORE_INDEX`] on tokens not scored. Labels
///   must lie in `0..vocab` elsewhere (out-of-range ids are not checked on every backend).
///
/// # Panics
/// If the batch and sequence dimensions of `logits` and `labels` differ.
pub fn sequence_logps<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> SequenceLogps<B> {
    sequence_logps_many(logits, vec![labels]).pop().expect("one label set in, one result out")
}

/// [`sequence_logps`] for several label sets over the same logits, sharing the `logsumexp` (one
/// autodiff node of `[batch, seq, vocab]` instead of one per label set) and the statistics pass.
///
/// ORPO needs this: its odds ratio scores the completion tokens, its NLL term the prompt and the
/// completion (`labels = input_ids` where `attention_mask == 1`, TRL's `concatenated_forward`).
///
/// # Panics
/// If any label set's shape differs from the logits' `[batch, seq]`.
pub fn sequence_logps_many<B: Backend>(logits: Tensor<B, 3>, label_sets: Vec<Tensor<B, 2, Int>>) -> Vec<SequenceLogps<B>> {
    sequence_logps_with(logits, label_sets, ExtraStats::default())
}

/// [`sequence_logps_many`] with the optional statistics `extra` asks for.
///
/// # Panics
/// If any label set's shape differs from the logits' `[batch, seq]`.
pub fn sequence_logps_with<B: Backend>(
    logits: Tensor<B, 3>,
    label_sets: Vec<Tensor<B, 2, Int>>,
    extra: ExtraStats,
) -> Vec<SequenceLogps<B>> {
    let [b, t, _v] = logits.dims();
    for labels in &label_sets {
        assert_eq!(labels.dims(), [b, t], "labels must be [batch, seq] = [{b}, {t}] like the logits");
    }
    // Every label set in one recorded step, whose backward pass is the softmax's own.
    let targets: Vec<ShiftedTargets<B>> = label_sets.into_iter().map(ShiftedTargets::new).collect();
    let (token_logps, lse, stats) = token_logps_and_stats(logits.clone(), stacked_ids(&targets), extra);
    let stats = match stats {
        Some(stats) => TokenStats::from_positions(stats),
        None => TokenStats::new(logits.detach(), lse, extra),
    };
    targets
        .iter()
        .enumerate()
        .map(|(set, targets)| {
            let token_logps: Tensor<B, 2> = token_logps.clone().narrow(2, set, 1).squeeze_dim(2) * targets.mask.clone();
            stats.reduce(token_logps.sum_dim(1).squeeze_dim(1), targets)
        })
        .collect()
}

/// The label sets' gatherable ids as `[batch, seq, sets]`, what `token_logps` takes.
fn stacked_ids<B: Backend>(targets: &[ShiftedTargets<B>]) -> Tensor<B, 3, Int> {
    match targets {
        [one] => one.safe.clone().unsqueeze_dim(2),
        many => Tensor::stack(many.iter().map(|t| t.safe.clone()).collect(), 2),
    }
}

/// Who computes the passes over the logits, for any number of label sets (the
/// log-probabilities, their gradient and the statistics) when training on `Autodiff<I>`, for
/// reports: `"kernel"` on burn's fused CubeCL backends (`logits_kernel.rs`), `"cpu passes"` on
/// the CPU backend with f32 logits (`cpu_logits.rs`), `"torch kernels"` on the libtorch backends
/// (`tch_logits.rs`), `"tensor ops"` elsewhere or with
/// `ALIGNMENT_LOGITS_KERNEL=0`.
pub fn logits_route<I: Backend>() -> &'static str {
    if !logits_kernels_enabled() {
        return "tensor ops";
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if alignment_core::backend::is_fused_cube::<I>() {
        return "kernel";
    }
    #[cfg(feature = "ndarray")]
    if std::any::TypeId::of::<I>() == std::any::TypeId::of::<burn::backend::NdArray<f32>>() {
        return "cpu passes";
    }
    #[cfg(feature = "tch")]
    if alignment_core::torch_storage::is_libtorch::<I>() {
        return "torch kernels";
    }
    "tensor ops"
}

/// Whether the passes over the logits take this crate's own kernels (CubeCL's on burn's GPU
/// backends, threaded passes on the CPU backend): unless `ALIGNMENT_LOGITS_KERNEL=0`, which keeps
/// burn's tensor operations everywhere, for measuring one against the other.
pub(crate) fn logits_kernels_enabled() -> bool {
    static KERNELS: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_LOGITS_KERNEL");
    #[cfg(test)]
    if TENSOR_OPS_ONLY.with(std::cell::Cell::get) {
        return false;
    }
    KERNELS.is_on()
}

#[cfg(test)]
thread_local! {
    /// Set by [`with_tensor_ops`] on its thread.
    static TENSOR_OPS_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` run with the passes over the logits in burn's tensor operations on this thread (as with
/// `ALIGNMENT_LOGITS_KERNEL=0`), so that tests check that path on the CPU backend too.
#[cfg(test)]
pub(crate) fn with_tensor_ops<T>(f: impl FnOnce() -> T) -> T {
    TENSOR_OPS_ONLY.with(|only| only.set(true));
    let out = f();
    TENSOR_OPS_ONLY.with(|only| only.set(false));
    out
}

/// `[batch, seq, 1]` `logsumexp` over the vocabulary, stabilised by the detached row max.
pub(crate) fn logsumexp_vocab<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 3> {
    let max = logits.clone().detach().max_dim(2);
    (logits - max.clone()).exp().sum_dim(2).log() + max
}

/// `[batch]` summed log-probabilities of `labels` under `logits`, without the statistics pass:
/// the cheapest path, for losses whose metrics are not wanted.
/// Returns `(sum, num_tokens)`, both `[batch]`.
pub(crate) fn sequence_logps_sum<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, t, _v] = logits.dims();
    assert_eq!(labels.dims(), [b, t], "labels must be [batch, seq] = [{b}, {t}] like the logits");
    let targets = ShiftedTargets::new(labels);
    let (token_logps, _) = token_logps(logits, stacked_ids(std::slice::from_ref(&targets)));
    let token_logps = token_logps.squeeze_dim::<2>(2) * targets.mask.clone();
    (token_logps.sum_dim(1).squeeze_dim(1), targets.mask.sum_dim(1).squeeze_dim(1))
}

/// Number of tokens `labels` scores (labels other than [`IGNORE_INDEX`] from the second position
/// on): the per-micro-batch count a trainer sums into transformers' `num_items_in_batch`.
pub fn num_scored_tokens<B: Backend>(labels: &Tensor<B, 2, Int>) -> usize {
    let targets = ShiftedTargets::new(labels.clone());
    targets.mask.sum().into_data().iter::<f64>().next().unwrap_or(0.0).round() as usize
}

/// Labels shifted one step left (`targets[:, t] = labels[:, t + 1]`, last column ignored), with
/// ignored entries replaced by token 0 so they can be gathered, and the float mask of scored ones.
pub(crate) struct ShiftedTargets<B: Backend> {
    /// `[batch, seq]` gatherable token ids.
    pub(crate) safe: Tensor<B, 2, Int>,
    /// `[batch, seq]` 1.0 where scored.
    pub(crate) mask: Tensor<B, 2>,
    /// `[batch, seq]` true where scored.
    pub(crate) scored: Tensor<B, 2, Bool>,
}

impl<B: Backend> ShiftedTargets<B> {
    pub(crate) fn new(labels: Tensor<B, 2, Int>) -> Self {
        let [b, t] = labels.dims();
        let device = labels.device();
        let pad = Tensor::<B, 2, Int>::full([b, 1], IGNORE_INDEX, &device);
        let shifted = if t > 1 { Tensor::cat(vec![labels.slice([0..b, 1..t]), pad], 1) } else { pad };
        let ignored = shifted.clone().equal_elem(IGNORE_INDEX);
        let scored = ignored.clone().bool_not();
        Self { safe: shifted.mask_fill(ignored, 0), mask: scored.clone().float(), scored }
    }
}

/// Detached per-position statistics of the next-token distributions, shared by label sets.
pub(crate) struct TokenStats<B: Backend> {
    /// `[batch, seq]` mean logit over the vocabulary.
    pub(crate) mean_logit: Tensor<B, 2>,
    /// `[batch]` mean of `mean_logit` over positions `0..seq-1`.
    pub(crate) mean_logit_all: Tensor<B, 1>,
    /// `[batch, seq]` entropy.
    pub(crate) entropy: Tensor<B, 2>,
    /// `[batch, seq]` most likely next token.
    pub(crate) argmax: Tensor<B, 2, Int>,
    /// `[batch, seq]` `log Σ_v p_v²`, when asked for.
    pub(crate) log_sum_sq_probs: Option<Tensor<B, 2>>,
}

impl<B: Backend> TokenStats<B> {
    /// `logits` and `lse` detached.
    fn new(logits: Tensor<B, 3>, lse: Tensor<B, 3>, extra: ExtraStats) -> Self {
        let stats = position_stats(logits, lse, extra);
        Self::from_positions(stats)
    }

    /// From the per-position values (`[batch, seq]` each).
    pub(crate) fn from_positions(stats: PositionStats<B>) -> Self {
        let PositionStats { mean_logit, entropy, argmax, log_sum_sq_probs } = stats;
        let [b, t] = mean_logit.dims();
        let mean_logit_all = if t > 1 {
            mean_logit.clone().slice([0..b, 0..t - 1]).mean_dim(1).squeeze_dim(1)
        } else {
            Tensor::zeros([b], &mean_logit.device())
        };
        Self { mean_logit, mean_logit_all, entropy, argmax, log_sum_sq_probs }
    }

    pub(crate) fn reduce(&self, sum: Tensor<B, 1>, targets: &ShiftedTargets<B>) -> SequenceLogps<B> {
        let mask = targets.mask.clone();
        let row = |t: Tensor<B, 2>| -> Tensor<B, 1> { t.sum_dim(1).squeeze_dim(1) };
        let num_tokens = row(mask.clone());
        let correct = self.argmax.clone().equal(targets.safe.clone()).bool_and(targets.scored.clone()).float();
        SequenceLogps {
            sum,
            mean_logits: row(self.mean_logit.clone() * mask.clone()) / num_tokens.clone().clamp_min(1.0),
            mean_logits_all: self.mean_logit_all.clone(),
            log_sum_sq_probs: self.log_sum_sq_probs.clone().map(|t| row(t * mask.clone())),
            entropy_sum: row(self.entropy.clone() * mask),
            num_correct: row(correct),
            num_tokens,
        }
    }
}

/// Per-position statistics of the next-token distributions, `[batch, seq]` each.
pub(crate) struct PositionStats<B: Backend> {
    pub(crate) mean_logit: Tensor<B, 2>,
    pub(crate) entropy: Tensor<B, 2>,
    pub(crate) argmax: Tensor<B, 2, Int>,
    pub(crate) log_sum_sq_probs: Option<Tensor<B, 2>>,
}

impl<B: Backend> PositionStats<B> {
    /// The statistics of consecutive runs of positions (`[batch, run]` each) joined along the
    /// positions.
    pub(crate) fn cat(parts: Vec<Self>) -> Self {
        let (mut mean_logit, mut entropy, mut argmax, mut sum_sq) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let with_sum_sq = parts.first().is_some_and(|p| p.log_sum_sq_probs.is_some());
        for part in parts {
            mean_logit.push(part.mean_logit);
            entropy.push(part.entropy);
            argmax.push(part.argmax);
            sum_sq.extend(part.log_sum_sq_probs);
        }
        Self {
            mean_logit: Tensor::cat(mean_logit, 1),
            entropy: Tensor::cat(entropy, 1),
            argmax: Tensor::cat(argmax, 1),
            log_sum_sq_probs: with_sum_sq.then(|| Tensor::cat(sum_sq, 1)),
        }
    }

    /// The same statistics as tensors of another backend: `float` maps each float tensor,
    /// `int` the argmax.
    pub(crate) fn map_tensors<C: Backend>(
        self,
        float: impl Fn(Tensor<B, 2>) -> Tensor<C, 2>,
        int: impl FnOnce(Tensor<B, 2, Int>) -> Tensor<C, 2, Int>,
    ) -> PositionStats<C> {
        PositionStats {
            mean_logit: float(self.mean_logit),
            entropy: float(self.entropy),
            argmax: int(self.argmax),
            log_sum_sq_probs: self.log_sum_sq_probs.map(&float),
        }
    }

    /// Every per-position tensor reshaped to `shape`.
    pub(crate) fn reshape(self, shape: [usize; 2]) -> Self {
        Self {
            mean_logit: self.mean_logit.reshape(shape),
            entropy: self.entropy.reshape(shape),
            argmax: self.argmax.reshape(shape),
            log_sum_sq_probs: self.log_sum_sq_probs.map(|t| t.reshape(shape)),
        }
    }
}

/// How many `[.., vocab]` elements each temporary of the statistics pass holds at most: 16 Mi
/// (64 MiB in f32). The pass computes three temporaries the size of its input (`lse − z`, the
/// probabilities, their product); over the full logits of a Llama-3.2-1B step (4 × 1024 ×
/// 128256) that would be 6 GiB at the forward pass's end, where memory peaks.
pub(crate) const STATS_CHUNK_ELEMENTS: usize = 1 << 24;

/// Per-position mean logit, entropy, argmax (and what `extra` asks for) of `logits`
/// `[batch, seq, vocab]` given their `logsumexp` `[batch, seq, 1]` (both detached), computed
/// over runs of positions whose temporaries hold at most [`STATS_CHUNK_ELEMENTS`] elements, as
/// TRL's `entropy_from_logits` chunks its rows. Every statistic reduces over the vocabulary
/// only, so the chunking does not change a value.
pub(crate) fn position_stats<B: Backend>(logits: Tensor<B, 3>, lse: Tensor<B, 3>, extra: ExtraStats) -> PositionStats<B> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if let Some(stats) = crate::logits_kernel::position_stats(&logits, &lse, extra.log_sum_sq_probs) {
        return stats;
    }
    #[cfg(feature = "ndarray")]
    if let Some(stats) = crate::cpu_logits::position_stats(&logits, &lse, extra.log_sum_sq_probs) {
        return stats;
    }
    #[cfg(feature = "tch")]
    if let Some(stats) = crate::tch_logits::position_stats(&logits, extra, STATS_CHUNK_ELEMENTS) {
        return stats;
    }
    match visit_autodiff::<B, _>(StatsOnInner { logits, lse, extra }) {
        Ok(stats) => stats,
        Err(StatsOnInner { logits, lse, extra }) => position_stats_in_chunks(logits, lse, extra, STATS_CHUNK_ELEMENTS),
    }
}

/// [`position_stats`] of an autodiff backend's (detached) tensors computed on its inner
/// backend. Through the autodiff wrapper the same operations held about 2.5 more logits-sized
/// tensors on burn-ndarray (its slices and element-wise operations copied where the inner
/// backend's work in place): 1116 against 500 MiB for 250 MiB of logits.
struct StatsOnInner<B: Backend> {
    logits: Tensor<B, 3>,
    lse: Tensor<B, 3>,
    extra: ExtraStats,
}

impl<B: Backend> AutodiffVisitor for StatsOnInner<B> {
    type Output = PositionStats<B>;

    fn visit<I: Backend>(self) -> PositionStats<B> {
        let inner = |t: Tensor<B, 3>| retype::<_, Tensor<Autodiff<I>, 3>>(t).inner();
        let stats = position_stats_in_chunks(inner(self.logits), inner(self.lse), self.extra, STATS_CHUNK_ELEMENTS);
        stats.map_tensors(|t| retype(Tensor::<Autodiff<I>, 2>::from_inner(t)), |t| retype(Tensor::<Autodiff<I>, 2, Int>::from_inner(t)))
    }
}

/// [`position_stats`] with temporaries of at most `max_elements` (one position at least).
pub(crate) fn position_stats_in_chunks<B: Backend>(
    logits: Tensor<B, 3>,
    lse: Tensor<B, 3>,
    extra: ExtraStats,
    max_elements: usize,
) -> PositionStats<B> {
    let runs = position_runs(logits.dims(), max_elements);
    if let [_] = runs.as_slice() {
        return position_stats_at_once(logits, lse, extra);
    }
    let parts = runs.into_iter().map(|run| {
        position_stats_at_once(logits.clone().narrow(1, run.start, run.len()), lse.clone().narrow(1, run.start, run.len()), extra)
    });
    PositionStats::cat(parts.collect())
}

/// The positions `0..seq` of a `[batch, seq, vocab]` tensor in consecutive runs of at most
/// `max_elements` elements each (one position at least): how the passes over the logits bound
/// their temporaries.
pub(crate) fn position_runs([batch, seq, vocab]: [usize; 3], max_elements: usize) -> Vec<std::ops::Range<usize>> {
    let positions = (max_elements / (batch * vocab).max(1)).max(1);
    if positions >= seq {
        return std::iter::once(0..seq).collect();
    }
    (0..seq).step_by(positions).map(|start| start..(start + positions).min(seq)).collect()
}

/// [`position_stats`] over all of `logits` in one pass, in the backend's own type (half-type
/// logits cast to it).
fn position_stats_at_once<B: Backend>(logits: Tensor<B, 3>, lse: Tensor<B, 3>, extra: ExtraStats) -> PositionStats<B> {
    let logits = cast_to(logits, float_type::<B>());
    let mean_logit: Tensor<B, 2> = logits.clone().mean_dim(2).squeeze_dim(2);
    // H = Σ p (logsumexp(z) − z) with p = softmax(z): a sum of non-negative terms, more
    // accurate in f32 than the algebraically equal logsumexp(z) − Σ p z, which cancels when
    // the distribution is peaked (TRL's kernel uses the latter; they agree to ~1e-6 here).
    let neg_logp = lse - logits.clone();
    let probs = (-neg_logp.clone()).exp();
    // log Σ p² ≥ −log V: no underflow to guard against.
    let log_sum_sq_probs = extra.log_sum_sq_probs.then(|| (probs.clone() * probs.clone()).sum_dim(2).log().squeeze_dim(2));
    let entropy: Tensor<B, 2> = (probs * neg_logp).sum_dim(2).squeeze_dim(2);
    let argmax = logits.argmax(2).squeeze_dim(2);
    PositionStats { mean_logit, entropy, argmax, log_sum_sq_probs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    #[test]
    fn the_statistics_pass_in_chunks_equals_it_at_once() {
        let device = Default::default();
        let logits = Tensor::<NdArray<f32>, 3>::random([2, 7, 11], Distribution::Normal(0.0, 3.0), &device);
        let lse = logsumexp_vocab(logits.clone());
        let extra = ExtraStats { log_sum_sq_probs: true };
        let whole = position_stats_at_once(logits.clone(), lse.clone(), extra);
        // 2 × 11 = 22 elements per position: runs of 1, 2 and 3 positions, the last run shorter.
        for max_elements in [1, 50, 66] {
            let parts = position_stats_in_chunks(logits.clone(), lse.clone(), extra, max_elements);
            assert_eq!(parts.mean_logit.into_data(), whole.mean_logit.clone().into_data(), "mean logit, {max_elements}");
            assert_eq!(parts.entropy.into_data(), whole.entropy.clone().into_data(), "entropy, {max_elements}");
            assert_eq!(parts.argmax.into_data(), whole.argmax.clone().into_data(), "argmax, {max_elements}");
            assert_eq!(
                parts.log_sum_sq_probs.unwrap().into_data(),
                whole.log_sum_sq_probs.clone().unwrap().into_data(),
                "log Σ p², {max_elements}"
            );
        }
    }
}
