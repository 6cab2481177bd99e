//! The training-step benchmark and the GPU correctness check (issue #12), one binary for every
//! backend this build has (`ndarray` always; `cuda`, `tch` by feature), so the same code runs
//! as a dry run on the CPU here and for real on the GPU machine.
//!
//! ```text
//! bench_train train --backend cuda-bf16 --shape scripts/gpu/shapes/llama-3.2-1b.json --task sft --seq 1024 --batch 4
//! bench_train check --backend cuda --fixtures crates/models/tests/fixtures --write-reference DIR   # or --reference DIR
//! bench_train nccl                                                          # NCCL at world size 1 vs one process
//! ```
//!
//! `train` builds a randomly initialised model from a config.json (no weights travel), runs
//! `--warmup` then `--steps` optimizer steps of the real training step — the trainer's task
//! (`SftTask`, `DpoTask`), the autodiff backward pass, gradient accumulation, our AdamW with
//! global-norm clipping — on random tokens, synchronising the device after each step, and
//! prints one JSON line: step times, median, tokens/s, model FLOPs utilisation. PyTorch's side
//! of the same measurement is `scripts/gpu/torch_baseline.py`; `scripts/gpu/run.sh` stages both.
//!
//! `check` runs two optimizer steps of SFT, DPO, LoRA and QLoRA on the committed tiny Llama
//! fixture and compares losses, metrics and the second step's gradients with values the CPU
//! backend wrote (`--write-reference` on the CPU, `--reference` on the GPU).

use alignment_models::{random_model, CausalLm, ModelConfig};
use alignment_objectives::DeferredMetrics;
use alignment_objectives::{DpoConfig, Reduction};
use alignment_peft::{apply_lora, LoraConfig, QuantConfig, TargetModules};
use alignment_trainer::optimizer::{AdamW, AdamWConfig, DeviceStepReport};
use alignment_trainer::tasks::{DpoTask, PreferencePair, ReferenceLogps, SftTask};
use alignment_trainer::{forward_backward, Sequence, StepOptions, Task, IGNORE_INDEX};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time training steps of a random model.
    Train(TrainArgs),
    /// Compare one backend's losses and gradients on the tiny fixtures with the CPU's.
    Check(CheckArgs),
    /// Run the NCCL communicator at world size 1 and compare with the single-process one.
    Nccl,
}

