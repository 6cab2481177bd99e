//! The seam between the training loop and an objective: what one example is, how a micro-batch
//! of them becomes a loss, and how much each counts.
//!
//! The loop is objective-agnostic. Each optimizer step sums [`Task::loss`] over its micro-batches
//! and divides by the total [`Task::weight`] of the step, so the gradient equals that of one big
//! batch: a token-mean for SFT/CPT (transformers' `num_items_in_batch` normalisation), a pair-mean
//! for DPO/ORPO. The per-objective files (`tasks/sft.rs`, `tasks/dpo.rs`, `tasks/orpo.rs`) are
//! where the objectives differ.

use alignment_models::CausalLm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Named metric values of a micro-batch (means over its examples), TRL's names.
pub type MetricValues = Vec<(String, f64)>;

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

    /// The loss of `examples` summed (not averaged) over what [`Task::weight`] counts, shape
    /// `[1]`, and their metrics as means. Runs on the autodiff backend in training and on the
    /// inner backend in evaluation.
    fn loss<B: Backend>(&self, model: &CausalLm<B>, examples: &[&Self::Example], device: &B::Device) -> (Tensor<B, 1>, MetricValues);
}
