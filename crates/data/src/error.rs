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
}
