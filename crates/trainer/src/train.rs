//! The training loop: one obvious path from examples to updated weights.
//!
//! ```text
//! for step in start..total_steps:
//!     micro-batches = the step's slice of this epoch's shuffled order (seeded by seed + epoch)
//!     for each micro-batch:  loss = task.loss(model, micro) / step weight;  grads += ∇loss
//!     AdamW update with the scheduled learning rate, after global-norm clipping
//!     every logging_steps: metrics.jsonl line + progress bar; every eval_steps: evaluate;
//!     every save_steps: atomic checkpoint (model, optimizer moments, step)
//! save the final model in Hugging Face layout, plot the losses
//! ```
//! Everything a step depends on is a function of (seed, step), the weights and the optimizer
//! moments, so a run resumed from a checkpoint logs the same losses as one never stopped.

use crate::checkpoint::{self, TrainerState};
use crate::data_parallel::MetricSums;
use crate::graph_steps::GraphedSteps;
use crate::logging::{self, MetricsAccumulator, MetricsLog};
use crate::optimizer::{AdamW, AdamWConfig};
use crate::output_dir;
use crate::recipe::Recipe;
use crate::schedule::{Schedule, ScheduleKind};
use crate::step::{forward_backward, GraphMode, StepOptions};
use crate::strategy::{SingleProcess, StepValues, Strategy};
use crate::task::{metric_values, Task};
use crate::TrainError;
use alignment_core::precision;
use alignment_models::{load_pretrained, CausalLm};
use alignment_objectives::DeferredMetrics;
use burn::module::AutodiffModule;
use burn::optim::GradientsAccumulator;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

pub use crate::step::HEAD_CHUNK_VALUES;

/// When to save checkpoints (`save_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStrategy {
    /// Never (only the final model).
    No,
    /// Every `save_steps` updates.
    Steps(u64),
    /// At the end of each epoch.
    Epoch,
}

/// Intervals given as a fraction of the run's total updates, as transformers reads
/// `logging_steps`/`eval_steps`/`save_steps` below 1: `ceil(total × fraction)` updates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FractionalSteps {
    pub logging: Option<f64>,
    pub eval: Option<f64>,
    pub save: Option<f64>,
}

impl TrainerConfig {
    /// This config with its fractional intervals turned into updates for a run of `total_steps`.
    pub fn with_intervals_for(&self, total_steps: u64) -> TrainerConfig {
        let steps = |fraction: f64| ((total_steps as f64 * fraction).ceil() as u64).max(1);
        let mut config = self.clone();
        let f = self.fractional_steps;
        if let Some(x) = f.logging {
            config.logging_steps = steps(x);
        }
        if let Some(x) = f.eval {
            config.eval_steps = Some(steps(x));
        }
        if let (Some(x), SaveStrategy::Steps(_)) = (f.save, config.save) {
            config.save = SaveStrategy::Steps(steps(x));
        }
        config.fractional_steps = FractionalSteps::default();
        config
    }
}

/// What is saved when only LoRA adapters train (`use_peft`): PEFT's adapter directory, in
/// checkpoints and as the final output, instead of the full model.
#[derive(Debug, Clone)]
pub struct AdapterOutput {
    /// The adapters' configuration (written as adapter_config.json).
    pub lora: alignment_peft::LoraConfig,
    /// The base model the adapters apply to (`base_model_name_or_path` in adapter_config.json).
    pub base_model_name_or_path: String,
}

