//! Autoregressive decoding with a key/value cache: greedy (temperature 0) or sampled with
//! temperature and nucleus (top-p) filtering.

use crate::decode::generate_batch;
use crate::error::ModelError;
use crate::model::CausalLm;
use burn::tensor::backend::Backend;
use rand::{rngs::StdRng, Rng};

/// How to decode.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Nucleus sampling mass; 1.0 disables it.
    pub top_p: f32,
    /// Seed of the sampling RNG.
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, top_p: 1.0, seed: 0, stop_tokens: vec![] }
    }
}

/// Generates a continuation of `prompt`, calling `on_token` as each token is chosen (for
/// streaming output). Returns the new tokens, including a final stop token if one was produced.
/// A batch of one for [`crate::decode::generate_batch`]; a prompt that fills the model's context
/// (`max_position_embeddings`) is refused.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Generation("the prompt has no tokens".into()));
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() >= context {
        return Err(ModelError::Generation(format!(
            "the prompt has {} tokens, which leaves no room in the model's context of {context} tokens (max_position_embeddings in config.json); shorten the prompt",
            prompt.len()
        )));
    }
    let mut streamed = 0;
    let mut generations = generate_batch(model, &[prompt.to_vec()], config, |_, tokens| {
        tokens[streamed..].iter().for_each(|&t| on_token(t));
        streamed = tokens.len();
        false
    })?;
    let tokens = generations.pop().map(|g| g.tokens).unwrap_or_default();
    // The callback does not see the token that ended generation on a stop token.
    tokens[streamed.min(tokens.len())..].iter().for_each(|&t| on_token(t));
    Ok(tokens)
}

/// The next token from one row of logits: the argmax when `config.temperature` is 0 (ties to the
/// lowest id, as `torch.argmax`), else a draw from the temperature-scaled, top-p-filtered
/// distribution.
pub(crate) fn choose_token(row: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    if config.temperature <= 0.0 {
        argmax(row)
    } else {
        sample(row, config, rng)
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(row: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = row.iter().enumerate().map(|(i, &v)| (i, ((v - max) / config.temperature).exp())).collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= config.top_p {
            cut = n + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mut draw = rng.random::<f32>() * kept.min(1.0);
    for &(i, p) in &probs {
        if draw < p {
            return i as u32;
        }
        draw -= p;
    }
    probs.last().map_or(0, |p| p.0 as u32)
}
