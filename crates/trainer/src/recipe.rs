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
    /// A value is out of range or contradicts another key.
    #[error("recipe key `{key}`: {message}")]
    Value { key: String, message: String },
}

fn default_revision() -> String {
    "main".into()
}
fn default_splits() -> Vec<String> {
    vec!["train".into(), "test".into()]
}

/// The config class a handbook script parses its recipe into. TRL's configs set their own
/// defaults over transformers' `TrainingArguments` (TRL 1.16's `_BaseConfig`: `logging_steps`
/// 10, `gradient_checkpointing` true, `bf16` true unless `fp16`; and each config's
/// `learning_rate`), so a key a recipe leaves out means what the script's config makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrlConfig {
    /// transformers' `TrainingArguments` alone: [`Recipe::default`].
    TrainingArguments,
    /// `SFTConfig` (`sft.py`, and the continued pretraining of `run_cpt.py`): learning rate 2e-5.
    Sft,
    /// `DPOConfig` (`dpo.py`): learning rate 1e-6.
    Dpo,
    /// `ORPOConfig` (`orpo.py`, `trl.experimental.orpo` in TRL 1.16): learning rate 1e-6.
    Orpo,
}

/// Every key a recipe may contain. [`Recipe::default`] holds transformers' `TrainingArguments`
/// defaults (with TRL's for the keys only TRL has); [`Recipe::defaults_for`] the defaults of one
/// of TRL's configs.
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
    /// TRL 1.16's ModelConfig name for `torch_dtype`.
    pub dtype: Option<String>,
    /// TRL's `model_init_kwargs`: extra `from_pretrained` arguments.
    pub model_init_kwargs: Option<serde_json::Value>,
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
    /// PEFT's DoRA (weight-decomposed LoRA) on the adapters.
    pub use_dora: bool,
    /// PEFT's `task_type`: only `CAUSAL_LM`.
    pub lora_task_type: String,
    /// PEFT's `target_parameters` (LoRA on bare parameters, e.g. MoE experts): refused when set.
    pub lora_target_parameters: Option<Vec<String>>,
    pub load_in_8bit: bool,
    pub load_in_4bit: bool,
    pub bnb_4bit_quant_type: String,
    pub use_bnb_nested_quant: bool,
    pub bnb_4bit_quant_storage: Option<String>,
    // --- data (handbook DataArguments) ---
    /// Jinja chat template overriding the tokenizer's.
    pub chat_template: Option<String>,
    /// TRL's `chat_template_path` (SFT): a `.jinja`/`.j2` file whose template replaces the
    /// tokenizer's (TRL's other form, a tokenizer to clone the template and tokens from, is refused).
    pub chat_template_path: Option<String>,
    /// TRL's ScriptArguments `dataset_streaming`: datasets are read whole here.
    pub dataset_streaming: bool,
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
    /// Today's handbook mixer: `{datasets: [{id, config, split, columns, weight}], seed,
    /// test_split_size}` (parsed by [`crate::components::dataset_mixture`]).
    pub dataset_mixture: Option<serde_json::Value>,
    /// TRL's `ScriptArguments.dataset_name`: one hub dataset (or local path), all of its splits.
    pub dataset_name: Option<String>,
    /// The config of `dataset_name`.
    pub dataset_config: Option<String>,
    /// The split trained on (`train`): of `dataset_name`'s splits, or of the mixture's.
    pub dataset_train_split: String,
    /// The split evaluated on (`test`), read only when `eval_strategy` is not `no`.
    pub dataset_test_split: String,
    /// TRL's `dataset_num_proc`: tokenization runs in one process here, but packing reproduces
    /// the rows `datasets.map(num_proc=…)` gives TRL's packing (one contiguous shard per process).
    pub dataset_num_proc: Option<usize>,
    /// TRL's `eos_token`: the token that ends each turn and is appended to examples, replacing
    /// the tokenizer's.
    pub eos_token: Option<String>,
    // --- sequence lengths, packing ---
    /// The old handbook's SFT/CPT length; when set, it decides over `max_length`.
    pub max_seq_length: Option<usize>,
    /// TRL's `max_length`, default 1024 in all its configs. `null` means what it means to TRL:
    /// no truncation (SFT, DPO; refused with packing, which needs a row length), 512 for ORPO.
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub packing: bool,
    /// TRL's `eval_packing`: whether the evaluation set is packed; unset, as `packing`.
    pub eval_packing: Option<bool>,
    /// TRL's packing strategy: `bfd` (best-fit decreasing, long examples truncated; `ffd` is
    /// TRL < 0.20's name for it), `bfd_split` (long examples split; `bfd-requeue` its older name)
    /// or `wrapped` (examples concatenated and cut every row length).
    pub packing_strategy: String,
    /// TRL's `disable_dropout` (DPO, ORPO; default true): training without dropout, LoRA's
    /// `lora_dropout` included (TRL zeroes every dropout module after PEFT wraps the model).
    pub disable_dropout: bool,
    /// TRL's `shuffle_dataset`: the tokenized examples put in `Dataset.shuffle(seed=seed)`'s
    /// order before packing and the packed rows again after (unpacked, once), the evaluation set
    /// too. Off by default: the trainer's sampler shuffles the training order anyway.
    pub shuffle_dataset: bool,
    pub padding_free: bool,
    /// TRL's `pad_to_multiple_of` (SFT, CPT, DPO): each micro-batch padded to a multiple of it
    /// ([`crate::Collation`]; padding is masked, so no loss changes, only the batches' shapes).
    pub pad_to_multiple_of: Option<usize>,
    /// TRL's `pad_token` (SFT, DPO) and `padding_value` (ORPO): the padding's token, masked, so
    /// they change no loss.
    pub pad_token: Option<String>,
    pub padding_value: Option<i64>,
    /// TRL's `activation_offloading`: activations stay on the device here.
    pub activation_offloading: bool,
    /// TRL's `router_aux_loss_coef`, for Mixture-of-Experts models: refused unless 0.
    pub router_aux_loss_coef: Option<f64>,
    pub assistant_only_loss: bool,
    /// SFT/CPT loss reduction, open-instruct's `reduce_loss`: `mean` (token mean over each
    /// optimizer step, transformers' default) or `sum` (summed token losses, divided only by the
    /// number of accumulated micro-batches).
    pub reduce_loss: String,
    pub completion_only_loss: Option<bool>,
    // --- preference objectives ---
    pub beta: f64,
    /// TRL's DPO `loss_type`: one name or a list (summed with `loss_weights`).
    pub loss_type: Option<OneOrMany>,
    /// Weights of the `loss_type` list (default 1 each).
    pub loss_weights: Option<Vec<f64>>,
    pub label_smoothing: f64,
    /// WPO: weight each pair by the policy's length-normalised probabilities.
    pub use_weighting: bool,
    /// LD-DPO's weight of the log-probs past the pair's shared length.
    pub ld_alpha: Option<f64>,
    pub discopop_tau: f64,
    pub f_divergence_type: String,
    pub f_alpha_divergence_coef: f64,
    pub precompute_ref_log_probs: bool,
    pub precompute_ref_batch_size: Option<usize>,
    pub reference_free: bool,
    /// TRL's TR-DPO (`sync_ref_model`, with `ref_model_mixup_alpha`, `ref_model_sync_steps`):
    /// refused when true.
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f64,
    pub ref_model_sync_steps: usize,
    /// TRL's `ignore_bias_buffers` (DDP with boolean buffers).
    pub ignore_bias_buffers: bool,
    /// ORPOConfig's `generate_during_eval`: refused when true.
    pub generate_during_eval: bool,
    /// ORPOConfig's `is_encoder_decoder`: only decoder-only models are built.
    pub is_encoder_decoder: Option<bool>,
    // --- optimisation (transformers TrainingArguments) ---
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
    /// Extra schedule arguments, as transformers' (`min_lr_rate`/`min_lr` for
    /// `cosine_with_min_lr`, `timescale` for `inverse_sqrt`, `num_cycles` for `cosine`).
    pub lr_scheduler_kwargs: Option<serde_json::Value>,
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
    pub average_tokens_across_devices: bool,
    pub ddp_timeout: u64,
    // --- evaluation, logging, saving ---
    pub do_train: bool,
    pub do_eval: bool,
    pub eval_strategy: Option<String>,
    pub evaluation_strategy: Option<String>,
    /// Updates between evaluations; below 1, a fraction of the run's total updates.
    pub eval_steps: Option<f64>,
    /// Updates between log lines; below 1, a fraction of the total.
    pub logging_steps: f64,
    pub logging_strategy: String,
    pub logging_first_step: bool,
    pub log_level: String,
    pub output_dir: PathBuf,
    pub overwrite_output_dir: bool,
    pub save_strategy: String,
    /// Updates between checkpoints; below 1, a fraction of the total.
    pub save_steps: f64,
    pub save_total_limit: Option<usize>,
    pub save_only_model: bool,
    pub hub_model_id: Option<String>,
    pub hub_model_revision: Option<String>,
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
    // --- transformers 5.24's TrainingArguments: read as below, named as inert, or refused ---
    /// `activation_checkpointing` (transformers 5's name; `gradient_checkpointing` is its
    /// deprecated alias): when set, it decides checkpointing.
    pub activation_checkpointing: Option<bool>,
    /// `disable_tqdm`: true hides the progress bar.
    pub disable_tqdm: Option<bool>,
    pub optim_args: Option<String>,
    pub optim_target_modules: Option<serde_json::Value>,
    pub label_smoothing_factor: f64,
    pub bf16_full_eval: bool,
    pub fp16_full_eval: bool,
    pub activation_checkpointing_kwargs: Option<serde_json::Value>,
    pub torch_compile: bool,
    pub torch_compile_backend: Option<String>,
    pub torch_compile_mode: Option<String>,
    pub liger_kernel_config: Option<serde_json::Value>,
    pub use_cache: bool,
    pub neftune_noise_alpha: Option<f64>,
    pub torch_empty_cache_steps: Option<usize>,
    pub auto_find_batch_size: bool,
    pub log_on_each_node: bool,
    pub log_level_replica: String,
    pub logging_nan_inf_filter: bool,
    pub include_num_input_tokens_seen: serde_json::Value,
    pub project: String,
    pub trackio_space_id: Option<String>,
    pub trackio_bucket_id: Option<String>,
    pub trackio_static_space_id: Option<serde_json::Value>,
    pub eval_delay: f64,
    pub prediction_loss_only: bool,
    pub eval_do_concat_batches: bool,
    pub eval_use_gather_object: bool,
    pub eval_accumulation_steps: Option<usize>,
    pub include_for_metrics: Vec<String>,
    pub batch_eval_metrics: bool,
    pub save_on_each_node: bool,
    pub enable_jit_checkpoint: bool,
    pub hub_token: Option<String>,
    pub hub_always_push: bool,
    pub hub_revision: Option<String>,
    pub load_best_model_at_end: bool,
    pub metric_for_best_model: Option<String>,
    pub greater_is_better: Option<bool>,
    pub ignore_data_skip: bool,
    pub restore_callback_states_from_checkpoint: bool,
    pub full_determinism: bool,
    pub use_cpu: bool,
    pub accelerator_config: Option<serde_json::Value>,
    pub parallelism_config: Option<serde_json::Value>,
    pub dataloader_drop_last: bool,
    pub dataloader_num_workers: usize,
    pub dataloader_pin_memory: bool,
    pub dataloader_persistent_workers: bool,
    pub dataloader_prefetch_factor: Option<usize>,
    pub dataloader_multiprocessing_context: Option<String>,
    pub dataloader_in_order: bool,
    pub label_names: Option<Vec<String>>,
    pub train_sampling_strategy: String,
    pub length_column_name: String,
    pub ddp_find_unused_parameters: Option<bool>,
    pub ddp_bucket_cap_mb: Option<usize>,
    pub ddp_broadcast_buffers: Option<bool>,
    pub ddp_static_graph: Option<bool>,
    pub ddp_backend: Option<String>,
    pub fsdp: Option<serde_json::Value>,
    pub fsdp_config: Option<serde_json::Value>,
    pub deepspeed: Option<serde_json::Value>,
    pub debug: serde_json::Value,
    pub skip_memory_metrics: bool,
    pub do_predict: bool,
    pub local_rank: i64,
}