/// Everything the loop needs, taken from a recipe by [`TrainerConfig::from_recipe`].
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub num_train_epochs: f64,
    /// Positive: total updates, overriding epochs.
    pub max_steps: Option<u64>,
    pub train_batch_size: usize,
    pub eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub adamw: AdamWConfig,
    pub seed: u64,
    pub logging_steps: u64,
    pub logging_first_step: bool,
    /// Evaluate every N updates (and at the end) when set.
    pub eval_steps: Option<u64>,
    /// Evaluate at the end of every epoch (`eval_strategy: epoch`).
    pub eval_every_epoch: bool,
    /// `logging_steps`, `eval_steps`, `save_steps` given as fractions of the run (below 1):
    /// they replace the integer intervals once the total number of updates is known.
    pub fractional_steps: FractionalSteps,
    /// Evaluate before the first update (`eval_on_start`).
    pub eval_on_start: bool,
    pub save: SaveStrategy,
    pub save_total_limit: Option<usize>,
    pub output_dir: PathBuf,
    /// Checkpoint to resume from.
    pub resume_from: Option<PathBuf>,
    /// Copied next to saved weights (tokenizer.json, tokenizer_config.json, ...).
    pub tokenizer_dir: Option<PathBuf>,
    /// Hide the progress bar.
    pub quiet: bool,
    /// Save adapters instead of the full model (set by the caller that attached them).
    pub adapter: Option<AdapterOutput>,
    /// The shape of each micro-batch's forward and backward pass (checkpointing, chunked head).
    pub step: StepOptions,
    /// Compute the head in chunks (`use_liger_kernel`); the chunk size follows the vocabulary.
    pub chunked_head: bool,
    /// Replay the optimizer steps from one captured step (`torch_compile_mode: reduce-overhead`:
    /// CUDA graphs on libtorch with a GPU, [`crate::graph_steps`]); where they cannot run, the
    /// run says why in one line and steps eagerly.
    pub step_graphs: Option<GraphMode>,
    /// Mixed precision (`bf16: true`): the matrix products in bf16 over f32 parameters,
    /// gradients and AdamW moments, where the backend has bf16 arithmetic (CUDA); elsewhere the
    /// run says in one line that it computes in f32.
    pub bf16: bool,
    /// Replace a previous run's files in `output_dir` (`overwrite_output_dir`); without it a used
    /// `output_dir` is refused unless the run resumes ([`crate::output_dir`]).
    pub overwrite_output_dir: bool,
    /// TRL's `disable_dropout` (DPOConfig, ORPOConfig; true by default): the model trains with
    /// every dropout off, LoRA's `lora_dropout` included; the saved adapter config keeps its
    /// value. SFT keeps its dropout (TRL's SFTConfig has no such key).
    pub disable_dropout: bool,
    /// Recipe settings that shape the examples or the objective (`max_seq_length`,
    /// `assistant_only_loss`, `beta`, ...), as `(key, value)`: part of the resume fingerprint, so
    /// a resume with another value is refused naming the key.
    pub resume_settings: Vec<(String, String)>,
}

impl TrainerConfig {
    /// Reads the loop's settings from a recipe (transformers' TrainingArguments semantics).
    pub fn from_recipe(recipe: &Recipe) -> Result<Self, TrainError> {
        crate::components::trainer_config(recipe)
    }

    /// Settings a resume must share, as `key=value` lines; `world_size` enters through the
    /// global batch only, so a run checkpointed on N ranks resumes on M with the same global
    /// batch. `data` is a hash of the tokenized examples (contents, order, labels): another
    /// dataset, split, fraction or tokenization is a different run.
    fn fingerprint(&self, data: &str, num_examples: usize, task: &str, world_size: usize) -> String {
        let a = &self.adamw;
        let mut pairs: Vec<(String, String)> = vec![
            ("task".into(), task.into()),
            ("examples".into(), num_examples.to_string()),
            ("data".into(), data.into()),
            ("global_batch_size".into(), (self.train_batch_size * world_size).to_string()),
            ("gradient_accumulation_steps".into(), self.gradient_accumulation_steps.to_string()),
            ("seed".into(), self.seed.to_string()),
            ("learning_rate".into(), self.learning_rate.to_string()),
            ("lr_scheduler_type".into(), format!("{:?}", self.schedule)),
            ("warmup_ratio".into(), self.warmup_ratio.to_string()),
            ("warmup_steps".into(), self.warmup_steps.to_string()),
            ("num_train_epochs".into(), self.num_train_epochs.to_string()),
            ("max_steps".into(), format!("{:?}", self.max_steps)),
            ("weight_decay".into(), a.weight_decay.to_string()),
            ("max_grad_norm".into(), format!("{:?}", a.max_grad_norm)),
            ("adam_beta1".into(), a.beta1.to_string()),
            ("adam_beta2".into(), a.beta2.to_string()),
            ("adam_epsilon".into(), a.epsilon.to_string()),
        ];
        if let Some(a) = &self.adapter {
            let mut lora =
                format!("r={} alpha={} targets={:?} rslora={}", a.lora.r, a.lora.alpha, a.lora.target_modules, a.lora.use_rslora);
            // Written only when set, so that checkpoints saved before these existed still resume.
            if a.lora.use_dora {
                lora.push_str(" dora=true");
            }
            if !a.lora.modules_to_save.is_empty() {
                lora.push_str(&format!(" modules_to_save={:?}", a.lora.modules_to_save));
            }
            pairs.push(("lora".into(), lora));
        }
        pairs.extend(self.resume_settings.iter().cloned());
        pairs.iter().map(|(k, v)| format!("{k}={}", v.replace('\n', " "))).collect::<Vec<_>>().join("\n")
    }
}

