//! SFT dataset rows to token ids and labels, as TRL 1.16's `SFTTrainer._prepare_dataset` builds
//! them — what today's handbook (`scripts/sft.py`, which passes the rows to TRL unformatted) trains
//! on.
//!
//! A row is one of TRL's dataset types ([`SftRow::from_row`]):
//!
//! | row | TRL's type | tokens | labelled (before the masks below) |
//! |---|---|---|---|
//! | `messages`: a conversation | conversational language modeling | the rendered conversation, no special tokens added | every token |
//! | `prompt` + `completion`, both conversations | conversational prompt-completion | `prompt + completion` rendered | every token |
//! | `prompt` + `completion`, both strings | prompt-completion | `prompt + completion + EOS` (EOS text added unless there), with special tokens | every token |
//! | the `dataset_text_field` column (`text`), a string | language modeling | the text + EOS text unless it ends with it, with special tokens | every token |
//!
//! Then, as TRL's `build_labels`: with `completion_only_loss` (TRL's default `None` means *on* for
//! prompt-completion rows) the prompt is masked — the prompt is the longest common prefix of the
//! tokenized prompt (conversations: rendered with the generation prompt) and the tokenized
//! `prompt + completion`; with `assistant_only_loss` (conversations only) only the assistant turns'
//! tokens stay labelled: those the template's `{% generation %}` blocks wrote (see
//! [`crate::tokenize::tokenize_conversation`]); a template without such blocks, and a row with no
//! assistant token, are errors, as TRL raises. Masked labels are `IGNORE_INDEX`.
//!
//! A row's `chat_template_kwargs` (and `tools`) reach the template through
//! [`tokenize_sft_row_with`]; TRL's `SFTConfig.eos_token` is [`override_eos_token`].
//!
//! Without packing, `input_ids` and labels are truncated to `max_length` by `truncation_mode`, and
//! a row left with no label is dropped ([`tokenize_sft_row`] returns `None`). With packing, rows
//! are left whole (the packer cuts them).
//!
//! A `messages` row is read as a conversation whatever other columns it has: ultrachat's rows also
//! carry a string `prompt`, which today's handbook recipes drop (`columns: [messages]`) because
//! TRL would otherwise take the row for a prompt-completion one and fail on the missing
//! `completion`.

use crate::chat_template::{ChatTemplate, Message};
use crate::error::DataError;
use crate::format::{messages_from_json, RowRef};
use crate::tokenize::{
    common_prefix_length, encode, encode_ids, overlap_mask, render_with_assistant_spans, tokenize_conversation_with, TokenizedExample,
    TruncationMode, IGNORE_INDEX,
};
use serde_json::{Map, Value as Json};
use tokenizers::Tokenizer;

/// TRL's `SFTConfig` settings that shape the examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftOptions {
    /// `max_length` (TRL's default 1024); `None`: no truncation.
    pub max_length: Option<usize>,
    /// Which end truncation keeps.
    pub truncation_mode: TruncationMode,
    /// Whether the rows will be packed (then they are not truncated or dropped here).
    pub packing: bool,
    /// `assistant_only_loss`: label only the assistant turns (conversations only).
    pub assistant_only_loss: bool,
    /// `completion_only_loss`: `None` (TRL's default) masks the prompt of prompt-completion rows.
    pub completion_only_loss: Option<bool>,
    /// `dataset_text_field`: the column of plain-text rows.
    pub dataset_text_field: String,
}

impl Default for SftOptions {
    fn default() -> Self {
        Self {
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
            packing: false,
            assistant_only_loss: false,
            completion_only_loss: None,
            dataset_text_field: "text".into(),
        }
    }
}

/// An SFT row, read as TRL tells its dataset types apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftRow {
    /// `messages`: a whole conversation.
    Conversation(Vec<Message>),
    /// `prompt` and `completion` conversations.
    ConversationalPromptCompletion { prompt: Vec<Message>, completion: Vec<Message> },
    /// `prompt` and `completion` strings.
    PromptCompletion { prompt: String, completion: String },
    /// The text column.
    Text(String),
}