/// A key that takes one value or a list of them (TRL's `loss_type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values, one or many.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one.clone()],
            OneOrMany::Many(many) => many.clone(),
        }
    }
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
            dtype: None,
            model_init_kwargs: None,
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
            use_dora: false,
            lora_task_type: "CAUSAL_LM".into(),
            lora_target_parameters: None,
            load_in_8bit: false,
            load_in_4bit: false,
            bnb_4bit_quant_type: "nf4".into(),
            use_bnb_nested_quant: false,
            bnb_4bit_quant_storage: None,
            chat_template: None,
            chat_template_path: None,
            dataset_streaming: false,
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
            dataset_mixture: None,
            dataset_name: None,
            dataset_config: None,
            dataset_train_split: "train".into(),
            dataset_test_split: "test".into(),
            dataset_num_proc: None,
            eos_token: None,
            max_seq_length: None,
            max_length: Some(1024),
            max_prompt_length: None,
            max_completion_length: None,
            packing: false,
            eval_packing: None,
            packing_strategy: "bfd".into(),
            shuffle_dataset: false,
            disable_dropout: true,
            padding_free: false,
            pad_to_multiple_of: None,
            pad_token: None,
            padding_value: None,
            activation_offloading: false,
            router_aux_loss_coef: None,
            assistant_only_loss: false,
            reduce_loss: "mean".into(),
            completion_only_loss: None,
            beta: 0.1,
            loss_type: None,
            loss_weights: None,
            label_smoothing: 0.0,
            use_weighting: false,
            ld_alpha: None,
            discopop_tau: 0.05,
            f_divergence_type: "reverse_kl".into(),
            f_alpha_divergence_coef: 0.5,
            precompute_ref_log_probs: false,
            precompute_ref_batch_size: None,
            reference_free: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            ignore_bias_buffers: false,
            generate_during_eval: false,
            is_encoder_decoder: None,
            learning_rate: 5e-5,
            lr_scheduler_type: "linear".into(),
            lr_scheduler_kwargs: None,
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
            // transformers 5.24 with torch ≥ 2.8; the same update as `adamw_torch` here.
            optim: "adamw_torch_fused".into(),
            bf16: false,
            fp16: false,
            tf32: None,
            seed: 42,
            data_seed: None,
            average_tokens_across_devices: true,
            ddp_timeout: 1800,
            do_train: false,
            do_eval: false,
            eval_strategy: None,
            evaluation_strategy: None,
            eval_steps: None,
            logging_steps: 500.0,
            logging_strategy: "steps".into(),
            logging_first_step: false,
            log_level: "passive".into(),
            output_dir: PathBuf::from("trainer_output"),
            overwrite_output_dir: false,
            save_strategy: "steps".into(),
            save_steps: 500.0,
            save_total_limit: None,
            save_only_model: false,
            hub_model_id: None,
            hub_model_revision: None,
            hub_strategy: None,
            hub_private_repo: None,
            push_to_hub: false,
            report_to: None,
            remove_unused_columns: true,
            run_name: None,
            resume_from_checkpoint: None,
            eval_on_start: false,
            activation_checkpointing: None,
            disable_tqdm: None,
            optim_args: None,
            optim_target_modules: None,
            label_smoothing_factor: 0.0,
            bf16_full_eval: false,
            fp16_full_eval: false,
            activation_checkpointing_kwargs: None,
            torch_compile: false,
            torch_compile_backend: None,
            torch_compile_mode: None,
            liger_kernel_config: None,
            use_cache: false,
            neftune_noise_alpha: None,
            torch_empty_cache_steps: None,
            auto_find_batch_size: false,
            log_on_each_node: true,
            log_level_replica: "warning".into(),
            logging_nan_inf_filter: true,
            include_num_input_tokens_seen: serde_json::Value::from("no"),
            project: "huggingface".into(),
            trackio_space_id: None,
            trackio_bucket_id: None,
            trackio_static_space_id: None,
            eval_delay: 0.0,
            prediction_loss_only: false,
            eval_do_concat_batches: true,
            eval_use_gather_object: false,
            eval_accumulation_steps: None,
            include_for_metrics: Vec::new(),
            batch_eval_metrics: false,
            save_on_each_node: false,
            enable_jit_checkpoint: false,
            hub_token: None,
            hub_always_push: false,
            hub_revision: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            ignore_data_skip: false,
            restore_callback_states_from_checkpoint: false,
            full_determinism: false,
            use_cpu: false,
            accelerator_config: None,
            parallelism_config: None,
            dataloader_drop_last: false,
            dataloader_num_workers: 0,
            dataloader_pin_memory: true,
            dataloader_persistent_workers: false,
            dataloader_prefetch_factor: None,
            dataloader_multiprocessing_context: None,
            dataloader_in_order: true,
            label_names: None,
            train_sampling_strategy: "random".into(),
            length_column_name: "length".into(),
            ddp_find_unused_parameters: None,
            ddp_bucket_cap_mb: None,
            ddp_broadcast_buffers: None,
            ddp_static_graph: None,
            ddp_backend: None,
            fsdp: None,
            fsdp_config: None,
            deepspeed: None,
            debug: serde_json::Value::from(""),
            skip_memory_metrics: true,
            do_predict: false,
            local_rank: -1,
            dataset_mixer_order: Vec::new(),
        }
    }
}