/// Why a checkpoint's fingerprint differs from this run's: each changed setting named, with its
/// value then and now.
fn fingerprint_difference(checkpoint: &str, now: &str) -> String {
    let parse = |s: &str| -> Option<Vec<(String, String)>> {
        s.lines().map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
    };
    let (Some(then), Some(current)) = (parse(checkpoint), parse(now)) else {
        return format!("the checkpoint was made with other settings:\n  checkpoint: {checkpoint}\n  now:        {now}");
    };
    let mut changed = Vec::new();
    for (key, value) in &current {
        match then.iter().find(|(k, _)| k == key) {
            Some((_, old)) if old != value => changed.push(format!("`{key}` was {old} in the checkpoint, now {value}")),
            None => changed.push(format!("`{key}` (now {value}) is not recorded in the checkpoint")),
            _ => {}
        }
    }
    for (key, old) in &then {
        if !current.iter().any(|(k, _)| k == key) {
            changed.push(format!("`{key}` was {old} in the checkpoint and is not set now"));
        }
    }
    format!("the run's settings changed since the checkpoint:\n  {}", changed.join("\n  "))
}

/// A stable hash (SHA-256, first 16 hex digits) of every example's token ids and labels, in order.
fn data_hash<T: Task>(task: &T, examples: &[T::Example]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for example in examples {
        for sequence in task.sequences(example) {
            hasher.update((sequence.input_ids.len() as u64).to_le_bytes());
            for id in &sequence.input_ids {
                hasher.update(id.to_le_bytes());
            }
            for label in &sequence.labels {
                hasher.update(label.to_le_bytes());
            }
        }
        hasher.update([0xff]);
    }
    hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A QLoRA model's trainable parameters held in bf16, as TRL 1.16's SFT and DPO trainers hold a
/// quantized model's (`alignment_peft::hold_trainable_in`: adapters and `modules_to_save`, not
/// DoRA's magnitudes), so its gradients and AdamW moments are bf16 too: called where the products
/// run in bf16. Not under data parallelism (the ranks' flat buffers are f32; the run says the
/// adapters train in f32), nor with `ALIGNMENT_QLORA_ADAPTERS_IN_BF16=0` (f32 adapters, this
/// project's behaviour before 2026-12-07, to measure what the cast changes). Any other model is
/// returned as it is.
pub fn hold_qlora_adapters_in_bf16<B: AutodiffBackend>(model: CausalLm<B>, single_process: bool, is_main: bool) -> CausalLm<B> {
    static IN_BF16: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_QLORA_ADAPTERS_IN_BF16");
    if !single_process || !model.has_quantized_layers() || !alignment_peft::has_lora(&model) || !IN_BF16.is_on() {
        return model;
    }
    let (model, values) = alignment_peft::hold_trainable_in(model, FloatDType::BF16);
    if is_main && values > 0 {
        eprintln!(
            "note: QLoRA: the {values} trainable values (adapters and modules_to_save) are held in bf16, with their gradients and \
             AdamW moments, as TRL holds a quantized model's"
        );
    }
    model
}

/// The first token id at or past `vocab_size` in `examples`, with the example's index.
fn out_of_vocab<T: Task>(task: &T, examples: &[T::Example], vocab_size: usize) -> Option<(usize, u32)> {
    examples.iter().enumerate().find_map(|(i, e)| {
        task.sequences(e).iter().flat_map(|s| s.input_ids.iter()).find(|&&id| id as usize >= vocab_size).map(|&id| (i, id))
    })
}

/// How the examples are walked: micro-batches per epoch and updates in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    pub micro_batches_per_epoch: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl StepPlan {
    /// transformers' arithmetic: ⌈n / batch⌉ micro-batches per epoch, ⌈that / accumulation⌉
    /// updates per epoch, `max_steps` or ⌈epochs × updates per epoch⌉ in total.
    pub fn new(num_examples: usize, config: &TrainerConfig) -> Self {
        let micro = num_examples.div_ceil(config.train_batch_size);
        let per_epoch = micro.div_ceil(config.gradient_accumulation_steps).max(1) as u64;
        let total = config.max_steps.unwrap_or_else(|| (config.num_train_epochs * per_epoch as f64).ceil() as u64);
        Self { micro_batches_per_epoch: micro, steps_per_epoch: per_epoch, total_steps: total }
    }

    /// Example indices of each micro-batch of update `step` (0-based).
    pub fn micro_batches(&self, step: u64, num_examples: usize, config: &TrainerConfig) -> Vec<Vec<usize>> {
        let epoch = step / self.steps_per_epoch;
        let order = epoch_order(num_examples, config.seed, epoch);
        let first = (step % self.steps_per_epoch) as usize * config.gradient_accumulation_steps;
        let last = (first + config.gradient_accumulation_steps).min(self.micro_batches_per_epoch);
        (first..last).map(|m| order[m * config.train_batch_size..((m + 1) * config.train_batch_size).min(num_examples)].to_vec()).collect()
    }
}

