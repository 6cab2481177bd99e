//! The model under evaluation: the network with its tokenizer and chat template, and the two
//! things every task asks of it — complete prompts ([`EvalModel::generate`]) and score
//! continuations ([`EvalModel::loglikelihood`], in [`crate::loglikelihood`]).

use crate::error::EvalError;
use crate::progress::Progress;
use alignment_data::{ChatTemplate, Message};
use alignment_models::{generate_batch_seeded, CausalLm, FinishReason, GenerationConfig};
use burn::tensor::backend::Backend;
use std::path::Path;
use tokenizers::Tokenizer;

/// A model ready to be evaluated.
pub struct EvalModel<B: Backend> {
    /// The network.
    pub model: CausalLm<B>,
    /// Its tokenizer (`tokenizer.json`).
    pub tokenizer: Tokenizer,
    /// Its chat template with special tokens (`tokenizer_config.json`).
    pub template: ChatTemplate,
    /// The name answer files and reports use (FastChat's `model_id`, AlpacaEval's `generator`).
    pub name: String,
    /// Tokens that end a completion: `config.json`'s `eos_token_id`(s) and the tokenizer's EOS.
    pub stop_tokens: Vec<u32>,
    /// Rows per forward pass.
    pub batch_size: usize,
}

/// How to sample completions.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// Nucleus mass; 1 disables it.
    pub top_p: f32,
    /// Seed of the sampler (prompt `i` of a call samples with `seed + i`).
    pub seed: u64,
    /// The completion ends before the first of these strings (which is not part of it).
    pub stop: Vec<String>,
}

impl SamplingParams {
    /// Greedy decoding of up to `max_new_tokens`, no stop strings.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, stop: Vec::new() }
    }
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The decoded text without special tokens, cut before any stop string.
    pub text: String,
    /// Number of generated tokens (a final stop token included).
    pub num_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
}

impl<B: Backend> EvalModel<B> {
    /// Wraps a loaded model with the tokenizer and chat template found in `tokenizer_dir`.
    pub fn new(model: CausalLm<B>, tokenizer_dir: &Path, name: impl Into<String>) -> Result<Self, EvalError> {
        let path = tokenizer_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| EvalError::Read { path, message: e.to_string() })?;
        let template = ChatTemplate::from_model_dir(tokenizer_dir)?;
        let mut stop_tokens = model.config.eos_token_ids.clone();
        if let Some(eos) = template.eos_token().and_then(|t| tokenizer.token_to_id(t)) {
            if !stop_tokens.contains(&eos) {
                stop_tokens.push(eos);
            }
        }
        Ok(Self { model, tokenizer, template, name: name.into(), stop_tokens, batch_size: 8 })
    }

    /// Token ids of `text` with the tokenizer's special tokens (BOS...) as transformers'
    /// `tokenizer(text)` adds them, unless `text` already starts with the BOS text (lm-evaluation-
    /// harness' `tok_encode`).
    pub fn encode(&self, text: &str, location: &str) -> Result<Vec<u32>, EvalError> {
        let starts_with_bos = self.template.bos_token().is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
        self.encode_with(text, !starts_with_bos, location)
    }

    /// Token ids of `text`, with or without the tokenizer's special tokens.
    pub fn encode_with(&self, text: &str, special_tokens: bool, location: &str) -> Result<Vec<u32>, EvalError> {
        let encoding = self
            .tokenizer
            .encode(text, special_tokens)
            .map_err(|e| EvalError::Tokenizer { location: location.to_string(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The prompt for `messages` as transformers' `apply_chat_template(messages,
    /// add_generation_prompt=True, tokenize=True)` makes it: the rendered text tokenized without
    /// adding special tokens (the template writes them).
    pub fn chat_prompt(&self, messages: &[Message], location: &str) -> Result<Vec<u32>, EvalError> {
        let text = self.template.render(messages, true)?;
        self.encode_with(&text, false, location)
    }

    /// The text of `tokens` without special tokens (`skip_special_tokens=True`).
    pub fn decode(&self, tokens: &[u32]) -> String {
        let kept: Vec<u32> = tokens.iter().copied().filter(|t| !self.stop_tokens.contains(t)).collect();
        self.tokenizer.decode(&kept, true).unwrap_or_default()
    }

    /// Completes every prompt (token ids), [`Self::batch_size`] at a time. Prompts are sorted by
    /// length so each batch pads little; results come back in the order given. `progress`
    /// advances by one per finished prompt.
    pub fn generate(&self, prompts: &[Vec<u32>], params: &SamplingParams, progress: &Progress) -> Result<Vec<Completion>, EvalError> {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
        let mut results: Vec<Option<Completion>> = vec![None; prompts.len()];
        let config = GenerationConfig {
            max_new_tokens: params.max_new_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            seed: params.seed,
            stop_tokens: self.stop_tokens.clone(),
        };
        for chunk in order.chunks(self.batch_size.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            // Prompt `i` samples with `seed + i`, whatever batch it lands in.
            let seeds: Vec<u64> = chunk.iter().map(|&i| params.seed.wrapping_add(i as u64)).collect();
            let outputs = self.generate_rows(&batch, &seeds, &config, params)?;
            progress.inc(chunk.len() as u64);
            for (&i, completion) in chunk.iter().zip(outputs) {
                results[i] = Some(completion);
            }
        }
        Ok(results.into_iter().map(|c| c.expect("every prompt is in one chunk")).collect())
    }

    fn generate_rows(
        &self,
        batch: &[Vec<u32>],
        seeds: &[u64],
        config: &GenerationConfig,
        params: &SamplingParams,
    ) -> Result<Vec<Completion>, EvalError> {
        let stop_hit = |tokens: &[u32]| {
            if params.stop.is_empty() {
                return false;
            }
            let text = self.decode(tokens);
            params.stop.iter().any(|s| text.contains(s.as_str()))
        };
        let generations = generate_batch_seeded(&self.model, batch, seeds, config, |_, tokens| stop_hit(tokens))?;
        Ok(generations
            .into_iter()
            .map(|g| {
                let mut text = self.decode(&g.tokens);
                if let Some(cut) = params.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    text.truncate(cut);
                }
                Completion { text, num_tokens: g.tokens.len(), finish: g.finish }
            })
            .collect())
    }
}
