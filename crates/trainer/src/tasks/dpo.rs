//! DPO: what makes preference training differ from SFT, in one place.
//!
//! An example is a *pair*: the same prompt with a chosen and a rejected completion (labels only on
//! the completion tokens). Both are scored in one forward pass (TRL's `concatenated_forward`:
//! chosen rows first, then rejected rows, padded together), each row's completion log-probability
//! is summed, and the loss compares the policy's chosen-vs-rejected margin with the frozen
//! reference model's margin (`alignment_objectives::dpo`). The reference log-probs are computed
//! once, before training, from the starting weights ([`precompute_reference`]) and cached on
//! disk, as TRL's `precompute_ref_log_probs` and open-instruct do; a frozen copy evaluated each
//! step would give the same numbers at twice the forward cost.
//!
//! Every TRL 1.16 `loss_type` works from the same per-row sums, with two additions the task asks
//! the step for: LD-DPO (`ld_alpha`) scores the completion tokens past the pair's shared length
//! as a second label set, and WPO (`use_weighting`) asks for `log Σ p²` per token
//! ([`Task::extra_stats`]). The reference's tail sums are precomputed with its sums, whatever the
//! configuration, so one cache serves every `ld_alpha`. No loss type keeps state across steps in
//! TRL 1.16 (`bco_pair` has no running reward mean there), so there is nothing to checkpoint.

use crate::sequence::{collate, Collation, Sequence};
use crate::task::{Scoring, Task};
use alignment_models::CausalLm;
use alignment_objectives::dpo::{dpo_loss_with_tails, ld_tail_row, DpoConfig};
use alignment_objectives::logprobs::sequence_logps_many;
use alignment_objectives::{DeferredMetrics, ExtraStats, SequenceLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A prompt with a chosen and a rejected completion, tokenized as prompt+completion rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Prompt + chosen completion; labels on the completion only.
    pub chosen: Sequence,
    /// Prompt + rejected completion; labels on the completion only.
    pub rejected: Sequence,
    /// The reference model's summed completion log-probs, once computed ([`precompute_reference`]).
    pub reference: Option<ReferenceLogps>,
}

/// The reference model's log-probs of a pair's completions, summed over completion tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogps {
    /// Of the chosen completion.
    pub chosen: f64,
    /// Of the rejected completion.
    pub rejected: f64,
    /// `[chosen, rejected]` over the tokens past the pair's shared completion length only, for
    /// LD-DPO (`ld_alpha`); `None` if not computed.
    pub tails: Option<[f64; 2]>,
}

impl ReferenceLogps {
    /// Sums without tails (enough unless `ld_alpha` is set).
    pub fn new(chosen: f64, rejected: f64) -> Self {
        Self { chosen, rejected, tails: None }
    }

    /// `[chosen, rejected]` as the loss uses them: LD-weighted with `config.ld_alpha`.
    ///
    /// # Panics
    /// If `ld_alpha` is set and the tails were not computed.
    pub fn for_config(&self, config: &DpoConfig) -> [f64; 2] {
        match (config.ld_alpha, self.tails) {
            (None, _) => [self.chosen, self.rejected],
            (Some(_), Some([c, r])) => [config.ld_logp(self.chosen, c), config.ld_logp(self.rejected, r)],
            (Some(_), None) => panic!("ld_alpha needs the reference's tail log-probs (precompute_reference computes them)"),
        }
    }
}

impl PreferencePair {
    /// Real tokens of both rows.
    pub fn num_tokens(&self) -> usize {
        self.chosen.num_tokens() + self.rejected.num_tokens()
    }

    /// LD-DPO's tail rows: the chosen and rejected rows labelled only past the pair's shared
    /// completion length `min(|y_w|, |y_l|)` (TRL's `tail_mask`).
    pub fn tails(&self) -> [Sequence; 2] {
        let shared = self.chosen.num_scored().min(self.rejected.num_scored());
        [&self.chosen, &self.rejected].map(|row| Sequence { labels: ld_tail_row(&row.labels, shared), ..row.clone() })
    }
}