impl StepPlan {
    /// The examples the run's updates visit, when that is not all of them: a run that stops
    /// (`max_steps`) within its first epoch sees only the head of that epoch's order. `None`
    /// when every example is visited. Lets per-example work done before training (DPO's
    /// reference log-probs) skip what the run will never read.
    pub fn examples_used(&self, num_examples: usize, config: &TrainerConfig) -> Option<Vec<usize>> {
        if self.total_steps >= self.steps_per_epoch {
            return None;
        }
        let micro_batches = self.total_steps as usize * config.gradient_accumulation_steps;
        let count = (micro_batches * config.train_batch_size).min(num_examples);
        let mut used = epoch_order(num_examples, config.seed, 0)[..count].to_vec();
        used.sort_unstable();
        Some(used)
    }
}

/// The shuffled order of the examples in `epoch`: a ChaCha8 permutation seeded by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch);
    order.shuffle(&mut rng);
    order
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Updates made (including those before a resume).
    pub steps: u64,
    /// Every metrics.jsonl entry.
    pub history: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Where the final model was saved.
    pub model_dir: PathBuf,
    /// Steps replayed from a captured step (`torch_compile_mode: reduce-overhead`); 0 when every
    /// step ran eagerly.
    pub steps_replayed: u64,
}

/// Evaluates `task` on `examples` (no gradients) in batches of `batch_size`, in order, and
/// returns its metrics, each prefixed `eval_`, averaged over the batches as transformers' and
/// TRL's `evaluate()` do: `eval_loss` is the mean of the batches' losses weighted by their
/// number of rows (`Trainer.evaluation_loop`), every other metric the plain mean of the
/// batches' values (the trainers' `log`).
pub fn evaluate<B: burn::tensor::backend::Backend, T: Task>(
    model: &CausalLm<B>,
    task: &T,
    examples: &[T::Example],
    batch_size: usize,
    device: &B::Device,
) -> Vec<(String, f64)> {
    evaluate_with(model, task, examples, batch_size, None, device)
}

/// [`evaluate`], computing the head `head_chunk_tokens` tokens at a time when given (the
/// chunked head of training: the full logits never exist).
pub fn evaluate_with<B: burn::tensor::backend::Backend, T: Task>(
    model: &CausalLm<B>,
    task: &T,
    examples: &[T::Example],
    batch_size: usize,
    head_chunk_tokens: Option<usize>,
    device: &B::Device,
) -> Vec<(String, f64)> {
    let mut acc = MetricsAccumulator::default();
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&T::Example> = chunk.iter().collect();
        let metrics = match head_chunk_tokens {
            None => task.loss(model, &refs, device).1,
            Some(tokens) => {
                let scoring = task.scoring::<B>(&refs, device);
                let hidden = model.hidden_states(&scoring.batch, None);
                let logps = alignment_objectives::chunked_sequence_logps_with(
                    hidden,
                    model.head_weight_for_products(),
                    scoring.label_sets,
                    tokens,
                    task.extra_stats(),
                );
                metric_values(task.loss_from_logps(logps, &refs, device).1)
            }
        };
        for (name, value) in &metrics {
            let weight = if name == "loss" { chunk.len() as f64 } else { 1.0 };
            acc.add([(name.as_str(), *value)], weight);
        }
    }
    acc.means("eval_")
}

/// Trains `model` on `train` with `task`, evaluating on `eval`. Writes `metrics.jsonl`,
/// checkpoints, the final model and `loss.svg` into `config.output_dir`.
pub fn train<B: AutodiffBackend, T: Task>(
    model: CausalLm<B>,
    task: &T,
    train: &[T::Example],
    eval: &[T::Example],
    config: &TrainerConfig,
    device: &B::Device,
) -> Result<(CausalLm<B>, TrainOutcome), TrainError> {
    train_with(model, task, train, eval, config, device, &mut SingleProcess)
}

