//! Recipes: the handbook's YAML training configurations (`recipes/<model>/<task>/config_*.yaml`).
//!
//! Keys are the handbook's (ModelArguments, DataArguments and TRL's SFT/DPO/ORPO configs), in
//! one flat struct. A YAML file is read with figment and `--key=value` command-line overrides are
//! merged on top (values parsed as YAML, so `--learning_rate=1e-4` is a number and
//! `--lora_target_modules=[q_proj,v_proj]` a list). A key that is not a known recipe key is an
//! error that lists the nearest valid keys. Keys that only make sense in the Python stack
//! (`use_flash_attention_2`, `report_to`, `preprocessing_num_workers`, ...) are accepted so that
//! the handbook's recipes load unchanged; `Recipe::inert_keys_set` names those that were set.

use figment::providers::{Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A recipe could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The key is not a recipe key.
    #[error("unknown recipe key `{key}` (in {source_name}); nearest valid keys: {suggestions}")]
    UnknownKey { key: String, source_name: String, suggestions: String },
    /// A command-line override is not of the form `--key=value`.
    #[error("malformed override `{0}`: expected --key=value")]
    MalformedOverride(String),
    /// The YAML is malformed or a value has the wrong type.
    #[error("invalid recipe {source_name}: {message}")]
    Invalid { source_name: String, message: String },
}

fn default_revision() -> String {
    "main".into()
}
fn default_splits() -> Vec<String> {
    vec!["train".into(), "test".into()]
}

/// Every key a recipe may contain, with TRL/transformers defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    // --- model (handbook ModelArguments) ---
    /// Hub id or local directory of the model to fine-tune.
    pub model_name_or_path: String,
    pub model_revision: String,
    pub tokenizer_name_or_path: Option<String>,
    /// `bfloat16`, `float16`, `float32`, `auto` or null.
    pub torch_dtype: Option<String>,
    pub attn_implementation: Option<String>,
    pub use_flash_attention_2: Option<bool>,
    pub trust_remote_code: bool,
    // --- PEFT / quantization ---
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: usize,
    pub lora_dropout: f64,
    pub lora_target_modules: Option<Vec<String>>,
    pub lora_modules_to_save: Option<Vec<String>>,
    pub use_rslora: bool,
    pub load_in_8bit: bool,
    pub load_in_4bit: bool,
    pub bnb_4bit_quant_type: String,
    pub use_bnb_nested_quant: bool,
    pub bnb_4bit_quant_storage: Option<String>,
    // --- data (handbook DataArguments) ---
    /// Jinja chat template overriding the tokenizer's.
    pub chat_template: Option<String>,
    /// Dataset id/path → fraction (≤ 1) or weight of its train split to use. Read in YAML order
    /// (see [`Recipe::dataset_mixer_in_order`]): the order decides the concatenation, hence the
    /// shuffled result.
    pub dataset_mixer: Option<BTreeMap<String, f64>>,
    /// The keys of `dataset_mixer` in the order the YAML (or the override) gave them.
    #[serde(skip)]
    pub dataset_mixer_order: Vec<String>,
    pub dataset_splits: Vec<String>,
    pub dataset_configs: Option<Vec<String>>,
    pub columns_to_keep: Option<Vec<String>>,
    pub shuffle: bool,
    pub preprocessing_num_workers: Option<usize>,
    /// The old handbook's tokenizer truncation side: `left` is TRL's `truncation_mode: keep_end`,
    /// `right` `keep_start`. Prefer `truncation_mode`.
    pub truncation_side: Option<String>,
    /// TRL's `truncation_mode` for SFT and DPO: `keep_start` (default) or `keep_end`.
    pub truncation_mode: Option<String>,
    /// Format rows as the old handbook did (alignment-handbook v0.4's `apply_chat_template(task)`:
    /// an empty system turn inserted, DPO/ORPO chosen and rejected rendered on their own) and hand
    /// TRL the texts, instead of today's handbook, which hands TRL the conversations (default).
    pub legacy_formatting: bool,
    /// Legacy formatting only (`legacy_formatting: true`, where it defaults to true): insert an
    /// empty system turn when the template mentions one.
    pub auto_insert_empty_system_msg: Option<bool>,
    pub text_column: String,
    pub dataset_text_field: Option<String>,
    pub dataset_kwargs: Option<serde_json::Value>,
    // --- sequence lengths, packing ---
    pub max_seq_length: Option<usize>,
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub packing: bool,
    pub assistant_only_loss: bool,
    /// SFT/CPT loss reduction, open-instruct's `reduce_loss`: `mean` (token mean over each
    /// optimizer step, transformers' default) or `sum` (summed token losses, divided only by the
    /// number of accumulated micro-batches).
    pub reduce_loss: String,
    pub completion_only_loss: Option<bool>,
    // --- preference objectives ---
    pub beta: f64,
    pub loss_type: Option<String>,
    pub label_smoothing: f64,
    pub precompute_ref_log_probs: bool,
    pub reference_free: bool,
    // --- optimisation (transformers TrainingArguments) ---
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub gradient_checkpointing: bool,
    pub gradient_checkpointing_kwargs: Option<serde_json::Value>,
    /// transformers' switch for Liger's fused kernels; here it selects the chunked head (the
    /// logits computed a chunk of tokens at a time, never held whole).
    pub use_liger_kernel: bool,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub optim: String,
    pub bf16: bool,
    pub fp16: bool,
    pub tf32: Option<bool>,
    pub seed: u64,
    pub data_seed: Option<u64>,
    // --- evaluation, logging, saving ---
    pub do_eval: bool,
    pub eval_strategy: Option<String>,
    pub evaluation_strategy: Option<String>,
    pub eval_steps: Option<usize>,
    pub logging_steps: usize,
    pub logging_strategy: String,
    pub logging_first_step: bool,
    pub log_level: String,
    pub output_dir: PathBuf,
    pub overwrite_output_dir: bool,
    pub save_strategy: String,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub save_only_model: bool,
    pub hub_model_id: Option<String>,
    pub hub_strategy: Option<String>,
    pub hub_private_repo: Option<bool>,
    pub push_to_hub: bool,
    pub report_to: Option<serde_json::Value>,
    pub remove_unused_columns: bool,
    pub run_name: Option<String>,
    /// `true` (the latest checkpoint in output_dir) or a checkpoint directory.
    pub resume_from_checkpoint: Option<ResumeFrom>,
    /// Evaluate once before training (transformers' `eval_on_start`).
    pub eval_on_start: bool,
}

