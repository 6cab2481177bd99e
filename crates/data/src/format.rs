//! The old handbook's per-task formatting of dataset rows into text — the **legacy** path, used
//! only with the recipe key `legacy_formatting: true` (and for CPT's raw text column). Today's
//! handbook passes conversations to TRL unformatted; that default path is [`crate::sft`] and
//! [`crate::preference`]. With a template that has a default system prompt (SmolLM2, Qwen) the two
//! differ in every example: the empty system turn inserted here replaces that prompt, and DPO's
//! chosen/rejected rendered on their own carry the template's system prompt and role header.
//!
//! Reproduces `apply_chat_template(example, tokenizer, task, auto_insert_empty_system_msg)` and
//! `maybe_insert_system_message` of alignment-handbook v0.4 (`src/alignment/data.py`, the version
//! with the `prompt` column, the `orpo` task and the leading-BOS strip of chosen/rejected), plus
//! the continued-pretraining task, which uses a raw text column as `run_cpt.py` does:
//!
//! | task | row columns | output |
//! |---|---|---|
//! | `sft` | `messages` | `text` = template(messages) |
//! | `generation` | `messages` | `text` = template(messages, add_generation_prompt) |
//! | `rm` | `chosen`, `rejected` | template(chosen), template(rejected), each with the system turn inserted |
//! | `dpo`, `orpo` | `chosen`, `rejected`, optional `prompt` | see below |
//! | `cpt` | the text column (`text` by default) | that string, unchanged |
//!
//! `dpo`/`orpo`: when a `prompt` column holds a list of messages, prompt = `prompt`, chosen and
//! rejected = the whole `chosen`/`rejected` lists; otherwise (no `prompt`, or a string one, as in
//! UltraFeedback) prompt = `chosen[..-1]`, chosen = `chosen[-1..]`, rejected = `rejected[-1..]`.
//! The empty system turn goes into the prompt only; the prompt is rendered *without* the
//! generation prompt (as the handbook does); chosen and rejected are rendered on their own, and
//! lose a leading BOS text when they start with it.
//!
//! "Insert the empty system turn" means: when the first message is not a system message and the
//! template's source contains `system` or `<|im_start|>`, prepend `{"role": "system", "content": ""}`.
//!
//! Stricter than the handbook, with errors naming the dataset, row and column: a missing column,
//! a column that is not a list of `{role, content}` string objects (unknown keys included), a role
//! other than system/user/assistant, an empty conversation (also an empty prompt after the split,
//! where the handbook crashes with an IndexError) and, for preference rows, `chosen` and `rejected`
//! lists that differ anywhere before their last message. A `prompt` column that is a list but not
//! well-formed messages is an error here, where the handbook would silently fall back to the split.

use crate::chat_template::{validate_messages, ChatTemplate, Message};
use crate::error::DataError;
use serde_json::{Map, Value as Json};
use std::fmt;
use std::str::FromStr;

/// What a dataset row is formatted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Supervised fine-tuning: the whole conversation.
    Sft,
    /// Prompting: the conversation followed by the generation prompt.
    Generation,
    /// Reward modelling: two whole conversations.
    Rm,
    /// Direct preference optimisation: prompt, chosen, rejected.
    Dpo,
    /// Odds-ratio preference optimisation: formatted as DPO.
    Orpo,
    /// Continued pretraining: a raw text column.
    Cpt,
}

impl Task {
    /// Every task, in the order the handbook lists them (then `cpt`).
    pub const ALL: [Task; 6] = [Task::Sft, Task::Generation, Task::Rm, Task::Dpo, Task::Orpo, Task::Cpt];

    /// The handbook's name of the task.
    pub fn name(self) -> &'static str {
        match self {
            Task::Sft => "sft",
            Task::Generation => "generation",
            Task::Rm => "rm",
            Task::Dpo => "dpo",
            Task::Orpo => "orpo",
            Task::Cpt => "cpt",
        }
    }

    /// The columns a row must have for this task (`text_column` for `cpt`).
    pub fn required_columns(self, text_column: &str) -> Vec<&str> {
        match self {
            Task::Sft | Task::Generation => vec!["messages"],
            Task::Rm | Task::Dpo | Task::Orpo => vec!["chosen", "rejected"],
            Task::Cpt => vec![text_column],
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        Task::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| DataError::UnknownTask { name: s.to_string() })
    }
}

/// Where a row comes from, for errors: the dataset's name and the row's index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef<'a> {
    /// Dataset name (hub id or path).
    pub dataset: &'a str,
    /// Row index within the dataset (split).
    pub row: usize,
}

