//! Recipe interpretation: the one place where a [`Recipe`]'s keys become the components a run
//! is built from — the data source (classic `dataset_mixer`, today's `dataset_mixture`, or TRL's
//! `dataset_name`), the LoRA configuration, the loss reduction — with errors naming the recipe
//! key at fault. The trainer's own settings are read by [`crate::TrainerConfig::from_recipe`];
//! the binaries only wire these together.

use crate::checkpoint;
use crate::optimizer::{AdamWConfig, UpdateRule};
use crate::recipe::{Recipe, RecipeError, ResumeFrom};
use crate::schedule::ScheduleKind;
use crate::step::StepOptions;
use crate::train::{FractionalSteps, SaveStrategy, TrainerConfig};
use crate::TrainError;
use alignment_data::mixer::{mix_datasets, mix_mixture, DatasetMixer, DatasetMixture, MixedSplits, MixerConfig, MixerEntry};
use alignment_data::{DataError, Dataset, SplitSource};
use alignment_peft::{LoraConfig, TargetModules};

fn value_error(key: &str, message: impl Into<String>) -> RecipeError {
    RecipeError::Value { key: key.into(), message: message.into() }
}

/// Where a run's rows come from, as the recipe names them.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// The old handbook's `dataset_mixer` (+ `dataset_splits`, `dataset_configs`, ...).
    Mixer(MixerConfig),
    /// Today's handbook's `dataset_mixture`, whose result has `train` (and, with
    /// `test_split_size`, `test`) splits.
    Mixture(DatasetMixture),
    /// TRL's `dataset_name` (+ `dataset_config`): one dataset, its splits by name.
    Named { id: String, config: Option<String> },
}

/// The train and evaluation rows of a run: the recipe's `dataset_train_split` and (when the run
/// evaluates) `dataset_test_split` of its data source.
#[derive(Debug, Clone, PartialEq)]
pub struct RunData {
    pub train: Dataset,
    pub eval: Option<Dataset>,
}

impl DataSource {
    /// The data source the recipe names (exactly one of `dataset_mixer`, `dataset_mixture`,
    /// `dataset_name`; [`Recipe::validate`] refuses two).
    pub fn from_recipe(recipe: &Recipe) -> Result<Self, RecipeError> {
        if let Some(value) = &recipe.dataset_mixture {
            let mixture: DatasetMixture = serde_json::from_value(value.clone()).map_err(|e| {
                value_error(
                    "dataset_mixture",
                    format!("{e} (expected {{datasets: [{{id, config, split, columns, weight}}], seed, test_split_size}})"),
                )
            })?;
            if mixture.datasets.is_empty() {
                return Err(value_error("dataset_mixture", "`datasets` is empty"));
            }
            return Ok(DataSource::Mixture(mixture));
        }
        if let Some(id) = &recipe.dataset_name {
            return Ok(DataSource::Named { id: id.clone(), config: recipe.dataset_config.clone() });
        }
        let entries: Vec<MixerEntry> =
            recipe.dataset_mixer_in_order().into_iter().map(|(id, fraction)| MixerEntry { id, fraction }).collect();
        if entries.is_empty() {
            return Err(value_error("dataset_mixture", "the recipe names no dataset (set dataset_mixture, dataset_name or dataset_mixer)"));
        }
        let mut config = MixerConfig::new(DatasetMixer(entries));
        config.dataset_splits = recipe.dataset_splits.clone();
        config.dataset_configs = recipe.dataset_configs.clone();
        config.columns_to_keep = recipe.columns_to_keep.clone();
        config.shuffle = recipe.shuffle;
        Ok(DataSource::Mixer(config))
    }