/// [`train`], with the ranks sharing each step as `strategy` says ([`crate::strategy`]). For a
/// data-parallel rank `config.train_batch_size` is the per-rank batch, the global batch is that
/// times the number of ranks, and only rank 0 writes files.
pub fn train_with<B: AutodiffBackend, T: Task, S: Strategy>(
    model: CausalLm<B>,
    task: &T,
    train: &[T::Example],
    eval: &[T::Example],
    config: &TrainerConfig,
    device: &B::Device,
    strategy: &mut S,
) -> Result<(CausalLm<B>, TrainOutcome), TrainError> {
    if train.is_empty() {
        return Err(TrainError::EmptyDataset { what: format!("{} training set", task.name()) });
    }
    let world = strategy.world_size();
    let is_main = strategy.is_main();
    // The step plan of the global batch: every rank walks the same micro-batches.
    let global = TrainerConfig { train_batch_size: config.train_batch_size * world, ..config.clone() };
    let plan = StepPlan::new(train.len(), &global);
    let vocab_size = model.config.vocab_size;
    for (split, examples) in [("training", train), ("evaluation", eval)] {
        if let Some((index, id)) = out_of_vocab(task, examples, vocab_size) {
            return Err(TrainError::TokenOutOfVocab {
                id,
                vocab_size,
                example: format!("{split} example {index}"),
                tokenizer: config.tokenizer_dir.clone(),
            });
        }
    }
    let fingerprint = config.fingerprint(&data_hash(task, train), train.len(), task.name(), world);
    let mut optimizer = AdamW::<B::InnerBackend>::new(config.adamw);
    let mut config = config.with_intervals_for(plan.total_steps);
    let recipe_checkpointing = config.step.gradient_checkpointing;
    config.step = StepOptions::for_model(&model, config.step.gradient_checkpointing, config.chunked_head);
    if model.has_quantized_layers() && !recipe_checkpointing {
        eprintln!("note: the 4-bit base trains with gradient checkpointing (its layers are dequantized one at a time)");
    }
    let config = &config;
    let mut model = model;
    let mut start = 0;
    if let Some(dir) = &config.resume_from {
        let state = checkpoint::read_state(dir)?;
        if state.fingerprint != fingerprint {
            return Err(TrainError::Resume { path: dir.clone(), message: fingerprint_difference(&state.fingerprint, &fingerprint) });
        }
        model = match &config.adapter {
            None => load_pretrained::<B>(dir, device)?,
            // The base is unchanged by training: only the adapters are swapped for the saved ones.
            Some(_) => alignment_peft::load_adapter(alignment_peft::remove_lora(model), dir)?.0,
        };
        checkpoint::load_optimizer(dir, &mut optimizer, &state, device)?;
        start = state.global_step;
    }
    if config.disable_dropout {
        // After a resume too: the adapters read back from a checkpoint carry their config's dropout.
        model = alignment_peft::set_lora_dropout(model, 0.0);
    }
    model = strategy.prepare(model, &mut optimizer, config.resume_from.is_some())?;
    // The recipe's `bf16`, or the accelerate config's `mixed_precision` under a launcher.
    let launcher_precision = strategy.launcher_precision().to_owned();
    if config.bf16 || launcher_precision == "bf16" {
        if precision::supported::<B>(FloatDType::BF16, device) {
            model.set_matmul_dtype(Some(FloatDType::BF16));
            // A frozen base (LoRA, QLoRA's embedding and head) from a bf16 checkpoint: held in
            // bf16, its values unchanged.
            let narrowed = model.store_frozen_weights_in_product_type();
            if narrowed > 0 && is_main {
                eprintln!("note: bf16: the frozen weights are held in bf16 ({:.0} MiB less)", narrowed as f64 / 1048576.0);
            }
            model = hold_qlora_adapters_in_bf16(model, strategy.single_process(), is_main);
        } else if is_main {
            eprintln!("note: bf16: this backend has no bf16 arithmetic; training computes in f32");
        }
    } else if launcher_precision == "fp16" && is_main {
        eprintln!("note: mixed_precision: fp16 (accelerate config) is not implemented; training computes in f32 (use bf16)");
    }
    if is_main && model.has_quantized_layers() && alignment_peft::has_lora(&model) && !alignment_peft::adapter_factors_in_bf16(&model) {
        eprintln!(
            "note: QLoRA: the adapters train in f32 (TRL holds a quantized model's in bf16; here that takes bf16: true on a \
             backend with bf16 arithmetic, one process, and ALIGNMENT_QLORA_ADAPTERS_IN_BF16 not 0)"
        );
    }
    // Steps replayed from a captured one, one process only (collectives are not captured).
    let mut graphs = match config.step_graphs {
        Some(_) if !strategy.single_process() => {
            if is_main {
                eprintln!("note: torch_compile_mode: steps run eagerly: steps are replayed as CUDA graphs in one process only");
            }
            None
        }
        Some(mode) => match GraphedSteps::<B, T::Example>::new(mode, &model, &optimizer, device) {
            Ok(graphs) => Some(graphs),
            Err(why) => {
                eprintln!("note: torch_compile_mode: steps run eagerly: {why}");
                None
            }
        },
        None => None,
    };
    let mut log = if is_main {
        // The run is known to start: the output_dir rules apply now, and only now is a
        // previous run's output replaced (crate::output_dir).
        output_dir::remove_stale_staging(&config.output_dir);
        output_dir::check_reusable(&config.output_dir, config.resume_from.is_some(), config.overwrite_output_dir)?;
        if config.overwrite_output_dir && config.resume_from.is_none() {
            output_dir::refuse_source_dir(&config.output_dir, config.tokenizer_dir.as_deref())?;
            output_dir::clear_previous_run(&config.output_dir)?;
        }
        std::fs::create_dir_all(&config.output_dir)
            .map_err(|e| alignment_core::IoError::new("creating directory", &config.output_dir, e))?;
        Some(MetricsLog::open(&config.output_dir.join("metrics.jsonl"), config.resume_from.as_ref().map(|_| start))?)
    } else {
        None
    };
    let mut write_log = |entry| -> Result<(), TrainError> {
        if let Some(log) = log.as_mut() {
            log.write(entry)?;
        }
        Ok(())
    };
    let schedule =
        Schedule::new(config.schedule, config.learning_rate, plan.total_steps as usize, config.warmup_ratio, config.warmup_steps);
    let bar = logging::progress_bar(plan.total_steps, start, config.quiet || !is_main);
    let epoch_of = |step: u64| step as f64 / plan.steps_per_epoch as f64;

    // Every rank evaluates the whole eval set (identical weights, identical results); rank 0 logs.
    if config.eval_on_start && start == 0 && !eval.is_empty() {
        let metrics = evaluate_with(&model.valid(), task, eval, config.eval_batch_size, config.step.head_chunk_tokens, device);
        strategy.check()?;
        write_log(logging::entry(0, 0.0, &metrics))?;
    }

    let mut window = MetricsAccumulator::default();
    // Metrics and gradient norms of the window's steps, still on the device (one process):
    // read when the window is logged or a checkpoint is saved, so no step waits for the device;
    // they are checked for non-finite values then, before anything is written.
    let mut pending = Pending::<B>::default();
    let mut last_saved: Option<PathBuf> = None;
    let describe = |step: u64, what: &str, value: f64, last_saved: &Option<PathBuf>| {
        let examples: Vec<&T::Example> =
            plan.micro_batches(step - 1, train.len(), &global).into_iter().flatten().map(|i| &train[i]).collect();
        let scored: usize = examples.iter().flat_map(|e| task.sequences(e)).map(|s| s.num_scored()).sum();
        TrainError::NonFinite {
            step,
            what: what.into(),
            value,
            rows: examples.len(),
            tokens: task.num_tokens(&examples),
            scored: scored as f64,
            saved: match last_saved {
                Some(dir) => format!("; the last checkpoint, {}, predates the step", dir.display()),
                None => "; no checkpoint was saved".into(),
            },
        }
    };
    let mut window_tokens = 0usize;
    let mut window_seconds = 0.0f64; // training time only: evaluation and saving are excluded
    let mut total_tokens = 0usize;
    for step in start..plan.total_steps {
        let step_start = Instant::now();
        let micro_batches = plan.micro_batches(step, train.len(), &global);
        let batches: Vec<Vec<&T::Example>> = micro_batches.iter().map(|ids| ids.iter().map(|&i| &train[i]).collect()).collect();
        // Normalised by the weight of the whole global step, whichever rank computes a part; a
        // step that scores nothing divides by 1 (TRL's `clamp(min=1)`): loss 0, no gradient.
        let step_weight: f64 = batches.iter().map(|b| task.weight(b)).sum::<f64>().max(1.0);
        let lr = schedule.lr(step as usize);
        let (updated, values, tokens) = if let Some(graphs) = graphs.as_mut() {
            // One process, no dropout: every micro-batch counts, no seed is drawn.
            let (updated, values) = graphs.step(model, task, &batches, step_weight, &config.step, &mut optimizer, lr, device)?;
            (updated, values, batches.iter().map(|b| task.num_tokens(b)).sum())
        } else {
            let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
            let mut step_metrics = Vec::new();
            let mut step_tokens = 0;
            for (micro, batch) in batches.iter().enumerate() {
                let (examples, counted) = strategy.part(batch);
                if examples.is_empty() {
                    continue;
                }
                let options = StepOptions { dropout_seed: dropout_seed(config.seed, step, micro), ..config.step };
                let scale = if counted { 1.0 / step_weight } else { 0.0 };
                let metrics = forward_backward(&model, task, examples, scale, &options, &mut accumulator, device);
                strategy.check()?;
                if counted {
                    step_metrics.push((metrics, task.weight(examples)));
                    step_tokens += task.num_tokens(examples);
                }
            }
            strategy.update(&mut optimizer, lr, model, accumulator.grads(), step_metrics, step_tokens)?
        };
        model = updated;
        pending.record(step + 1, values);
        window_tokens += tokens;
        total_tokens += tokens;
        window_seconds += step_start.elapsed().as_secs_f64();
        let done = step + 1;
        bar.set_position(done);

        let last = done == plan.total_steps;
        if done % config.logging_steps == 0 || (config.logging_first_step && done == 1) || last {
            // Reading waits for the device to finish the window's steps: training time.
            let read_start = Instant::now();
            pending.settle().map_err(|(step, what, value)| describe(step, what, value, &last_saved))?;
            pending.drain_into(&mut window);
            window_seconds += read_start.elapsed().as_secs_f64();
            let elapsed = window_seconds.max(1e-9);
            let mut values = window.means("");
            values.push(("learning_rate".into(), lr));
            values.push(("tokens_per_second".into(), window_tokens as f64 / elapsed));
            values.push(("num_tokens".into(), total_tokens as f64));
            let loss = values.iter().find(|(k, _)| k == "loss").map_or(f64::NAN, |(_, v)| *v);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {:.0} tok/s", window_tokens as f64 / elapsed));
            write_log(logging::entry(done, epoch_of(done), &values))?;
            window.clear();
            window_tokens = 0;
            window_seconds = 0.0;
        }
        let epoch_end = done % plan.steps_per_epoch == 0;
        let eval_now = config.eval_steps.is_some_and(|n| done % n.max(1) == 0)
            || (last && config.eval_steps.is_some())
            || (config.eval_every_epoch && (epoch_end || last));
        if eval_now && !eval.is_empty() {
            let metrics = evaluate_with(&model.valid(), task, eval, config.eval_batch_size, config.step.head_chunk_tokens, device);
            strategy.check()?;
            let loss = metrics.iter().find(|(k, _)| k == "eval_loss").map_or(f64::NAN, |(_, v)| *v);
            bar.println(format!("step {done}: eval_loss {loss:.4}"));
            write_log(logging::entry(done, epoch_of(done), &metrics))?;
        }
        let save_now = match config.save {
            SaveStrategy::Steps(n) => done % n == 0 && !last,
            SaveStrategy::Epoch => epoch_end && !last,
            SaveStrategy::No => false,
        };
        if save_now {
            // Nothing non-finite is saved: the window's deferred values are read and checked first.
            pending.settle().map_err(|(step, what, value)| describe(step, what, value, &last_saved))?;
            let state = TrainerState {
                global_step: done,
                total_steps: plan.total_steps,
                optimizer_step: optimizer.step,
                fingerprint: fingerprint.clone(),
            };
            let saved = strategy.checkpoint_state(&optimizer, &model, device)?; // a collective
            if is_main {
                last_saved = Some(
                    checkpoint::save_checkpoint(
                        &config.output_dir,
                        &saved.model,
                        config.adapter.as_ref(),
                        &saved.optimizer,
                        &state,
                        config.tokenizer_dir.as_deref(),
                        config.save_total_limit,
                    )
                    .map_err(|e| non_finite_update(e, done))?,
                );
            }
            strategy.barrier()?;
        }
    }
    bar.finish();
    // The captured graph and its stream go here, before the final model is read.
    let steps_replayed = graphs.take().map_or(0, |graphs| {
        eprintln!(
            "CUDA graphs: {} of {} steps replayed from {} captured (one per batch shape; {} eager: each shape's first step, and shapes past {})",
            graphs.replayed,
            graphs.replayed + graphs.eager,
            graphs.graphs(),
            graphs.eager,
            crate::graph_steps::MAX_GRAPHS
        );
        graphs.replayed
    });
    pending.settle().map_err(|(step, what, value)| describe(step, what, value, &last_saved))?;
    let model = strategy.finish(model)?; // the whole model on every rank (collective with ZeRO-3)
    let history = log.as_ref().map(|l| l.history().to_vec()).unwrap_or_default();
    if is_main {
        save_final(&model.valid(), config).map_err(|e| non_finite_update(e, plan.total_steps))?;
        let _ = logging::plot_losses(&history, &config.output_dir.join("loss.svg"), &format!("{} loss", task.name()));
    }
    strategy.conclude()?;
    Ok((model, TrainOutcome { steps: plan.total_steps, history, model_dir: config.output_dir.clone(), steps_replayed }))
}

