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

use crate::sequence::{collate, Sequence};
use crate::task::{Scoring, Task};
use alignment_models::CausalLm;
use alignment_objectives::dpo::{dpo_loss, DpoConfig};
use alignment_objectives::logprobs::sequence_logps;
use alignment_objectives::{DeferredMetrics, SequenceLogps};
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
    /// The reference model's summed completion log-probs `[chosen, rejected]`, once computed.
    pub reference: Option<[f64; 2]>,
}

impl PreferencePair {
    /// Real tokens of both rows.
    pub fn num_tokens(&self) -> usize {
        self.chosen.num_tokens() + self.rejected.num_tokens()
    }
}

/// The rows of `pairs` in TRL's `concatenated_forward` order: every chosen row, then every
/// rejected row, so row `i` and row `n + i` belong to pair `i`.
pub fn concatenated_rows<'a>(pairs: &[&'a PreferencePair]) -> Vec<&'a Sequence> {
    pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect()
}

/// DPO with TRL's loss variants.
#[derive(Debug, Clone)]
pub struct DpoTask {
    pub config: DpoConfig,
    pub pad_id: u32,
}

/// Scores chosen and rejected rows of `pairs` in one forward pass: per-row summed completion
/// log-probs, completion token counts and mean completion logits, chosen rows first.
fn concatenated_forward<B: Backend>(
    model: &CausalLm<B>,
    pairs: &[&PreferencePair],
    pad_id: u32,
    device: &B::Device,
) -> alignment_objectives::logprobs::SequenceLogps<B> {
    let (batch, labels) = collate::<B>(&concatenated_rows(pairs), pad_id, device);
    sequence_logps(model.forward(&batch, None), labels)
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

    fn scoring<B: Backend>(&self, pairs: &[&PreferencePair], device: &B::Device) -> Scoring<B> {
        let (batch, labels) = collate::<B>(&concatenated_rows(pairs), self.pad_id, device);
        Scoring { batch, label_sets: vec![labels] }
    }

    fn loss_from_logps<B: Backend>(
        &self,
        mut logps: Vec<SequenceLogps<B>>,
        pairs: &[&PreferencePair],
        device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        let n = pairs.len();
        let (chosen, rejected) = logps.pop().expect("one label set").split_at(n);
        let reference_of =
            |p: &&PreferencePair| p.reference.expect("reference log-probs are computed before training (precompute_reference)");
        let column = |i: usize| {
            let values: Vec<f32> = pairs.iter().map(|p| reference_of(p)[i] as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device)
        };
        let out = dpo_loss(&chosen, &rejected, column(0), column(1), &self.config);
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

/// Fills `reference` of every pair with the log-probs of `model` (the starting weights), in
/// batches of `batch_size`. With a `cache` (made from the same model), results are stored under
/// a key hashing the model's weights and every pair's tokens, and reused when the same model and
/// data come again.
pub fn precompute_reference<B: Backend>(
    model: &CausalLm<B>,
    pairs: &mut [PreferencePair],
    batch_size: usize,
    pad_id: u32,
    cache: Option<&ReferenceCache>,
    device: &B::Device,
) -> Result<(), alignment_core::IoError> {
    let cache_file = cache.map(|c| c.file(pairs));
    if let Some(file) = &cache_file {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Ok(values) = serde_json::from_str::<Vec<[f64; 2]>>(&text) {
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
        let sums = concatenated_forward(model, &refs, pad_id, device).sum.into_data().convert::<f64>().into_vec::<f64>().expect("f64");
        let n = chunk.len();
        values.extend((0..n).map(|i| [sums[i], sums[n + i]]));
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
