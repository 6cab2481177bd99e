//! The training-step benchmark and the GPU correctness check (issue #12), one binary for every
//! backend this build has (`ndarray` always; `cuda`, `tch`, `wgpu` by feature), so the same code runs
//! as a dry run on the CPU here and for real on the GPU machine.
//!
//! ```text
//! bench_train train --backend cuda-bf16 --shape scripts/gpu/shapes/llama-3.2-1b.json --task sft --seq 1024 --batch 4
//! bench_train check --backend cuda --fixtures crates/models/tests/fixtures --write-reference DIR   # or --reference DIR
//! bench_train nccl                                                          # NCCL at world size 1 vs one process
//! bench_train update --backend cuda --shape scripts/gpu/shapes/smollm2-135m.json   # the optimizer update alone
//! bench_train dequant --backend cuda-bf16 --shape scripts/gpu/shapes/mistral-7b.json  # QLoRA's NF4 base alone
//! bench_train gemm --backend cuda-bf16 --shape scripts/gpu/shapes/llama-3.2-1b.json   # cuBLAS vs CubeCL's matmul
//! bench_train ops --backend cuda-bf16                                       # burn's operations one at a time vs the CPU
//! ```
//!
//! `train` builds a randomly initialised model from a config.json (no weights travel), runs
//! `--warmup` then `--steps` optimizer steps of the real training step — the trainer's task
//! (`SftTask`, `DpoTask`), the autodiff backward pass, gradient accumulation, our AdamW with
//! global-norm clipping — on random tokens, synchronising the device after each step, and
//! prints one JSON line: step times, median, tokens/s, model FLOPs utilisation. PyTorch's side
//! of the same measurement is `scripts/gpu/torch_baseline.py`; `scripts/gpu/run.sh` stages both.
//!
//! `check` runs the cases of `alignment_handbook::step_check` (two optimizer steps of SFT, DPO,
//! LoRA, QLoRA and the lean step, on the committed tiny Llama fixture) and compares losses,
//! metrics and the first step's gradients with values the CPU backend wrote
//! (`--write-reference` on the CPU, `--reference` on the GPU). A mixed-precision backend
//! (`cuda-bf16`) is compared with the same f32 values, within `step_check::MIXED_TOLERANCE`.
//! Without mixed products it also runs ZeRO-3's first step in a world of one
//! (`step_check::run_zero3_case`, reported as `zero3-sft`, `zero3-lora`): the shards on this
//! backend's device, against the dense reference.
//!
//! `ops` runs `alignment_handbook::op_check`: the step's tensor operations one at a time on this
//! backend and on the CPU backend in the same process, each compared, so that a failing `check`
//! can be traced to the operation a backend gets wrong.

use alignment_handbook::op_check;
use alignment_handbook::step_check::{self, dpo_pair, read_metrics, sft_row, train_step};
use alignment_models::{random_model, CausalLm, ModelConfig};
use alignment_objectives::{DpoConfig, OrpoConfig, Reduction};
use alignment_peft::{apply_lora, LoraConfig, QuantConfig, TargetModules};
use alignment_trainer::optimizer::{AdamW, AdamWConfig};
use alignment_trainer::tasks::{DpoTask, OrpoTask, PreferencePair, SftTask};
use alignment_trainer::{Collation, Sequence, StepOptions, Task};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor};
use clap::{Parser, Subcommand};
use serde_json::{json, Map};
use std::path::PathBuf;
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
    /// Time the optimizer update alone (full fine-tuning, random gradients): the one-process
    /// step, and a data-parallel rank's update with its optimizer on the device and offloaded.
    Update(UpdateArgs),
    /// Time QLoRA's 4-bit base dequantized alone, one `[intermediate, hidden]` weight of the
    /// shape (its largest projection), into the products' type: the backend's own route
    /// (`QuantizedWeight::dequantize_by_kernel`: the GPU kernel on CubeCL backends, the threaded
    /// pass on `cpu`; printed as `kernel`) against the tensor operations every backend runs
    /// (`dequantize_by_tensor_ops`, then the cast).
    Dequant(DequantArgs),
    /// A training step's matrix products alone, at the shape's sizes: by the route the step
    /// takes (`alignment_core::gemm`: cuBLAS on `cuda*`) and by burn's own `matmul` (CubeCL's
    /// kernels there), their values compared and each timed; then one product's gradients
    /// through the recorded step against burn's. Exits non-zero when they disagree.
    Gemm(GemmArgs),
    /// burn's operations as the step uses them, one at a time, on this backend and on the CPU
    /// backend, compared (`alignment_handbook::op_check`): names the operation a backend gets
    /// wrong when `check` fails. With `-bf16`/`-f16`, every operation again on inputs of that
    /// type. Exits non-zero when one differs.
    Ops(OpsArgs),
}