    /// Loads the rows: `train_split` always, `test_split` when `evaluates` (as the handbook's
    /// scripts pass `dataset[dataset_test_split]` only when `eval_strategy` is not `no`). The
    /// classic mixer's splits are its mixed `train` and `test` sets.
    pub fn load(&self, source: &dyn SplitSource, train_split: &str, test_split: &str, evaluates: bool) -> Result<RunData, DataError> {
        let missing = |what: &str, split: &str, have: &[&str]| DataError::InvalidMixer {
            message: format!("the data has no `{split}` split for {what} (it has: {have:?}); set dataset_{what}_split"),
        };
        match self {
            DataSource::Named { id, config } => {
                let train = source.load_split(id, config.as_deref(), train_split)?;
                let eval = if evaluates { Some(source.load_split(id, config.as_deref(), test_split)?) } else { None };
                Ok(RunData { train, eval })
            }
            DataSource::Mixer(_) | DataSource::Mixture(_) => {
                let MixedSplits { train, test } = match self {
                    DataSource::Mixer(config) => mix_datasets(config, source)?,
                    DataSource::Mixture(mixture) => mix_mixture(mixture, source)?,
                    DataSource::Named { .. } => unreachable!(),
                };
                let have: Vec<&str> =
                    [("train", train.is_some()), ("test", test.is_some())].into_iter().filter(|(_, h)| *h).map(|(s, _)| s).collect();
                let pick = |split: &str, train: &Option<Dataset>, test: &Option<Dataset>| match split {
                    "train" => train.clone(),
                    "test" => test.clone(),
                    _ => None,
                };
                let train_rows = pick(train_split, &train, &test).ok_or_else(|| match self {
                    DataSource::Mixer(config) if train.is_none() => DataError::InvalidMixer {
                        message: format!(
                            "the training set is empty: dataset_splits {:?} name no train split (one whose name contains `train`)",
                            config.dataset_splits
                        ),
                    },
                    _ => missing("train", train_split, &have),
                })?;
                let eval = if evaluates {
                    match self {
                        // The classic mixer's test splits are optional: no test split, no evaluation.
                        DataSource::Mixer(_) => pick(test_split, &train, &test),
                        _ => Some(pick(test_split, &train, &test).ok_or_else(|| missing("test", test_split, &have))?),
                    }
                } else {
                    None
                };
                Ok(RunData { train: train_rows, eval })
            }
        }
    }
}

/// Whether the recipe evaluates during training (`eval_strategy`/`evaluation_strategy` other
/// than `no`, `do_eval` with `eval_steps`, or `eval_on_start`).
pub fn evaluates(recipe: &Recipe) -> bool {
    let strategy = recipe.eval_strategy.as_deref().or(recipe.evaluation_strategy.as_deref()).unwrap_or("no");
    strategy != "no" || (recipe.do_eval && recipe.eval_steps.is_some()) || recipe.eval_on_start
}

/// The recipe's LoRA settings (TRL's `get_peft_config`): `lora_target_modules` absent means
/// PEFT's default for Llama/Mistral/Gemma (`q_proj`, `v_proj`); `[all-linear]` every linear
/// layer but the head.
pub fn lora_config(recipe: &Recipe) -> Result<LoraConfig, alignment_peft::PeftError> {
    let target_modules = match recipe.lora_target_modules.as_deref() {
        None => TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        Some([one]) if one == "all-linear" => TargetModules::AllLinear,
        Some(names) => TargetModules::Names(names.to_vec()),
    };
    let mut config = LoraConfig::new(recipe.lora_r, recipe.lora_alpha as f64, target_modules);
    config.dropout = recipe.lora_dropout;
    config.use_rslora = recipe.use_rslora;
    config.use_dora = recipe.use_dora;
    config.modules_to_save = recipe.lora_modules_to_save.clone().unwrap_or_default();
    config.validate()?;
    Ok(config)
}

/// The SFT/CPT loss reduction (`reduce_loss`).
pub fn reduction(recipe: &Recipe) -> Result<alignment_objectives::Reduction, RecipeError> {
    recipe.reduce_loss.parse().map_err(|e: alignment_objectives::ObjectiveError| value_error("reduce_loss", e.to_string()))
}

/// TRL's `truncation_mode` (from `truncation_mode` or the old `truncation_side`).
pub fn truncation_mode(recipe: &Recipe) -> Result<alignment_data::TruncationMode, RecipeError> {
    recipe.truncation_mode()
}

/// The DPO objective of the recipe (TRL 1.16's `DPOConfig` keys: `beta`, `loss_type` as one
/// name or a list, `loss_weights`, `label_smoothing`, `use_weighting`, `ld_alpha`,
/// `discopop_tau`, `f_divergence_type`, `f_alpha_divergence_coef`), validated as TRL validates
/// it; an error names the key at fault.
pub fn dpo_config(recipe: &Recipe) -> Result<alignment_objectives::DpoConfig, RecipeError> {
    let objective_error = |e: alignment_objectives::ObjectiveError| value_error(e.key().unwrap_or("loss_type"), e.to_string());
    let names = recipe.loss_type.as_ref().map(|l| l.to_vec()).unwrap_or_else(|| vec!["sigmoid".into()]);
    let base = alignment_objectives::DpoConfig::from_names(&names, recipe.loss_weights.as_deref()).map_err(objective_error)?;
    let f_divergence_type = recipe.f_divergence_type.parse().map_err(objective_error)?;
    let config = alignment_objectives::DpoConfig {
        beta: recipe.beta,
        label_smoothing: recipe.label_smoothing,
        use_weighting: recipe.use_weighting,
        ld_alpha: recipe.ld_alpha,
        discopop_tau: recipe.discopop_tau,
        f_divergence_type,
        f_alpha_divergence_coef: recipe.f_alpha_divergence_coef,
        ..base
    };
    config.validate().map_err(objective_error)?;
    Ok(config)
}