/// `resume_from_checkpoint`: a flag or a path, as in transformers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResumeFrom {
    /// `true`: the latest `checkpoint-*` in `output_dir`; `false`: start afresh.
    Latest(bool),
    /// A checkpoint directory.
    Path(PathBuf),
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            model_name_or_path: String::new(),
            model_revision: default_revision(),
            tokenizer_name_or_path: None,
            torch_dtype: None,
            attn_implementation: None,
            use_flash_attention_2: None,
            trust_remote_code: false,
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32,
            lora_dropout: 0.05,
            lora_target_modules: None,
            lora_modules_to_save: None,
            use_rslora: false,
            load_in_8bit: false,
            load_in_4bit: false,
            bnb_4bit_quant_type: "nf4".into(),
            use_bnb_nested_quant: false,
            bnb_4bit_quant_storage: None,
            chat_template: None,
            dataset_mixer: None,
            dataset_splits: default_splits(),
            dataset_configs: None,
            columns_to_keep: None,
            shuffle: true,
            preprocessing_num_workers: None,
            truncation_side: None,
            truncation_mode: None,
            legacy_formatting: false,
            auto_insert_empty_system_msg: None,
            text_column: "text".into(),
            dataset_text_field: None,
            dataset_kwargs: None,
            max_seq_length: None,
            max_length: None,
            max_prompt_length: None,
            max_completion_length: None,
            packing: false,
            assistant_only_loss: false,
            reduce_loss: "mean".into(),
            completion_only_loss: None,
            beta: 0.1,
            loss_type: None,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            reference_free: false,
            learning_rate: 5e-5,
            lr_scheduler_type: "linear".into(),
            warmup_ratio: 0.0,
            warmup_steps: 0,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            gradient_checkpointing_kwargs: None,
            use_liger_kernel: false,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            optim: "adamw_torch".into(),
            bf16: false,
            fp16: false,
            tf32: None,
            seed: 42,
            data_seed: None,
            do_eval: false,
            eval_strategy: None,
            evaluation_strategy: None,
            eval_steps: None,
            logging_steps: 500,
            logging_strategy: "steps".into(),
            logging_first_step: false,
            log_level: "passive".into(),
            output_dir: PathBuf::from("trainer_output"),
            overwrite_output_dir: false,
            save_strategy: "steps".into(),
            save_steps: 500,
            save_total_limit: None,
            save_only_model: false,
            hub_model_id: None,
            hub_strategy: None,
            hub_private_repo: None,
            push_to_hub: false,
            report_to: None,
            remove_unused_columns: true,
            run_name: None,
            resume_from_checkpoint: None,
            eval_on_start: false,
            dataset_mixer_order: Vec::new(),
        }
    }
}

