//! Autoregressive decoding with a key/value cache: greedy (temperature 0) or sampled with
//! temperature and nucleus (top-p) filtering.

use crate::error::ModelError;
use crate::model::{Batch, CausalLm, KvCache};
use burn::tensor::backend::Backend;
use rand::{rngs::StdRng, Rng, SeedableRng};

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
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Generation("the prompt has no tokens".into()));
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut cache = KvCache::new(model.layers.len());
    let mut generated = Vec::new();
    let mut step = Batch::from_ids(vec![prompt.to_vec()]);
    for _ in 0..config.max_new_tokens {
        let logits = model.forward(&step, Some(&mut cache));
        let [_, seq, vocab] = logits.dims();
        let last = logits.slice([0..1, seq - 1..seq, 0..vocab]);
        let row: Vec<f32> = last.into_data().convert::<f32>().into_vec().expect("f32 after convert");
        let token = if config.temperature <= 0.0 { argmax(&row) } else { sample(&row, config, &mut rng) };
        generated.push(token);
        on_token(token);
        if config.stop_tokens.contains(&token) {
            break;
        }
        let position = cache.len() as i64;
        step = Batch { input_ids: vec![vec![token]], position_ids: vec![vec![position]], attention_mask: None, document_ids: None };
    }
    Ok(generated)
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