#[derive(Parser)]
struct TrainArgs {
    /// `cpu`, `cuda` (f32), `cuda-bf16`, `tch-cpu`, `tch-cuda`, `tch-cuda-bf16` (those built in).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// A config.json giving the model's shape.
    #[arg(long)]
    shape: PathBuf,
    /// `sft`, `dpo` (full fine-tuning), `lora` (r 16, all linear layers), `qlora` (NF4 base + lora).
    #[arg(long, default_value = "sft")]
    task: String,
    /// Tokens per sequence (for DPO: per chosen and per rejected row).
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Sequences per micro-batch (DPO: pairs).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Untimed steps first (kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Peak dense bf16 rate for MFU, TFLOP/s (H100/H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recompute each layer in the backward pass (`gradient_checkpointing: true`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Compute the head in chunks, never holding the full logits (`use_liger_kernel: true`).
    #[arg(long)]
    chunked_head: bool,
}

#[derive(Parser)]
struct CheckArgs {
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Directory holding the `tiny-llama` fixture.
    #[arg(long, default_value = "crates/models/tests/fixtures")]
    fixtures: PathBuf,
    /// Write this backend's values here (run on the CPU).
    #[arg(long)]
    write_reference: Option<PathBuf>,
    /// Compare with the values written here by `--write-reference`.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Write the comparison as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() {
    alignment_core::memory::retain_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => dispatch_train(&args),
        Command::Check(args) => dispatch_check(&args),
        Command::Nccl => nccl_check(),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

/// Runs `$body` with `B` bound to the autodiff backend named by `$name` and `$device` to its
/// device, for the backends compiled into this binary.
macro_rules! with_backend {
    ($name:expr, |$b:ident, $device:ident| $body:expr) => {{
        match $name {
            "cpu" => {
                type $b = alignment_core::backend::CpuAutodiff;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            "cuda" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::Gpu>;
                let $device = burn::backend::cuda::CudaDevice::new(0);
                $body
            }
            #[cfg(feature = "cuda")]
            "cuda-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::GpuBf16>;
                let $device = burn::backend::cuda::CudaDevice::new(0);
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cpu" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::Torch>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cpu;
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cuda" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::Torch>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cuda(0);
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cuda-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::TorchBf16>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cuda(0);
                $body
            }
            other => Err(format!(
                "backend `{other}` is not built into this binary (features: cpu{}{})",
                if cfg!(feature = "cuda") { ", cuda, cuda-bf16" } else { "" },
                if cfg!(feature = "tch") { ", tch-cpu, tch-cuda, tch-cuda-bf16" } else { "" }
            )),
        }
    }};
}

fn dispatch_train(args: &TrainArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device| run_train::<B>(args, &device))
}

fn dispatch_check(args: &CheckArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device| run_check::<B>(args, &device))
}

// ---------------------------------------------------------------------------------------------
// The training step, as the trainer's loop runs it (crates/trainer/src/train.rs).

/// One optimizer step over `micro_batches`, as the trainer's loop runs it: each micro-batch's
/// forward and backward pass (`step::forward_backward`, shaped by `options`) with its loss
/// divided by the step's total weight, gradients accumulated, then AdamW. Returns the updated
/// model, the step's pending metrics with their weights, the gradients and the device report.
#[allow(clippy::type_complexity)]
fn train_step<B: AutodiffBackend, T: Task>(
    model: CausalLm<B>,
    task: &T,
    micro_batches: &[Vec<&T::Example>],
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    options: &StepOptions,
    device: &B::Device,
) -> (CausalLm<B>, Vec<(DeferredMetrics<B>, f64)>, GradientsParams, DeviceStepReport<B::InnerBackend>) {
    let step_weight: f64 = micro_batches.iter().map(|b| task.weight(b)).sum::<f64>().max(f64::MIN_POSITIVE);
    let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
    let mut pending = Vec::new();
    for batch in micro_batches {
        let metrics = forward_backward(&model, task, batch, 1.0 / step_weight, options, &mut accumulator, device);
        pending.push((metrics, task.weight(batch) / step_weight));
    }
    let grads = accumulator.grads();
    let (model, report) = optimizer.step(lr, model, &grads);
    (model, pending, grads, report)
}

/// The weighted means of a step's pending metrics (reads them from the device).
fn read_metrics<B: Backend>(pending: Vec<(DeferredMetrics<B>, f64)>) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::<String, f64>::new();
    for (deferred, w) in pending {
        for (k, v) in deferred.read().iter() {
            *metrics.entry(k.to_string()).or_default() += v * w;
        }
    }
    metrics
}

/// Deterministic pseudo-random token ids in `1..vocab` (splitmix64).
fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            1 + ((z ^ (z >> 31)) % (vocab as u64 - 1)) as u32
        })
        .collect()
}

/// An SFT row of `len` tokens, every token scored.
fn sft_row(len: usize, vocab: usize, seed: u64) -> Sequence {
    let ids = random_tokens(len, vocab, seed);
    let labels = ids.iter().map(|&i| i as i64).collect();
    Sequence::new(ids, labels)
}

/// A preference pair: a shared prompt of `len / 2` tokens, then different completions, each row
/// `len` tokens; the reference log-probs are fixed numbers (precomputed in a real run).
fn dpo_pair(len: usize, vocab: usize, seed: u64) -> PreferencePair {
    let prompt = random_tokens(len / 2, vocab, seed);
    let row = |salt: u64| {
        let mut ids = prompt.clone();
        ids.extend(random_tokens(len - prompt.len(), vocab, seed ^ salt));
        let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt.len() { IGNORE_INDEX } else { t as i64 }).collect();
        Sequence::new(ids, labels)
    };
    PreferencePair { chosen: row(1), rejected: row(2), reference: Some(ReferenceLogps::new(-(len as f64), -(len as f64) * 1.1)) }
}