/// The rows of `pairs` in TRL's `concatenated_forward` order: every chosen row, then every
/// rejected row, so row `i` and row `n + i` belong to pair `i`.
pub fn concatenated_rows<'a>(pairs: &[&'a PreferencePair]) -> Vec<&'a Sequence> {
    pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect()
}

/// The label sets of `pairs`' concatenated rows: the completions, and with `ld` the tails
/// ([`PreferencePair::tails`]), padded alike.
fn label_sets<B: Backend>(pairs: &[&PreferencePair], ld: bool, collation: Collation, device: &B::Device) -> Scoring<B> {
    let (batch, labels) = collate::<B>(&concatenated_rows(pairs), collation, device);
    let mut label_sets = vec![labels];
    if ld {
        let tails: Vec<[Sequence; 2]> = pairs.iter().map(|p| p.tails()).collect();
        let rows: Vec<&Sequence> = tails.iter().map(|[c, _]| c).chain(tails.iter().map(|[_, r]| r)).collect();
        label_sets.push(collate::<B>(&rows, collation, device).1);
    }
    Scoring { batch, label_sets, row_values: Vec::new() }
}

/// DPO with TRL's loss variants.
#[derive(Debug, Clone)]
pub struct DpoTask {
    /// The loss types, their weights and settings.
    pub config: DpoConfig,
    /// How micro-batches are padded.
    pub collation: Collation,
}

/// Scores chosen and rejected rows of `pairs` in one forward pass: per-row summed completion
/// log-probs and the tails' (chosen rows first), as `[chosen, rejected, chosen tail, rejected
/// tail]` per pair.
fn concatenated_forward<B: Backend>(
    model: &CausalLm<B>,
    pairs: &[&PreferencePair],
    collation: Collation,
    device: &B::Device,
) -> Vec<ReferenceLogps> {
    let scoring = label_sets::<B>(pairs, true, collation, device);
    let scored = sequence_logps_many(model.forward(&scoring.batch, None), scoring.label_sets);
    let sums: Vec<Vec<f64>> = scored.into_iter().map(|s| s.sum.into_data().iter::<f64>().collect()).collect();
    let n = pairs.len();
    (0..n).map(|i| ReferenceLogps { chosen: sums[0][i], rejected: sums[0][n + i], tails: Some([sums[1][i], sums[1][n + i]]) }).collect()
}

impl Task for DpoTask {
    type Example = PreferencePair;

    fn name(&self) -> &'static str {
        "dpo"
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

    /// The label sets, and the pairs' reference log-probs as the loss uses them when every pair
    /// has them (training; not while they are being computed).
    fn scoring<B: Backend>(&self, pairs: &[&PreferencePair], device: &B::Device) -> Scoring<B> {
        let mut scoring = label_sets(pairs, self.config.ld_alpha.is_some(), self.collation, device);
        if pairs.iter().all(|p| p.reference.is_some()) {
            scoring.row_values = self.reference_columns(pairs, device).to_vec();
        }
        scoring
    }

    fn extra_stats(&self) -> ExtraStats {
        ExtraStats { log_sum_sq_probs: self.config.needs_log_sum_sq_probs() }
    }

    fn loss_from_logps<B: Backend>(
        &self,
        logps: Vec<SequenceLogps<B>>,
        pairs: &[&PreferencePair],
        device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        let [chosen, rejected] = self.reference_columns(pairs, device);
        self.loss_with_references(logps, pairs.len(), chosen, rejected)
    }

    /// The references [`Task::scoring`] uploaded, when it did.
    fn loss_from_scored<B: Backend>(
        &self,
        logps: Vec<SequenceLogps<B>>,
        pairs: &[&PreferencePair],
        scoring: &Scoring<B>,
        device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        match scoring.row_values.as_slice() {
            [chosen, rejected] => self.loss_with_references(logps, pairs.len(), chosen.clone(), rejected.clone()),
            _ => self.loss_from_logps(logps, pairs, device),
        }
    }
}

