//! The cross-backend check of the training step: a few optimizer steps of every kind of run
//! (full SFT and DPO, LoRA, QLoRA, the lean step with gradient checkpointing and the chunked
//! head, and SFT with bitsandbytes' 8-bit AdamW) on the committed tiny Llama, whose losses, metrics and gradients must equal the
//! CPU backend's. It is how a GPU backend is proven correct: in CI on burn's `wgpu` backend over
//! Mesa's software Vulkan (the same CubeCL kernels as `cuda`; `tests/backend_check.rs`), and on
//! the device through `bench_train check` with values the CPU wrote here (issue #12).
//!
//! The step is the trainer's own: its tasks (`SftTask`, `DpoTask`), `forward_backward` with its
//! options, gradient accumulation over two micro-batches of unequal lengths (so padding and its
//! masks are exercised), and our AdamW with global-norm clipping.
//!
//! Every case also runs under mixed precision (`bf16: true`: the products in bf16 on CUDA, in
//! f16 on Vulkan, over f32 parameters; [`alignment_core::precision`]) against the same f32
//! reference, within [`MIXED_TOLERANCE`] instead of [`F32_TOLERANCE`].

use crate::models::{CausalLm, SaveDtype};
use crate::objectives::{DeferredMetrics, DpoConfig, Reduction};
use crate::trainer::optimizer::{AdamW, AdamWConfig, DeviceStepReport, UpdateRule};
use crate::trainer::tasks::{DpoTask, PreferencePair, ReferenceLogps, SftTask};
use crate::trainer::{forward_backward_prepared, prepare, Collation, PreparedBatch, Sequence, StepOptions, Task, IGNORE_INDEX};
use alignment_peft::{apply_lora, LoraConfig, QuantConfig, TargetModules};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a check could not run (a mismatch is not an error: see [`Difference`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("loading the fixture {path}: {message}")]
    Fixture { path: PathBuf, message: String },
    #[error("applying LoRA: {0}")]
    Lora(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Reference { path: PathBuf, message: String },
    #[error("ZeRO-3: {0}")]
    Zero3(String),
}

/// One kind of run the check covers.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// File stem of its reference values and its name in reports.
    pub name: &'static str,
    /// `true`: DPO on preference pairs; `false`: SFT on single rows.
    pub preference: bool,
    /// LoRA (r 4, every linear layer) on a frozen base.
    pub lora: bool,
    /// The frozen base in NF4 with double quantisation (QLoRA); always checkpointed, as the
    /// trainer does ([`StepOptions::for_model`]).
    pub nf4: bool,
    /// Gradient checkpointing and the chunked head (the recipes' `gradient_checkpointing` and
    /// `use_liger_kernel`), with a chunk small enough that the tiny vocabulary spans several.
    pub lean: bool,
    /// The optimizer's update (`optim`): AdamW, or bitsandbytes' AdamW with 8-bit moments, whose
    /// tensor form runs on the GPU backends (`trainer::adam8bit_tensors`).
    pub optim: UpdateRule,
}

impl Case {
    /// The case's optimizer settings: the defaults, with its update rule.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { rule: self.optim, ..AdamWConfig::default() }
    }
}

/// Every case, in the order reports list them.
pub const CASES: [Case; 7] = [
    Case { name: "sft", preference: false, lora: false, nf4: false, lean: false, optim: UpdateRule::AdamW },
    Case { name: "dpo", preference: true, lora: false, nf4: false, lean: false, optim: UpdateRule::AdamW },
    Case { name: "lora", preference: false, lora: true, nf4: false, lean: false, optim: UpdateRule::AdamW },
    Case { name: "qlora", preference: false, lora: true, nf4: true, lean: false, optim: UpdateRule::AdamW },
    Case { name: "sft-lean", preference: false, lora: false, nf4: false, lean: true, optim: UpdateRule::AdamW },
    Case { name: "dpo-lean", preference: true, lora: false, nf4: false, lean: true, optim: UpdateRule::AdamW },
    Case { name: "sft-8bit", preference: false, lora: false, nf4: false, lean: false, optim: UpdateRule::AdamW8bit },
];