impl<'a> RowRef<'a> {
    /// A reference to `row` of `dataset`.
    pub fn new(dataset: &'a str, row: usize) -> Self {
        Self { dataset, row }
    }

    /// `dataset `name` row N, column `field``, the location errors print.
    pub fn column(&self, field: &str) -> String {
        format!("{self}, column `{field}`")
    }

    fn invalid(&self, field: &str, message: impl Into<String>) -> DataError {
        DataError::InvalidColumn { dataset: self.dataset.into(), row: self.row, column: field.into(), message: message.into() }
    }
}

impl fmt::Display for RowRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dataset `{}` row {}", self.dataset, self.row)
    }
}

/// Options of [`format_row`], with the handbook's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatOptions {
    /// `auto_insert_empty_system_msg` (handbook default: true).
    pub auto_insert_empty_system_msg: bool,
    /// The column `cpt` reads (`text_column`, default `text`).
    pub text_column: String,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self { auto_insert_empty_system_msg: true, text_column: "text".into() }
    }
}

/// A formatted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formatted {
    /// `sft`, `generation`, `cpt`: the handbook's `text` column.
    Text(String),
    /// `rm`: `text_chosen`, `text_rejected`.
    Pair { chosen: String, rejected: String },
    /// `dpo`, `orpo`: `text_prompt`, `text_chosen`, `text_rejected` (renamed prompt/chosen/rejected
    /// for TRL by the handbook's scripts).
    Preference { prompt: String, chosen: String, rejected: String },
}

impl Formatted {
    /// The `text` of `sft`/`generation`/`cpt` rows.
    pub fn text(&self) -> Option<&str> {
        match self {
            Formatted::Text(t) => Some(t),
            _ => None,
        }
    }
}

/// The messages of a preference row, split as the handbook does (before any system insertion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceMessages {
    /// The shared context.
    pub prompt: Vec<Message>,
    /// The preferred continuation.
    pub chosen: Vec<Message>,
    /// The dispreferred continuation.
    pub rejected: Vec<Message>,
}

/// Converts a JSON column into messages: it must be a list of objects with exactly the string
/// fields `role` and `content`, and every role one of system/user/assistant. An empty list is an
/// error. `at` and `field` name the row and column in errors.
pub fn messages_from_json(value: &Json, at: RowRef<'_>, field: &str) -> Result<Vec<Message>, DataError> {
    let messages = parse_messages(value, at, field)?;
    validate_messages(&messages, &at.column(field))?;
    Ok(messages)
}

/// Like [`messages_from_json`] but accepts an empty list.
fn parse_messages(value: &Json, at: RowRef<'_>, field: &str) -> Result<Vec<Message>, DataError> {
    let Json::Array(items) = value else {
        return Err(at.invalid(field, format!("expected a list of messages, found {}", json_kind(value))));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Json::Object(fields) = item else {
                return Err(at.invalid(field, format!("message {i} is {}, not an object with `role` and `content`", json_kind(item))));
            };
            if let Some(key) = fields.keys().find(|k| *k != "role" && *k != "content") {
                return Err(at.invalid(field, format!("message {i} has the unsupported key `{key}` (only `role` and `content` are read)")));
            }
            let string = |key: &str| match fields.get(key) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(other) => Err(at.invalid(field, format!("message {i}: `{key}` is {}, not a string", json_kind(other)))),
                None => Err(at.invalid(field, format!("message {i} has no `{key}`"))),
            };
            Ok(Message { role: string("role")?, content: string("content")? })
        })
        .collect()
}

fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn column<'r>(row: &'r Map<String, Json>, at: RowRef<'_>, task: Task, name: &str) -> Result<&'r Json, DataError> {
    row.get(name).ok_or_else(|| DataError::RowMissingColumn {
        dataset: at.dataset.into(),
        row: at.row,
        column: name.into(),
        task: task.name().into(),
        present: row.keys().cloned().collect::<Vec<_>>().join(", "),
    })
}

/// Whether [`maybe_insert_system_message`] would insert into a conversation that does not start
/// with a system turn: the template's source mentions `system` or `<|im_start|>`.
pub fn template_wants_system(template: &ChatTemplate) -> bool {
    let source = template.source();
    source.contains("system") || source.contains("<|im_start|>")
}

/// The handbook's `maybe_insert_system_message`: prepends an empty system turn unless the first
/// message is a system turn or the template never mentions one. An empty list is left as is.
pub fn maybe_insert_system_message(messages: &mut Vec<Message>, template: &ChatTemplate) {
    if messages.first().is_some_and(|m| m.role != "system") && template_wants_system(template) {
        messages.insert(0, Message::new("system", ""));
    }
}

