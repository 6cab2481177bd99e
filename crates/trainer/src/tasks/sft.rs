//! SFT and CPT: next-token cross-entropy on the labelled tokens of each sequence (assistant turns
//! for SFT with `assistant_only_loss`, every token for CPT). The step's loss is the token-mean
//! over all micro-batches of the step (transformers' `num_items_in_batch`), or the summed token
//! loss per micro-batch with open-instruct's `reduce_loss: sum`.

use crate::sequence::{collate, Collation, Sequence};
use crate::task::{Scoring, Task};
use alignment_objectives::sft::{Reduction, SftOutput};
use alignment_objectives::{DeferredMetrics, SequenceLogps};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Causal-LM training on sequences with labels.
#[derive(Debug, Clone)]
pub struct SftTask {
    /// Token-mean over the step, or the token sum per micro-batch.
    pub reduction: Reduction,
    /// How micro-batches are padded.
    pub collation: Collation,
    /// `sft` or `cpt`, for logs.
    pub name: &'static str,
}

impl Task for SftTask {
    type Example = Sequence;

    fn name(&self) -> &'static str {
        self.name
    }

    fn weight(&self, examples: &[&Sequence]) -> f64 {
        match self.reduction {
            // Token mean over the whole step (the loop divides by the step's total).
            Reduction::Mean | Reduction::MeanOver(_) => examples.iter().map(|e| e.num_scored()).sum::<usize>() as f64,
            // open-instruct: token sums, divided only by the number of micro-batches.
            Reduction::Sum => 1.0,
        }
    }

    fn sequences<'a>(&self, example: &'a Sequence) -> Vec<&'a Sequence> {
        vec![example]
    }

    fn num_tokens(&self, examples: &[&Sequence]) -> usize {
        examples.iter().map(|e| e.num_tokens()).sum()
    }

    fn scoring<B: Backend>(&self, examples: &[&Sequence], device: &B::Device) -> Scoring<B> {
        let (batch, labels) = collate::<B>(examples, self.collation, device);
        Scoring { batch, label_sets: vec![labels], row_values: Vec::new() }
    }

    /// The loss is `−Σ sum` ([`SequenceLogps::sum_nll`] below), whatever the reduction (the loop
    /// divides by the step's weight afterwards).
    fn constant_sum_gradients(&self) -> Option<Vec<f64>> {
        Some(vec![-1.0])
    }

    fn loss_from_logps<B: Backend>(
        &self,
        mut logps: Vec<SequenceLogps<B>>,
        examples: &[&Sequence],
        _device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        let _ = examples;
        let logps = logps.pop().expect("one label set");
        let loss_sum = logps.sum_nll();
        let out = SftOutput { loss: loss_sum, logps };
        // The logged loss is this micro-batch's token mean, over the scored tokens the device
        // counted (the host's count of the examples' labels, as an exact f32): a step replayed
        // as a CUDA graph reads it from the batch it replays, not from the one it captured.
        (out.loss.clone(), out.deferred_token_mean_metrics())
    }
}