/// The ORPO objective of the recipe (`beta`).
pub fn orpo_config(recipe: &Recipe) -> Result<alignment_objectives::OrpoConfig, RecipeError> {
    let config = alignment_objectives::OrpoConfig { beta: recipe.beta };
    config.validate().map_err(|e| value_error("beta", e.to_string()))?;
    Ok(config)
}

/// The training loop's settings (transformers' TrainingArguments semantics): the schedule and
/// its kwargs, intervals (counts, fractions of the run, or `epoch`), the update rule (`optim`),
/// batch sizes, the checkpoint to resume from; an error names the key at fault.
pub fn trainer_config(recipe: &Recipe) -> Result<TrainerConfig, TrainError> {
    let config_error = |key: &str, message: String| TrainError::Config { key: key.into(), message };
    let schedule = ScheduleKind::from_recipe(&recipe.lr_scheduler_type, recipe.lr_scheduler_kwargs.as_ref(), recipe.learning_rate)
        .map_err(|e| match e {
            crate::schedule::ScheduleError::Unknown(_) => config_error("lr_scheduler_type", e.to_string()),
            crate::schedule::ScheduleError::Kwargs(m) => config_error("lr_scheduler_kwargs", m),
        })?;
    let strategy = recipe.eval_strategy.as_deref().or(recipe.evaluation_strategy.as_deref()).unwrap_or("no");
    // An interval in updates, or (below 1) a fraction of the run resolved once its length is known.
    let interval = |key: &str, value: f64| -> Result<(u64, Option<f64>), TrainError> {
        if !value.is_finite() || value <= 0.0 {
            return Err(config_error(key, format!("{value}: must be a positive number of steps, or a fraction of the run below 1")));
        }
        if value < 1.0 {
            return Ok((1, Some(value)));
        }
        if value.fract() != 0.0 {
            return Err(config_error(key, format!("{value}: a number of steps ≥ 1 must be whole (fractions of the run are below 1)")));
        }
        Ok((value as u64, None))
    };
    let (logging_steps, logging_fraction) = interval("logging_steps", recipe.logging_steps)?;
    let mut fractions = FractionalSteps { logging: logging_fraction, ..Default::default() };
    let (eval_steps, eval_every_epoch) = match (strategy, recipe.eval_steps) {
        ("steps", Some(n)) | ("no", Some(n)) if strategy == "steps" || recipe.do_eval => {
            let (steps, fraction) = interval("eval_steps", n)?;
            fractions.eval = fraction;
            (Some(steps), false)
        }
        // transformers: eval_steps defaults to logging_steps
        ("steps", None) => {
            fractions.eval = logging_fraction;
            (Some(logging_steps), false)
        }
        ("no", _) => (None, false),
        ("epoch", _) => (None, true),
        (other, _) => return Err(config_error("eval_strategy", format!("`{other}` (expected no, steps or epoch)"))),
    };
    let save = match recipe.save_strategy.as_str() {
        "steps" => {
            let (steps, fraction) = interval("save_steps", recipe.save_steps)?;
            fractions.save = fraction;
            SaveStrategy::Steps(steps)
        }
        "epoch" => SaveStrategy::Epoch,
        "no" => SaveStrategy::No,
        other => return Err(config_error("save_strategy", format!("`{other}` (expected no, steps or epoch)"))),
    };
    if recipe.per_device_train_batch_size == 0 {
        return Err(config_error("per_device_train_batch_size", "must be at least 1".into()));
    }
    if recipe.gradient_accumulation_steps == 0 {
        return Err(config_error("gradient_accumulation_steps", "must be at least 1".into()));
    }
    let rule = UpdateRule::from_optim(&recipe.optim).map_err(|m| config_error("optim", m))?;
    if !recipe.learning_rate.is_finite() || recipe.learning_rate < 0.0 {
        return Err(TrainError::Config {
            key: "learning_rate".into(),
            message: format!("{} (expected a finite, non-negative number)", recipe.learning_rate),
        });
    }
    let resume_from = match &recipe.resume_from_checkpoint {
        None | Some(ResumeFrom::Latest(false)) => None,
        Some(ResumeFrom::Latest(true)) => Some(checkpoint::latest_checkpoint(&recipe.output_dir).ok_or_else(|| TrainError::Config {
            key: "resume_from_checkpoint".into(),
            message: format!("no checkpoint-* directory in {}", recipe.output_dir.display()),
        })?),
        Some(ResumeFrom::Path(path)) => Some(path.clone()),
    };
    Ok(TrainerConfig {
        learning_rate: recipe.learning_rate,
        schedule,
        warmup_ratio: recipe.warmup_ratio,
        warmup_steps: recipe.warmup_steps,
        num_train_epochs: recipe.num_train_epochs,
        max_steps: (recipe.max_steps > 0).then_some(recipe.max_steps as u64),
        train_batch_size: recipe.per_device_train_batch_size,
        eval_batch_size: recipe.per_device_eval_batch_size.max(1),
        gradient_accumulation_steps: recipe.gradient_accumulation_steps,
        adamw: AdamWConfig {
            beta1: recipe.adam_beta1,
            beta2: recipe.adam_beta2,
            epsilon: recipe.adam_epsilon,
            weight_decay: recipe.weight_decay,
            max_grad_norm: Some(recipe.max_grad_norm),
            rule,
        },
        seed: recipe.seed,
        logging_steps,
        logging_first_step: recipe.logging_first_step,
        eval_steps,
        eval_every_epoch,
        fractional_steps: fractions,
        eval_on_start: recipe.eval_on_start,
        save,
        save_total_limit: recipe.save_total_limit,
        output_dir: recipe.output_dir.clone(),
        resume_from,
        tokenizer_dir: None,
        quiet: false,
        adapter: None,
        step: StepOptions { gradient_checkpointing: recipe.checkpointing(), head_chunk_tokens: None, dropout_seed: 0 },
        chunked_head: recipe.use_liger_kernel,
        step_graphs: recipe.replays_steps_as_graphs().then_some(crate::step::GraphMode::Capture),
        bf16: recipe.bf16,
        overwrite_output_dir: recipe.overwrite_output_dir,
        // Set by the caller that knows the objective (TRL's DPO and ORPO trainers read it).
        disable_dropout: false,
        resume_settings: resume_settings(recipe),
    })
}

