//! Supervised fine-tuning (SFT) and continued pre-training (CPT): next-token cross entropy.
//!
//! The loss is `-log p(label)` per scored token, reduced over the batch. SFT and CPT differ only
//! in their labels (built by `alignment-data`): SFT masks everything but the assistant turns with
//! [`IGNORE_INDEX`](crate::IGNORE_INDEX), CPT scores every non-padding token. Nothing here needs a
//! reference model or pairs of completions: compare with `dpo.rs`.
//!
//! Reproduces TRL 1.16.0 `SFTTrainer.compute_loss` (`trl/trainer/sft_trainer.py`, lines
//! 1611–1618, `loss_type="nll"`): `per_token_loss = -log_probs`; `loss = per_token_loss.sum() /
//! num_tokens` with `num_tokens = label_mask.sum()` or `num_items_in_batch` when the Trainer passes
//! it; and its metrics (lines 1639–1657): `entropy`, `mean_token_accuracy`, `num_tokens`.

use crate::logprobs::{sequence_logps, sequence_logps_sum, SequenceLogps};
use crate::metrics::{ratio, DeferredMetrics, Metrics};
use crate::ObjectiveError;
use burn::tensor::{backend::Backend, Int, Tensor};
use std::str::FromStr;

/// How the per-token cross entropies of a batch are reduced to the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reduction {
    /// Mean over the scored tokens of the batch: transformers' `ForCausalLMLoss` (PyTorch
    /// `cross_entropy(..., ignore_index=-100, reduction="mean")`) and TRL's SFT loss without
    /// gradient accumulation. Every token of the micro-batch weighs the same; with gradient
    /// accumulation, micro-batches with few tokens get their tokens over-weighted.
    Mean,
    /// Sum over the scored tokens, not divided by anything: open-instruct's `reduce_loss: sum`
    /// (`finetune.py`: `CrossEntropyLoss(reduction="sum")` over the shifted labels). There the
    /// only division is accelerate's `accelerator.backward`, which divides by
    /// `gradient_accumulation_steps` — the trainer's business, not the loss's. Weights every
    /// token of the dataset equally (open-instruct reports better AlpacaEval with it), at the
    /// cost of a loss and gradient scale that grow with the number of tokens per batch.
    Sum,
    /// The sum divided by a given token count: transformers' behaviour under gradient
    /// accumulation, where `num_items_in_batch` is the number of scored tokens of *all* the
    /// micro-batches of one optimizer step (see [`num_scored_tokens`](crate::num_scored_tokens)),
    /// so that the accumulated gradient is the token mean over the whole step.
    MeanOver(f64),
}

impl Reduction {
    /// Applies the reduction to a summed NLL `[1]` of `num_tokens` scored tokens (`[1]`).
    fn apply<B: Backend>(self, nll_sum: Tensor<B, 1>, num_tokens: Tensor<B, 1>) -> Tensor<B, 1> {
        match self {
            // TRL clamps the count so that a batch without scored tokens gives 0, not 0/0.
            Reduction::Mean => nll_sum / num_tokens.clamp_min(1.0),
            Reduction::Sum => nll_sum,
            Reduction::MeanOver(n) => nll_sum / n.max(1.0),
        }
    }
}

/// Parses open-instruct's `reduce_loss` values, `"mean"` and `"sum"`.
impl FromStr for Reduction {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            other => Err(ObjectiveError::UnknownValue { what: "reduce_loss", given: other.to_string(), valid: &["mean", "sum"] }),
        }
    }
}

/// Next-token cross entropy of `labels` under `logits`, reduced as `reduction` says; `[1]`.
///
/// `logits` `[batch, seq, vocab]`, `labels` `[batch, seq]` in the input-ids layout with
/// [`IGNORE_INDEX`](crate::IGNORE_INDEX) on tokens not scored (shifted inside, see
/// [`sequence_logps`]). The cheapest entry point: no metrics are computed.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, reduction: Reduction) -> Tensor<B, 1> {
    let (sum, num_tokens) = sequence_logps_sum(logits, labels);
    reduction.apply(-sum.sum(), num_tokens.sum())
}

/// The summed next-token cross entropy `[1]`, for a caller that normalises itself (e.g. by
/// transformers' `num_items_in_batch`); same as [`causal_lm_loss`] with [`Reduction::Sum`].
pub fn causal_lm_loss_sum<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    causal_lm_loss(logits, labels, Reduction::Sum)
}

/// The SFT/CPT loss of one micro-batch with what TRL logs about it.
#[derive(Debug, Clone)]
pub struct SftOutput<B: Backend> {
    /// `[1]` the reduced cross entropy; call `backward()` on it.
    pub loss: Tensor<B, 1>,
    /// Per-row log-probabilities and token statistics.
    pub logps: SequenceLogps<B>,
}

/// [`causal_lm_loss`] plus the statistics for [`SftOutput::metrics`].
pub fn sft_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>, reduction: Reduction) -> SftOutput<B> {
    let logps = sequence_logps(logits, labels);
    let loss = reduction.apply(logps.sum_nll(), logps.num_tokens.clone().sum());
    SftOutput { loss, logps }
}

impl<B: Backend> SftOutput<B> {
    /// TRL's SFT metrics for this micro-batch: `loss`, `entropy` (mean next-token entropy over
    /// the scored tokens) and `mean_token_accuracy` (share of scored tokens whose label is the
    /// argmax). Reads a few scalars back from the device.
    ///
    /// TRL's `num_tokens` is not here: it is the running total of *input* tokens seen in
    /// training (`attention_mask.sum()` accumulated over steps, prompt included), which only the
    /// trainer knows.
    pub fn metrics(&self) -> Metrics {
        self.deferred_metrics().read()
    }

    /// [`Self::metrics`], read later ([`DeferredMetrics`]).
    pub fn deferred_metrics(&self) -> DeferredMetrics<B> {
        self.deferred(false)
    }

    /// [`Self::deferred_metrics`] with `loss` divided by the scored tokens (at least 1), as the
    /// device counted them: the micro-batch's token-mean loss, whatever the reduction. The count
    /// comes with the rows, so metrics read after a CUDA graph's replay are the replayed batch's.
    pub fn deferred_token_mean_metrics(&self) -> DeferredMetrics<B> {
        self.deferred(true)
    }

    /// The metrics' rows on the device; `loss` as it is, or divided by the scored tokens.
    fn deferred(&self, token_mean: bool) -> DeferredMetrics<B> {
        let rows = vec![
            self.loss.clone().detach(),
            self.logps.num_tokens.clone().sum(),
            self.logps.entropy_sum.clone().sum(),
            self.logps.num_correct.clone().sum(),
        ];
        DeferredMetrics::new(rows, move |rows| {
            let (loss, tokens, entropy, correct) = (rows[0][0], rows[1][0], rows[2][0], rows[3][0]);
            let loss = if token_mean { loss / tokens.max(1.0) } else { loss };
            Metrics::new().with("loss", loss).with("entropy", ratio(entropy, tokens)).with("mean_token_accuracy", ratio(correct, tokens))
        })
    }
}
