//! Generation benchmark: tokens/s of greedy decoding at several batch sizes, ours against
//! transformers' `generate` on the same model, prompts, batch and lengths, in one run; checks that
//! the greedy tokens are identical.
//!
//! ```text
//! cargo run --release --example bench_generate                      # SmolLM2-135M-Instruct, batch 1 and 8, 64 new tokens
//! cargo run --release --example bench_generate -- --batch-sizes 1,4,8 --new-tokens 128 --model DIR
//! cargo run --release --example bench_generate -- --no-reference   # ours only
//! ```
//! Each batch size takes the first `b` of eight chat prompts (rendered with the model's template,
//! left-padded), and generates exactly `--new-tokens` tokens per row (no stopping at EOS on either
//! side). tokens/s = rows × new tokens / wall time of the whole `generate` call (prefill
//! included); best of `--repeats` runs after a warm-up. `stepwise` is the one-prompt path before
//! batched decoding (a forward pass per token through `CausalLm::forward` with the growing
//! `KvCache`, logits of every prompt position), kept for the before/after record.

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::data::chat_template::{ChatTemplate, Message};
use alignment_handbook::models::{generate_batch, Batch, CausalLm, GenerationConfig, KvCache};
use alignment_handbook::reference::{run_python_script, smollm2_dir};
use alignment_handbook::run::load_for_inference;
use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Hugging Face model directory (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Comma-separated batch sizes (at most 8).
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    batch_sizes: Vec<usize>,
    /// New tokens per row.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed runs per measurement (the best is kept).
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Skip transformers.
    #[arg(long)]
    no_reference: bool,
    /// Skip the stepwise (pre-batching) path.
    #[arg(long)]
    no_stepwise: bool,
    /// Write the measurements here as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

const PROMPTS: [&str; 8] = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show your work.",
    "Give me a recipe for a simple tomato soup, with the ingredients first and then the steps to follow.",
    "Translate 'good morning' into Spanish, French and German.",
    "Summarize the plot of a story about a lost dog that finds its way home.",
];

/// The decoding loop before batched generation: one prompt, `CausalLm::forward` with a growing
/// `KvCache`, the whole prompt's logits at the first step.
fn stepwise(model: &CausalLm<Cpu>, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let mut cache = KvCache::new(model.layers.len());
    let mut step = Batch::from_ids(vec![prompt.to_vec()]);
    let mut out = Vec::new();
    for _ in 0..new_tokens {
        let logits = model.forward(&step, Some(&mut cache));
        let [_, seq, vocab] = logits.dims();
        let row: Vec<f32> = logits.slice([0..1, seq - 1..seq, 0..vocab]).into_data().into_vec().expect("f32");
        let token = row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best }) as u32;
        out.push(token);
        let position = cache.len() as i64;
        step = Batch { input_ids: vec![vec![token]], position_ids: vec![vec![position]], attention_mask: None, document_ids: None };
    }
    out
}

fn best_of<T>(repeats: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut result = f(); // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        result = f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    (best, result)
}

fn main() -> anyhow::Result<()> {
    alignment_core::memory::retain_freed_memory();
    let args = Args::parse();
    anyhow::ensure!(args.batch_sizes.iter().all(|&b| (1..=PROMPTS.len()).contains(&b)), "batch sizes must be 1..=8");
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => smollm2_dir().context("preparing SmolLM2-135M-Instruct")?,
    };
    let template = ChatTemplate::from_model_dir(&dir)?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| {
            let text = template.render(&[Message::new("user", *p)], true)?;
            Ok(tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec())
        })
        .collect::<anyhow::Result<_>>()?;
    let model = load_for_inference::<Cpu>(&dir, &Default::default())?;
    let config = GenerationConfig { max_new_tokens: args.new_tokens, ..Default::default() };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model {}, {} new tokens per row, prompt lengths {:?}, {threads} threads",
        dir.display(),
        args.new_tokens,
        prompts.iter().map(Vec::len).collect::<Vec<_>>()
    );

    let mut ours = Vec::new();
    if !args.no_stepwise {
        let (seconds, tokens) = best_of(args.repeats, || stepwise(&model, &prompts[0], args.new_tokens));
        let rate = args.new_tokens as f64 / seconds;
        println!("stepwise   batch 1: {rate:7.1} tokens/s");
        ours.push(json!({"path": "stepwise", "batch_size": 1, "seconds": seconds, "tokens_per_second": rate, "tokens": [tokens]}));
    }
    for &b in &args.batch_sizes {
        let (seconds, generations) = best_of(args.repeats, || generate_batch(&model, &prompts[..b], &config, |_, _| false));
        let tokens: Vec<Vec<u32>> = generations?.into_iter().map(|g| g.tokens).collect();
        let rate = (b * args.new_tokens) as f64 / seconds;
        println!("batched    batch {b}: {rate:7.1} tokens/s");
        ours.push(json!({"path": "batched", "batch_size": b, "seconds": seconds, "tokens_per_second": rate, "tokens": tokens}));
    }

    let mut reference = Value::Null;
    let mut rows = Vec::new();
    if !args.no_reference {
        let work = tempfile::tempdir()?;
        let request = work.path().join("request.json");
        let out = work.path().join("hf.json");
        let body = json!({"prompts": prompts, "batch_sizes": args.batch_sizes, "new_tokens": args.new_tokens, "repeats": args.repeats});
        std::fs::write(&request, body.to_string())?;
        run_python_script(
            "bench_generate_hf.py",
            &[
                "--model",
                dir.to_str().unwrap_or_default(),
                "--request",
                request.to_str().unwrap_or_default(),
                "--out",
                out.to_str().unwrap_or_default(),
            ],
        )?;
        reference = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
        for run in reference["runs"].as_array().cloned().unwrap_or_default() {
            let b = run["batch_size"].as_u64().unwrap_or(0) as usize;
            let hf_rate = run["tokens_per_second"].as_f64().unwrap_or(f64::NAN);
            let mine = ours.iter().find(|r| r["path"] == "batched" && r["batch_size"] == b).cloned().unwrap_or(Value::Null);
            let identical = mine["tokens"] == run["tokens"];
            let rate = mine["tokens_per_second"].as_f64().unwrap_or(f64::NAN);
            rows.push(format!("| {b} | {rate:.1} | {hf_rate:.1} | {:.2}× | {} |", rate / hf_rate, if identical { "yes" } else { "NO" }));
        }
        println!(
            "\n| batch | ours (tokens/s) | transformers {} (tokens/s) | speed-up | greedy tokens identical |\n|---|---|---|---|---|",
            reference["transformers_version"].as_str().unwrap_or("?")
        );
        for row in &rows {
            println!("{row}");
        }
    }
    if let Some(path) = &args.out {
        let record = json!({"model": dir.display().to_string(), "new_tokens": args.new_tokens, "threads": threads, "ours": ours, "transformers": reference});
        std::fs::write(path, serde_json::to_string_pretty(&record)?)?;
    }
    if rows.iter().any(|r| r.ends_with("NO |")) {
        anyhow::bail!("greedy tokens differ from transformers");
    }
    Ok(())
}