/// How close a backend computing in f32 must come to the CPU's values (relative).
pub const F32_TOLERANCE: f64 = 1e-4;

/// How close a run whose products are in a half type must come to the CPU's f32 values.
pub const MIXED_TOLERANCE: f64 = 2e-2;

/// [`F32_TOLERANCE`], or [`MIXED_TOLERANCE`] when the products run in `matmul_dtype`.
pub fn tolerance(matmul_dtype: Option<FloatDType>) -> f64 {
    match matmul_dtype {
        Some(FloatDType::BF16 | FloatDType::F16) => MIXED_TOLERANCE,
        _ => F32_TOLERANCE,
    }
}

/// Head chunk of the lean cases, in tokens: the check's micro-batches have 2 × 13 positions.
const LEAN_HEAD_CHUNK_TOKENS: usize = 5;

/// What one case produced: each step's metrics and grad norm (`step0/loss`, ...) and the first
/// step's gradients by parameter path (`layers.0.self_attn.q_proj.weight`, ...).
///
/// The gradients are the first step's because AdamW's first update is `lr · g / (|g| + ε)`:
/// a gradient element that is zero up to rounding (seen: 9e-9 beside a maximum of 9e-3, in a
/// QLoRA `B`) moves its weight by up to `lr` in a direction that rounding decides, which then
/// shows in the second step's gradients as a difference of 1e-4 relative on a correct backend.
/// The later steps' losses, metrics and grad norms, which such an element barely moves, show
/// that the update itself matched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaseValues {
    pub scalars: BTreeMap<String, f64>,
    pub grads: BTreeMap<String, Vec<f32>>,
}

/// Optimizer steps each case runs.
pub const STEPS: usize = 2;

/// Gives every LoRA `B` small deterministic values (uniform in ±0.01) instead of PEFT's zeros,
/// so that `A` has a gradient in the first step, the one whose gradients are compared.
fn fill_lora_b<B: Backend>(model: &mut CausalLm<B>, config: &LoraConfig) {
    for (i, (_, linear)) in alignment_peft::lora::linear_layers_mut(model).into_iter().enumerate() {
        if let Some(lora) = linear.lora.take() {
            let [out, r] = lora.b.dims();
            let values: Vec<f32> = random_tokens(out * r, 2001, 31 + i as u64).into_iter().map(|t| (t as f32 - 1001.0) * 1e-5).collect();
            let b = Tensor::from_data(burn::tensor::TensorData::new(values, [out, r]), &lora.b.device());
            linear.lora = Some(alignment_peft::lora::adapter(lora.a.val(), b, config));
        }
    }
}

/// The model and step options of `case` on backend `B`, from the Llama checkpoint in `fixture`
/// (the tiny one: `crates/models/tests/fixtures/tiny-llama`), its matrix products in
/// `matmul_dtype` (mixed precision) when given, its frozen weights stored in that type where
/// that loses nothing, as the trainer stores them (`CausalLm::store_frozen_weights_in_product_type`).
pub fn prepare_case<B: AutodiffBackend>(
    fixture: &Path,
    case: Case,
    matmul_dtype: Option<FloatDType>,
    device: &B::Device,
) -> Result<(CausalLm<B>, StepOptions), CheckError> {
    prepare_case_storing(fixture, case, matmul_dtype, true, device)
}

/// [`prepare_case`], with the frozen weights left in their own type when `store_frozen` is false:
/// what a test compares the stored ones against.
pub fn prepare_case_storing<B: AutodiffBackend>(
    fixture: &Path,
    case: Case,
    matmul_dtype: Option<FloatDType>,
    store_frozen: bool,
    device: &B::Device,
) -> Result<(CausalLm<B>, StepOptions), CheckError> {
    let fixture_error = |e: &dyn std::fmt::Display| CheckError::Fixture { path: fixture.to_path_buf(), message: e.to_string() };
    let model: CausalLm<B> = if case.nf4 {
        alignment_peft::load_pretrained_4bit(fixture, device, QuantConfig::nf4(true)).map_err(|e| fixture_error(&e))?
    } else {
        crate::models::load_pretrained(fixture, device).map_err(|e| fixture_error(&e))?
    };
    let mut model = if case.lora {
        let mut config = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        config.dropout = 0.0;
        let mut model = apply_lora(model, &config, 5).map_err(|e| CheckError::Lora(e.to_string()))?;
        fill_lora_b(&mut model, &config);
        model
    } else {
        model
    };
    model.set_matmul_dtype(matmul_dtype);
    if store_frozen {
        model.store_frozen_weights_in_product_type();
    }
    let mut options = StepOptions::for_model(&model, case.lean, false);
    if case.lean {
        options.head_chunk_tokens = Some(LEAN_HEAD_CHUNK_TOKENS);
    }
    Ok((model, options))
}