impl DpoTask {
    /// The pairs' reference log-probs as the loss uses them ([`ReferenceLogps::for_config`]),
    /// chosen and rejected, as `[pairs]` tensors on `device`.
    fn reference_columns<B: Backend>(&self, pairs: &[&PreferencePair], device: &B::Device) -> [Tensor<B, 1>; 2] {
        let references: Vec<[f64; 2]> = pairs
            .iter()
            .map(|p| p.reference.expect("reference log-probs are computed before training (precompute_reference)").for_config(&self.config))
            .collect();
        [0, 1].map(|i| {
            let values: Vec<f32> = references.iter().map(|r| r[i] as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(values, [pairs.len()]), device)
        })
    }

    /// The loss of `n` pairs' log-probabilities against their references.
    fn loss_with_references<B: Backend>(
        &self,
        logps: Vec<SequenceLogps<B>>,
        n: usize,
        reference_chosen: Tensor<B, 1>,
        reference_rejected: Tensor<B, 1>,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        let mut halves = logps.into_iter().map(|l| l.split_at(n));
        let (chosen, rejected) = halves.next().expect("the completions' label set");
        let tails = halves.next();
        let tails = tails.as_ref().map(|(c, r)| (c, r));
        let out = dpo_loss_with_tails(&chosen, &rejected, tails, reference_chosen, reference_rejected, &self.config);
        (out.losses.clone().sum(), out.deferred_metrics())
    }
}

/// Where reference log-probs are cached: a directory, and the digest of the reference model's
/// weights (hashed once, tensor by tensor, however many pair sets are then computed).
#[derive(Debug, Clone)]
pub struct ReferenceCache {
    dir: PathBuf,
    weights_digest: String,
}

impl ReferenceCache {
    /// A cache in `dir` for the log-probs of `model`.
    pub fn new<B: Backend>(dir: &Path, model: &CausalLm<B>) -> Self {
        let mut hash = Sha256::new();
        alignment_models::pretrained::for_each_named_tensor(model, |tensor| {
            hash.update(tensor.name.as_bytes());
            tensor.values.iter().for_each(|v| hash.update(v.to_le_bytes()));
        });
        Self { dir: dir.to_path_buf(), weights_digest: hex(hash.finalize().as_slice()) }
    }

    /// The file for `pairs`: the weights' digest and every pair's tokens and labels, hashed.
    fn file(&self, pairs: &[PreferencePair]) -> PathBuf {
        let mut hash = Sha256::new();
        hash.update(self.weights_digest.as_bytes());
        for p in pairs {
            for s in [&p.chosen, &p.rejected] {
                hash.update((s.input_ids.len() as u64).to_le_bytes());
                s.input_ids.iter().for_each(|i| hash.update(i.to_le_bytes()));
                s.labels.iter().for_each(|l| hash.update(l.to_le_bytes()));
            }
        }
        self.dir.join(format!("{}.json", hex(hash.finalize().as_slice())))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills `reference` of every pair with the log-probs of `model` (the starting weights), sums
/// and LD-DPO tails, in batches of `batch_size`. With a `cache` (made from the same model),
/// results are stored under a key hashing the model's weights and every pair's tokens, and
/// reused when the same model and data come again (a cache file in another format is
/// recomputed).
pub fn precompute_reference<B: Backend>(
    model: &CausalLm<B>,
    pairs: &mut [PreferencePair],
    batch_size: usize,
    collation: Collation,
    cache: Option<&ReferenceCache>,
    device: &B::Device,
) -> Result<(), alignment_core::IoError> {
    let cache_file = cache.map(|c| c.file(pairs));
    if let Some(file) = &cache_file {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Ok(values) = serde_json::from_str::<Vec<ReferenceLogps>>(&text) {
                if values.len() == pairs.len() {
                    for (p, v) in pairs.iter_mut().zip(values) {
                        p.reference = Some(v);
                    }
                    return Ok(());
                }
            }
        }
    }
    let mut values = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        values.extend(concatenated_forward(model, &refs, collation, device));
    }
    for (p, v) in pairs.iter_mut().zip(&values) {
        p.reference = Some(*v);
    }
    if let Some(file) = cache_file {
        let json = serde_json::to_string(&values).expect("numbers serialize");
        alignment_core::write_atomic(&file, |w| w.write_all(json.as_bytes()))?;
    }
    Ok(())
}
