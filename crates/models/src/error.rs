//! Errors of the models crate, each naming the file, tensor or field at fault.

use std::path::PathBuf;

/// Everything that can go wrong while reading, building or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] alignment_core::IoError),
    /// `config.json` is not valid JSON or has a field of the wrong type.
    #[error("invalid model config {path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    /// `config.json` asks for a feature this crate does not implement.
    #[error("unsupported model config: field `{field}` = {value}: {reason}")]
    Unsupported { field: String, value: String, reason: String },
    /// A safetensors file could not be parsed (truncated, corrupted header, ...).
    #[error("corrupted safetensors file {path}: {message}")]
    CorruptedWeights { path: PathBuf, message: String },
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("missing tensor `{name}` in {path}")]
    MissingTensor { name: String, path: PathBuf },
    /// A tensor's shape disagrees with what config.json implies.
    #[error("shape mismatch for `{name}`: config.json implies {expected:?}, weights have {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A tensor has a dtype we cannot convert.
    #[error("unsupported dtype {dtype} for tensor `{name}` (supported: F32, BF16, F16)")]
    UnsupportedDtype { name: String, dtype: String },
    /// The checkpoint has tensors the architecture does not use.
    #[error("unexpected tensors in {path}: {names:?}")]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },
    /// A GGUF file is malformed, or asks for something this reader does not support; the
    /// message names the metadata key or tensor.
    #[error("GGUF file {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    /// A tensor holds NaN or infinite values (found when loading or before saving).
    #[error("tensor `{name}` ({path}) holds {count} non-finite values (the first, {value}, at element {index}): refusing weights that make every output NaN")]
    NonFiniteWeights { name: String, path: PathBuf, index: usize, value: f32, count: usize },
    /// A generation request is malformed (empty prompt, ...).
    #[error("invalid generation request: {0}")]
    Generation(String),
}

pub(crate) fn io_err(action: &'static str, path: &std::path::Path, e: std::io::Error) -> ModelError {
    ModelError::Io(alignment_core::IoError::new(action, path, e))
}