/// The recipe keys outside [`TrainerConfig`] that change what a run computes, for the resume
/// fingerprint (their effect on the examples is also in its data hash; naming them says why).
pub(crate) fn resume_settings(recipe: &Recipe) -> Vec<(String, String)> {
    let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
    vec![
        ("dataset_mixer".into(), show(&recipe.dataset_mixer_in_order())),
        ("dataset_splits".into(), show(&recipe.dataset_splits)),
        ("max_seq_length".into(), show(&recipe.sft_max_length())),
        ("max_length".into(), show(&recipe.max_length)),
        ("truncation_mode".into(), show(&recipe.truncation_mode)),
        ("packing".into(), recipe.packing.to_string()),
        ("assistant_only_loss".into(), recipe.assistant_only_loss.to_string()),
        ("completion_only_loss".into(), show(&recipe.completion_only_loss)),
        ("beta".into(), recipe.beta.to_string()),
        ("loss_type".into(), show(&recipe.loss_type)),
        ("label_smoothing".into(), recipe.label_smoothing.to_string()),
        ("dataset_mixture".into(), show(&recipe.dataset_mixture)),
        ("dataset_name".into(), show(&(&recipe.dataset_name, &recipe.dataset_config))),
        ("dataset_train_split".into(), recipe.dataset_train_split.clone()),
        ("eos_token".into(), show(&recipe.eos_token)),
        ("loss_weights".into(), show(&recipe.loss_weights)),
        ("use_weighting".into(), recipe.use_weighting.to_string()),
        ("ld_alpha".into(), show(&recipe.ld_alpha)),
        ("discopop_tau".into(), recipe.discopop_tau.to_string()),
        ("f_divergence".into(), format!("{} {}", recipe.f_divergence_type, recipe.f_alpha_divergence_coef)),
        ("optim".into(), recipe.optim.clone()),
    ]
}
