//! Errors of the data crate, each naming the file, field, template or message at fault.

use std::path::PathBuf;

/// Everything that can go wrong turning datasets into token batches.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A JSON file is malformed.
    #[error("invalid JSON in {path}: {message}")]
    InvalidJson { path: PathBuf, message: String },
    /// A required field is absent from a file.
    #[error("{path} has no `{field}`")]
    MissingField { path: PathBuf, field: String },
    /// The chat template does not compile.
    #[error("chat template `{name}` has a syntax error: {message}")]
    TemplateSyntax { name: String, message: String },
    /// The template called `raise_exception(message)` (e.g. roles that do not alternate).
    #[error("chat template `{name}` raised: {message}")]
    TemplateRaised { name: String, message: String },
    /// `assistant_only_loss` with a template that has no `{% generation %}` blocks: TRL 1.16 swaps
    /// in a training variant for the model templates it ships one for and refuses the others.
    #[error(
        "chat template `{name}`: The chat template is not training-compatible (missing prefix-preservation or `{{% generation %}}` \
         markers) and patching is not supported for this template. Please manually modify the chat template for training. \
         (assistant_only_loss trains on what the template's {{% generation %}} ... {{% endgeneration %}} blocks write, as TRL 1.16 does; \
         put them around each assistant turn's content and end-of-turn token, or give a recipe `chat_template` that has them)"
    )]
    TemplateNotTrainable { name: String },
    /// Rendering failed for another reason (type error, unknown filter, ...); the message
    /// starts with the template's name.
    #[error("chat template rendering failed: {message}")]
    TemplateRender { message: String },
    /// A conversation has no messages (transformers refuses to render those too).
    #[error("{location}: empty conversation")]
    EmptyConversation { location: String },
    /// A message is not a JSON object (`{"role": ..., "content": ...}`).
    #[error("message {index} is not an object: {value}")]
    InvalidMessage { index: usize, value: String },
    /// A message has a role other than system/user/assistant; `location` names the dataset row.
    #[error("{location}: message {index} has role `{role}` (expected one of system, user, assistant)")]
    InvalidRole { location: String, index: usize, role: String },
    /// The tokenizer failed on a text.
    #[error("{location}: tokenizer error: {message}")]
    Tokenizer { location: String, message: String },
    /// A dataset row lacks a column its task needs (`present` lists the columns it has).
    #[error("dataset `{dataset}` row {row}: no column `{column}`, which the `{task}` task needs (the row has: {present})")]
    RowMissingColumn { dataset: String, row: usize, column: String, task: String, present: String },
    /// A column does not hold what the task needs (a list of `{role, content}` messages, a string).
    #[error("dataset `{dataset}` row {row}, column `{column}`: {message}")]
    InvalidColumn { dataset: String, row: usize, column: String, message: String },
    /// A preference row whose `chosen` and `rejected` differ before their last message.
    #[error("dataset `{dataset}` row {row}: `chosen` and `rejected` differ at message {index} ({what}); a preference pair must share every turn but the last")]
    PromptMismatch { dataset: String, row: usize, index: usize, what: String },
    /// A task name other than sft, generation, rm, dpo, orpo, cpt.
    #[error("unknown task `{name}` (expected one of sft, generation, rm, dpo, orpo, cpt)")]
    UnknownTask { name: String },
    /// A token a setting names (`key`, e.g. `eos_token`) is not in the tokenizer's vocabulary.
    #[error("`{key}`: {message}")]
    UnknownToken { key: String, message: String },
    /// Preference tokenization refused a pair (TRL's checks, e.g. ORPO's prompt tokens of chosen
    /// and rejected differing by more than the last token).
    #[error("{location}: {message}")]
    PreferenceTokens { location: String, message: String },

    // ---- dataset sources and the mixer (source.rs, parquet.rs, hub.rs, mixer.rs) ----
    /// A line of a JSON Lines file is not a JSON object.
    #[error("{path}:{line}: malformed JSON line: {message}")]
    MalformedJsonLine { path: PathBuf, line: usize, message: String },
    /// A parquet file cannot be read (corrupt, unsupported codec or type).
    #[error("unreadable parquet file {path}: {message}")]
    Parquet { path: PathBuf, message: String },
    /// A data file has an extension that is not .parquet, .jsonl or .json.
    #[error("{path}: unsupported data file type (expected .parquet, .jsonl or .json)")]
    UnsupportedFile { path: PathBuf },
    /// No data file of a dataset matches the split; `found` lists the data files there are.
    #[error("dataset `{dataset}` has no files for split `{split}`; data files found: {found:?}")]
    MissingSplit { dataset: String, split: String, found: Vec<String> },
    /// A dataset id is neither an existing local path (relative to `cwd`) nor a hub id
    /// (`name` or `org/name`), or no hub client is configured.
    #[error("dataset `{id}` is not a local file or directory (relative to {cwd}), nor a hub dataset id")]
    DatasetNotFound { id: String, cwd: PathBuf },
    /// A dataset id that is not a local path (relative to `cwd`) and that the hub does not
    /// serve (no such repo, the hub unreachable and nothing cached): `hub` says why.
    #[error("dataset `{id}` is neither a local file or directory (relative to {cwd}) nor reachable on the hub: {hub}")]
    NotLocalNorHub { id: String, cwd: PathBuf, hub: Box<DataError> },
    /// The dataset card's (README.md) YAML `configs:` are malformed.
    #[error("dataset `{dataset}`: README.md `configs`: {message}")]
    DatasetCard { dataset: String, message: String },
    /// A config asked for that the dataset card does not declare.
    #[error("dataset `{dataset}` has no config `{config}`; its configs (README.md) are {available:?}")]
    UnknownConfig { dataset: String, config: String, available: Vec<String> },
    /// No config asked, and the dataset card declares several without a default.
    #[error("dataset `{dataset}` has several configs and no default one: name one of {available:?} (`dataset_configs`, or `config` in a mixture)")]
    NoDefaultConfig { dataset: String, available: Vec<String> },
    /// A split asked for that the config's `data_files` does not list.
    #[error("dataset `{dataset}`, config `{config}`, has no split `{split}`; its splits (README.md) are {available:?}")]
    MissingConfigSplit { dataset: String, config: String, split: String, available: Vec<String> },
    /// A `data_files` path without wildcards that names no file of the dataset.
    #[error("dataset `{dataset}`, config `{config}`, split `{split}`: no file `{pattern}` (README.md `data_files`)")]
    DataFilesNotFound { dataset: String, config: String, split: String, pattern: String },
    /// A split name contains neither "train" nor "test" (the handbook's `mix_datasets` rule).
    #[error("Split type {split} not recognized as one of test or train.")]
    UnknownSplitType { split: String },
    /// A column asked for (`select_columns`, a mixture's `columns`) is not in the dataset.
    #[error("dataset `{dataset}` has no column `{column}`; its columns are {available:?}")]
    MissingColumn { dataset: String, column: String, available: Vec<String> },
    /// `columns_to_keep` shares no column with a dataset, which would leave it without rows.
    #[error("dataset `{dataset}` has none of the columns to keep {keep:?}; its columns are {available:?}")]
    NoColumnsKept { dataset: String, keep: Vec<String>, available: Vec<String> },
    /// A row index past the end (`select`, or a mixer fraction above 1).
    #[error("row {index} is out of range for dataset `{dataset}` of {len} rows")]
    RowOutOfRange { dataset: String, index: usize, len: usize },
    /// A mixer fraction or mixture weight that is negative or not a number.
    #[error("dataset `{dataset}`: fraction {fraction} is invalid (Dataset fractions cannot be negative)")]
    InvalidFraction { dataset: String, fraction: f64 },
    /// A fraction above 1 asks for more rows than the split has.
    #[error("dataset `{dataset}`: fraction {fraction} selects {requested} rows but the split has {len}")]
    FractionTooLarge { dataset: String, fraction: f64, requested: usize, len: usize },
    /// `train_test_split` refused the test size (message as `datasets` words it).
    #[error("dataset `{dataset}`: invalid test_size {test_size}: {message}")]
    InvalidTestSize { dataset: String, test_size: String, message: String },
    /// A mixer configuration that cannot be applied (config count, differing columns, nothing to load).
    #[error("invalid dataset mixer: {message}")]
    InvalidMixer { message: String },
    /// A request to the hub failed (HTTP status, connection, missing headers).
    #[error("hub dataset `{repo}`{}: {message}", file.as_ref().map(|f| format!(", file `{f}`")).unwrap_or_default())]
    Hub { repo: String, file: Option<String>, message: String },
    /// Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable) and the cache lacks what is needed:
    /// `what` is the repo listing, a file or a split.
    #[error("hub dataset `{repo}`: {what} is not in the cache {cache_dir}, and the hub is not used (HF_HUB_OFFLINE) or cannot be reached")]
    HubOfflineMiss { repo: String, what: String, cache_dir: PathBuf },
}
