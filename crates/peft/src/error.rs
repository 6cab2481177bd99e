//! Errors of the peft crate, each naming the file, tensor or field at fault.

use std::path::PathBuf;

/// Everything that can go wrong while attaching, saving, loading or merging adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] alignment_core::IoError),
    /// Writing the safetensors file failed (see [`alignment_models::ModelError`]).
    #[error(transparent)]
    Model(#[from] alignment_models::ModelError),
    /// The LoRA configuration is invalid (rank 0, a target matching no module, ...).
    #[error("invalid LoRA config: {0}")]
    InvalidConfig(String),
    /// A `modules_to_save` entry names what cannot be trained whole here (see
    /// `crate::saved_modules`), or nothing.
    #[error("modules_to_save `{name}`: {message}")]
    SavedModule { name: String, message: String },
    /// `adapter_config.json` is unreadable or asks for a PEFT feature this crate does not implement.
    #[error("unsupported or invalid adapter config {path}: field `{field}`: {message}")]
    AdapterConfig { path: PathBuf, field: String, message: String },
    /// `adapter_model.safetensors` could not be parsed or has a tensor of an unsupported dtype.
    #[error("corrupted adapter weights {path}: {message}")]
    CorruptedWeights { path: PathBuf, message: String },
    /// Targeted modules have no adapter tensors in the file.
    #[error("missing adapter tensors in {path}: {names:?}")]
    MissingTensors { path: PathBuf, names: Vec<String> },
    /// The file has tensors that do not belong to a targeted linear layer of this model.
    #[error("unexpected adapter tensors in {path}: {names:?}")]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },
    /// An adapter tensor's shape disagrees with the model and the config's rank.
    #[error("shape mismatch for adapter tensor `{name}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    /// The model has adapters where none are expected, or none where they are.
    #[error("{0}")]
    State(String),
}