/// What one optimizer step of a case leaves: the updated model, its metrics still on the device
/// (one entry per micro-batch, with its weight), the gradients, and the device report.
pub type CaseStep<B> =
    (CausalLm<B>, Vec<(DeferredMetrics<B>, f64)>, GradientsParams, DeviceStepReport<<B as AutodiffBackend>::InnerBackend>);

/// One optimizer step of `case`: two micro-batches of rows 13 + 9 and 11 + 6 tokens long (pairs
/// of such rows for DPO), learning rate 1e-3. Nothing is read back from the device.
pub fn case_step<B: AutodiffBackend>(
    model: CausalLm<B>,
    case: Case,
    optimizer: &mut AdamW<B::InnerBackend>,
    options: &StepOptions,
    device: &B::Device,
) -> CaseStep<B> {
    let vocab = model.config.vocab_size;
    let lengths = [13usize, 9, 11, 6];
    let lr = 1e-3;
    let (model, pending, grads, report) = if case.preference {
        let task = DpoTask { config: DpoConfig::default(), collation: Collation::pad_with(0) };
        let pairs: Vec<PreferencePair> = lengths.iter().enumerate().map(|(i, &n)| dpo_pair(n, vocab, 77 + i as u64)).collect();
        let batches: Vec<Vec<&PreferencePair>> = pairs.chunks(2).map(|c| c.iter().collect()).collect();
        train_step(model, &task, &batches, optimizer, lr, options, true, device)
    } else {
        let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
        let rows: Vec<Sequence> = lengths.iter().enumerate().map(|(i, &n)| sft_row(n, vocab, 77 + i as u64)).collect();
        let batches: Vec<Vec<&Sequence>> = rows.chunks(2).map(|c| c.iter().collect()).collect();
        train_step(model, &task, &batches, optimizer, lr, options, true, device)
    };
    (model, pending, grads.expect("train_step keeps the gradients when asked"), report)
}

/// Runs `case` on backend `B` ([`prepare_case`], then [`STEPS`] of [`case_step`]), reading each
/// step's metrics and grad norm, and the first step's gradients.
pub fn run_case<B: AutodiffBackend>(
    fixture: &Path,
    case: Case,
    matmul_dtype: Option<FloatDType>,
    device: &B::Device,
) -> Result<CaseValues, CheckError> {
    run_case_storing::<B>(fixture, case, matmul_dtype, true, device)
}

/// [`run_case`] on [`prepare_case_storing`]'s model.
pub fn run_case_storing<B: AutodiffBackend>(
    fixture: &Path,
    case: Case,
    matmul_dtype: Option<FloatDType>,
    store_frozen: bool,
    device: &B::Device,
) -> Result<CaseValues, CheckError> {
    let (mut model, options) = prepare_case_storing::<B>(fixture, case, matmul_dtype, store_frozen, device)?;
    let mut optimizer = AdamW::<B::InnerBackend>::new(case.adamw());
    let mut values = CaseValues::default();
    for step in 0..STEPS {
        let (updated, pending, grads, report) = case_step(model, case, &mut optimizer, &options, device);
        for (k, v) in read_metrics(pending) {
            values.scalars.insert(format!("step{step}/{k}"), v);
        }
        values.scalars.insert(format!("step{step}/grad_norm"), report.read().grad_norm);
        if step == 0 {
            values.grads = named_gradients(&updated, &grads);
        }
        model = updated;
    }
    Ok(values)
}

