//! ORPO: preference pairs like DPO, but no reference model — the chosen completion is also
//! trained on directly (an SFT term over the chosen rows' prompt and completion, as TRL does)
//! and the odds ratio of chosen over rejected, from length-averaged log-probs, is pushed up
//! (`alignment_objectives::orpo`).

use crate::sequence::{collate, Collation, Sequence, IGNORE_INDEX};
use crate::task::{Scoring, Task};
use crate::tasks::dpo::{concatenated_rows, PreferencePair};
use alignment_objectives::orpo::{orpo_loss, OrpoConfig};
use alignment_objectives::{DeferredMetrics, SequenceLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// ORPO over preference pairs (their `reference` is unused).
#[derive(Debug, Clone)]
pub struct OrpoTask {
    pub config: OrpoConfig,
    /// How micro-batches are padded.
    pub collation: Collation,
}

impl Task for OrpoTask {
    type Example = PreferencePair;

    fn name(&self) -> &'static str {
        "orpo"
    }

    fn weight(&self, examples: &[&PreferencePair]) -> f64 {
        examples.len() as f64
    }

    fn sequences<'a>(&self, example: &'a PreferencePair) -> Vec<&'a Sequence> {
        vec![&example.chosen, &example.rejected]
    }

    fn num_tokens(&self, examples: &[&PreferencePair]) -> usize {
        examples.iter().map(|p| p.num_tokens()).sum()
    }

    fn scoring<B: Backend>(&self, pairs: &[&PreferencePair], device: &B::Device) -> Scoring<B> {
        let rows = concatenated_rows(pairs);
        let (batch, completion_labels) = collate::<B>(&rows, self.collation, device);
        // TRL's NLL term: labels = input ids wherever the attention mask is 1 (prompt included).
        let [rows_n, width] = batch.dims();
        let full: Vec<i64> = batch
            .input_ids
            .iter()
            .zip(rows.iter())
            .flat_map(|(ids, row)| ids.iter().enumerate().map(move |(t, &id)| if t < row.num_tokens() { id as i64 } else { IGNORE_INDEX }))
            .collect();
        let full_labels = Tensor::<B, 2, Int>::from_data(TensorData::new(full, [rows_n, width]), device);
        Scoring { batch, label_sets: vec![completion_labels, full_labels], row_values: Vec::new() }
    }

    fn loss_from_logps<B: Backend>(
        &self,
        mut logps: Vec<SequenceLogps<B>>,
        pairs: &[&PreferencePair],
        _device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        let n = pairs.len();
        let full = logps.pop().expect("two label sets");
        let completion = logps.pop().expect("two label sets");
        let (chosen, rejected) = completion.split_at(n);
        let (chosen_full, _) = full.split_at(n);
        let out = orpo_loss(&chosen, &rejected, chosen_full.mean_nll(), &self.config);
        // The step's loss is the mean over pairs: scale this micro-batch's mean by its size.
        (out.loss.clone() * n as f64, out.deferred_metrics())
    }
}
