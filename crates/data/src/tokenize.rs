//! Conversations to token ids with assistant-only labels, as TRL's `assistant_only_loss`.
//!
//! The conversation is rendered once with the chat template; the character spans produced by
//! each assistant turn are found by rendering growing prefixes (`messages[..i]` with the
//! generation prompt, then `messages[..=i]`), so the method works for any template without
//! `{% generation %}` markers. Tokens whose characters fall inside an assistant span are
//! trained on; every other token gets the label `IGNORE_INDEX` (-100, as PyTorch and TRL).

use crate::chat_template::{validate_messages, ChatTemplate, Message};
use crate::error::DataError;
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
}

/// Byte ranges of `text` written by assistant turns (content and the template's closing tokens,
/// e.g. `<|im_end|>`, which the model must learn to emit).
pub fn assistant_spans(template: &ChatTemplate, messages: &[Message]) -> Result<Vec<(usize, usize)>, DataError> {
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if through.len() > before.len() && through.starts_with(&before) {
            spans.push((before.len(), through.len()));
        } else {
            return Err(DataError::TemplateRender {
                message: format!("the template's rendering of turn {i} does not extend the rendering of the turns before it; cannot locate the assistant's tokens"),
            });
        }
    }
    Ok(spans)
}

/// Tokenizes an SFT conversation. With `assistant_only`, only assistant tokens are labelled;
/// otherwise every token is (plain causal LM loss). Truncates to `max_length` tokens.
pub fn tokenize_conversation(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    assistant_only: bool,
    max_length: Option<usize>,
    location: &str,
) -> Result<TokenizedExample, DataError> {
    validate_messages(messages, location)?;
    let text = template.render(messages, false)?;
    let spans = if assistant_only { assistant_spans(template, messages)? } else { vec![(0, text.len())] };
    // The template writes BOS itself; like transformers' apply_chat_template(tokenize=True), add no special tokens.
    let encoding = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| DataError::Tokenizer { location: location.into(), message: e.to_string() })?;
    let mut input_ids = encoding.get_ids().to_vec();
    let mut labels: Vec<i64> = input_ids
        .iter()
        .zip(encoding.get_offsets())
        .map(|(&id, &(start, end))| {
            let inside = spans.iter().any(|&(s, e)| start >= s && end <= e && end > start);
            if inside { id as i64 } else { IGNORE_INDEX }
        })
        .collect();
    if let Some(max) = max_length {
        input_ids.truncate(max);
        labels.truncate(max);
    }
    Ok(TokenizedExample { input_ids, labels })
}

/// Tokenizes raw text for continued pretraining: every token is labelled; `eos` is appended
/// when given (so packed documents are separated, as the handbook's CPT does).
pub fn tokenize_text(tokenizer: &Tokenizer, text: &str, eos: Option<u32>, location: &str) -> Result<TokenizedExample, DataError> {
    let encoding =
        tokenizer.encode(text, false).map_err(|e| DataError::Tokenizer { location: location.into(), message: e.to_string() })?;
    let mut input_ids = encoding.get_ids().to_vec();
    input_ids.extend(eos);
    let labels = input_ids.iter().map(|&i| i as i64).collect();
    Ok(TokenizedExample { input_ids, labels })
}