/// The cases ZeRO-3 is checked on ([`run_zero3_case`]): SFT (every weight partitioned and
/// trained) and LoRA (a partitioned frozen base); QLoRA's NF4 base is not partitioned.
pub const ZERO3_CASES: [Case; 2] = [CASES[0], CASES[2]];

/// The first step of `case` under ZeRO-3 in a world of one: the embedding and projections
/// partitioned into shards on `B`'s device (`trainer::zero3`), gathered inside the passes
/// through the collectives' world-of-one route, their gradients summed into the shards by the
/// recorded backward steps. Gives what [`first_step`] keeps of [`run_case`]'s values — the
/// step's metrics and every gradient, the shards' under their parameter paths — for comparison
/// with the dense model's.
pub fn run_zero3_case<B: AutodiffBackend>(fixture: &Path, case: Case, device: &B::Device) -> Result<CaseValues, CheckError> {
    use crate::trainer::zero3::{partition, Group};
    let (dense, options) = prepare_case::<B>(fixture, case, None, device)?;
    let group = std::sync::Arc::new(Group::new(Box::new(alignment_distributed::LocalCommunicator::new())));
    let (model, shards) = partition(dense, &group).map_err(|e| CheckError::Zero3(e.to_string()))?;
    // The step's own update reaches only the parameters outside the shards; it is not used.
    let mut optimizer = AdamW::<B::InnerBackend>::new(AdamWConfig::default());
    let (_, pending, grads, _) = case_step(model.clone(), case, &mut optimizer, &options, device);
    group.check().map_err(|e| CheckError::Zero3(e.to_string()))?;
    let mut values = CaseValues {
        scalars: read_metrics(pending).into_iter().map(|(k, v)| (format!("step0/{k}"), v)).collect(),
        grads: named_gradients(&model, &grads),
    };
    for shard in shards.iter().filter(|s| crate::models::CompressedWeight::is_trainable(s.as_ref())) {
        let grad = shard.take_gradient().into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
        values.grads.insert(shard.path.clone(), grad);
    }
    Ok(values)
}

/// The part of [`run_case`]'s values that [`run_zero3_case`] gives: the first step's metrics
/// (its grad norm is the data-parallel update's, not computed there) and the gradients.
pub fn first_step(values: &CaseValues) -> CaseValues {
    let scalars = values.scalars.iter().filter(|(k, _)| k.starts_with("step0/") && *k != "step0/grad_norm");
    CaseValues { scalars: scalars.map(|(k, v)| (k.clone(), *v)).collect(), grads: values.grads.clone() }
}

/// The smallest magnitude a scalar is compared relative to. DPO's `logits/chosen` is a mean of
/// logits over the vocabulary, −0.001 on the tiny model, so a difference of 2e-5 (f16 products)
/// would read as 2 %; 0.1 is below every loss, log-probability, reward and grad norm of the
/// cases, which stay compared relative to themselves.
pub const SCALAR_FLOOR: f64 = 0.1;

/// How far a backend's values are from the reference's.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// Largest `|got - expected| / max(|expected|, SCALAR_FLOOR)` over the scalars.
    pub max_rel_scalar: f64,
    /// Largest `‖got - expected‖ / ‖expected‖` over the gradient tensors.
    pub max_rel_grad: f64,
    /// The scalar or tensor with the largest of the two.
    pub worst: String,
    /// Keys of the reference that `got` lacks, or with another number of values.
    pub missing: Vec<String>,
}

impl Difference {
    /// Whether everything is present and within `tolerance`.
    pub fn within(&self, tolerance: f64) -> bool {
        self.missing.is_empty() && self.max_rel_scalar <= tolerance && self.max_rel_grad <= tolerance
    }
}

