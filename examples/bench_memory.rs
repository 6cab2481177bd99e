//! Peak memory of full fine-tuning vs LoRA vs QLoRA on the same model and batch (CPU: process
//! RSS), with the bytes each part of the training state takes.
//!
//! ```text
//! cargo run --release --example bench_memory                       # all three modes, a table
//! cargo run --release --example bench_memory -- --write docs/memory.md
//! cargo run --release --example bench_memory -- --model random:llama-400m   # a larger random Llama
//! ```
//!
//! Each mode runs in its own child process (this binary re-executed with `--mode`), so one
//! mode's allocations cannot raise another's peak. A child loads the model, resets the kernel's
//! peak-RSS counter (`/proc/self/clear_refs`), runs `--steps` SFT updates (forward, backward,
//! AdamW) on a fixed batch, and reports: RSS after loading, the peak RSS while loading and
//! while training (`VmHWM`), and the analytic sizes of the weights, gradients and optimizer
//! moments.

use alignment_core::backend::{Cpu, CpuAutodiff};
use alignment_handbook::run::resolve_model;
use alignment_models::weights::{write_safetensors, NamedTensor};
use alignment_models::{load_pretrained, CausalLm, SaveDtype};
use alignment_objectives::Reduction;
use alignment_peft::qlora::{base_weight_bytes, load_pretrained_4bit};
use alignment_peft::{apply_lora, num_lora_params, LoraConfig, QuantConfig, TargetModules};
use alignment_trainer::optimizer::{AdamW, AdamWConfig};
use alignment_trainer::tasks::SftTask;
use alignment_trainer::{forward_backward, StepOptions};
use alignment_trainer::{Collation, Sequence, Task};
use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsAccumulator;
use clap::Parser;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Model directory or known id, or `random:llama-400m` (random bf16 weights, made once
    /// under the cache directory).
    #[arg(long, default_value = "HuggingFaceTB/SmolLM2-135M-Instruct")]
    model: String,
    /// `full`, `lora`, `qlora`, or `all` (each in a child process).
    #[arg(long, default_value = "all")]
    mode: String,
    /// Training updates measured.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// LoRA rank (all linear layers).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Write the markdown report here (with `--mode all`).
    #[arg(long)]
    write: Option<PathBuf>,
    /// Recompute each layer in the backward pass (always on for `qlora`, as in the trainer).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Compute the head in chunks, never holding the full logits.
    #[arg(long)]
    chunked_head: bool,
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`); the benchmark needs Linux.
fn status_bytes(field: &str) -> u64 {
    alignment_core::memory::status_bytes(field).unwrap_or_else(|| panic!("{field} in /proc/self/status (Linux only)"))
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("writing /proc/self/clear_refs");
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A Llama-shaped model with random weights: hidden 1024, 24 layers, MLP 2816, vocab 32000,
/// untied head (≈ 375M parameters), written in bf16 once and reused.
fn random_llama_400m() -> PathBuf {
    let dir = alignment_handbook::reference::cache_dir().join("bench-models/llama-400m");
    if dir.join("model.safetensors").is_file() {
        return dir;
    }
    let (hidden, layers, inter, vocab, heads, kv_heads) = (1024usize, 24usize, 2816usize, 32000usize, 16usize, 8usize);
    let head_dim = hidden / heads;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
    });
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect()
    };
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![heads * head_dim, hidden]),
            ("self_attn.k_proj", vec![kv_heads * head_dim, hidden]),
            ("self_attn.v_proj", vec![kv_heads * head_dim, hidden]),
            ("self_attn.o_proj", vec![hidden, heads * head_dim]),
            ("mlp.gate_proj", vec![inter, hidden]),
            ("mlp.up_proj", vec![inter, hidden]),
            ("mlp.down_proj", vec![hidden, inter]),
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
        ] {
            tensors.push((format!("{p}.{name}.weight"), shape));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![hidden]));
    tensors.push(("lm_head.weight".into(), vec![vocab, hidden]));
    let named: Vec<NamedTensor> = tensors
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = if name.ends_with("norm.weight") { vec![1.0; n] } else { random(n) };
            NamedTensor { name, shape, values }
        })
        .collect();
    std::fs::create_dir_all(&dir).expect("creating the model directory");
    write_safetensors(&dir.join("model.safetensors.partial"), &named, SaveDtype::BF16).expect("writing weights");
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).expect("writing config.json");
    std::fs::rename(dir.join("model.safetensors.partial"), dir.join("model.safetensors")).expect("renaming weights");
    dir
}

fn model_dir(name: &str) -> PathBuf {
    match name {
        "random:llama-400m" => random_llama_400m(),
        other => resolve_model(other).expect("model"),
    }
}

/// One mode, in this process: prints one JSON line.
fn measure(args: &Args, mode: &str) {
    let dir = model_dir(&args.model);
    let device = Default::default();
    let lora = LoraConfig::new(args.rank, 2.0 * args.rank as f64, TargetModules::AllLinear);
    let start = Instant::now();
    let model: CausalLm<CpuAutodiff> = match mode {
        "full" => load_pretrained(&dir, &device).unwrap(),
        "lora" => apply_lora(load_pretrained(&dir, &device).unwrap(), &lora, 0).unwrap(),
        "qlora" => apply_lora(load_pretrained_4bit(&dir, &device, QuantConfig::nf4(true)).unwrap(), &lora, 0).unwrap(),
        other => panic!("unknown mode {other}"),
    };
    let load_seconds = start.elapsed().as_secs_f64();
    let load_peak = status_bytes("VmHWM");
    let after_load = status_bytes("VmRSS");
    reset_peak();

    let total_params = model.num_params();
    let trainable = if mode == "full" { total_params } else { num_lora_params(&model) };
    let weights = base_weight_bytes::<Cpu>(&model.valid()) + if mode == "full" { 0 } else { 4 * trainable };
    let vocab = model.config.vocab_size as u32;
    let examples: Vec<Sequence> = (0..args.batch as u32)
        .map(|b| {
            let ids: Vec<u32> = (0..args.seq as u32).map(|t| (b * 7919 + t * 104_729) % vocab).collect();
            let labels = ids.iter().map(|&i| i as i64).collect();
            Sequence::new(ids, labels)
        })
        .collect();
    let refs: Vec<&Sequence> = examples.iter().collect();
    let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let mut optimizer = AdamW::<Cpu>::new(AdamWConfig::default());
    let mut model = model;
    let mut losses = Vec::new();
    let start = Instant::now();
    // As the trainer does (a 4-bit base always trains with gradient checkpointing).
    let options = StepOptions::for_model(&model, args.gradient_checkpointing, args.chunked_head);
    for _ in 0..args.steps {
        let mut accumulator = GradientsAccumulator::new();
        let metrics = forward_backward(&model, &task, &refs, 1.0 / task.weight(&refs), &options, &mut accumulator, &device);
        losses.push(metrics.read().get("loss").unwrap_or(f64::NAN));
        model = optimizer.step(1e-4, model, accumulator.grads()).0;
    }
    let step_seconds = start.elapsed().as_secs_f64() / args.steps as f64;
    let moments: usize = optimizer.state.values().map(|m| 2 * 4 * m.exp_avg.shape().num_elements()).sum();
    let report = json!({
        "mode": mode,
        "total_params": total_params,
        "trainable_params": trainable,
        "weight_bytes": weights,
        "grad_bytes": 4 * trainable,
        "optimizer_bytes": moments,
        "rss_after_load": after_load,
        "peak_rss_load": load_peak,
        "peak_rss_train": status_bytes("VmHWM"),
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "losses": losses,
        "gradient_checkpointing": options.gradient_checkpointing,
        "chunked_head": args.chunked_head,
    });
    println!("{report}");
}

fn main() {
    alignment_core::memory::retain_freed_memory();
    let args = Args::parse();
    if args.mode != "all" {
        measure(&args, &args.mode);
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    model_dir(&args.model); // made once here, not inside a measured child
    let mut rows = Vec::new();
    for mode in ["full", "lora", "qlora"] {
        eprintln!("measuring {mode} ...");
        let out = Command::new(&exe)
            .args(["--model", &args.model, "--mode", mode, "--steps", &args.steps.to_string()])
            .args(["--batch", &args.batch.to_string(), "--seq", &args.seq.to_string(), "--rank", &args.rank.to_string()])
            .args(args.gradient_checkpointing.then_some("--gradient-checkpointing"))
            .args(args.chunked_head.then_some("--chunked-head"))
            .output()
            .expect("running the measurement child");
        assert!(out.status.success(), "{mode} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout).lines().last().expect("a JSON line").to_string();
        rows.push(serde_json::from_str::<serde_json::Value>(&line).expect("JSON"));
    }
    let get = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut table = String::from(
        "| mode | trainable params | weights (MiB) | grads (MiB) | AdamW moments (MiB) | RSS after load (MiB) | peak RSS loading (MiB) | peak RSS training (MiB) | s/step |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        table += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} |\n",
            r["mode"].as_str().unwrap_or("?"),
            r["trainable_params"],
            mib(get(r, "weight_bytes") as u64),
            mib(get(r, "grad_bytes") as u64),
            mib(get(r, "optimizer_bytes") as u64),
            mib(get(r, "rss_after_load") as u64),
            mib(get(r, "peak_rss_load") as u64),
            mib(get(r, "peak_rss_train") as u64),
            get(r, "step_seconds"),
        );
    }
    println!("{table}");
    println!("raw: {}", serde_json::Value::Array(rows.clone()));
    if let Some(path) = &args.write {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let key = format!(
            "{}{}{}",
            args.model,
            if args.gradient_checkpointing { ":checkpointed" } else { "" },
            if args.chunked_head { ":chunked" } else { "" }
        );
        let (begin, end) = (format!("<!-- bench_memory:{key}:begin -->"), format!("<!-- bench_memory:{key}:end -->"));
        let (begin, end) = (begin.as_str(), end.as_str());
        let block = format!(
            "{begin}\nModel `{}`, batch {}×{} tokens, LoRA r={} on all linear layers, {} updates, f32 compute, \
             QLoRA with NF4 + double quantization (always with gradient checkpointing); gradient checkpointing {}, chunked head {}. Measured {}.\n\n{table}\n<details><summary>raw</summary>\n\n```json\n{}\n```\n</details>\n{end}",
            args.model,
            args.batch,
            args.seq,
            args.rank,
            args.steps,
            if args.gradient_checkpointing { "on" } else { "off" },
            if args.chunked_head { "on" } else { "off" },
            Command::new("date").arg("-u").arg("+%Y-%m-%d").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
            serde_json::to_string_pretty(&rows).expect("JSON")
        );
        let new = match (text.find(begin), text.find(end)) {
            (Some(b), Some(e)) => format!("{}{block}{}", &text[..b], &text[e + end.len()..]),
            _ => format!("{text}\n{block}\n"),
        };
        alignment_core::atomic::write_atomic(path, |w| std::io::Write::write_all(w, new.as_bytes())).expect("writing the report");
        eprintln!("wrote {}", path.display());
    }
}