/// Keys accepted so that the handbook's recipes load unchanged but that change nothing here,
/// each with the reason. A run names those its recipe sets (to a non-default value) in one note
/// ([`Recipe::inert_keys_set`]); every other key acts ([`ACTING_KEYS`]).
pub const INERT_KEYS: &[(&str, &str)] = &[
    ("torch_dtype", "parameters are loaded and kept in f32 (bf16: true runs the products in bf16 and holds frozen weights whose values are all bf16's, a LoRA base from a bf16 checkpoint, in bf16; with the optimizer offloaded, the weights are bf16 over an f32 master copy); the model is saved in its source dtype"),
    ("dtype", "parameters are loaded and kept in f32 (bf16: true runs the products in bf16 and holds frozen weights whose values are all bf16's, a LoRA base from a bf16 checkpoint, in bf16; with the optimizer offloaded, the weights are bf16 over an f32 master copy); the model is saved in its source dtype"),
    ("model_init_kwargs", "the model is loaded as model_name_or_path, model_revision and load_in_4bit say"),
    ("attn_implementation", "there is one attention implementation"),
    ("use_flash_attention_2", "there is one attention implementation"),
    ("trust_remote_code", "no remote code is run: the Llama, Mistral and Gemma families are built in"),
    ("bnb_4bit_quant_storage", "NF4 codes are stored packed, whatever the storage type"),
    ("preprocessing_num_workers", "tokenization runs in one process"),
    ("dataset_kwargs", "examples are built as TRL builds them without it"),
    // TRL 1.16 has no prompt/completion truncation for decoder-only models: only `max_length`
    // truncates (DPOConfig dropped `max_prompt_length`; ORPOConfig uses `max_completion_length`
    // for encoder-decoders only).
    ("max_prompt_length", "TRL 1.16 truncates decoder-only models by max_length only"),
    ("max_completion_length", "TRL 1.16 truncates decoder-only models by max_length only"),
    ("padding_free", "batches are padded, which gives the same losses"),
    ("pad_token", "padded positions are masked, whatever their token"),
    ("padding_value", "padded positions are masked, whatever their token"),
    ("activation_offloading", "activations stay on the device (gradient_checkpointing is what saves their memory here)"),
    ("dataset_streaming", "datasets are read whole: the same rows, in the same order"),
    ("precompute_ref_batch_size", "reference log-probs are computed in batches of per_device_eval_batch_size"),
    ("ref_model_mixup_alpha", "only read with sync_ref_model, which is not implemented"),
    ("ref_model_sync_steps", "only read with sync_ref_model, which is not implemented"),
    ("ignore_bias_buffers", "the models here have no boolean buffers for DDP to ignore"),
    ("precompute_ref_log_probs", "reference log-probs are always computed once, before training"),
    ("gradient_checkpointing_kwargs", "checkpointing here has no reentrant variant"),
    ("fp16", "training computes in f32 (fp16 mixed precision, with its loss scaling, is not implemented: use bf16)"),
    ("tf32", "no TF32 matmuls here"),
    ("average_tokens_across_devices", "losses are always normalised by the tokens of the whole global batch"),
    ("ddp_timeout", "collectives wait without a timeout"),
    ("do_train", "the handbook's scripts always train"),
    ("data_seed", "the data order is seeded by seed"),
    ("log_level", "progress and notes go to stderr"),
    ("report_to", "metrics go to output_dir/metrics.jsonl and loss.svg"),
    ("remove_unused_columns", "only the columns an objective reads are used"),
    ("run_name", "there is no experiment tracker"),
    ("hub_strategy", "push_to_hub publishes the final model to the local hub"),
    ("hub_private_repo", "push_to_hub publishes the final model to the local hub"),
    ("hub_model_revision", "the local hub keeps one revision per model"),
    ("save_only_model", "checkpoints always hold the optimizer state (for exact resume)"),
    ("bf16_full_eval", "evaluation computes as training does (bf16: true runs its products in bf16)"),
    ("fp16_full_eval", "evaluation computes as training does (bf16: true runs its products in bf16)"),
    ("activation_checkpointing_kwargs", "checkpointing here keeps every layer's input on the device; there is nothing to configure"),
    ("torch_compile_backend", "there is no graph compiler: the backend's kernels run as built"),
    ("liger_kernel_config", "use_liger_kernel chooses the chunked head; there is nothing to configure"),
    ("use_cache", "training and evaluation keep no KV cache"),
    ("torch_empty_cache_steps", "device memory is released as tensors are dropped"),
    ("log_on_each_node", "the main rank reports"),
    ("log_level_replica", "the main rank reports"),
    ("logging_nan_inf_filter", "a non-finite loss stops the run with an error: there is nothing to filter"),
    ("include_num_input_tokens_seen", "no running count of input tokens is logged"),
    ("project", "there is no experiment tracker"),
    ("trackio_space_id", "there is no experiment tracker"),
    ("trackio_bucket_id", "there is no experiment tracker"),
    ("trackio_static_space_id", "there is no experiment tracker"),
    ("prediction_loss_only", "evaluation averages each batch's objective metrics as transformers does; there are no predictions to gather"),
    ("eval_do_concat_batches", "evaluation averages each batch's objective metrics as transformers does; there are no predictions to gather"),
    ("eval_use_gather_object", "evaluation averages each batch's objective metrics as transformers does; there are no predictions to gather"),
    ("eval_accumulation_steps", "evaluation averages each batch's objective metrics as transformers does; there are no predictions to gather"),
    ("include_for_metrics", "evaluation averages each batch's objective metrics as transformers does; there are no predictions to gather"),
    ("batch_eval_metrics", "evaluation averages each batch's objective metrics as transformers does; there are no predictions to gather"),
    ("save_on_each_node", "the main rank saves"),
    ("enable_jit_checkpoint", "checkpoints follow save_strategy; none is written on SIGTERM"),
    ("hub_token", "push_to_hub publishes the final model to the local hub"),
    ("hub_always_push", "push_to_hub publishes the final model to the local hub"),
    ("hub_revision", "push_to_hub publishes the final model to the local hub"),
    ("restore_callback_states_from_checkpoint", "there are no callbacks"),
    ("full_determinism", "runs are seeded as always; there is no non-deterministic mode to turn off"),
    ("use_cpu", "the backend is chosen when the binary is built (--features cuda or tch)"),
    ("dataloader_num_workers", "batches are built in the training process, without a DataLoader"),
    ("dataloader_pin_memory", "batches are built in the training process, without a DataLoader"),
    ("dataloader_persistent_workers", "batches are built in the training process, without a DataLoader"),
    ("dataloader_prefetch_factor", "batches are built in the training process, without a DataLoader"),
    ("dataloader_multiprocessing_context", "batches are built in the training process, without a DataLoader"),
    ("dataloader_in_order", "batches are built in the training process, without a DataLoader"),
    ("label_names", "labels are the objective's own"),
    ("length_column_name", "only read by the group_by_length sampler, which is not implemented"),
    ("ddp_find_unused_parameters", "gradients are reduced by the run's own collectives, not torch DDP"),
    ("ddp_bucket_cap_mb", "gradients are reduced by the run's own collectives, not torch DDP"),
    ("ddp_broadcast_buffers", "gradients are reduced by the run's own collectives, not torch DDP"),
    ("ddp_static_graph", "gradients are reduced by the run's own collectives, not torch DDP"),
    ("ddp_backend", "the communicator is the build's and the launcher's (NCCL or TCP), not named here"),
    ("debug", "there are no debug modes"),
    ("skip_memory_metrics", "memory is not among the logged metrics"),
    ("do_predict", "the handbook's scripts do not predict"),
    ("local_rank", "ranks come from the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE)"),
];

