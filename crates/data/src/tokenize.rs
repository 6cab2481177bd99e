//! Text and conversations to token ids and labels, as TRL 1.16's `SFTTrainer` prepares them.
//!
//! Two kinds of rows, as in TRL:
//! - text rows ([`tokenize_lm_text`]): the handbook's formatted `text` column (SFT) or raw text
//!   (CPT); EOS text appended when missing, tokenized with special tokens, every token labelled;
//! - conversations ([`tokenize_conversation`]): rendered with the chat template, tokenized
//!   without special tokens; with `assistant_only` only the assistant's tokens are labelled
//!   (TRL's `assistant_only_loss`): those overlapping what the template's `{% generation %}`
//!   blocks wrote, as transformers' `return_assistant_tokens_mask` finds them.
//!
//! Both truncate to `max_length` keeping the start (TRL's default `truncation_mode`). Tokens that
//! do not count in the loss get the label `IGNORE_INDEX` (-100, as PyTorch and TRL).

use crate::chat_template::{validate_messages, ChatTemplate, Message};
use crate::error::DataError;
use serde_json::{Map, Value as Json};
use tokenizers::Tokenizer;

/// Label of tokens that do not contribute to the loss.
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Token ids of the rendered conversation.
    pub input_ids: Vec<u32>,
    /// Same length: the id to predict at this position, or `IGNORE_INDEX`.
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    /// Number of tokens that count in the loss.
    pub fn num_trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Renders `messages` (with extra template variables `kwargs`) and finds the assistant's text as
/// TRL 1.16's `assistant_only_loss` does: the byte ranges the template's `{% generation %}`
/// blocks wrote ([`ChatTemplate::render_with_generation_spans`]). A template without such blocks
/// is refused with TRL's error ([`DataError::TemplateNotTrainable`]).
pub fn render_with_assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
    kwargs: &Map<String, Json>,
) -> Result<(String, Vec<(usize, usize)>), DataError> {
    if !template.has_generation_markers() {
        return Err(DataError::TemplateNotTrainable { name: template.name().into() });
    }
    template.render_with_generation_spans(messages, false, kwargs)
}

/// Which tokens overlap one of `spans` (byte ranges), given each token's byte `offsets`: the rule
/// of transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` (5.x): a token is
/// an assistant token when its offsets overlap a span, so a token straddling the start or end of a
/// span (merged across the boundary) counts as the assistant's.
pub fn overlap_mask(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    let mut mask = vec![false; offsets.len()];
    let mut span = 0;
    for (i, &(start, end)) in offsets.iter().enumerate() {
        while span < spans.len() && start >= spans[span].1 {
            span += 1;
        }
        if span == spans.len() {
            break;
        }
        mask[i] = end > spans[span].0;
    }
    mask
}

/// Which end of a too-long sequence truncation keeps (TRL's `truncation_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationMode {
    /// `keep_start` (TRL's default): drop tokens from the end.
    #[default]
    KeepStart,
    /// `keep_end` (deprecated in TRL 1.16): drop tokens from the start.
    KeepEnd,
}

impl std::str::FromStr for TruncationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep_start" => Ok(Self::KeepStart),
            "keep_end" => Ok(Self::KeepEnd),
            other => Err(format!("Unsupported truncation mode: {other}, expected 'keep_start' or 'keep_end'")),
        }
    }
}

/// Number of leading ids `a` and `b` share (TRL's `common_prefix_length`): where a completion
/// starts when the tokenized prompt is not a prefix of the tokenized prompt + completion.
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub(crate) fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    add_special_tokens: bool,
    location: &str,
) -> Result<tokenizers::Encoding, DataError> {
    tokenizer.encode(text, add_special_tokens).map_err(|e| DataError::Tokenizer { location: location.into(), message: e.to_string() })
}

/// Token ids of `text` as `tokenizer(text, add_special_tokens=...)` gives them in transformers.
pub fn encode_ids(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool, location: &str) -> Result<Vec<u32>, DataError> {
    Ok(encode(tokenizer, text, add_special_tokens, location)?.get_ids().to_vec())
}