/// Keys accepted for compatibility with the Python stack that have no effect here.
pub const INERT_KEYS: &[&str] = &[
    "use_flash_attention_2",
    "attn_implementation",
    "trust_remote_code",
    "preprocessing_num_workers",
    "gradient_checkpointing_kwargs",
    "report_to",
    "remove_unused_columns",
    "log_level",
    "tf32",
    "hub_strategy",
    "hub_private_repo",
    "dataset_kwargs",
    // TRL 1.16 has no prompt/completion truncation for decoder-only models: only `max_length`
    // truncates (DPOConfig dropped `max_prompt_length`; ORPOConfig uses `max_completion_length`
    // for encoder-decoders only).
    "max_prompt_length",
    "max_completion_length",
];

impl Recipe {
    /// All valid keys, in declaration order.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Recipe::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => unreachable!("Recipe serializes to a JSON object"),
        }
    }

    /// Reads `path` and applies `overrides` (`--key=value` strings) on top.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RecipeError::Invalid { source_name: path.display().to_string(), message: e.to_string() })?;
        Self::from_yaml_str(&text, &path.display().to_string(), overrides)
    }

    /// Parses recipe YAML (named `source_name` in errors) with `overrides` applied.
    pub fn from_yaml_str(yaml: &str, source_name: &str, overrides: &[String]) -> Result<Self, RecipeError> {
        let file_keys: BTreeMap<String, serde_yaml_value::Value> = Figment::from(Yaml::string(yaml))
            .extract()
            .map_err(|e| RecipeError::Invalid { source_name: source_name.into(), message: e.to_string() })?;
        check_keys(file_keys.keys(), source_name)?;
        let mut figment = Figment::from(Serialized::defaults(Recipe::default())).merge(Yaml::string(yaml));
        for raw in overrides {
            let (key, value) = parse_override(raw)?;
            check_keys(std::iter::once(&key), "command line")?;
            let value: serde_yaml_value::Value = Figment::from(Yaml::string(&format!("v: {value}")))
                .extract_inner("v")
                .map_err(|e| RecipeError::Invalid { source_name: format!("override {raw}"), message: e.to_string() })?;
            figment = figment.merge(Serialized::default(&key, value));
        }
        let mut recipe: Recipe =
            figment.extract().map_err(|e| RecipeError::Invalid { source_name: source_name.into(), message: e.to_string() })?;
        // figment's maps are sorted; take the mixer's order from the YAML itself (last one wins).
        let mut order = mixer_order(yaml);
        for raw in overrides {
            if let Ok((key, value)) = parse_override(raw) {
                if key == "dataset_mixer" {
                    // An overriding mixer replaces the recipe's (figment would merge the two maps).
                    let yaml = format!("dataset_mixer: {value}");
                    order = mixer_order(&yaml);
                    let replaced: Recipe = Figment::from(Serialized::defaults(Recipe::default()))
                        .merge(Yaml::string(&yaml))
                        .extract()
                        .map_err(|e| RecipeError::Invalid { source_name: format!("override {raw}"), message: e.to_string() })?;
                    recipe.dataset_mixer = replaced.dataset_mixer;
                }
            }
        }
        recipe.dataset_mixer_order = order;
        Ok(recipe)
    }

    /// `dataset_mixer` as (dataset, fraction) pairs in the order the recipe wrote them.
    pub fn dataset_mixer_in_order(&self) -> Vec<(String, f64)> {
        let Some(mixer) = &self.dataset_mixer else { return Vec::new() };
        let mut ordered: Vec<(String, f64)> =
            self.dataset_mixer_order.iter().filter_map(|k| mixer.get(k).map(|v| (k.clone(), *v))).collect();
        for (k, v) in mixer {
            if !self.dataset_mixer_order.contains(k) {
                ordered.push((k.clone(), *v));
            }
        }
        ordered
    }

    /// Keys that were set to a non-default value but have no effect in this implementation (or
    /// with this recipe's other settings: `auto_insert_empty_system_msg` without
    /// `legacy_formatting`).
    pub fn inert_keys_set(&self) -> Vec<&'static str> {
        let this = serde_json::to_value(self).expect("serializable");
        let default = serde_json::to_value(Recipe::default()).expect("serializable");
        let mut inert: Vec<&'static str> = INERT_KEYS.iter().copied().filter(|k| this[k] != default[k]).collect();
        if self.auto_insert_empty_system_msg.is_some() && !self.legacy_formatting {
            inert.push("auto_insert_empty_system_msg (only read with legacy_formatting: true)");
        }
        if self.bf16 {
            inert.push("bf16 (training computes in f32: bf16 mixed precision is not implemented yet)");
        }
        inert
    }

    /// TRL's `truncation_mode`, from `truncation_mode` or the old handbook's `truncation_side`
    /// (`left` = `keep_end`); an error for other values or when the two disagree.
    pub fn truncation_mode(&self) -> Result<alignment_data::TruncationMode, RecipeError> {
        let invalid = |message: String| RecipeError::Invalid { source_name: "recipe".into(), message };
        let from_side = match self.truncation_side.as_deref() {
            None => None,
            Some("left") => Some("keep_end"),
            Some("right") => Some("keep_start"),
            Some(other) => return Err(invalid(format!("truncation_side `{other}`: expected `left` or `right`"))),
        };
        match (self.truncation_mode.as_deref(), from_side) {
            (Some(mode @ ("keep_start" | "keep_end")), side) => match side {
                Some(side) if side != mode => Err(invalid(format!(
                    "truncation_mode `{mode}` contradicts truncation_side `{}`",
                    self.truncation_side.as_deref().unwrap_or_default()
                ))),
                _ => Ok(mode.parse().expect("a valid mode")),
            },
            (Some(other), _) => Err(invalid(format!("truncation_mode `{other}`: expected `keep_start` or `keep_end`"))),
            (None, side) => Ok(side.unwrap_or("keep_start").parse().expect("a valid mode")),
        }
    }

    /// The maximum sequence length for SFT/CPT: `max_seq_length` (handbook) or `max_length` (TRL ≥ 0.20).
    pub fn sft_max_length(&self) -> Option<usize> {
        self.max_seq_length.or(self.max_length)
    }
}

