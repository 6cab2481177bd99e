//! The seam between the training loop and an objective: what one example is, which rows and
//! labels a micro-batch of them puts through the model, how the per-row log-probabilities
//! become a loss, and how much each micro-batch counts.
//!
//! The loop is objective-agnostic. Each optimizer step sums the micro-batches' losses and
//! divides by the total [`Task::weight`] of the step, so the gradient equals that of one big
//! batch: a token-mean for SFT/CPT (transformers' `num_items_in_batch` normalisation), a pair-mean
//! for DPO/ORPO. The per-objective files (`tasks/sft.rs`, `tasks/dpo.rs`, `tasks/orpo.rs`) are
//! where the objectives differ.
//!
//! An objective never sees logits: it gets [`SequenceLogps`] — per-row sums of the labelled
//! tokens' log-probabilities and the statistics TRL logs — for each of its label sets. That is
//! what lets the step compute them from the full logits ([`Task::loss`]) or chunk by chunk from
//! the hidden states without ever holding the logits (`crate::step`), with the same result.

use alignment_models::{Batch, CausalLm};
use alignment_objectives::logprobs::sequence_logps_with;
use alignment_objectives::{DeferredMetrics, ExtraStats, SequenceLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Named metric values of a micro-batch (means over its examples), TRL's names.
pub type MetricValues = Vec<(String, f64)>;

/// What one forward pass scores for a micro-batch: the padded rows and one or more label sets
/// over them (`[rows, seq]` each, `IGNORE_INDEX` where nothing is scored).
#[derive(Debug, Clone)]
pub struct Scoring<B: Backend> {
    pub batch: Batch,
    pub label_sets: Vec<Tensor<B, 2, Int>>,
    /// `[examples]` numbers the loss reads besides the log-probabilities, uploaded with the rows
    /// ([`Task::loss_from_scored`]): DPO's reference log-probs, chosen then rejected; none for
    /// SFT and ORPO.
    pub row_values: Vec<Tensor<B, 1>>,
}

/// An objective as the training loop drives it.
pub trait Task {
    /// One training example after tokenization.
    type Example: Clone;

    /// Short name for logs (`sft`, `dpo`, ...).
    fn name(&self) -> &'static str;

    /// How much `examples` count in the step's normaliser (scored tokens or rows).
    fn weight(&self, examples: &[&Self::Example]) -> f64;

    /// Real (non-padding) tokens the forward pass processes, for tokens/s.
    fn num_tokens(&self, examples: &[&Self::Example]) -> usize;

    /// The token sequences of one example (its row, or a pair's chosen and rejected rows): what
    /// the loop checks against the model's vocabulary and hashes into the resume fingerprint.
    /// The default, none, skips both.
    fn sequences<'a>(&self, _example: &'a Self::Example) -> Vec<&'a crate::Sequence> {
        Vec::new()
    }

    /// The rows and label sets the forward pass of `examples` scores.
    fn scoring<B: Backend>(&self, examples: &[&Self::Example], device: &B::Device) -> Scoring<B>;

    /// The optional per-token statistics [`Task::loss_from_logps`] reads (none by default).
    fn extra_stats(&self) -> ExtraStats {
        ExtraStats::default()
    }

    /// `∂loss/∂sum` per label set when it is a constant, the same for every row whatever the
    /// log-probabilities: the loss is `Σ_sets c_set · Σ_rows sum` (SFT's `−Σ sum`: `[-1]`). The
    /// chunked head then computes the log-probabilities and the head's gradients in one walk over
    /// the chunks, each chunk's head product once instead of twice (`crate::step`). `None` (the
    /// default): the loss's own backward pass gives them.
    fn constant_sum_gradients(&self) -> Option<Vec<f64>> {
        None
    }

    /// The loss of `examples` summed (not averaged) over what [`Task::weight`] counts, shape
    /// `[1]`, and their metrics (as means, read later), from the per-row log-probabilities of
    /// each label set of [`Task::scoring`], in its order. Only `SequenceLogps::sum` may carry
    /// gradient.
    fn loss_from_logps<B: Backend>(
        &self,
        logps: Vec<SequenceLogps<B>>,
        examples: &[&Self::Example],
        device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>);

    /// [`Task::loss_from_logps`] reading what [`Task::scoring`] uploaded for the loss
    /// (`scoring.row_values`) instead of uploading it again: what the training step calls, so
    /// that nothing moves from the host between a micro-batch's uploads and its loss (a step
    /// replayed as a CUDA graph needs that). The default ignores `scoring`.
    fn loss_from_scored<B: Backend>(
        &self,
        logps: Vec<SequenceLogps<B>>,
        examples: &[&Self::Example],
        scoring: &Scoring<B>,
        device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        let _ = scoring;
        self.loss_from_logps(logps, examples, device)
    }

    /// The loss and metrics of `examples` through the full logits: the plain path (evaluation,
    /// tests, training without the chunked head). Reads the metrics back at once.
    fn loss<B: Backend>(&self, model: &CausalLm<B>, examples: &[&Self::Example], device: &B::Device) -> (Tensor<B, 1>, MetricValues) {
        let scoring = self.scoring::<B>(examples, device);
        let logps = sequence_logps_with(model.forward(&scoring.batch, None), scoring.label_sets, self.extra_stats());
        let (loss, metrics) = self.loss_from_logps(logps, examples, device);
        (loss, metric_values(metrics))
    }
}

/// Reads deferred metrics into `(name, value)` pairs.
pub fn metric_values<B: Backend>(metrics: DeferredMetrics<B>) -> MetricValues {
    metrics.read().iter().map(|(k, v)| (k.to_string(), v)).collect()
}