/// Compares `got` with `expected` key by key; NaN counts as an infinite difference.
pub fn compare(got: &CaseValues, expected: &CaseValues) -> Difference {
    let mut diff = Difference { max_rel_scalar: 0.0, max_rel_grad: 0.0, worst: String::new(), missing: Vec::new() };
    let mut worst_err = -1f64;
    let mut note = |key: &str, err: f64, diff: &mut Difference| {
        if err > worst_err {
            worst_err = err;
            diff.worst = key.to_string();
        }
    };
    for (k, &e) in &expected.scalars {
        let Some(&g) = got.scalars.get(k) else {
            diff.missing.push(k.clone());
            continue;
        };
        let err = (g - e).abs() / e.abs().max(SCALAR_FLOOR);
        let err = if err.is_nan() { f64::INFINITY } else { err };
        diff.max_rel_scalar = diff.max_rel_scalar.max(err);
        note(k, err, &mut diff);
    }
    for (k, e) in &expected.grads {
        let Some(g) = got.grads.get(k).filter(|g| g.len() == e.len()) else {
            diff.missing.push(k.clone());
            continue;
        };
        let (d, n) = g.iter().zip(e).fold((0f64, 0f64), |(d, n), (&a, &b)| (d + ((a - b) as f64).powi(2), n + (b as f64).powi(2)));
        let err = d.sqrt() / n.sqrt().max(1e-12);
        let err = if err.is_nan() { f64::INFINITY } else { err };
        diff.max_rel_grad = diff.max_rel_grad.max(err);
        note(k, err, &mut diff);
    }
    diff
}

/// Writes `values` as `<dir>/<name>.json` (scalars) and `<dir>/<name>.safetensors` (gradients,
/// flattened f32), for a later [`read_reference`] on another machine.
pub fn write_reference(dir: &Path, name: &str, values: &CaseValues) -> Result<(), CheckError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckError::Io { path: dir.to_path_buf(), source })?;
    let json_path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&values.scalars).expect("a map of numbers serialises");
    std::fs::write(&json_path, text).map_err(|source| CheckError::Io { path: json_path, source })?;
    let tensors: Vec<crate::models::weights::NamedTensor> = values
        .grads
        .iter()
        .map(|(k, v)| crate::models::weights::NamedTensor { name: k.clone(), shape: vec![v.len()], values: v.clone() })
        .collect();
    let path = dir.join(format!("{name}.safetensors"));
    crate::models::weights::write_safetensors(&path, &tensors, SaveDtype::F32)
        .map_err(|e| CheckError::Reference { path, message: e.to_string() })
}

/// The values [`write_reference`] wrote for `name` in `dir`.
pub fn read_reference(dir: &Path, name: &str) -> Result<CaseValues, CheckError> {
    let json_path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&json_path).map_err(|source| CheckError::Io { path: json_path.clone(), source })?;
    let scalars = serde_json::from_str(&text).map_err(|e| CheckError::Reference { path: json_path, message: e.to_string() })?;
    let path = dir.join(format!("{name}.safetensors"));
    let reference_error = |e: &dyn std::fmt::Display| CheckError::Reference { path: path.clone(), message: e.to_string() };
    let checkpoint = crate::models::weights::Checkpoint::open_file(&path).map_err(|e| reference_error(&e))?;
    let mut grads = BTreeMap::new();
    for k in checkpoint.names() {
        let len = checkpoint.shape(&k).unwrap_or_default().iter().product();
        grads.insert(k.clone(), checkpoint.read_f32(&k, &[len]).map_err(|e| reference_error(&e))?);
    }
    Ok(CaseValues { scalars, grads })
}

/// Gradients by parameter path (`layers.0.self_attn.q_proj.weight`, ...), flattened to f32.
pub fn named_gradients<B: AutodiffBackend>(model: &CausalLm<B>, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
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

// ---------------------------------------------------------------------------------------------
// The training step, as the trainer's loop runs it (crates/trainer/src/train.rs); shared with
// `bench_train train`.

/// One optimizer step over `micro_batches`, as the trainer's loop runs it: each micro-batch's
/// forward and backward pass (`step::forward_backward`, shaped by `options`) with its loss
/// divided by the step's total weight, gradients accumulated, then AdamW. Returns the updated
/// model, the step's pending metrics with their weights, the gradients when `keep_gradients`
/// (handles kept past the update, which then copies them before scaling: a timed step keeps
/// none, as the trainer's loop) and the device report.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn train_step<B: AutodiffBackend, T: Task>(
    model: CausalLm<B>,
    task: &T,
    micro_batches: &[Vec<&T::Example>],
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    options: &StepOptions,
    keep_gradients: bool,
    device: &B::Device,
) -> (CausalLm<B>, Vec<(DeferredMetrics<B>, f64)>, Option<GradientsParams>, DeviceStepReport<B::InnerBackend>) {
    let prepared: Vec<PreparedBatch<B>> = micro_batches.iter().map(|batch| prepare(&model, task, batch, device)).collect();
    train_step_prepared(model, task, micro_batches, &prepared, optimizer, lr, options, keep_gradients, device)
}