#[derive(Parser)]
struct OpsArgs {
    /// As for `train`.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Write the comparison as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Parser)]
struct GemmArgs {
    /// As for `train`; `-bf16` multiplies bf16 operands.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// A config.json giving the model's shape.
    #[arg(long)]
    shape: PathBuf,
    /// Tokens per micro-batch (the products' rows), as `--seq` × `--batch` of `train`.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens per sequence (attention's products).
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Untimed calls first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed calls per path.
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

#[derive(Parser)]
struct DequantArgs {
    /// As for `train`; `-bf16`/`-f16` give the weight in that type.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// A config.json giving the model's shape.
    #[arg(long)]
    shape: PathBuf,
    /// Untimed calls first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed calls per path.
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

#[derive(Parser)]
struct UpdateArgs {
    /// As for `train`.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// A config.json giving the model's shape.
    #[arg(long)]
    shape: PathBuf,
    /// Untimed updates first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed updates per variant.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// The update rule (the recipes' `optim`): `adamw_torch` times the one-process update and a
    /// data-parallel rank's; `adamw_bnb_8bit` the one-process 8-bit update (on libtorch with a
    /// GPU bitsandbytes' kernels when `ALIGNMENT_BITSANDBYTES_LIB` or the torch install has them,
    /// else the tensor form), which data-parallel runs refuse.
    #[arg(long, default_value = "adamw_torch")]
    optim: String,
}

#[derive(Parser)]
struct TrainArgs {
    /// `cpu`, `cuda` (f32), `cuda-bf16` (mixed: bf16 products over f32 parameters, what
    /// `bf16: true` runs), `cuda-pure-bf16` (everything bf16), the same for `tch-cuda`; `tch-cpu`,
    /// `tch-cpu-bf16` (mixed, torch's CPU bf16) and `tch-cpu-pure-bf16`, `wgpu`, `wgpu-f16` (mixed with f16) — those
    /// built in.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// A config.json giving the model's shape.
    #[arg(long)]
    shape: PathBuf,
    /// `sft`, `dpo`, `orpo` (full fine-tuning), `lora` (r 16, all linear layers), `qlora` (NF4 base + lora).
    #[arg(long, default_value = "sft")]
    task: String,
    /// Tokens per sequence (for DPO and ORPO: per chosen and per rejected row).
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Sequences per micro-batch (DPO, ORPO: pairs).
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
    /// Profile into this folder. libtorch backends: the timed steps under libtorch's Kineto
    /// profiler, written as `trace.json` (torch operators; CUDA kernels with their device time).
    /// CubeCL backends (`cuda*`, `wgpu*`): every kernel of every step timed on the device and
    /// logged to `cubecl.log`, each step ending in a table by kernel; profiling from the first
    /// kernel on (it is configured before any) slows every step, so time without `--profile`.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// libtorch on CUDA (`tch-cuda`, `tch-cuda-bf16`), every task:
    /// the warm-up steps on a side stream, then one step captured as a CUDA graph, and the timed
    /// steps its replays (the same batch every step, as without it). Needs a binary built with
    /// CUDA graphs (`scripts/gpu/run.sh stage`).
    #[arg(long)]
    cuda_graph: bool,
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
    /// Only these cases (`sft-8bit`, `zero3-sft`, …: the names the report gives), comma-separated;
    /// every case when absent.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
}

fn main() {
    alignment_core::memory::retain_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => prepare_profile(&args).and_then(|()| dispatch_train(&args)),
        Command::Check(args) => dispatch_check(&args),
        Command::Nccl => nccl_check(),
        Command::Update(args) => dispatch_update(&args),
        Command::Dequant(args) => dispatch_dequant(&args),
        Command::Gemm(args) => dispatch_gemm(&args),
        Command::Ops(args) => dispatch_ops(&args),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

/// The type a backend name's matrix products run in: mixed precision for `-bf16` and `-f16`
/// (bf16/f16 products over f32 parameters, what `bf16: true` runs), `None` otherwise (f32, or
/// `-pure-bf16`, whose tensors are all bf16).
fn matmul_dtype_of(backend: &str) -> Option<FloatDType> {
    if backend.ends_with("-pure-bf16") {
        None
    } else if backend.ends_with("-bf16") {
        Some(FloatDType::BF16)
    } else if backend.ends_with("-f16") {
        Some(FloatDType::F16)
    } else {
        None
    }
}

/// Runs `$body` with `B` bound to the autodiff backend named by `$name`, `$device` to its
/// device and `$dtype` to its products' type ([`matmul_dtype_of`]), for the backends compiled
/// into this binary.
macro_rules! with_backend {
    ($name:expr, |$b:ident, $device:ident, $dtype:ident| $body:expr) => {{
        let $dtype = matmul_dtype_of($name);
        match $name {
            "cpu" => {
                type $b = alignment_core::backend::CpuAutodiff;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            "cuda" | "cuda-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::Gpu>;
                let $device = burn::backend::cuda::CudaDevice::new(0);
                $body
            }
            #[cfg(feature = "cuda")]
            "cuda-pure-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::GpuBf16>;
                let $device = burn::backend::cuda::CudaDevice::new(0);
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cpu" | "tch-cpu-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::Torch>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cpu;
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cpu-pure-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::TorchBf16>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cpu;
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cuda" | "tch-cuda-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::Torch>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cuda(0);
                $body
            }
            #[cfg(feature = "tch")]
            "tch-cuda-pure-bf16" => {
                type $b = burn::backend::Autodiff<alignment_core::backend::TorchBf16>;
                let $device = burn::backend::libtorch::LibTorchDevice::Cuda(0);
                $body
            }
            #[cfg(feature = "wgpu")]
            "wgpu" | "wgpu-f16" => {
                type $b = alignment_core::backend::WgpuAutodiff;
                let $device = burn::backend::wgpu::WgpuDevice::default();
                $body
            }
            other => Err(format!(
                "backend `{other}` is not built into this binary (features: cpu{}{}{})",
                if cfg!(feature = "cuda") { ", cuda, cuda-bf16, cuda-pure-bf16" } else { "" },
                if cfg!(feature = "tch") {
                    ", tch-cpu, tch-cpu-bf16, tch-cpu-pure-bf16, tch-cuda, tch-cuda-bf16, tch-cuda-pure-bf16"
                } else {
                    ""
                },
                if cfg!(feature = "wgpu") { ", wgpu, wgpu-f16" } else { "" }
            )),
        }
    }};
}

/// With `--profile`: creates the folder and, on a CubeCL backend, sets CubeCL's configuration
/// (before any kernel, as CubeCL requires) so that every kernel is timed and logged there.
fn prepare_profile(args: &TrainArgs) -> Result<(), String> {
    let Some(dir) = &args.profile else { return Ok(()) };
    std::fs::create_dir_all(dir).map_err(|e| format!("--profile {}: {e}", dir.display()))?;
    let backend = args.backend.as_str();
    if backend.starts_with("cuda") || backend.starts_with("wgpu") {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        {
            use cubecl::config::{profiling::ProfilingLogLevel, CubeClRuntimeConfig, RuntimeConfig};
            let mut config = CubeClRuntimeConfig::default();
            config.profiling.logger.level = ProfilingLogLevel::Basic;
            config.profiling.logger.file = Some(dir.join("cubecl.log"));
            config.profiling.logger.append = false;
            CubeClRuntimeConfig::set(config);
        }
        Ok(())
    } else if backend.starts_with("tch-") {
        Ok(())
    } else {
        Err(format!("--profile: backend `{backend}` has no profiler (libtorch and CubeCL backends do)"))
    }
}

fn dispatch_train(args: &TrainArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device, dtype| run_train::<B>(args, dtype, &device))
}

fn dispatch_check(args: &CheckArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device, dtype| run_check::<B>(args, dtype, &device))
}

fn dispatch_update(args: &UpdateArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device, _dtype| run_update::<B>(args, &device))
}

fn dispatch_dequant(args: &DequantArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device, dtype| run_dequant::<B>(args, dtype, &device))
}

fn dispatch_ops(args: &OpsArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device, dtype| run_op_check::<B>(args, dtype, &device))
}

fn dispatch_gemm(args: &GemmArgs) -> Result<(), String> {
    with_backend!(args.backend.as_str(), |B, device, dtype| run_gemm::<B>(args, dtype, &device))
}

