//! Preference evaluation on chosen/rejected pairs (`prompt`/`chosen`/`rejected` rows, as
//! ultrafeedback_binarized and tiny-chat's `*_prefs` splits).
//!
//! Each pair is tokenized as TRL 1.16 tokenizes conversational preference rows for DPO
//! ([`alignment_data::tokenize_preference_conversation`]: the prompt rendered with the generation
//! prompt, `prompt + chosen` and `prompt + rejected` without; the prompt is their common prefix),
//! optionally truncated to `max_length` keeping the start. A model's score of a completion is its
//! summed log-probability given the prompt, `log π(y | x)`.
//!
//! - **DPO's implicit reward** of the policy against a reference model:
//!   `r(x, y) = β (log π(y|x) − log π_ref(y|x))`; `rewards/accuracies` is the fraction of pairs
//!   with `r(chosen) > r(rejected)`, `rewards/margins` the mean of `r(chosen) − r(rejected)` (TRL's
//!   names and definitions).
//! - **Win/tie/loss of two models**: each model's log-prob margin `log π(chosen) − log π(rejected)`
//!   per pair; the first model wins a pair when its margin is larger by more than the tolerance,
//!   loses when smaller by more, ties otherwise.
//! - Without either, the policy's own `logps/accuracy`: fraction of pairs with
//!   `log π(chosen) > log π(rejected)`.
//!
//! All models must share the policy's tokenizer (the pairs are tokenized once).

use crate::error::EvalError;
use crate::model::EvalModel;
use crate::progress::Progress;
use crate::tasks::{mean_and_stderr, TaskResult};
use alignment_data::format::{split_preference, RowRef, Task as DataTask};
use alignment_data::preference::{tokenize_preference_conversation, TruncationMode};
use alignment_data::Dataset;
use burn::tensor::backend::Backend;
use serde_json::json;

/// A tokenized pair: the prompt and the two completions (truncated as configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Options of the task.
#[derive(Debug, Clone)]
pub struct PreferenceOptions {
    /// DPO's β (the recipes' `beta`).
    pub beta: f64,
    /// Truncate prompt + completion to this many tokens, keeping the start (TRL's `max_length`).
    pub max_length: Option<usize>,
    /// Margins closer than this (nats) are a tie.
    pub tie_tolerance: f64,
}

impl Default for PreferenceOptions {
    fn default() -> Self {
        Self { beta: 0.1, max_length: None, tie_tolerance: 1e-3 }
    }
}

/// Tokenizes every row with `model`'s template and tokenizer; rows whose prompt fills
/// `max_length` (nothing left to score) are dropped, as TRL drops them.
pub fn tokenize_pairs<B: Backend>(
    model: &EvalModel<B>,
    dataset: &Dataset,
    max_length: Option<usize>,
) -> Result<Vec<TokenizedPair>, EvalError> {
    let mut pairs = Vec::new();
    for (i, row) in dataset.rows.iter().enumerate() {
        let origin = dataset.origin(i); // the row's file and line, not its index in a mix
        let label = origin.label();
        let at = RowRef::new(&label, origin.row);
        let messages = split_preference(row, DataTask::Dpo, at)?;
        let location = at.to_string();
        let ids = tokenize_preference_conversation(
            &model.template,
            &model.tokenizer,
            &messages.prompt,
            &messages.chosen,
            &messages.rejected,
            &location,
        )?;
        if !ids.kept(max_length, TruncationMode::KeepStart) || ids.prompt_ids.is_empty() {
            continue;
        }
        let (chosen, rejected) = ids.sequences(max_length, TruncationMode::KeepStart);
        let n = ids.prompt_ids.len();
        pairs.push(TokenizedPair {
            prompt: ids.prompt_ids.clone(),
            chosen: chosen.input_ids[n..].to_vec(),
            rejected: rejected.input_ids[n..].to_vec(),
        });
    }
    Ok(pairs)
}