/// Acting keys that only SFT and CPT read ([`Recipe::sft_only_keys_set`]).
pub const SFT_ONLY_KEYS: &[&str] = &[
    "packing",
    "eval_packing",
    "packing_strategy",
    "shuffle_dataset",
    "assistant_only_loss",
    "completion_only_loss",
    "dataset_text_field",
    "reduce_loss",
    "chat_template_path",
];

/// Keys that change what a run does (or are refused with an error naming them when set to
/// something not implemented). With [`INERT_KEYS`], every key of [`Recipe`].
pub const ACTING_KEYS: &[&str] = &[
    "model_name_or_path",
    "torch_compile",
    "torch_compile_mode",
    "model_revision",
    "tokenizer_name_or_path",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_modules_to_save",
    "use_rslora",
    "use_dora",
    "lora_task_type",
    "lora_target_parameters",
    "load_in_8bit",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "chat_template",
    "chat_template_path",
    "dataset_mixer",
    "dataset_splits",
    "dataset_configs",
    "columns_to_keep",
    "shuffle",
    "truncation_side",
    "truncation_mode",
    "legacy_formatting",
    "auto_insert_empty_system_msg",
    "text_column",
    "dataset_text_field",
    "dataset_mixture",
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_test_split",
    "eos_token",
    "max_seq_length",
    "max_length",
    "packing",
    "eval_packing",
    "packing_strategy",
    "pad_to_multiple_of",
    "shuffle_dataset",
    "disable_dropout",
    "dataset_num_proc",
    "assistant_only_loss",
    "reduce_loss",
    "completion_only_loss",
    "beta",
    "loss_type",
    "label_smoothing",
    "loss_weights",
    "use_weighting",
    "ld_alpha",
    "discopop_tau",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "reference_free",
    "sync_ref_model",
    "generate_during_eval",
    "is_encoder_decoder",
    "router_aux_loss_coef",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_ratio",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "use_liger_kernel",
    "bf16",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "seed",
    "do_eval",
    "eval_strategy",
    "evaluation_strategy",
    "eval_steps",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "output_dir",
    "overwrite_output_dir",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "hub_model_id",
    "push_to_hub",
    "resume_from_checkpoint",
    "eval_on_start",
    "activation_checkpointing",
    "disable_tqdm",
    "optim_args",
    "optim_target_modules",
    "label_smoothing_factor",
    "neftune_noise_alpha",
    "auto_find_batch_size",
    "eval_delay",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "ignore_data_skip",
    "accelerator_config",
    "parallelism_config",
    "dataloader_drop_last",
    "train_sampling_strategy",
    "fsdp",
    "fsdp_config",
    "deepspeed",
];