/// Splits a preference row into prompt, chosen and rejected messages (see the module docs) and
/// checks it: both lists well-formed and non-empty, the same turns before their last message, a
/// non-empty prompt.
pub fn split_preference(row: &Map<String, Json>, task: Task, at: RowRef<'_>) -> Result<PreferenceMessages, DataError> {
    let chosen = messages_from_json(column(row, at, task, "chosen")?, at, "chosen")?;
    let rejected = messages_from_json(column(row, at, task, "rejected")?, at, "rejected")?;
    check_shared_prompt(&chosen, &rejected, at)?;
    match row.get("prompt") {
        Some(prompt @ Json::Array(_)) => {
            let prompt = messages_from_json(prompt, at, "prompt")?;
            Ok(PreferenceMessages { prompt, chosen, rejected })
        }
        _ => {
            let prompt = chosen[..chosen.len() - 1].to_vec();
            if prompt.is_empty() {
                return Err(DataError::EmptyConversation {
                    location: format!("{} (the prompt: every turn but the last; there is no `prompt` list)", at.column("chosen")),
                });
            }
            let chosen = chosen[chosen.len() - 1..].to_vec();
            let rejected = rejected[rejected.len() - 1..].to_vec();
            Ok(PreferenceMessages { prompt, chosen, rejected })
        }
    }
}

/// `chosen` and `rejected` must agree on every message but their last.
fn check_shared_prompt(chosen: &[Message], rejected: &[Message], at: RowRef<'_>) -> Result<(), DataError> {
    let (c, r) = (&chosen[..chosen.len() - 1], &rejected[..rejected.len() - 1]);
    let mismatch = |index: usize, what: String| DataError::PromptMismatch { dataset: at.dataset.into(), row: at.row, index, what };
    for (i, (a, b)) in c.iter().zip(r).enumerate() {
        if a.role != b.role {
            return Err(mismatch(i, format!("role `{}` vs `{}`", a.role, b.role)));
        }
        if a.content != b.content {
            return Err(mismatch(i, format!("content {:?} vs {:?}", preview(&a.content), preview(&b.content))));
        }
    }
    if c.len() != r.len() {
        return Err(mismatch(c.len().min(r.len()), format!("chosen has {} turns, rejected {}", chosen.len(), rejected.len())));
    }
    Ok(())
}

fn preview(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

fn strip_bos(text: String, template: &ChatTemplate) -> String {
    match template.bos_token() {
        Some(bos) if !bos.is_empty() && text.starts_with(bos) => text[bos.len()..].to_string(),
        _ => text,
    }
}

/// Formats one dataset row for `task` (see the module docs).
pub fn format_row(
    row: &Map<String, Json>,
    template: &ChatTemplate,
    task: Task,
    options: &FormatOptions,
    at: RowRef<'_>,
) -> Result<Formatted, DataError> {
    let insert = |messages: &mut Vec<Message>| {
        if options.auto_insert_empty_system_msg {
            maybe_insert_system_message(messages, template);
        }
    };
    match task {
        Task::Sft | Task::Generation => {
            let mut messages = messages_from_json(column(row, at, task, "messages")?, at, "messages")?;
            insert(&mut messages);
            Ok(Formatted::Text(template.render(&messages, task == Task::Generation)?))
        }
        Task::Rm => {
            let mut chosen = messages_from_json(column(row, at, task, "chosen")?, at, "chosen")?;
            let mut rejected = messages_from_json(column(row, at, task, "rejected")?, at, "rejected")?;
            insert(&mut chosen);
            insert(&mut rejected);
            Ok(Formatted::Pair { chosen: template.render(&chosen, false)?, rejected: template.render(&rejected, false)? })
        }
        Task::Dpo | Task::Orpo => {
            let PreferenceMessages { mut prompt, chosen, rejected } = split_preference(row, task, at)?;
            insert(&mut prompt);
            Ok(Formatted::Preference {
                prompt: template.render(&prompt, false)?,
                chosen: strip_bos(template.render(&chosen, false)?, template),
                rejected: strip_bos(template.render(&rejected, false)?, template),
            })
        }
        Task::Cpt => match column(row, at, task, &options.text_column)? {
            Json::String(text) => Ok(Formatted::Text(text.clone())),
            other => Err(at.invalid(&options.text_column, format!("expected a string, found {}", json_kind(other)))),
        },
    }
}