/// [`train_step`] over micro-batches already uploaded (`prepared[i]` from `micro_batches[i]`): a
/// step that moves nothing between host and device, which `bench_train train --cuda-graph`
/// captures. The loss's normaliser (the step's total weight) is a number computed here from
/// `micro_batches`.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn train_step_prepared<B: AutodiffBackend, T: Task>(
    model: CausalLm<B>,
    task: &T,
    micro_batches: &[Vec<&T::Example>],
    prepared: &[PreparedBatch<B>],
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    options: &StepOptions,
    keep_gradients: bool,
    device: &B::Device,
) -> (CausalLm<B>, Vec<(DeferredMetrics<B>, f64)>, Option<GradientsParams>, DeviceStepReport<B::InnerBackend>) {
    let step_weight: f64 = micro_batches.iter().map(|b| task.weight(b)).sum::<f64>().max(f64::MIN_POSITIVE);
    let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
    let mut pending = Vec::new();
    for (batch, inputs) in micro_batches.iter().zip(prepared) {
        let metrics = forward_backward_prepared(&model, task, inputs, batch, 1.0 / step_weight, options, &mut accumulator, device);
        pending.push((metrics, task.weight(batch) / step_weight));
    }
    let grads = accumulator.grads();
    let kept = keep_gradients.then(|| handles(&model, &grads));
    let (model, report) = optimizer.step(lr, model, grads);
    (model, pending, kept, report)
}

/// A second container holding handles to `grads`' tensors (no copy), for `model`'s parameters.
fn handles<B: AutodiffBackend>(model: &CausalLm<B>, grads: &GradientsParams) -> GradientsParams {
    struct Share<'a> {
        grads: &'a GradientsParams,
        out: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Share<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.out.register::<B::InnerBackend, D>(param.id, g);
            }
        }
    }
    let mut share = Share { grads, out: GradientsParams::new() };
    model.visit(&mut share);
    share.out
}

/// The weighted means of a step's pending metrics (reads them from the device).
pub fn read_metrics<B: Backend>(pending: Vec<(DeferredMetrics<B>, f64)>) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::<String, f64>::new();
    for (deferred, w) in pending {
        for (k, v) in deferred.read().iter() {
            *metrics.entry(k.to_string()).or_default() += v * w;
        }
    }
    metrics
}

/// Deterministic pseudo-random token ids in `1..vocab` (splitmix64).
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
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

/// An SFT row of `len` random tokens, every token scored.
pub fn sft_row(len: usize, vocab: usize, seed: u64) -> Sequence {
    let ids = random_tokens(len, vocab, seed);
    let labels = ids.iter().map(|&i| i as i64).collect();
    Sequence::new(ids, labels)
}

/// A preference pair: a shared prompt of `len / 2` tokens, then different completions, each row
/// `len` tokens; the reference log-probs are fixed numbers (precomputed in a real run).
pub fn dpo_pair(len: usize, vocab: usize, seed: u64) -> PreferencePair {
    let prompt = random_tokens(len / 2, vocab, seed);
    let row = |salt: u64| {
        let mut ids = prompt.clone();
        ids.extend(random_tokens(len - prompt.len(), vocab, seed ^ salt));
        let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt.len() { IGNORE_INDEX } else { t as i64 }).collect();
        Sequence::new(ids, labels)
    };
    PreferencePair { chosen: row(1), rejected: row(2), reference: Some(ReferenceLogps::new(-(len as f64), -(len as f64) * 1.1)) }
}
