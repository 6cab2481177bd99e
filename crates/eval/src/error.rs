//! Errors of the evaluation crate, each naming the task, file, row or field at fault.

use std::path::PathBuf;

/// Everything that can go wrong evaluating a model.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] alignment_data::DataError),
    #[error(transparent)]
    Model(#[from] alignment_models::ModelError),
    #[error(transparent)]
    Io(#[from] alignment_core::IoError),
    /// The tokenizer failed on a text.
    #[error("{location}: tokenizer error: {message}")]
    Tokenizer { location: String, message: String },
    /// A task row lacks a field or has one of the wrong kind.
    #[error("{location}: {message}")]
    InvalidRow { location: String, message: String },
    /// A task name, option or data source the command line or caller gave is not understood.
    #[error("{0}")]
    Config(String),
    /// A file could not be read.
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
}

impl EvalError {
    /// An [`EvalError::InvalidRow`] for row `row` (0-based) of `dataset`.
    pub fn row(dataset: &str, row: usize, message: impl Into<String>) -> Self {
        Self::InvalidRow { location: format!("{dataset} row {row}"), message: message.into() }
    }
}