impl SftRow {
    /// Reads `row`: `messages` if present, else `prompt` + `completion`, else the text field.
    pub fn from_row(row: &Map<String, Json>, text_field: &str, at: RowRef<'_>) -> Result<Self, DataError> {
        if let Some(messages) = row.get("messages") {
            return Ok(SftRow::Conversation(messages_from_json(messages, at, "messages")?));
        }
        match (row.get("prompt"), row.get("completion")) {
            (Some(Json::String(prompt)), Some(Json::String(completion))) => {
                return Ok(SftRow::PromptCompletion { prompt: prompt.clone(), completion: completion.clone() });
            }
            (Some(prompt @ Json::Array(_)), Some(completion @ Json::Array(_))) => {
                return Ok(SftRow::ConversationalPromptCompletion {
                    prompt: messages_from_json(prompt, at, "prompt")?,
                    completion: messages_from_json(completion, at, "completion")?,
                });
            }
            (Some(_), Some(_)) => {
                return Err(DataError::InvalidColumn {
                    dataset: at.dataset.into(),
                    row: at.row,
                    column: "prompt".into(),
                    message: "`prompt` and `completion` must both be strings or both be lists of messages".into(),
                })
            }
            _ => {}
        }
        match row.get(text_field) {
            Some(Json::String(text)) => Ok(SftRow::Text(text.clone())),
            Some(_) => Err(DataError::InvalidColumn {
                dataset: at.dataset.into(),
                row: at.row,
                column: text_field.into(),
                message: "expected a string".into(),
            }),
            None => Err(DataError::RowMissingColumn {
                dataset: at.dataset.into(),
                row: at.row,
                column: format!("messages` (or `prompt` + `completion`, or `{text_field}`"),
                task: "sft".into(),
                present: row.keys().cloned().collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Whether TRL would take the row for a conversational one.
    pub fn is_conversational(&self) -> bool {
        matches!(self, SftRow::Conversation(_) | SftRow::ConversationalPromptCompletion { .. })
    }
}

/// `ids` and `labels` cut to `max_length` by `mode` (TRL's `truncate`); no-op when they fit.
pub fn truncate(example: &mut TokenizedExample, max_length: usize, mode: TruncationMode) {
    let len = example.input_ids.len();
    if len <= max_length {
        return;
    }
    let range = match mode {
        TruncationMode::KeepStart => 0..max_length,
        TruncationMode::KeepEnd => len - max_length..len,
    };
    example.input_ids = example.input_ids[range.clone()].to_vec();
    example.labels = example.labels[range].to_vec();
}

/// Tokenizes one SFT row as TRL's `SFTTrainer` does (see the module docs). `None`: TRL drops the
/// row (no label left after truncation). `eos_token` is the tokenizer's EOS text.
pub fn tokenize_sft_row(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    row: &SftRow,
    options: &SftOptions,
    eos_token: Option<&str>,
    at: RowRef<'_>,
) -> Result<Option<TokenizedExample>, DataError> {
    tokenize_sft_row_with(template, tokenizer, row, &Map::new(), options, eos_token, at)
}

/// [`tokenize_sft_row`] with the row's extra template variables `kwargs` (its `tools` and
/// `chat_template_kwargs` columns, [`crate::chat_template::row_template_kwargs`] with tools),
/// which TRL passes to every rendering of a conversational row.
pub fn tokenize_sft_row_with(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    row: &SftRow,
    kwargs: &Map<String, Json>,
    options: &SftOptions,
    eos_token: Option<&str>,
    at: RowRef<'_>,
) -> Result<Option<TokenizedExample>, DataError> {
    let location = at.to_string();
    if options.assistant_only_loss && !row.is_conversational() {
        return Err(DataError::InvalidColumn {
            dataset: at.dataset.into(),
            row: at.row,
            column: options.dataset_text_field.clone(),
            message: "`assistant_only_loss` needs conversations (`messages`, or `prompt`/`completion` lists of messages); \
                      TRL refuses plain-text rows too"
                .into(),
        });
    }
    let mut example = match row {
        SftRow::Conversation(messages) => {
            let example = tokenize_conversation_with(template, tokenizer, messages, kwargs, options.assistant_only_loss, None, &location)?;
            if options.assistant_only_loss && example.num_trained_tokens() == 0 {
                return Err(no_assistant_token(at, "messages"));
            }
            example
        }
        SftRow::ConversationalPromptCompletion { prompt, completion } => {
            let prompt_ids = encode_ids(tokenizer, &template.render_with(prompt, true, kwargs)?, false, &location)?;
            let joined: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
            let (text, spans) = if options.assistant_only_loss {
                render_with_assistant_spans(template, &joined, kwargs)?
            } else {
                (template.render_with(&joined, false, kwargs)?, Vec::new())
            };
            let encoding = encode(tokenizer, &text, false, &location)?;
            let ids = encoding.get_ids().to_vec();
            let assistant = options.assistant_only_loss.then(|| overlap_mask(encoding.get_offsets(), &spans));
            if assistant.as_ref().is_some_and(|mask| !mask.contains(&true)) {
                return Err(no_assistant_token(at, "completion"));
            }
            labelled(ids, Some(common_prefix_length(&prompt_ids, encoding.get_ids())), assistant, options)
        }
        SftRow::PromptCompletion { prompt, completion } => {
            let completion = match eos_token {
                Some(eos) if !completion.ends_with(eos) => format!("{completion}{eos}"),
                _ => completion.clone(),
            };
            let prompt_ids = encode_ids(tokenizer, prompt, true, &location)?;
            let ids = encode_ids(tokenizer, &format!("{prompt}{completion}"), true, &location)?;
            let prompt_len = common_prefix_length(&prompt_ids, &ids);
            labelled(ids, Some(prompt_len), None, options)
        }
        SftRow::Text(text) => crate::tokenize::tokenize_lm_text(tokenizer, text, eos_token, None, &location)?,
    };
    match options.max_length {
        Some(max) if !options.packing => {
            truncate(&mut example, max, options.truncation_mode);
            Ok((example.num_trained_tokens() > 0).then_some(example))
        }
        _ => Ok(Some(example)),
    }
}

fn no_assistant_token(at: RowRef<'_>, column: &str) -> DataError {
    DataError::InvalidColumn {
        dataset: at.dataset.into(),
        row: at.row,
        column: column.into(),
        message: "You're using `assistant_only_loss=True`, but at least one example has no assistant tokens (no token of the \
                  conversation lies in the chat template's {% generation %} blocks; TRL raises the same)"
            .into(),
    }
}

/// TRL's `SFTConfig.eos_token`: the template rendering with `eos_token` as the tokenizer's EOS
/// text ([`ChatTemplate::with_eos_token`]; its `eos_token` variable, and the EOS text appended to
/// text rows, pass [`ChatTemplate::eos_token`] to [`tokenize_sft_row`]) and the token's id, which
/// the model's `eos_token_id` (and generation config) should then be set to, as TRL does. A token
/// the tokenizer's vocabulary lacks is refused with TRL's error.
pub fn override_eos_token(template: &ChatTemplate, tokenizer: &Tokenizer, eos_token: &str) -> Result<(ChatTemplate, u32), DataError> {
    let id = tokenizer.token_to_id(eos_token).ok_or_else(|| DataError::UnknownToken {
        key: "eos_token".into(),
        message: format!(
            "The specified `eos_token` ('{eos_token}') is not found in the vocabulary of the given `processing_class`. \
             Ensure that the `eos_token` exists in the vocabulary before using it as an EOS token."
        ),
    })?;
    Ok((template.with_eos_token(eos_token), id))
}

/// Labels of a prompt-completion row: the ids, masked on the first `prompt_len` tokens when
/// `completion_only_loss` applies and outside the assistant turns when `assistant` is given.
fn labelled(ids: Vec<u32>, prompt_len: Option<usize>, assistant: Option<Vec<bool>>, options: &SftOptions) -> TokenizedExample {
    let completion_only = options.completion_only_loss.unwrap_or(true);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let in_prompt = completion_only && prompt_len.is_some_and(|n| i < n);
            let outside_assistant = assistant.as_ref().is_some_and(|mask| !mask[i]);
            if in_prompt || outside_assistant {
                IGNORE_INDEX
            } else {
                id as i64
            }
        })
        .collect();
    TokenizedExample { input_ids: ids, labels }
}