/// Parameters with a gradient (trainable) and in total.
fn count_params<B: AutodiffBackend>(model: &CausalLm<B>) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.shape().num_elements();
            self.1 += n;
            if param.is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut count = Count(0, 0);
    model.visit(&mut count);
    // Quantized (NF4) weights are integer tensors, not float parameters.
    let compressed: usize = alignment_peft::lora::linear_layers(model)
        .iter()
        .filter(|(_, l)| l.quantized.is_some())
        .map(|(_, l)| l.dims().iter().product::<usize>())
        .sum();
    (count.0, count.1 + compressed)
}

/// Training FLOPs per token, PaLM's convention (appendix B): `6·N` for the matmul parameters
/// (every projection and the head; the embedding lookup is free) plus `12·L·H·T` for the
/// attention scores and their weighted sum (forward + backward, the causal half not skipped).
/// LoRA/QLoRA count the same: the frozen weights' input gradients cost as much as in full
/// fine-tuning; only the weight gradients are skipped, so this over-counts their work by ≈ 1/3.
fn flops_per_token(config: &ModelConfig, seq: usize) -> f64 {
    let (h, i, v) = (config.hidden_size as f64, config.intermediate_size as f64, config.vocab_size as f64);
    let q = (config.num_heads * config.head_dim) as f64;
    let kv = (config.num_kv_heads * config.head_dim) as f64;
    let per_layer = h * q * 2.0 + h * kv * 2.0 + 3.0 * h * i;
    let matmul_params = config.num_layers as f64 * per_layer + v * h;
    6.0 * matmul_params + 12.0 * config.num_layers as f64 * q * seq as f64
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run_train<B: AutodiffBackend>(args: &TrainArgs, device: &B::Device) -> Result<(), String> {
    let config = ModelConfig::from_file(&args.shape).map_err(|e| e.to_string())?;
    let load_start = Instant::now();
    let quant = QuantConfig { double_quant: true };
    let quantize = |values: &[f32], dims: [usize; 2]| quant.quantize(values, dims);
    let model = match args.task.as_str() {
        "sft" | "dpo" | "lora" => random_model::<B>(config.clone(), args.seed, device, None),
        "qlora" => random_model::<B>(config.clone(), args.seed, device, Some(&quantize)),
        other => return Err(format!("--task {other}: expected sft, dpo, lora or qlora")),
    }
    .map_err(|e| e.to_string())?;
    let model = if matches!(args.task.as_str(), "lora" | "qlora") {
        let mut lora = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
        lora.dropout = 0.0;
        apply_lora(model, &lora, args.seed).map_err(|e| e.to_string())?
    } else {
        model
    };
    B::sync(device).map_err(|e| format!("{e:?}"))?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let (trainable, total) = count_params(&model);
    let vocab = config.vocab_size;
    let mut optimizer = AdamW::<B::InnerBackend>::new(AdamWConfig::default());
    let lr = 1e-5;
    let total_steps = args.warmup + args.steps;
    // As the trainer does (a 4-bit base always trains with gradient checkpointing).
    let options = StepOptions::for_model(&model, args.gradient_checkpointing, args.chunked_head);
    let mut step_seconds = Vec::new();
    let mut losses = Vec::new();
    let mut model = model;
    let tokens_per_step;
    match args.task.as_str() {
        "dpo" => {
            let task = DpoTask { config: DpoConfig::default(), pad_id: 0 };
            let pairs: Vec<PreferencePair> = (0..args.batch * args.accum).map(|i| dpo_pair(args.seq, vocab, 1000 + i as u64)).collect();
            let batches: Vec<Vec<&PreferencePair>> = pairs.chunks(args.batch).map(|c| c.iter().collect()).collect();
            tokens_per_step = pairs.iter().map(|p| p.num_tokens()).sum::<usize>();
            for step in 0..total_steps {
                let start = Instant::now();
                let (updated, pending, _, _) = train_step(model, &task, &batches, &mut optimizer, lr, &options, device);
                model = updated;
                B::sync(device).map_err(|e| format!("{e:?}"))?;
                if step >= args.warmup {
                    step_seconds.push(start.elapsed().as_secs_f64());
                }
                losses.push(read_metrics(pending).get("loss").copied().unwrap_or(f64::NAN));
            }
        }
        _ => {
            let task = SftTask { reduction: Reduction::Mean, pad_id: 0, name: "sft" };
            let rows: Vec<Sequence> = (0..args.batch * args.accum).map(|i| sft_row(args.seq, vocab, 1000 + i as u64)).collect();
            let batches: Vec<Vec<&Sequence>> = rows.chunks(args.batch).map(|c| c.iter().collect()).collect();
            tokens_per_step = rows.iter().map(Sequence::num_tokens).sum::<usize>();
            for step in 0..total_steps {
                let start = Instant::now();
                let (updated, pending, _, _) = train_step(model, &task, &batches, &mut optimizer, lr, &options, device);
                model = updated;
                B::sync(device).map_err(|e| format!("{e:?}"))?;
                if step >= args.warmup {
                    step_seconds.push(start.elapsed().as_secs_f64());
                }
                losses.push(read_metrics(pending).get("loss").copied().unwrap_or(f64::NAN));
            }
        }
    }
    let med = median(&step_seconds);
    let tokens_per_second = tokens_per_step as f64 / med;
    let flops = flops_per_token(&config, args.seq);
    let achieved_tflops = tokens_per_second * flops / 1e12;
    let line = json!({
        "impl": "ours",
        "backend": args.backend,
        "shape": args.shape.file_stem().and_then(|s| s.to_str()).unwrap_or("?"),
        "task": args.task,
        "seq": args.seq,
        "batch": args.batch,
        "accum": args.accum,
        "params": total,
        "trainable_params": trainable,
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "median_step_seconds": med,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops,
        "achieved_tflops": achieved_tflops,
        "mfu": achieved_tflops / args.peak_tflops,
        "losses": losses,
        "gradient_checkpointing": args.gradient_checkpointing,
        "chunked_head": args.chunked_head,
        "peak_rss_mib": alignment_core::memory::status_bytes("VmHWM").map(|b| b as f64 / 1048576.0),
    });
    println!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Correctness on the tiny fixtures: this backend against the CPU's values.

/// The cases of `check`: (name, task kind, with LoRA, with an NF4 base).
const CASES: [(&str, &str, bool, bool); 4] =
    [("sft", "sft", false, false), ("dpo", "dpo", false, false), ("lora", "sft", true, false), ("qlora", "sft", true, true)];

/// Gradients by parameter path (`layers.0.self_attn.q_proj.weight`, ...), flattened to f32.
fn named_gradients<B: AutodiffBackend>(model: &CausalLm<B>, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: BTreeMap<String, Vec<f32>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let values = g.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
                self.out.insert(self.path.join("."), values);
            }
        }
    }
    let mut collect = Collect { grads, path: Vec::new(), out: BTreeMap::new() };
    model.visit(&mut collect);
    collect.out
}

