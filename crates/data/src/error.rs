//! Errors of the data crate, each naming the dataset, row, field or file at fault.

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
    #[error("chat template syntax error: {message}")]
    TemplateSyntax { message: String },
    /// The template called `raise_exception` (e.g. unsupported role order).
    #[error("chat template raised: {message}")]
    TemplateRaised { message: String },
    /// Rendering failed for another reason (undefined variable, type error, ...).
    #[error("chat template rendering failed: {message}")]
    TemplateRender { message: String },
    /// A message has a role other than system/user/assistant.
    #[error("{location}: message {index} has role `{role}` (expected one of system, user, assistant)")]
    InvalidRole { location: String, index: usize, role: String },
    /// A conversation has no messages.
    #[error("{location}: empty conversation")]
    EmptyConversation { location: String },
}