/// `bench_train gemm`: see [`Command::Gemm`]. Tolerances: 1e-4 relative in f32, 2e-2 in bf16 or
/// f16 (issue #12's bounds), relative to the largest value of burn's result.
fn run_gemm<B: AutodiffBackend>(args: &GemmArgs, dtype: Option<FloatDType>, device: &B::Device) -> Result<(), String> {
    use alignment_core::gemm::{has_own_gemm, matmul};
    use alignment_core::precision::cast_to;
    use burn::tensor::{Distribution, ElementConversion};
    type Inner<B> = <B as AutodiffBackend>::InnerBackend;
    let config = ModelConfig::from_file(&args.shape).map_err(|e| e.to_string())?;
    let operand_type = dtype.unwrap_or_else(alignment_core::precision::float_type::<B>);
    let tolerance = if operand_type == FloatDType::F32 { 1e-4 } else { 2e-2 };
    let (t, h, i) = (args.tokens, config.hidden_size, config.intermediate_size);
    let (heads, head_dim) = (config.num_heads, config.head_dim);
    let rows = (t / args.seq).max(1);
    let random = |dims: Vec<usize>| {
        let scale = 1.0 / (*dims.last().expect("dimensions") as f64).sqrt();
        cast_to(Tensor::<Inner<B>, 4>::random(burn::tensor::Shape::from(dims), Distribution::Normal(0.0, scale), device), operand_type)
    };
    let relative = |got: Tensor<Inner<B>, 4>, want: Tensor<Inner<B>, 4>| {
        let (got, want) = (got.cast(FloatDType::F32), want.cast(FloatDType::F32));
        let scale = want.clone().abs().max().into_scalar().elem::<f32>().max(1e-12);
        f64::from((got - want).abs().max().into_scalar().elem::<f32>() / scale)
    };
    // (name, lhs, rhs as the step reads it: a transposed view where the step has one)
    type Case<I> = (&'static str, Tensor<I, 4>, Tensor<I, 4>);
    let cases: Vec<Case<Inner<B>>> = vec![
        ("x Wᵀ (up proj)", random(vec![1, 1, t, h]), random(vec![1, 1, i, h]).swap_dims(2, 3)),
        ("∂y W (its ∂x)", random(vec![1, 1, t, i]), random(vec![1, 1, i, h])),
        ("∂yᵀ x (its ∂W)", random(vec![1, 1, t, i]).swap_dims(2, 3), random(vec![1, 1, t, h])),
        ("q kᵀ (scores)", random(vec![rows, heads, args.seq, head_dim]), random(vec![rows, heads, args.seq, head_dim]).swap_dims(2, 3)),
        ("p v (attn out)", random(vec![rows, heads, args.seq, args.seq]), random(vec![rows, heads, args.seq, head_dim])),
    ];
    let time = |f: &dyn Fn() -> Tensor<Inner<B>, 4>| -> Result<f64, String> {
        let mut seconds = Vec::new();
        for call in 0..args.warmup + args.steps {
            let start = Instant::now();
            std::hint::black_box(f());
            Inner::<B>::sync(device).map_err(|e| format!("{e:?}"))?;
            if call >= args.warmup {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(median(&seconds))
    };
    let routed = has_own_gemm::<Inner<B>>();
    let route = alignment_core::gemm::products_route::<Inner<B>>();
    println!(
        "gemm on {} in {operand_type:?}: the step's route is {}",
        args.backend,
        if routed { "cuBLAS" } else { "burn's matmul (no route of its own here)" }
    );
    let mut results = Vec::new();
    let mut disagreements = Vec::new();
    for (name, lhs, rhs) in cases {
        let [batch, heads, m, k] = lhs.dims();
        let n = rhs.dims()[3];
        let flops = 2.0 * (batch * heads * m * n * k) as f64;
        // Against burn's matmul in f32 of the same operands: its half-type matmul is no
        // reference (on lavapipe it gave a wrong f16 product, tests/backend_check.rs).
        let exact = lhs.clone().cast(FloatDType::F32).matmul(rhs.clone().cast(FloatDType::F32));
        let difference = relative(matmul(lhs.clone(), rhs.clone()), exact.clone());
        let burn_difference = relative(lhs.clone().matmul(rhs.clone()), exact);
        let route_s = time(&|| matmul(lhs.clone(), rhs.clone()))?;
        let burn_s = time(&|| lhs.clone().matmul(rhs.clone()))?;
        println!(
            "  {name:<16} [{batch}·{heads}] {m}×{k} · {k}×{n}: route {:.3} ms ({:.1} TFLOP/s), burn {:.3} ms ({:.1} TFLOP/s), ×{:.2}; difference from f32: route {difference:.1e}, burn {burn_difference:.1e}",
            1e3 * route_s,
            flops / route_s / 1e12,
            1e3 * burn_s,
            flops / burn_s / 1e12,
            burn_s / route_s
        );
        if difference > tolerance {
            disagreements.push(format!("{name}: {difference:.2e}"));
        }
        results.push(json!({"product": name, "dims": [batch, heads, m, k, n], "route_s": route_s, "burn_s": burn_s, "flops": flops, "difference": difference, "burn_difference": burn_difference}));
    }
    // One projection's gradients through the recorded step (autodiff), against burn's in f32.
    let x = Tensor::<B, 4>::from_inner(random(vec![1, 1, t.min(1024), h]));
    let w = Tensor::<B, 4>::from_inner(random(vec![1, 1, i, h]));
    let weights = Tensor::<B, 4>::from_inner(random(vec![1, 1, t.min(1024), i]));
    let gradients = |routed: bool| {
        let as_operands = |t: &Tensor<B, 4>| if routed { t.clone() } else { t.clone().cast(FloatDType::F32) };
        let (x, w) = (as_operands(&x).require_grad(), as_operands(&w).require_grad());
        let y = if routed { matmul(x.clone(), w.clone().swap_dims(2, 3)) } else { x.clone().matmul(w.clone().swap_dims(2, 3)) };
        let grads = (y.cast(FloatDType::F32) * weights.clone().cast(FloatDType::F32)).sum().backward();
        (x.grad(&grads).expect("x is tracked"), w.grad(&grads).expect("w is tracked"))
    };
    let ((dx, dw), (dx_ref, dw_ref)) = (gradients(true), gradients(false));
    let (dx_difference, dw_difference) = (relative(dx, dx_ref), relative(dw, dw_ref));
    println!("  gradients of x Wᵀ through the recorded step: ∂x {dx_difference:.1e}, ∂W {dw_difference:.1e}");
    for (name, difference) in [("∂x", dx_difference), ("∂W", dw_difference)] {
        if difference > tolerance {
            disagreements.push(format!("{name}: {difference:.2e}"));
        }
    }
    let shape = args.shape.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
    println!(
        "{}",
        json!({"gemm": results, "backend": args.backend, "shape": shape, "dtype": format!("{operand_type:?}"), "route": route,
               "gradient_difference": [dx_difference, dw_difference], "tolerance": tolerance, "agrees": disagreements.is_empty()})
    );
    if disagreements.is_empty() {
        Ok(())
    } else {
        Err(format!("the route's products differ from burn's beyond {tolerance:e}: {}", disagreements.join(", ")))
    }
}

/// `bench_train dequant`: prints each path's median time per weight and the bytes it would move
/// at the minimum (the packed indices and scales read, the weight written once), as a rate.
fn run_dequant<B: Backend>(args: &DequantArgs, dtype: Option<FloatDType>, device: &B::Device) -> Result<(), String> {
    use alignment_models::{QuantizedParts, QuantizedWeight, ScaleParts};
    let config = ModelConfig::from_file(&args.shape).map_err(|e| e.to_string())?;
    let dims = [config.intermediate_size, config.hidden_size];
    let values = dims[0] * dims[1];
    // bitsandbytes' layout as the handbook's QLoRA recipes configure it: blocks of 64 values,
    // their scales double-quantized in blocks of 256. The values are arbitrary: the work is not.
    let blocks = values.div_ceil(64);
    let parts = QuantizedParts {
        dims,
        packed_bytes: (0..values.div_ceil(2)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
        code_book: (0..16).map(|i| (i as f32 - 7.5) / 7.5).collect(),
        block_size: 64,
        scales: ScaleParts::Nested {
            indices: (0..blocks).map(|j| (j * 97) as u8).collect(),
            code_book: (0..256).map(|i| i as f32 / 256.0).collect(),
            scales: vec![0.05; blocks.div_ceil(256)],
            offset: 0.01,
            block_size: 256,
        },
    };
    let weight = QuantizedWeight::<B>::from_parts(&parts, device);
    let out_type = dtype.unwrap_or_else(alignment_core::precision::float_type::<B>);
    let time = |path: &dyn Fn() -> Tensor<B, 2>| -> Result<f64, String> {
        let mut seconds = Vec::new();
        for call in 0..args.warmup + args.steps {
            let start = Instant::now();
            std::hint::black_box(path());
            B::sync(device).map_err(|e| format!("{e:?}"))?;
            if call >= args.warmup {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(median(&seconds))
    };
    let least_bytes = (weight.storage_bytes() + values * burn::tensor::DType::from(out_type).size()) as f64;
    let mut results = Map::new();
    let dequantize = |path: &str| match path {
        "kernel" => weight.dequantize_by_kernel(out_type).expect("a backend with the kernel"),
        _ => alignment_core::precision::cast_to(weight.dequantize_by_tensor_ops(), out_type),
    };
    let mut paths = vec!["tensor-ops"];
    if weight.dequantize_by_kernel(out_type).is_some() {
        paths.push("kernel");
    }
    for name in paths {
        let median_s = time(&|| dequantize(name))?;
        println!(
            "dequant {name:<10} [{}, {}] into {out_type:?}: median {:.3} ms, {:.1} GB/s at the least bytes ({:.1} MB)",
            dims[0],
            dims[1],
            1e3 * median_s,
            least_bytes / median_s / 1e9,
            least_bytes / 1e6
        );
        results.insert((*name).into(), json!({"median_s": median_s, "least_bytes": least_bytes}));
    }
    let shape = args.shape.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
    println!("{}", json!({"dequant": results, "backend": args.backend, "shape": shape, "dims": dims, "dtype": format!("{out_type:?}")}));
    Ok(())
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

fn run_train<B: AutodiffBackend>(args: &TrainArgs, matmul_dtype: Option<FloatDType>, device: &B::Device) -> Result<(), String> {
    let config = ModelConfig::from_file(&args.shape).map_err(|e| e.to_string())?;
    let load_start = Instant::now();
    let quant = QuantConfig::nf4(true);
    let quantize = |values: &[f32], dims: [usize; 2]| quant.quantize(values, dims);
    let model = match args.task.as_str() {
        "sft" | "dpo" | "orpo" | "lora" => random_model::<B>(config.clone(), args.seed, device, None),
        "qlora" => random_model::<B>(config.clone(), args.seed, device, Some(&quantize)),
        other => return Err(format!("--task {other}: expected sft, dpo, orpo, lora or qlora")),
    }
    .map_err(|e| e.to_string())?;
    let mut model = if matches!(args.task.as_str(), "lora" | "qlora") {
        let mut lora = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
        lora.dropout = 0.0;
        apply_lora(model, &lora, args.seed).map_err(|e| e.to_string())?
    } else {
        model
    };
    model.set_matmul_dtype(matmul_dtype);
    // As the trainer does: a LoRA or QLoRA base's frozen weights in bf16 (the shapes' random
    // values are bf16's, as a bf16 checkpoint's are).
    let frozen_bytes_narrowed = model.store_frozen_weights_in_product_type();
    // As the trainer does: QLoRA's adapters in bf16 where the products are, as TRL holds them.
    if matmul_dtype == Some(FloatDType::BF16) {
        model = alignment_trainer::train::hold_qlora_adapters_in_bf16(model, true, true);
    }
    B::sync(device).map_err(|e| format!("{e:?}"))?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    // The process's peak so far is the random model's making (host values, quantization); from
    // here on the kernel's peak-RSS counter measures the steps alone (Linux; ignored elsewhere).
    let load_peak_rss_mib = alignment_core::memory::status_bytes("VmHWM").map(|b| b as f64 / 1048576.0);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    // The same for the device (libtorch's CUDA allocator), as the PyTorch baseline resets its own.
    #[cfg(feature = "tch")]
    alignment_trainer::tch_device_memory::reset_peaks().map_err(|e| e.to_string())?;
    let (trainable, total) = count_params(&model);
    let vocab = config.vocab_size;
    let mut optimizer = AdamW::<B::InnerBackend>::new(AdamWConfig::default());
    let lr = 1e-5;
    // As the trainer does (a 4-bit base always trains with gradient checkpointing).
    let options = StepOptions::for_model(&model, args.gradient_checkpointing, args.chunked_head);
    let timing = Timing { args, lr, options: &options, device };
    let (tokens_per_step, (step_seconds, losses, torch_profiler)) = match args.task.as_str() {
        "dpo" | "orpo" => {
            let pairs: Vec<PreferencePair> = (0..args.batch * args.accum).map(|i| dpo_pair(args.seq, vocab, 1000 + i as u64)).collect();
            let batches: Vec<Vec<&PreferencePair>> = pairs.chunks(args.batch).map(|c| c.iter().collect()).collect();
            let tokens = pairs.iter().map(|p| p.num_tokens()).sum::<usize>();
            if args.task == "orpo" {
                (
                    tokens,
                    timing.steps(
                        model,
                        &OrpoTask { config: OrpoConfig::default(), collation: Collation::pad_with(0) },
                        &batches,
                        &mut optimizer,
                    )?,
                )
            } else {
                (
                    tokens,
                    timing.steps(
                        model,
                        &DpoTask { config: DpoConfig::default(), collation: Collation::pad_with(0) },
                        &batches,
                        &mut optimizer,
                    )?,
                )
            }
        }
        _ => {
            let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
            let rows: Vec<Sequence> = (0..args.batch * args.accum).map(|i| sft_row(args.seq, vocab, 1000 + i as u64)).collect();
            let batches: Vec<Vec<&Sequence>> = rows.chunks(args.batch).map(|c| c.iter().collect()).collect();
            (rows.iter().map(Sequence::num_tokens).sum::<usize>(), timing.steps(model, &task, &batches, &mut optimizer)?)
        }
    };
    let profile = finish_profile(torch_profiler, args)?;
    let med = median(&step_seconds);
    let tokens_per_second = tokens_per_step as f64 / med;
    let flops = flops_per_token(&config, args.seq);
    let achieved_tflops = tokens_per_second * flops / 1e12;
    let mut line = json!({
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
        // What the step ran: a 4-bit base turns it on whatever the flag says.
        "gradient_checkpointing": options.gradient_checkpointing,
        "chunked_head": args.chunked_head,
        // The timed steps were replays of one captured step (`--cuda-graph`).
        "cuda_graph": args.cuda_graph,
        "matmul_dtype": matmul_dtype.map(|d| format!("{d:?}")),
        // Bytes saved by storing frozen weights in the products' type (LoRA and QLoRA bases).
        "frozen_narrowed_mib": frozen_bytes_narrowed as f64 / 1048576.0,
        // Who multiplies: cuBLAS through alignment_core::gemm (on CubeCL's stream, or
        // host-synchronised), or the backend's own matmul (CubeCL's on cuda with
        // ALIGNMENT_CUBLAS=0; cuBLAS inside libtorch on tch-cuda).
        "products": alignment_core::gemm::products_route::<B::InnerBackend>(),
        // Who computes blocked attention's softmax: its CubeCL kernels, or tensor operations
        // (ALIGNMENT_SOFTMAX_KERNEL=0); "burn's attention" where blocked attention is not used.
        "attention_softmax": alignment_models::block_softmax::route::<B::InnerBackend>(),
        // Whether AdamW ran as one CubeCL kernel per parameter (burn's GPU backends, unless
        // ALIGNMENT_ADAMW_KERNEL=0).
        "adamw_kernel": alignment_trainer::optimizer::update_by_kernel::<B::InnerBackend>(),
        // Who computes the loss's passes over the logits: their CubeCL kernels, the CPU
        // backend's threaded passes, or tensor operations (ALIGNMENT_LOGITS_KERNEL=0, and
        // libtorch).
        "logits": alignment_objectives::logprobs::logits_route::<B::InnerBackend>(),
        "profile": profile,
        // Host memory (the CPU backends' training memory): the peak while making the model, and
        // the peak during the steps (warm-up and timed).
        "load_peak_rss_mib": load_peak_rss_mib,
        "peak_rss_mib": alignment_core::memory::status_bytes("VmHWM").map(|b| b as f64 / 1048576.0),
    });
    if let Some((allocated, reserved)) = torch_device_peaks()? {
        // Device memory by torch's allocator during the steps, under the keys of the PyTorch
        // baseline's (torch.cuda.max_memory_allocated / max_memory_reserved): exact, and without
        // the CUDA context nvidia-smi's sampled peak counts.
        line["torch_max_allocated_mib"] = json!(allocated);
        line["torch_max_reserved_mib"] = json!(reserved);
    }
    println!("{line}");
    Ok(())
}

/// The peaks (MiB allocated, reserved) of torch's CUDA allocator on the GPU the steps used, since
/// the reset after the model was made; `None` off libtorch or without a GPU.
#[cfg(feature = "tch")]
fn torch_device_peaks() -> Result<Option<(f64, f64)>, String> {
    let used = alignment_trainer::tch_device_memory::used_devices().map_err(|e| e.to_string())?;
    let mib = |b: u64| b as f64 / 1048576.0;
    Ok(used.first().map(|(_, m)| (mib(m.peak_allocated), mib(m.peak_reserved))))
}

#[cfg(not(feature = "tch"))]
fn torch_device_peaks() -> Result<Option<(f64, f64)>, String> {
    Ok(None)
}

/// libtorch's profiler, running over the timed steps of a `tch-*` backend with `--profile`.
#[cfg(feature = "tch")]
type TorchProfiler = alignment_trainer::tch_profiler::TorchProfiler;
#[cfg(not(feature = "tch"))]
type TorchProfiler = std::convert::Infallible;

/// Starts libtorch's profiler when `--profile` is given and the backend is libtorch's (CUDA
/// kernels recorded on `tch-cuda*`); `None` otherwise.
/// What the timed loop of `run_train` shares across tasks.
struct Timing<'a, B: AutodiffBackend> {
    args: &'a TrainArgs,
    lr: f64,
    options: &'a StepOptions,
    device: &'a B::Device,
}

impl<B: AutodiffBackend> Timing<'_, B> {
    /// `--warmup` then `--steps` training steps of `task` over `batches` (one optimizer step
    /// each), the device synchronised after each: the timed steps' seconds, every step's loss,
    /// and the torch profiler started after the warm-up (`--profile` on libtorch).
    #[allow(clippy::type_complexity)]
    fn steps<T: Task>(
        &self,
        mut model: CausalLm<B>,
        task: &T,
        batches: &[Vec<&T::Example>],
        optimizer: &mut AdamW<B::InnerBackend>,
    ) -> Result<(Vec<f64>, Vec<f64>, Option<TorchProfiler>), String> {
        if self.args.cuda_graph {
            return self.graph_steps(model, task, batches, optimizer);
        }
        let (mut step_seconds, mut losses, mut torch_profiler) = (Vec::new(), Vec::new(), None);
        for step in 0..self.args.warmup + self.args.steps {
            if step == self.args.warmup {
                torch_profiler = start_torch_profiler(self.args)?;
            }
            let start = Instant::now();
            let (updated, pending, _, _) = train_step(model, task, batches, optimizer, self.lr, self.options, false, self.device);
            model = updated;
            B::sync(self.device).map_err(|e| format!("{e:?}"))?;
            if step >= self.args.warmup {
                step_seconds.push(start.elapsed().as_secs_f64());
            }
            losses.push(read_metrics(pending).get("loss").copied().unwrap_or(f64::NAN));
        }
        Ok((step_seconds, losses, torch_profiler))
    }

    /// [`Self::steps`] with `--cuda-graph`: the batches uploaded once, the warm-up steps run on a
    /// stream from torch's pool, one step captured as a CUDA graph there, and the timed steps
    /// replays of it; the losses are every step's, read after each. The capture must leave the
    /// parameters, moments and AdamW's scalars where they were (updated in place), or the
    /// replays would not train the model: checked, and refused with the first that moved.
    #[cfg(feature = "tch")]
    #[allow(clippy::type_complexity)]
    fn graph_steps<T: Task>(
        &self,
        mut model: CausalLm<B>,
        task: &T,
        batches: &[Vec<&T::Example>],
        optimizer: &mut AdamW<B::InnerBackend>,
    ) -> Result<(Vec<f64>, Vec<f64>, Option<TorchProfiler>), String> {
        use alignment_handbook::step_check::train_step_prepared;
        use alignment_trainer::tch_graph::{state_addresses, CudaGraph, SideStream};
        use alignment_trainer::{prepare, PreparedBatch};
        let backend = self.args.backend.as_str();
        if !matches!(backend, "tch-cuda" | "tch-cuda-bf16") {
            return Err(format!("--cuda-graph: backend `{backend}`: CUDA graphs run on tch-cuda and tch-cuda-bf16"));
        }
        let sync = |device: &B::Device| B::sync(device).map_err(|e| format!("{e:?}"));
        let loss = |pending| read_metrics(pending).get("loss").copied().unwrap_or(f64::NAN);
        let _stream = SideStream::enter(0).map_err(|e| format!("--cuda-graph: {e}"))?;
        let prepared: Vec<PreparedBatch<B>> = batches.iter().map(|batch| prepare(&model, task, batch, self.device)).collect();
        let step = |model, optimizer: &mut AdamW<B::InnerBackend>| {
            let (updated, pending, _, _) =
                train_step_prepared(model, task, batches, &prepared, optimizer, self.lr, self.options, false, self.device);
            (updated, pending)
        };
        // Warm-up on the capture's stream: the moments, AdamW's device scalars and cuBLAS's
        // workspace for this stream exist before capture.
        let mut losses = Vec::new();
        for _ in 0..self.args.warmup.max(1) {
            let (updated, pending) = step(model, optimizer);
            model = updated;
            sync(self.device)?;
            losses.push(loss(pending));
        }
        let before = state_addresses(&model, optimizer);
        let start = Instant::now();
        let (graph, (model, pending)) = CudaGraph::capture(|| step(model, optimizer)).map_err(|e| format!("--cuda-graph: {e}"))?;
        eprintln!("captured the step as a CUDA graph in {:.2} s", start.elapsed().as_secs_f64());
        let after = state_addresses(&model, optimizer);
        if before.len() != after.len() {
            return Err(format!(
                "--cuda-graph: the captured step changed the optimizer's state ({} tensors before, {} after)",
                before.len(),
                after.len()
            ));
        }
        if let Some(((name, was), (_, is))) = before.iter().zip(&after).find(|(a, b)| a.1 != b.1) {
            return Err(format!(
                "--cuda-graph: the captured step moved {name} ({was:#x} → {is:#x}): its replays would not train the model"
            ));
        }
        let torch_profiler = start_torch_profiler(self.args)?;
        let mut step_seconds = Vec::new();
        for _ in 0..self.args.steps {
            let start = Instant::now();
            graph.replay().map_err(|e| format!("--cuda-graph: {e}"))?;
            sync(self.device)?;
            step_seconds.push(start.elapsed().as_secs_f64());
            losses.push(loss(pending.clone()));
        }
        // The graph reads the model's and the batches' memory: it goes first.
        drop(graph);
        drop(model);
        Ok((step_seconds, losses, torch_profiler))
    }

    #[cfg(not(feature = "tch"))]
    #[allow(clippy::type_complexity)]
    fn graph_steps<T: Task>(
        &self,
        _model: CausalLm<B>,
        _task: &T,
        _batches: &[Vec<&T::Example>],
        _optimizer: &mut AdamW<B::InnerBackend>,
    ) -> Result<(Vec<f64>, Vec<f64>, Option<TorchProfiler>), String> {
        Err("--cuda-graph: this binary was built without the `tch` feature (CUDA graphs run on the libtorch route)".into())
    }
}

fn start_torch_profiler(args: &TrainArgs) -> Result<Option<TorchProfiler>, String> {
    #[cfg(feature = "tch")]
    if args.profile.is_some() && args.backend.starts_with("tch-") {
        return TorchProfiler::start(args.backend.starts_with("tch-cuda")).map(Some).map_err(|e| e.to_string());
    }
    let _ = args;
    Ok(None)
}

/// Where `--profile` wrote: libtorch's trace (written here from the running profiler), or
/// CubeCL's log (written by CubeCL as the kernels ran).
fn finish_profile(torch_profiler: Option<TorchProfiler>, args: &TrainArgs) -> Result<Option<PathBuf>, String> {
    let Some(dir) = &args.profile else { return Ok(None) };
    match torch_profiler {
        #[cfg(feature = "tch")]
        Some(profiler) => profiler.finish(&dir.join("trace.json")).map(Some).map_err(|e| e.to_string()),
        #[cfg(not(feature = "tch"))]
        Some(never) => match never {},
        // No timed step ran (`--steps 0`).
        None if args.backend.starts_with("tch-") => Ok(None),
        None => Ok(Some(dir.join("cubecl.log"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Correctness on the tiny fixtures: this backend against the CPU's values (step_check).

fn run_check<B: AutodiffBackend>(args: &CheckArgs, matmul_dtype: Option<FloatDType>, device: &B::Device) -> Result<(), String> {
    let fixture = args.fixtures.join("tiny-llama");
    let tolerance = if args.backend.ends_with("pure-bf16") { step_check::MIXED_TOLERANCE } else { step_check::tolerance(matmul_dtype) };
    let mut report = Map::new();
    let mut all_pass = true;
    println!("{:<10} {:>14} {:>14} {:>10}  result", "case", "max rel scalar", "max rel grad", "tolerance");
    let wanted = |name: &str| args.cases.is_empty() || args.cases.iter().any(|c| c == name);
    for case in step_check::CASES.into_iter().filter(|c| wanted(c.name)) {
        let name = case.name;
        let start = Instant::now();
        let values = step_check::run_case::<B>(&fixture, case, matmul_dtype, device).map_err(|e| e.to_string())?;
        if let Some(dir) = &args.write_reference {
            step_check::write_reference(dir, name, &values).map_err(|e| e.to_string())?;
            println!(
                "{name:<8} wrote reference ({} scalars, {} gradients) in {:.1}s",
                values.scalars.len(),
                values.grads.len(),
                start.elapsed().as_secs_f64()
            );
        }
        if let Some(dir) = &args.reference {
            let expected = step_check::read_reference(dir, name).map_err(|e| e.to_string())?;
            all_pass &= check_case(name, &values, &expected, tolerance, start, &mut report);
        }
    }
    // ZeRO-3's first step (shards on this backend's device, gathered and reduced inside the
    // passes) against the dense reference; once per backend, without mixed products.
    if let (Some(dir), None) = (&args.reference, matmul_dtype) {
        for case in step_check::ZERO3_CASES.into_iter().filter(|c| wanted(&format!("zero3-{}", c.name))) {
            let name = format!("zero3-{}", case.name);
            let start = Instant::now();
            let values = step_check::run_zero3_case::<B>(&fixture, case, device).map_err(|e| e.to_string())?;
            let expected = step_check::first_step(&step_check::read_reference(dir, case.name).map_err(|e| e.to_string())?);
            all_pass &= check_case(&name, &values, &expected, tolerance, start, &mut report);
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

/// Compares one case's `values` with the reference's, prints its row and records it in `report`;
/// whether it is within `tolerance`.
fn check_case(
    name: &str,
    values: &step_check::CaseValues,
    expected: &step_check::CaseValues,
    tolerance: f64,
    start: Instant,
    report: &mut Map<String, serde_json::Value>,
) -> bool {
    let diff = step_check::compare(values, expected);
    let pass = diff.within(tolerance);
    let missing = if diff.missing.is_empty() { String::new() } else { format!(", missing: {}", diff.missing.join(" ")) };
    println!(
        "{name:<10} {:>14.3e} {:>14.3e} {tolerance:>10.0e}  {} (worst: {}{missing})",
        diff.max_rel_scalar,
        diff.max_rel_grad,
        if pass { "PASS" } else { "FAIL" },
        diff.worst
    );
    report.insert(name.into(), json!({"max_rel_scalar": diff.max_rel_scalar, "max_rel_grad": diff.max_rel_grad, "tolerance": tolerance, "pass": pass, "worst": diff.worst, "missing": diff.missing, "seconds": start.elapsed().as_secs_f64()}));
    pass
}

// ---------------------------------------------------------------------------------------------
// burn's operations one at a time against the CPU (op_check).

fn run_op_check<B: AutodiffBackend>(args: &OpsArgs, half: Option<FloatDType>, device: &B::Device) -> Result<(), String> {
    let reference = op_check::run_ops::<alignment_core::backend::CpuAutodiff>(&Default::default(), None);
    let (mut report, mut failures) = (Vec::new(), Vec::new());
    for (inputs, tolerance) in op_check::passes(half) {
        let label = inputs.map_or("f32".to_string(), |dtype| format!("{dtype:?}").to_lowercase());
        println!("{} operations, {label} inputs:", args.backend);
        let start = Instant::now();
        let got = op_check::run_ops::<B>(device, inputs);
        for diff in op_check::compare_ops(&got, &reference, tolerance) {
            let verdict = if diff.pass() { "PASS" } else { "FAIL" };
            let error = diff.error.as_deref().map(|e| format!(" ({})", e.replace('\n', " "))).unwrap_or_default();
            println!("  {:<66} {:>10.3e} {:>8.0e}  {verdict}{error}", diff.name, diff.relative, diff.tolerance);
            if !diff.pass() {
                failures.push(format!("{} ({label})", diff.name));
            }
            report.push(json!({"inputs": label, "op": diff.name, "relative": diff.relative, "tolerance": diff.tolerance, "pass": diff.pass(), "error": diff.error}));
        }
        println!("  ({:.1} s)", start.elapsed().as_secs_f64());
    }
    if let Some(path) = &args.report {
        let json = json!({"backend": args.backend, "ops": report});
        std::fs::write(path, serde_json::to_string_pretty(&json).expect("json")).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    match failures.len() {
        0 => Ok(()),
        n => Err(format!("{n} operations differ from the CPU on {}: {}", args.backend, failures.join(", "))),
    }
}

// ---------------------------------------------------------------------------------------------
// The optimizer update alone.

/// Times `--steps` updates of each variant on one random model with random gradients:
/// `AdamW::step` (one process), and `DataParallel::step` of a ZeRO-2 rank at world size 1 with the optimizer on the
/// device (flat device buffers, collectives on them) and offloaded (`offload_optimizer_device:
/// cpu`: gradients and weights through the host, AdamW there). At world size 1 the collectives
/// move nothing, so the difference between the last two is the host round trip a data-parallel
/// step pays without device buffers, before any network.
fn run_update<B: AutodiffBackend>(args: &UpdateArgs, device: &B::Device) -> Result<(), String> {
    use alignment_distributed::{LocalCommunicator, ZeroStage};
    use alignment_trainer::DataParallel;
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;
    let config = ModelConfig::from_file(&args.shape).map_err(|e| e.to_string())?;
    let mut model = random_model::<B>(config, 0, device, None).map_err(|e| e.to_string())?;
    let (trainable, _) = count_params(&model);
    struct RandomGrads<'a, I: Backend>(&'a mut GradientsParams, &'a I::Device);
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for RandomGrads<'_, AD::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if param.is_require_grad() {
                let grad = Tensor::<AD::InnerBackend, D>::random(param.shape(), Distribution::Normal(0.0, 1e-4), self.1);
                self.0.register::<AD::InnerBackend, D>(param.id, grad);
            }
        }
    }
    // Fresh gradients for each update, made before its timer: like the backward pass's, held by
    // nothing but their container, which the one-process step consumes.
    let random_grads = |model: &CausalLm<B>| -> Result<GradientsParams, String> {
        let mut grads = GradientsParams::new();
        model.visit(&mut RandomGrads::<B::InnerBackend>(&mut grads, device));
        B::sync(device).map_err(|e| format!("{e:?}"))?;
        Ok(grads)
    };
    let rule = alignment_trainer::optimizer::UpdateRule::from_optim(&args.optim)?;
    let adamw = AdamWConfig { weight_decay: 0.01, rule, ..AdamWConfig::default() };
    let variants: &[&str] = match rule {
        alignment_trainer::optimizer::UpdateRule::AdamW => &["one-process", "data-parallel-device", "data-parallel-offloaded"],
        _ => &["one-process"],
    };
    let mut results = Map::new();
    for &variant in variants {
        let mut optimizer = AdamW::<B::InnerBackend>::new(adamw);
        let mut parallel = DataParallel::new(Box::new(LocalCommunicator::new()), ZeroStage::Zero2);
        parallel.offload_optimizer = Some(variant == "data-parallel-offloaded");
        let mut seconds = Vec::new();
        for step in 0..args.warmup + args.steps {
            let grads = random_grads(&model)?;
            let start = Instant::now();
            model = if variant == "one-process" {
                let (updated, report) = optimizer.step(1e-5, model, grads);
                std::hint::black_box(report);
                updated
            } else {
                parallel.step(&adamw, step as u64 + 1, 1e-5, model, &grads).map_err(|e| e.to_string())?.0
            };
            B::sync(device).map_err(|e| format!("{e:?}"))?;
            if step >= args.warmup {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        println!("update {variant:<24} median {:.2} ms over {} updates of {trainable} parameters", 1e3 * median(&seconds), args.steps);
        results.insert(variant.into(), json!({"median_s": median(&seconds), "steps_s": seconds}));
    }
    let shape = args.shape.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
    println!("{}", json!({"update": results, "backend": args.backend, "shape": shape, "trainable": trainable, "optim": args.optim}));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// NCCL at world size 1.

#[cfg(any(feature = "cuda", feature = "tch"))]
fn nccl_check() -> Result<(), String> {
    use alignment_distributed::{Communicator, DistEnv, LocalCommunicator, NcclCommunicator, ShardLayout};
    let port = alignment_distributed::launch::free_port().map_err(|e| e.to_string())?;
    let env = DistEnv { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: port };
    let mut nccl = NcclCommunicator::connect(&env, std::time::Duration::from_secs(60)).map_err(|e| e.to_string())?;
    let mut local = LocalCommunicator::new();
    let values: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin()).collect();
    let layout = ShardLayout::new(values.len(), 1);
    let mut results: Vec<(String, bool)> = Vec::new();
    let mut a = values.clone();
    let mut b = values.clone();
    nccl.all_reduce_sum(&mut a).map_err(|e| e.to_string())?;
    local.all_reduce_sum(&mut b).map_err(|e| e.to_string())?;
    results.push(("all_reduce_sum".into(), a == b));
    let a = nccl.reduce_scatter_sum(&values, &layout).map_err(|e| e.to_string())?;
    let b = local.reduce_scatter_sum(&values, &layout).map_err(|e| e.to_string())?;
    results.push(("reduce_scatter_sum".into(), a == b));
    let a = nccl.all_gather(&values, &layout).map_err(|e| e.to_string())?;
    let b = local.all_gather(&values, &layout).map_err(|e| e.to_string())?;
    results.push(("all_gather".into(), a == b));
    let (mut a, mut b) = (values.clone(), values.clone());
    nccl.broadcast(&mut a, 0).map_err(|e| e.to_string())?;
    local.broadcast(&mut b, 0).map_err(|e| e.to_string())?;
    results.push(("broadcast".into(), a == b));
    // The data-parallel step's device route (alignment_trainer::cuda_collectives on burn-cuda,
    // tch_collectives on libtorch): NCCL on the tensors' own buffers.
    #[cfg(feature = "cuda")]
    results.extend(device_route_checks::<alignment_trainer::cuda_collectives::CubeBuffers>(
        &mut nccl,
        &values,
        &Default::default(),
        "device",
    )?);
    #[cfg(feature = "tch")]
    results.extend(device_route_checks::<alignment_trainer::tch_collectives::TorchBuffers>(
        &mut nccl,
        &values,
        &burn::backend::libtorch::LibTorchDevice::Cuda(0),
        "torch",
    )?);
    nccl.barrier().map_err(|e| e.to_string())?;
    for (op, same) in &results {
        println!("nccl {op:<26} {}", if *same { "equal to one process" } else { "DIFFERS" });
    }
    println!("{}", json!({"nccl": results.iter().map(|(op, same)| (op.clone(), json!(same))).collect::<Map<String, serde_json::Value>>()}));
    if results.iter().all(|(_, same)| *same) {
        Ok(())
    } else {
        Err("NCCL collectives differ from the single-process communicator".into())
    }
}

/// The data-parallel collectives' device route on `R`'s buffers
/// (`alignment_trainer::device_collectives`) at world size 1 on `device`, where every collective
/// gives its input back: checks the buffer addresses (a view 3 values into its buffer among
/// them), the padding and the synchronisation with the backend's kernels, each result named
/// `"{name} {collective}"`.
#[cfg(any(feature = "cuda", feature = "tch"))]
fn device_route_checks<R: alignment_trainer::device_collectives::NcclBuffers>(
    nccl: &mut alignment_distributed::NcclCommunicator,
    values: &[f32],
    device: &burn::tensor::Device<R::Gpu>,
    name: &str,
) -> Result<Vec<(String, bool)>, String> {
    use alignment_distributed::ShardLayout;
    use alignment_trainer::device_collectives as route;
    use burn::tensor::TensorData;
    type B<R> = <R as alignment_trainer::device_collectives::NcclBuffers>::Gpu;
    let whole = Tensor::<B<R>, 1>::from_data(TensorData::new(values.to_vec(), [values.len()]), device);
    // Queued work the collectives must wait for: the view is computed, not uploaded.
    let view = (whole * 2.0).narrow(0, 3, values.len() - 3) * 0.5;
    let expected = &values[3..];
    let layout = ShardLayout::new(expected.len(), 1);
    let read = |t: Tensor<B<R>, 1>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    let declined = |_| format!("the {name} route declined a CUDA tensor on an NCCL communicator");
    let mut results = Vec::new();
    let sum = route::all_reduce_sum::<R, B<R>>(nccl, view.clone()).map_err(|e| e.to_string())?.map_err(declined)?;
    results.push((format!("{name} all_reduce_sum"), read(sum) == expected));
    let shard = route::reduce_scatter_sum::<R, B<R>>(nccl, view.clone(), &layout).map_err(|e| e.to_string())?.map_err(declined)?;
    results.push((format!("{name} reduce_scatter"), read(shard) == expected));
    let gathered = route::all_gather::<R, B<R>>(nccl, view.clone(), &layout).map_err(|e| e.to_string())?.map_err(declined)?;
    results.push((format!("{name} all_gather"), read(gathered) == expected));
    let copied = route::broadcast::<R, B<R>>(nccl, view.clone(), 0).map_err(|e| e.to_string())?.map_err(declined)?;
    results.push((format!("{name} broadcast"), read(copied) == expected));
    results.push((format!("{name} input untouched"), read(view) == expected));
    Ok(results)
}

#[cfg(not(any(feature = "cuda", feature = "tch")))]
fn nccl_check() -> Result<(), String> {
    Err("the NCCL check needs a GPU build (--features cuda or tch)".into())
}