/// What one case produced: per-step scalars and the second step's gradients.
struct CaseValues {
    scalars: Map<String, Value>,
    grads: BTreeMap<String, Vec<f32>>,
}

fn run_case<B: AutodiffBackend>(fixture: &Path, kind: &str, lora: bool, nf4: bool, device: &B::Device) -> Result<CaseValues, String> {
    let quant = QuantConfig { double_quant: true };
    let model: CausalLm<B> = if nf4 {
        alignment_peft::load_pretrained_4bit(fixture, device, quant).map_err(|e| e.to_string())?
    } else {
        alignment_models::load_pretrained(fixture, device).map_err(|e| e.to_string())?
    };
    let vocab = model.config.vocab_size;
    let mut model = if lora {
        let mut config = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        config.dropout = 0.0;
        apply_lora(model, &config, 5).map_err(|e| e.to_string())?
    } else {
        model
    };
    let mut optimizer = AdamW::<B::InnerBackend>::new(AdamWConfig::default());
    let mut scalars = Map::new();
    let mut last_grads = BTreeMap::new();
    // Rows of unequal lengths, so padding and its masks are exercised; two micro-batches.
    let lengths = [13usize, 9, 11, 6];
    for step in 0..2 {
        let lr = 1e-3;
        let options = StepOptions::default();
        let (updated, pending, grads, report) = if kind == "dpo" {
            let task = DpoTask { config: DpoConfig::default(), pad_id: 0 };
            let pairs: Vec<PreferencePair> = lengths.iter().enumerate().map(|(i, &n)| dpo_pair(n, vocab, 77 + i as u64)).collect();
            let batches: Vec<Vec<&PreferencePair>> = pairs.chunks(2).map(|c| c.iter().collect()).collect();
            train_step(model, &task, &batches, &mut optimizer, lr, &options, device)
        } else {
            let task = SftTask { reduction: Reduction::Mean, pad_id: 0, name: "sft" };
            let rows: Vec<Sequence> = lengths.iter().enumerate().map(|(i, &n)| sft_row(n, vocab, 77 + i as u64)).collect();
            let batches: Vec<Vec<&Sequence>> = rows.chunks(2).map(|c| c.iter().collect()).collect();
            train_step(model, &task, &batches, &mut optimizer, lr, &options, device)
        };
        let metrics = read_metrics(pending);
        let grad_norm = report.read().grad_norm;
        for (k, v) in metrics {
            scalars.insert(format!("step{step}/{k}"), json!(v));
        }
        scalars.insert(format!("step{step}/grad_norm"), json!(grad_norm));
        if step == 1 {
            last_grads = named_gradients(&updated, &grads);
        }
        model = updated;
    }
    Ok(CaseValues { scalars, grads: last_grads })
}