/// A save refused for non-finite weights, as the error of the update that made them.
fn non_finite_update(error: TrainError, step: u64) -> TrainError {
    match error {
        TrainError::Model(source @ alignment_models::ModelError::NonFiniteWeights { .. }) => TrainError::NonFiniteUpdate { step, source },
        other => other,
    }
}

/// The seed of micro-batch `micro`'s LoRA dropout masks at `step`: a function of the run's seed
/// and the position in it, so a resumed run draws the same masks.
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (micro as u64).wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// Saves the final model (or, with adapters, the adapter directory) into `output_dir` itself
/// (beside `checkpoint-*` and `metrics.jsonl`), as `trainer.save_model(output_dir)` does:
/// assembled in a staging directory, then each file renamed into place, weights first and the
/// config (config.json / adapter_config.json) last.
fn save_final<B: burn::tensor::backend::Backend>(model: &CausalLm<B>, config: &TrainerConfig) -> Result<PathBuf, TrainError> {
    let staging = alignment_core::AtomicDir::new(config.output_dir.join(".final-model"))?;
    checkpoint::write_weights(model, staging.path(), config.adapter.as_ref(), config.tokenizer_dir.as_deref())?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(staging.path())
        .map_err(|e| alignment_core::IoError::new("listing", staging.path(), e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let is_config = |p: &PathBuf| matches!(p.file_name().and_then(|n| n.to_str()), Some("config.json" | "adapter_config.json"));
    names.sort_by_key(|p| (is_config(p), p.clone()));
    for from in names {
        let to = config.output_dir.join(from.file_name().expect("a file name"));
        std::fs::rename(&from, &to).map_err(|e| alignment_core::IoError::new("renaming into place", &to, e))?;
    }
    Ok(config.output_dir.clone())
}

/// The loop's values still on the device (one process): each micro-batch's metrics and each
/// step's gradient norm, tagged with the (1-based) optimizer step, read together when a window is
/// logged or a checkpoint saved ([`Pending::settle`]) — one wait for the device per window
/// rather than per step.
struct Pending<B: AutodiffBackend> {
    metrics: Vec<(u64, DeferredMetrics<B>, f64)>,
    norms: Vec<(u64, Tensor<B::InnerBackend, 1>)>,
    read_metrics: Vec<(u64, crate::MetricValues, f64)>,
    /// Steps whose metrics a data-parallel group already summed: (name, Σ value·weight, Σ weight).
    read_sums: Vec<(u64, MetricSums)>,
    read_norms: Vec<(u64, f64)>,
}

impl<B: AutodiffBackend> Default for Pending<B> {
    fn default() -> Self {
        Self { metrics: Vec::new(), norms: Vec::new(), read_metrics: Vec::new(), read_sums: Vec::new(), read_norms: Vec::new() }
    }
}

impl<B: AutodiffBackend> Pending<B> {
    /// Keeps optimizer step `step`'s values until the window is read.
    fn record(&mut self, step: u64, values: StepValues<B>) {
        match values {
            StepValues::OnDevice { metrics, grad_norm } => {
                self.metrics.extend(metrics.into_iter().map(|(m, weight)| (step, m, weight)));
                self.norms.push((step, grad_norm));
            }
            StepValues::Read { sums, grad_norm } => {
                self.read_sums.push((step, sums));
                self.read_norms.push((step, grad_norm));
            }
        }
    }

    /// Reads what is still on the device and checks it: the first step whose loss or gradient
    /// norm is NaN or infinite, as `(step, what, value)`.
    fn settle(&mut self) -> Result<(), (u64, &'static str, f64)> {
        for (step, metrics, weight) in self.metrics.drain(..) {
            self.read_metrics.push((step, metric_values(metrics), weight));
        }
        if !self.norms.is_empty() {
            let (steps, tensors): (Vec<u64>, Vec<_>) = std::mem::take(&mut self.norms).into_iter().unzip();
            let values = Tensor::cat(tensors, 0).into_data().iter::<f64>().collect::<Vec<f64>>();
            self.read_norms.extend(steps.into_iter().zip(values));
        }
        let bad_loss = self
            .read_metrics
            .iter()
            .find_map(|(step, values, _)| values.iter().find(|(k, v)| k == "loss" && !v.is_finite()).map(|(_, v)| (*step, "loss", *v)))
            .into_iter()
            .chain(self.read_sums.iter().find_map(|(step, sums)| {
                sums.iter().find(|(k, sum, _)| k == "loss" && !sum.is_finite()).map(|(_, sum, weight)| (*step, "loss", sum / weight))
            }))
            .min_by_key(|(step, _, _)| *step);
        let bad_norm = self.read_norms.iter().find(|(_, v)| !v.is_finite()).map(|&(step, v)| (step, "gradient norm", v));
        match (bad_loss, bad_norm) {
            (Some(a), Some(b)) => Err(if b.0 < a.0 { b } else { a }),
            (Some(bad), None) | (None, Some(bad)) => Err(bad),
            (None, None) => Ok(()),
        }
    }

    /// Moves the read values into the logging window.
    fn drain_into(&mut self, window: &mut MetricsAccumulator) {
        for (_, values, weight) in self.read_metrics.drain(..) {
            window.add(values.iter().map(|(k, v)| (k.as_str(), *v)), weight);
        }
        for (_, sums) in self.read_sums.drain(..) {
            window.add_sums(&sums);
        }
        for (_, norm) in self.read_norms.drain(..) {
            window.add([("grad_norm", norm)], 1.0);
        }
    }
}