/// Keys of TRL 1.16, PEFT and TrainingArguments whose non-default values are not implemented,
/// with the reason: a recipe setting one otherwise is refused naming the key and its value
/// ([`Recipe::validate`]).
pub const REFUSED_UNLESS_DEFAULT: &[(&str, &str)] = &[
    ("lora_task_type", "only CAUSAL_LM (causal language models) is built"),
    ("sync_ref_model", "TR-DPO's syncing is not implemented: the reference is the starting model throughout"),
    ("generate_during_eval", "generation during evaluation is not implemented: evaluation computes the metrics without generating"),
    ("optim_args", "optimizer arguments beyond adam_beta1, adam_beta2, adam_epsilon and weight_decay are not read"),
    ("optim_target_modules", "GaLore and APOLLO's per-module optimizers are not implemented"),
    ("label_smoothing_factor", "label smoothing of the cross entropy is not implemented (DPO's label_smoothing is)"),
    ("neftune_noise_alpha", "NEFTune's noise on the embeddings is not implemented"),
    ("auto_find_batch_size", "true is not implemented: the batch sizes are the recipe's"),
    ("eval_delay", "a delay before the first evaluation is not implemented"),
    ("load_best_model_at_end", "true is not implemented: the final model is the last step's"),
    ("metric_for_best_model", "choosing a best checkpoint is not implemented"),
    ("greater_is_better", "choosing a best checkpoint is not implemented"),
    ("ignore_data_skip", "true is not implemented: a resumed run continues the data where it stopped"),
    ("accelerator_config", "is not read: data-parallel settings come from the accelerate config the launcher names"),
    ("parallelism_config", "tensor and context parallelism are not implemented"),
    ("dataloader_drop_last", "true is not implemented: the last, partial batch is trained on"),
    ("train_sampling_strategy", "only `random` (transformers' default sampler) is implemented"),
    ("fsdp", "FSDP is not implemented: shard with ZeRO through the accelerate config the launcher names"),
    ("fsdp_config", "FSDP is not implemented: shard with ZeRO through the accelerate config the launcher names"),
    ("deepspeed", "a DeepSpeed config is not read here: name the ZeRO stage in the accelerate config the launcher names"),
];