fn run_check<B: AutodiffBackend>(args: &CheckArgs, device: &B::Device) -> Result<(), String> {
    let fixture = args.fixtures.join("tiny-llama");
    let tolerance = if args.backend.ends_with("bf16") { 2e-2 } else { 1e-4 };
    let mut report = Map::new();
    let mut all_pass = true;
    println!("{:<8} {:>14} {:>14} {:>10}  result", "case", "max rel scalar", "max rel grad", "tolerance");
    for (name, kind, lora, nf4) in CASES {
        let start = Instant::now();
        let values = run_case::<B>(&fixture, kind, lora, nf4, device)?;
        if let Some(dir) = &args.write_reference {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&values.scalars).expect("json"))
                .map_err(|e| e.to_string())?;
            let tensors: Vec<alignment_models::weights::NamedTensor> = values
                .grads
                .iter()
                .map(|(k, v)| alignment_models::weights::NamedTensor { name: k.clone(), shape: vec![v.len()], values: v.clone() })
                .collect();
            alignment_models::weights::write_safetensors(
                &dir.join(format!("{name}.safetensors")),
                &tensors,
                alignment_models::SaveDtype::F32,
            )
            .map_err(|e| e.to_string())?;
            println!(
                "{name:<8} wrote reference ({} scalars, {} gradients) in {:.1}s",
                values.scalars.len(),
                values.grads.len(),
                start.elapsed().as_secs_f64()
            );
        }
        if let Some(dir) = &args.reference {
            let (scalar_err, grad_err, worst) = compare(dir, name, &values)?;
            let pass = scalar_err <= tolerance && grad_err <= tolerance;
            all_pass &= pass;
            println!(
                "{name:<8} {scalar_err:>14.3e} {grad_err:>14.3e} {tolerance:>10.0e}  {} (worst: {worst})",
                if pass { "PASS" } else { "FAIL" }
            );
            report.insert(name.into(), json!({"max_rel_scalar": scalar_err, "max_rel_grad": grad_err, "tolerance": tolerance, "pass": pass, "worst": worst, "seconds": start.elapsed().as_secs_f64()}));
        }
    }
    if let Some(path) = &args.report {
        report.insert("backend".into(), json!(args.backend));
        std::fs::write(path, serde_json::to_string_pretty(&report).expect("json")).map_err(|e| e.to_string())?;
    }
    if args.reference.is_some() && !all_pass {
        return Err(format!("{} differs from the CPU reference beyond {tolerance:e}", args.backend));
    }
    Ok(())
}