/// The keys of the top-level `dataset_mixer` mapping of `yaml`, in document order.
fn mixer_order(yaml: &str) -> Vec<String> {
    let Ok(serde_yaml::Value::Mapping(top)) = serde_yaml::from_str::<serde_yaml::Value>(yaml) else { return Vec::new() };
    match top.get("dataset_mixer") {
        Some(serde_yaml::Value::Mapping(m)) => m.keys().filter_map(|k| k.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

/// figment's generic value, used to read YAML without knowing its shape.
mod serde_yaml_value {
    pub type Value = figment::value::Value;
}

fn parse_override(raw: &str) -> Result<(String, String), RecipeError> {
    let body = raw.strip_prefix("--").ok_or_else(|| RecipeError::MalformedOverride(raw.into()))?;
    let (key, value) = body.split_once('=').ok_or_else(|| RecipeError::MalformedOverride(raw.into()))?;
    if key.is_empty() {
        return Err(RecipeError::MalformedOverride(raw.into()));
    }
    Ok((key.to_string(), value.to_string()))
}

fn check_keys<'a>(keys: impl Iterator<Item = &'a String>, source_name: &str) -> Result<(), RecipeError> {
    let valid = Recipe::keys();
    for key in keys {
        if !valid.contains(key) {
            let mut ranked: Vec<(f64, &String)> = valid.iter().map(|v| (strsim::jaro_winkler(key, v), v)).collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let suggestions = ranked.iter().take(3).map(|(_, v)| v.as_str()).collect::<Vec<_>>().join(", ");
            return Err(RecipeError::UnknownKey { key: key.clone(), source_name: source_name.into(), suggestions });
        }
    }
    Ok(())
}