/// Tokenizes an SFT conversation as TRL 1.16's `SFTTrainer` does for a conversational
/// (`messages`) dataset: the rendered conversation is tokenized without adding special tokens
/// (the template writes them), and truncated to `max_length` keeping the start.
///
/// With `assistant_only` (TRL's `assistant_only_loss=True`), only assistant tokens are labelled:
/// those overlapping a span the template's `{% generation %}` blocks wrote
/// ([`render_with_assistant_spans`], [`overlap_mask`]), as transformers'
/// `return_assistant_tokens_mask` marks them; a template without such blocks is an error, as in
/// TRL. Without `assistant_only`, every token is labelled.
///
/// TRL drops an example whose labels are all `IGNORE_INDEX` after truncation; check
/// [`TokenizedExample::num_trained_tokens`] to do the same.
pub fn tokenize_conversation(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    assistant_only: bool,
    max_length: Option<usize>,
    location: &str,
) -> Result<TokenizedExample, DataError> {
    tokenize_conversation_with(template, tokenizer, messages, &Map::new(), assistant_only, max_length, location)
}

/// [`tokenize_conversation`] with extra template variables (a row's `chat_template_kwargs`, see
/// [`crate::chat_template::row_template_kwargs`]).
pub fn tokenize_conversation_with(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    kwargs: &Map<String, Json>,
    assistant_only: bool,
    max_length: Option<usize>,
    location: &str,
) -> Result<TokenizedExample, DataError> {
    validate_messages(messages, location)?;
    let (text, spans) = if assistant_only {
        render_with_assistant_spans(template, messages, kwargs)?
    } else {
        (template.render_with(messages, false, kwargs)?, Vec::new())
    };
    let encoding = encode(tokenizer, &text, false, location)?;
    let mut input_ids = encoding.get_ids().to_vec();
    let mut labels: Vec<i64> = if assistant_only {
        let mask = overlap_mask(encoding.get_offsets(), &spans);
        input_ids.iter().zip(mask).map(|(&id, m)| if m { id as i64 } else { IGNORE_INDEX }).collect()
    } else {
        input_ids.iter().map(|&id| id as i64).collect()
    };
    if let Some(max) = max_length {
        input_ids.truncate(max);
        labels.truncate(max);
    }
    Ok(TokenizedExample { input_ids, labels })
}

/// Tokenizes the text of a language-modelling row as TRL 1.16's `SFTTrainer` does for a
/// non-conversational dataset (the handbook's `text` column for SFT, the raw text for CPT):
/// `eos_token` is appended to the *text* unless it already ends with it, the text is tokenized
/// with the tokenizer's special tokens (its post-processor, e.g. Llama's BOS), every token is
/// labelled, and the result is truncated to `max_length` keeping the start.
pub fn tokenize_lm_text(
    tokenizer: &Tokenizer,
    text: &str,
    eos_token: Option<&str>,
    max_length: Option<usize>,
    location: &str,
) -> Result<TokenizedExample, DataError> {
    let ids = match eos_token {
        Some(eos) if !text.ends_with(eos) => encode_ids(tokenizer, &format!("{text}{eos}"), true, location)?,
        _ => encode_ids(tokenizer, text, true, location)?,
    };
    let mut input_ids = ids;
    if let Some(max) = max_length {
        input_ids.truncate(max);
    }
    let labels = input_ids.iter().map(|&i| i as i64).collect();
    Ok(TokenizedExample { input_ids, labels })
}

/// Tokenizes raw text without special tokens, labels every token and appends the `eos` id when
/// given. (TRL's own handling of text rows is [`tokenize_lm_text`].)
pub fn tokenize_text(tokenizer: &Tokenizer, text: &str, eos: Option<u32>, location: &str) -> Result<TokenizedExample, DataError> {
    let mut input_ids = encode_ids(tokenizer, text, false, location)?;
    input_ids.extend(eos);
    let labels = input_ids.iter().map(|&i| i as i64).collect();
    Ok(TokenizedExample { input_ids, labels })
}