/// Largest relative difference of the scalars (|a - b| / max(|b|, 1e-6)) and of the gradients
/// (‖a - b‖ / ‖b‖ per tensor) against the reference in `dir`, and the worst item's name.
fn compare(dir: &Path, name: &str, values: &CaseValues) -> Result<(f64, f64, String), String> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).map_err(|e| format!("{}: {e}", dir.display()))?;
    let reference: Map<String, Value> = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let (mut scalar_err, mut grad_err, mut worst, mut worst_err) = (0f64, 0f64, String::new(), -1f64);
    for (k, expected) in &reference {
        let expected = expected.as_f64().unwrap_or(f64::NAN);
        let got = values.scalars.get(k).and_then(Value::as_f64).ok_or_else(|| format!("{name}: no value for {k}"))?;
        let err = (got - expected).abs() / expected.abs().max(1e-6);
        let err = if err.is_nan() { f64::INFINITY } else { err };
        scalar_err = scalar_err.max(err);
        if err > worst_err {
            (worst, worst_err) = (k.clone(), err);
        }
    }
    let checkpoint =
        alignment_models::weights::Checkpoint::open_file(&dir.join(format!("{name}.safetensors"))).map_err(|e| e.to_string())?;
    for k in checkpoint.names() {
        let got = values.grads.get(&k).ok_or_else(|| format!("{name}: no gradient for {k}"))?;
        let expected = checkpoint.read_f32(&k, &[got.len()]).map_err(|e| e.to_string())?;
        let (diff, norm) =
            got.iter().zip(&expected).fold((0f64, 0f64), |(d, n), (&a, &b)| (d + ((a - b) as f64).powi(2), n + (b as f64).powi(2)));
        let err = diff.sqrt() / norm.sqrt().max(1e-12);
        let err = if err.is_nan() { f64::INFINITY } else { err };
        grad_err = grad_err.max(err);
        if err > worst_err {
            (worst, worst_err) = (k.clone(), err);
        }
    }
    Ok((scalar_err, grad_err, worst))
}

// ---------------------------------------------------------------------------------------------
// NCCL at world size 1.

#[cfg(feature = "cuda")]
fn nccl_check() -> Result<(), String> {
    use alignment_distributed::{Communicator, DistEnv, LocalCommunicator, NcclCommunicator, ShardLayout};
    let port = alignment_distributed::launch::free_port().map_err(|e| e.to_string())?;
    let env = DistEnv { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: port };
    let mut nccl = NcclCommunicator::connect(&env, std::time::Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let mut local = LocalCommunicator::new();
    let values: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin()).collect();
    let layout = ShardLayout::new(values.len(), 1);
    let mut results = Vec::new();
    let mut a = values.clone();
    let mut b = values.clone();
    nccl.all_reduce_sum(&mut a).map_err(|e| e.to_string())?;
    local.all_reduce_sum(&mut b).map_err(|e| e.to_string())?;
    results.push(("all_reduce_sum", a == b));
    let a = nccl.reduce_scatter_sum(&values, &layout).map_err(|e| e.to_string())?;
    let b = local.reduce_scatter_sum(&values, &layout).map_err(|e| e.to_string())?;
    results.push(("reduce_scatter_sum", a == b));
    let a = nccl.all_gather(&values, &layout).map_err(|e| e.to_string())?;
    let b = local.all_gather(&values, &layout).map_err(|e| e.to_string())?;
    results.push(("all_gather", a == b));
    let (mut a, mut b) = (values.clone(), values.clone());
    nccl.broadcast(&mut a, 0).map_err(|e| e.to_string())?;
    local.broadcast(&mut b, 0).map_err(|e| e.to_string())?;
    results.push(("broadcast", a == b));
    nccl.barrier().map_err(|e| e.to_string())?;
    for (op, same) in &results {
        println!("nccl {op:<20} {}", if *same { "equal to one process" } else { "DIFFERS" });
    }
    println!("{}", json!({"nccl": results.iter().map(|(op, same)| (op.to_string(), json!(same))).collect::<Map<String, Value>>()}));
    if results.iter().all(|(_, same)| *same) {
        Ok(())
    } else {
        Err("NCCL collectives differ from the single-process communicator".into())
    }
}

#[cfg(not(feature = "cuda"))]
fn nccl_check() -> Result<(), String> {
    Err("the NCCL check needs a build with --features cuda".into())
}