/// `(log π(chosen | prompt), log π(rejected | prompt))` of every pair under `model`.
pub fn pair_logps<B: Backend>(model: &EvalModel<B>, pairs: &[TokenizedPair], progress: &Progress) -> Result<Vec<(f64, f64)>, EvalError> {
    let vocab = model.model.embedding_dims()[0] as u32;
    if let Some(id) = pairs.iter().flat_map(|p| p.prompt.iter().chain(&p.chosen).chain(&p.rejected)).find(|&&id| id >= vocab) {
        return Err(EvalError::Config(format!(
            "model `{}` has {vocab} tokens but the pairs use id {id}: the models do not share a tokenizer",
            model.name
        )));
    }
    let mut requests = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        // An empty completion (truncated away) scores 0.
        requests.push((p.prompt.clone(), p.chosen.clone()));
        requests.push((p.prompt.clone(), p.rejected.clone()));
    }
    let nonempty: Vec<usize> = (0..requests.len()).filter(|&i| !requests[i].1.is_empty()).collect();
    let scored = model.loglikelihood_tokens(&nonempty.iter().map(|&i| requests[i].clone()).collect::<Vec<_>>(), progress)?;
    let mut logps = vec![0.0; requests.len()];
    for (&i, s) in nonempty.iter().zip(scored) {
        logps[i] = s.logprob;
    }
    Ok(logps.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Scores `policy` on the pairs of `dataset`, against `reference` (DPO rewards) and `other`
/// (win/tie/loss) when given.
pub fn run<B: Backend>(
    policy: &EvalModel<B>,
    reference: Option<&EvalModel<B>>,
    other: Option<&EvalModel<B>>,
    dataset: &Dataset,
    options: &PreferenceOptions,
    quiet: bool,
) -> Result<TaskResult, EvalError> {
    let pairs = tokenize_pairs(policy, dataset, options.max_length)?;
    let passes = 1 + usize::from(reference.is_some()) + usize::from(other.is_some());
    let progress = Progress::new("preference", (2 * pairs.len() * passes) as u64, quiet);
    let policy_logps = pair_logps(policy, &pairs, &progress)?;
    let reference_logps = reference.map(|m| pair_logps(m, &pairs, &progress)).transpose()?;
    let other_logps = other.map(|m| pair_logps(m, &pairs, &progress)).transpose()?;
    progress.finish();

    let mut result = TaskResult::new("preference", &dataset.name, pairs.len());
    let mean = |v: &[f64]| mean_and_stderr(v).0;
    let margins: Vec<f64> = policy_logps.iter().map(|(c, r)| c - r).collect();
    result.metric("logps/accuracy", mean(&margins.iter().map(|&m| f64::from(m > 0.0)).collect::<Vec<_>>()));
    result.metric("logps/chosen", mean(&policy_logps.iter().map(|p| p.0).collect::<Vec<_>>()));
    result.metric("logps/rejected", mean(&policy_logps.iter().map(|p| p.1).collect::<Vec<_>>()));
    if let Some(reference_logps) = &reference_logps {
        let rewards: Vec<(f64, f64)> =
            policy_logps.iter().zip(reference_logps).map(|(p, r)| (options.beta * (p.0 - r.0), options.beta * (p.1 - r.1))).collect();
        result.metric("rewards/accuracies", mean(&rewards.iter().map(|r| f64::from(r.0 > r.1)).collect::<Vec<_>>()));
        result.metric("rewards/margins", mean(&rewards.iter().map(|r| r.0 - r.1).collect::<Vec<_>>()));
        result.metric("rewards/chosen", mean(&rewards.iter().map(|r| r.0).collect::<Vec<_>>()));
        result.metric("rewards/rejected", mean(&rewards.iter().map(|r| r.1).collect::<Vec<_>>()));
        result.notes.push(format!("rewards: β = {} against reference `{}`", options.beta, reference.map_or("", |m| m.name.as_str())));
    }
    if let Some(other_logps) = &other_logps {
        let (mut win, mut tie, mut loss) = (0usize, 0usize, 0usize);
        for (m, o) in margins.iter().zip(other_logps) {
            let diff = m - (o.0 - o.1);
            if diff > options.tie_tolerance {
                win += 1;
            } else if diff < -options.tie_tolerance {
                loss += 1;
            } else {
                tie += 1;
            }
        }
        let n = pairs.len().max(1) as f64;
        result.metric("win_rate", win as f64 / n).metric("tie_rate", tie as f64 / n).metric("loss_rate", loss as f64 / n);
        result.notes.push(format!(
            "win/tie/loss {win}/{tie}/{loss} against `{}` (log-prob margins, tie within {} nats)",
            other.map_or("", |m| m.name.as_str()),
            options.tie_tolerance
        ));
    }
    for (i, p) in policy_logps.iter().enumerate() {
        let mut sample = json!({"pair": i, "logp_chosen": p.0, "logp_rejected": p.1});
        if let Some(r) = &reference_logps {
            sample["ref_logp_chosen"] = json!(r[i].0);
            sample["ref_logp_rejected"] = json!(r[i].1);
        }
        if let Some(o) = &other_logps {
            sample["other_logp_chosen"] = json!(o[i].0);
            sample["other_logp_rejected"] = json!(o[i].1);
        }
        result.samples.push(sample);
    }
    Ok(result)
}