impl Recipe {
    /// All valid keys, in declaration order.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Recipe::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => unreachable!("Recipe serializes to a JSON object"),
        }
    }

    /// The defaults of `config`: transformers' `TrainingArguments` with TRL's overrides. `bf16`
    /// is TRL's `None`, read as true here; [`Recipe::from_yaml_str_for`] makes it `not fp16` when
    /// a recipe sets `fp16` and leaves `bf16` out, as TRL's `__post_init__` does.
    pub fn defaults_for(config: TrlConfig) -> Recipe {
        let learning_rate = match config {
            TrlConfig::TrainingArguments => return Recipe::default(),
            TrlConfig::Sft => 2e-5,
            TrlConfig::Dpo | TrlConfig::Orpo => 1e-6,
        };
        Recipe { learning_rate, logging_steps: 10.0, gradient_checkpointing: true, bf16: true, ..Recipe::default() }
    }

    /// Reads `path` with `TrainingArguments`' defaults and applies `overrides` (`--key=value`
    /// strings) on top. A script reads its recipe with [`Recipe::load_for`].
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        Self::load_for(TrlConfig::TrainingArguments, path, overrides)
    }

    /// Reads `path` as `config` does (its defaults for the keys left out) and applies
    /// `overrides` on top.
    pub fn load_for(config: TrlConfig, path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RecipeError::Invalid { source_name: path.display().to_string(), message: e.to_string() })?;
        Self::from_yaml_str_for(config, &text, &path.display().to_string(), overrides)
    }

    /// [`Recipe::from_yaml_str_for`] with `TrainingArguments`' defaults.
    pub fn from_yaml_str(yaml: &str, source_name: &str, overrides: &[String]) -> Result<Self, RecipeError> {
        Self::from_yaml_str_for(TrlConfig::TrainingArguments, yaml, source_name, overrides)
    }

    /// Parses recipe YAML (named `source_name` in errors) over `config`'s defaults, with
    /// `overrides` applied, and checks the values ([`Recipe::validate`]). A type error names the
    /// key and where it was written — the file, or the command-line override.
    pub fn from_yaml_str_for(config: TrlConfig, yaml: &str, source_name: &str, overrides: &[String]) -> Result<Self, RecipeError> {
        let invalid =
            |source_name: &str, e: figment::Error| RecipeError::Invalid { source_name: source_name.into(), message: figment_message(e) };
        // serde_yaml refuses a key written twice (figment would keep the last one silently).
        if let Err(e) = serde_yaml::from_str::<serde_yaml::Value>(yaml) {
            return Err(RecipeError::Invalid { source_name: source_name.into(), message: e.to_string() });
        }
        let file_keys: BTreeMap<String, serde_yaml_value::Value> =
            Figment::from(Yaml::string(yaml)).extract().map_err(|e| invalid(source_name, e))?;
        check_keys(file_keys.keys(), source_name)?;
        let defaults = || Figment::from(Serialized::defaults(Recipe::defaults_for(config)));
        let mut bf16_written = file_keys.contains_key("bf16");
        // Type errors in the file are reported against the file alone.
        defaults().merge(Yaml::string(yaml)).extract::<Recipe>().map_err(|e| invalid(source_name, e))?;
        let mut figment = defaults().merge(Yaml::string(yaml));
        for raw in overrides {
            let (key, value) = parse_override(raw)?;
            check_keys(std::iter::once(&key), "command line")?;
            let here = format!("command-line override `{raw}`");
            let value: serde_yaml_value::Value =
                Figment::from(Yaml::string(&format!("v: {value}"))).extract_inner("v").map_err(|e| invalid(&here, e))?;
            defaults().merge(Serialized::default(&key, value.clone())).extract::<Recipe>().map_err(|e| invalid(&here, e))?;
            bf16_written |= key == "bf16";
            figment = figment.merge(Serialized::default(&key, value));
        }
        let mut recipe: Recipe = figment.extract().map_err(|e| invalid(source_name, e))?;
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
        if config != TrlConfig::TrainingArguments && !bf16_written {
            // TRL's `bf16: None`: true unless the recipe asks for fp16.
            recipe.bf16 = !recipe.fp16;
        }
        recipe.validate()?;
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

    /// Keys set to a non-default value that have no effect here, each as `key (why)`, and keys
    /// that act only with settings this recipe lacks (`auto_insert_empty_system_msg` without
    /// `legacy_formatting`) or are read under another name (`packing_strategy: ffd`).
    pub fn inert_keys_set(&self) -> Vec<String> {
        let (this, default) = self.json_and_defaults();
        let mut inert: Vec<String> =
            INERT_KEYS.iter().filter(|(k, _)| this[k] != default[k]).map(|(k, why)| format!("{k} ({why})")).collect();
        if self.auto_insert_empty_system_msg.is_some() && !self.legacy_formatting {
            inert.push("auto_insert_empty_system_msg (only read with legacy_formatting: true)".into());
        }
        if self.dataset_mixture.is_some() || self.dataset_name.is_some() {
            for (key, set) in [
                ("dataset_splits", self.dataset_splits != default_splits()),
                ("dataset_configs", self.dataset_configs.is_some()),
                ("columns_to_keep", self.columns_to_keep.is_some()),
                ("shuffle", !self.shuffle),
            ] {
                if set {
                    inert.push(format!("{key} (only read with dataset_mixer)"));
                }
            }
        }
        if self.dataset_num_proc.is_some() && !self.packing {
            inert.push(
                "dataset_num_proc (tokenization runs in one process; the value shapes packed rows only, as datasets' shards do for TRL, and packing is off)"
                    .into(),
            );
        }
        if (self.torch_compile || self.torch_compile_mode.is_some()) && !self.replays_steps_as_graphs() {
            inert.push(format!(
                "torch_compile{} (there is no graph compiler: the backend's kernels run as built; torch_compile_mode: reduce-overhead replays each step as a CUDA graph on libtorch with a GPU)",
                self.torch_compile_mode.as_ref().map_or(String::new(), |m| format!(" with torch_compile_mode: {m}"))
            ));
        }
        if self.packing_strategy == "ffd" {
            inert.push("packing_strategy: ffd (TRL < 0.20's name: packed best-fit decreasing, TRL 1.16's bfd)".into());
        }
        inert
    }

    /// Whether the run replays its steps as CUDA graphs: `torch_compile_mode` `reduce-overhead`
    /// or `max-autotune`, the modes in which `torch.compile` replays CUDA graphs (setting the mode
    /// turns `torch_compile` on, as transformers does).
    pub fn replays_steps_as_graphs(&self) -> bool {
        matches!(self.torch_compile_mode.as_deref(), Some("reduce-overhead" | "max-autotune"))
    }

    /// The keys set here (away from their defaults) that only SFT and CPT read, TRL's
    /// `SFTConfig` fields without a counterpart in `DPOConfig` or `ORPOConfig`: a DPO or ORPO run
    /// names them as having no effect.
    pub fn sft_only_keys_set(&self) -> Vec<&'static str> {
        let (this, default) = self.json_and_defaults();
        SFT_ONLY_KEYS.iter().copied().filter(|k| this[k] != default[k]).collect()
    }

    /// Checks the values a run cannot make sense of, naming the key as the recipe wrote it:
    /// non-finite or negative rates, betas outside `[0, 1)`, zero intervals and sizes,
    /// contradictory pairs (`eval_strategy` and `evaluation_strategy`, `bf16` and `fp16`,
    /// two dataset sources), an empty `output_dir`.
    pub fn validate(&self) -> Result<(), RecipeError> {
        let bad = |key: &str, message: String| Err(RecipeError::Value { key: key.into(), message });
        let finite_non_negative = [
            ("learning_rate", self.learning_rate),
            ("weight_decay", self.weight_decay),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
            ("warmup_ratio", self.warmup_ratio),
            ("lora_dropout", self.lora_dropout),
            ("label_smoothing", self.label_smoothing),
        ];
        for (key, value) in finite_non_negative {
            if !value.is_finite() || value < 0.0 {
                return bad(key, format!("{value}: must be a finite number ≥ 0"));
            }
        }
        for (key, value) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&value) {
                return bad(key, format!("{value}: must be in [0, 1)"));
            }
        }
        if self.warmup_ratio > 1.0 {
            return bad("warmup_ratio", format!("{}: a fraction of the run, at most 1", self.warmup_ratio));
        }
        if self.lora_dropout >= 1.0 {
            return bad("lora_dropout", format!("{}: must be below 1", self.lora_dropout));
        }
        if !self.beta.is_finite() || self.beta <= 0.0 {
            return bad("beta", format!("{}: must be a finite number > 0", self.beta));
        }
        if self.max_steps <= 0 && !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0) {
            return bad("num_train_epochs", format!("{}: must be > 0 (or set max_steps)", self.num_train_epochs));
        }
        let mut intervals = vec![("logging_steps", self.logging_steps), ("save_steps", self.save_steps)];
        intervals.extend(self.eval_steps.map(|v| ("eval_steps", v)));
        for (key, value) in intervals {
            if !value.is_finite() || value <= 0.0 {
                return bad(key, format!("{value}: must be a positive number of steps, or a fraction of the run below 1"));
            }
        }
        for (key, value) in [
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        for (key, value) in
            [("max_length", self.max_length), ("max_seq_length", self.max_seq_length), ("pad_to_multiple_of", self.pad_to_multiple_of)]
        {
            if value == Some(0) {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.use_peft && self.lora_r == 0 {
            return bad("lora_r", "must be at least 1".into());
        }
        if let (Some(a), Some(b)) = (&self.eval_strategy, &self.evaluation_strategy) {
            return bad(
                "evaluation_strategy",
                format!("`{b}` given together with eval_strategy `{a}`: evaluation_strategy is its old name; keep one"),
            );
        }
        if self.bf16 && self.fp16 {
            return bad("fp16", "bf16 and fp16 are both true: choose one".into());
        }
        if self.output_dir.as_os_str().is_empty() {
            return bad("output_dir", "is empty (it would write into the current directory); name a directory".into());
        }
        let sources: Vec<&str> = [
            ("dataset_mixer", self.dataset_mixer.is_some()),
            ("dataset_mixture", self.dataset_mixture.is_some()),
            ("dataset_name", self.dataset_name.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        if sources.len() > 1 {
            return bad(sources[1], format!("the recipe names its data with both {}: keep one", sources.join(" and ")));
        }
        if !matches!(self.logging_strategy.as_str(), "steps") {
            return bad("logging_strategy", format!("`{}`: only `steps` is implemented (with logging_steps)", self.logging_strategy));
        }
        self.packing_strategy()?;
        if let Some(mode) = self.torch_compile_mode.as_deref() {
            if !matches!(mode, "default" | "reduce-overhead" | "max-autotune" | "max-autotune-no-cudagraphs") {
                return bad(
                    "torch_compile_mode",
                    format!(
                        "`{mode}` is not one of torch.compile's modes (default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs)"
                    ),
                );
            }
        }
        if self.reference_free {
            return bad("reference_free", "true is not implemented: DPO here always scores against the reference model".into());
        }
        self.refuse_unimplemented()
    }

    /// TRL 1.16 and PEFT settings accepted by name whose non-default values are not implemented:
    /// refused naming the key, not run as something else.
    fn refuse_unimplemented(&self) -> Result<(), RecipeError> {
        let bad = |key: &str, message: &str| Err(RecipeError::Value { key: key.into(), message: message.into() });
        if self.lora_target_parameters.as_ref().is_some_and(|p| !p.is_empty()) {
            return bad("lora_target_parameters", "LoRA on bare parameters (MoE experts) is not implemented: use lora_target_modules");
        }
        if self.router_aux_loss_coef.is_some_and(|c| c != 0.0) {
            return bad(
                "router_aux_loss_coef",
                "weighs a Mixture-of-Experts router's loss; the Llama, Mistral and Gemma models here have no router (TRL refuses it on them too)",
            );
        }
        if self.is_encoder_decoder == Some(true) {
            return bad("is_encoder_decoder", "true: only decoder-only models are built");
        }
        let (this, default) = self.json_and_defaults();
        match REFUSED_UNLESS_DEFAULT.iter().find(|(key, _)| this[key] != default[key]) {
            Some((key, why)) => bad(key, &format!("{}: {why}", this[key])),
            None => Ok(()),
        }
    }

    /// This recipe's keys and values as JSON, beside the defaults': `this[key] != default[key]`
    /// is "the recipe sets `key` to something else than its default".
    fn json_and_defaults(&self) -> (serde_json::Value, serde_json::Value) {
        (serde_json::to_value(self).expect("serializable"), serde_json::to_value(Recipe::default()).expect("serializable"))
    }

    /// Whether layers are checkpointed: `activation_checkpointing` (transformers 5's name) when
    /// set, else `gradient_checkpointing`, its deprecated alias, as TrainingArguments resolves them.
    pub fn checkpointing(&self) -> bool {
        self.activation_checkpointing.unwrap_or(self.gradient_checkpointing)
    }

    /// The recipe the evaluation set is built with: `packing` set to `eval_packing` when that
    /// is given, as TRL's `SFTTrainer` prepares its evaluation dataset.
    pub fn for_evaluation(&self) -> Recipe {
        Recipe { packing: self.eval_packing.unwrap_or(self.packing), ..self.clone() }
    }

    /// The packing strategy `packing_strategy` names (`ffd`, TRL < 0.20's name for best-fit
    /// decreasing, read as `bfd`); an error naming the key for any other value.
    pub fn packing_strategy(&self) -> Result<alignment_data::PackingStrategy, RecipeError> {
        let name = if self.packing_strategy == "ffd" { "bfd" } else { self.packing_strategy.as_str() };
        alignment_data::PackingStrategy::from_name(name).ok_or_else(|| RecipeError::Value {
            key: "packing_strategy".into(),
            message: format!("`{}`: expected bfd, bfd_split or wrapped (TRL 1.16's strategies; ffd is read as bfd)", self.packing_strategy),
        })
    }

    /// TRL's `truncation_mode`, from `truncation_mode` or the old handbook's `truncation_side`
    /// (`left` = `keep_end`); an error for other values or when the two disagree.
    pub fn truncation_mode(&self) -> Result<alignment_data::TruncationMode, RecipeError> {
        let invalid = |message: String| RecipeError::Value {
            key: if self.truncation_mode.is_some() { "truncation_mode" } else { "truncation_side" }.into(),
            message,
        };
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

    /// How an SFT, CPT or DPO run's micro-batches are padded: with the tokenizer's `pad_token`,
    /// to the longest row rounded up to `pad_to_multiple_of`, as TRL's collators (TRL's ORPO has
    /// no such key and pads to the longest row: its logged `logits/*` average the padding too).
    /// Packed rows are split by document, or kept whole when the steps are replayed as CUDA
    /// graphs (`torch_compile_mode: reduce-overhead`), which need batches of repeating shapes, or
    /// when `ALIGNMENT_PACKED_ROWS=whole` asks (to measure the layout alone: docs/performance.md).
    pub fn collation(&self, pad_token: u32) -> crate::Collation {
        let asked = std::env::var("ALIGNMENT_PACKED_ROWS").is_ok_and(|v| v.trim() == "whole");
        let packed_rows = if self.replays_steps_as_graphs() || asked { crate::PackedRows::Whole } else { crate::PackedRows::ByDocument };
        crate::Collation { pad_token, pad_to_multiple_of: self.pad_to_multiple_of, packed_rows }
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

/// A figment error as `key: what is wrong`, without figment's own source locations.
fn figment_message(e: figment::Error) -> String {
    let key = e.path.iter().filter(|p| p.as_str() != "default").cloned().collect::<Vec<_>>().join(".");
    if key.is_empty() {
        e.kind.to_string()
    } else {
        format!("`{key}`: {}", e.kind)
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
