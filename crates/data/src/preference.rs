//! Preference pairs to token ids, as TRL 1.16 prepares them for DPO and ORPO — what today's
//! handbook (`scripts/dpo.py`, `scripts/orpo.py`, which pass the rows to TRL unformatted) trains on.
//!
//! **Rows** ([`PreferenceRow::from_row`], TRL's `maybe_extract_prompt`): `chosen` and `rejected`
//! are both conversations or both strings. A `prompt` of the same kind is the explicit prompt;
//! otherwise (no `prompt`, or one of the other kind, such as UltraFeedback's string `prompt` beside
//! conversational pairs) the prompt is the longest shared prefix of `chosen` and `rejected`, whole
//! messages for conversations, characters for strings ([`extract_prompt`]), and each completion is
//! the rest. (TRL's `DPOTrainer` extracts only when there is no `prompt` column at all and fails on
//! a string `prompt` beside conversations; today's handbook recipes keep only `chosen` and
//! `rejected` for that reason. Its `ORPOTrainer` extracts as here.)
//!
//! **DPO** (`trl.DPOTrainer._prepare_dataset` + `DataCollatorForPreference`, [`tokenize_dpo_row`]):
//! - text rows: the EOS text is appended to chosen and rejected unless they end with it;
//!   `prompt`, `prompt + chosen` and `prompt + rejected` (string concatenation) are tokenized with
//!   the tokenizer's special tokens ([`tokenize_preference_text`]);
//! - conversational rows: the prompt is rendered with the generation prompt, `prompt + chosen` and
//!   `prompt + rejected` without, each tokenized without special tokens
//!   ([`tokenize_preference_conversation`]);
//! - then the prompt is the longest common prefix of the tokenized prompt with both full
//!   sequences, and each completion is the rest of its full sequence ([`PreferenceIds`]);
//! - rows whose prompt alone is `max_length` or longer are dropped under `keep_start`
//!   ([`PreferenceIds::kept`]);
//! - the collator concatenates prompt + completion, truncates each sequence to `max_length`
//!   (keep the start, or the end), and marks the completion ([`PreferenceIds::sequences`]).
//!
//! **ORPO** (`trl.experimental.orpo.ORPOTrainer`, [`tokenize_orpo_row`]): conversations are first
//! rendered to text as TRL's `apply_chat_template` does for an explicit prompt
//! ([`render_preference`]), then `ORPOTrainer.tokenize_row` tokenizes the texts
//! ([`tokenize_orpo`]).
//!
//! The old handbook's formatting (the legacy opt-in, [`crate::format`]) produces text rows, which
//! go through the same text paths.

use crate::chat_template::{ChatTemplate, Message};
use crate::error::DataError;
use crate::format::{messages_from_json, PreferenceMessages, RowRef};
pub use crate::tokenize::TruncationMode;
use crate::tokenize::{common_prefix_length, encode_ids, TokenizedExample, IGNORE_INDEX};
use serde_json::{Map, Value as Json};
use tokenizers::Tokenizer;

/// A tokenized preference pair before truncation (TRL's `prompt_ids`, `chosen_ids`,
/// `rejected_ids` dataset columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceIds {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

impl PreferenceIds {
    /// Splits the tokenized prompt and full sequences where they diverge, as TRL does: the prompt
    /// is the longest prefix the tokenized prompt shares with both full sequences.
    pub fn from_full(prompt: &[u32], prompt_chosen: &[u32], prompt_rejected: &[u32]) -> Self {
        let len = common_prefix_length(prompt, prompt_chosen).min(common_prefix_length(prompt, prompt_rejected));
        Self {
            prompt_ids: prompt[..len].to_vec(),
            chosen_ids: prompt_chosen[len..].to_vec(),
            rejected_ids: prompt_rejected[len..].to_vec(),
        }
    }

    /// Whether TRL keeps the row: under `keep_start` with a `max_length`, a prompt of
    /// `max_length` tokens or more would leave no completion, and the row is dropped.
    pub fn kept(&self, max_length: Option<usize>, mode: TruncationMode) -> bool {
        match (max_length, mode) {
            (Some(max), TruncationMode::KeepStart) => self.prompt_ids.len() < max,
            _ => true,
        }
    }

    /// The chosen and rejected training sequences: prompt + completion truncated to `max_length`
    /// by `mode`, labelled on the completion only (`IGNORE_INDEX` on the prompt), as
    /// `DataCollatorForPreference` builds `input_ids` and `completion_mask`.
    pub fn sequences(&self, max_length: Option<usize>, mode: TruncationMode) -> (TokenizedExample, TokenizedExample) {
        (self.sequence(&self.chosen_ids, max_length, mode), self.sequence(&self.rejected_ids, max_length, mode))
    }

    fn sequence(&self, completion: &[u32], max_length: Option<usize>, mode: TruncationMode) -> TokenizedExample {
        let input_ids: Vec<u32> = self.prompt_ids.iter().chain(completion).copied().collect();
        let labels: Vec<i64> =
            std::iter::repeat_n(IGNORE_INDEX, self.prompt_ids.len()).chain(completion.iter().map(|&id| id as i64)).collect();
        let range = match (max_length, mode) {
            (Some(max), TruncationMode::KeepStart) => 0..input_ids.len().min(max),
            (Some(max), TruncationMode::KeepEnd) => input_ids.len().saturating_sub(max)..input_ids.len(),
            (None, _) => 0..input_ids.len(),
        };
        TokenizedExample { input_ids: input_ids[range.clone()].to_vec(), labels: labels[range].to_vec() }
    }
}

/// TRL's DPO tokenization of a text (non-conversational) pair, e.g. the handbook's formatted
/// `text_prompt`/`text_chosen`/`text_rejected`. `eos_token` is the tokenizer's EOS text.
pub fn tokenize_preference_text(
    tokenizer: &Tokenizer,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    eos_token: Option<&str>,
    location: &str,
) -> Result<PreferenceIds, DataError> {
    let with_eos = |s: &str| match eos_token {
        Some(eos) if !s.ends_with(eos) => format!("{s}{eos}"),
        _ => s.to_string(),
    };
    let prompt_ids = encode_ids(tokenizer, prompt, true, location)?;
    let chosen_full = encode_ids(tokenizer, &format!("{prompt}{}", with_eos(chosen)), true, location)?;
    let rejected_full = encode_ids(tokenizer, &format!("{prompt}{}", with_eos(rejected)), true, location)?;
    Ok(PreferenceIds::from_full(&prompt_ids, &chosen_full, &rejected_full))
}

/// TRL's DPO tokenization of a conversational pair: `prompt` rendered with the generation
/// prompt, `prompt + chosen` and `prompt + rejected` rendered whole, none with added special
/// tokens (no handbook formatting, no system insertion: TRL used directly on messages).
pub fn tokenize_preference_conversation(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    prompt: &[Message],
    chosen: &[Message],
    rejected: &[Message],
    location: &str,
) -> Result<PreferenceIds, DataError> {
    tokenize_preference_conversation_with(template, tokenizer, prompt, chosen, rejected, &Map::new(), location)
}

/// [`tokenize_preference_conversation`] with extra template variables `kwargs` for every
/// rendering (TRL's `{"tools": ..., **example["chat_template_kwargs"]}`).
pub fn tokenize_preference_conversation_with(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    prompt: &[Message],
    chosen: &[Message],
    rejected: &[Message],
    kwargs: &Map<String, Json>,
    location: &str,
) -> Result<PreferenceIds, DataError> {
    let joined = |completion: &[Message]| prompt.iter().chain(completion).cloned().collect::<Vec<_>>();
    let prompt_ids = encode_ids(tokenizer, &template.render_with(prompt, true, kwargs)?, false, location)?;
    let chosen_full = encode_ids(tokenizer, &template.render_with(&joined(chosen), false, kwargs)?, false, location)?;
    let rejected_full = encode_ids(tokenizer, &template.render_with(&joined(rejected), false, kwargs)?, false, location)?;
    Ok(PreferenceIds::from_full(&prompt_ids, &chosen_full, &rejected_full))
}

/// A preference row as TRL reads it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreferenceRow {
    /// Conversations: prompt, chosen and rejected messages.
    Conversation(PreferenceMessages),
    /// Strings.
    Text { prompt: String, chosen: String, rejected: String },
}

impl PreferenceRow {
    /// Reads `row`'s `chosen`, `rejected` and optional `prompt` as TRL's `maybe_extract_prompt`
    /// does. `task` (`dpo`, `orpo`) names the task in errors. A pair with no shared prompt is an
    /// error (TRL would fail on the empty prompt).
    pub fn from_row(row: &Map<String, Json>, task: &str, at: RowRef<'_>) -> Result<Self, DataError> {
        let column = |name: &str| {
            row.get(name).ok_or_else(|| DataError::RowMissingColumn {
                dataset: at.dataset.into(),
                row: at.row,
                column: name.into(),
                task: task.into(),
                present: row.keys().cloned().collect::<Vec<_>>().join(", "),
            })
        };
        let no_prompt = || DataError::EmptyConversation {
            location: format!(
                "{at}: the prompt (`chosen` and `rejected` share no leading message or text, and there is no `prompt` of their kind)"
            ),
        };
        match (column("chosen")?, column("rejected")?) {
            (chosen @ Json::Array(_), rejected @ Json::Array(_)) => {
                let chosen = messages_from_json(chosen, at, "chosen")?;
                let rejected = messages_from_json(rejected, at, "rejected")?;
                if let Some(prompt @ Json::Array(_)) = row.get("prompt") {
                    let prompt = messages_from_json(prompt, at, "prompt")?;
                    return Ok(PreferenceRow::Conversation(PreferenceMessages { prompt, chosen, rejected }));
                }
                let (prompt, chosen, rejected) = extract_prompt(&chosen, &rejected, |_| false);
                if prompt.is_empty() {
                    return Err(no_prompt());
                }
                Ok(PreferenceRow::Conversation(PreferenceMessages { prompt, chosen, rejected }))
            }
            (Json::String(chosen), Json::String(rejected)) => {
                if let Some(Json::String(prompt)) = row.get("prompt") {
                    return Ok(PreferenceRow::Text { prompt: prompt.clone(), chosen: chosen.clone(), rejected: rejected.clone() });
                }
                let (c, r): (Vec<char>, Vec<char>) = (chosen.chars().collect(), rejected.chars().collect());
                let (prompt, chosen, rejected) = extract_prompt(&c, &r, |ch| *ch == ' ');
                if prompt.is_empty() {
                    return Err(no_prompt());
                }
                Ok(PreferenceRow::Text {
                    prompt: prompt.into_iter().collect(),
                    chosen: chosen.into_iter().collect(),
                    rejected: rejected.into_iter().collect(),
                })
            }
            _ => Err(DataError::InvalidColumn {
                dataset: at.dataset.into(),
                row: at.row,
                column: "chosen".into(),
                message: "`chosen` and `rejected` must both be lists of messages or both be strings".into(),
            }),
        }
    }
}

/// TRL's `extract_prompt`: the prompt is `chosen[..i]`, where `i` is the first index at which
/// `chosen` and `rejected` differ (one back when the item before it is a space, `is_space`, as TRL
/// does for strings), or the last index of the shorter one when they do not differ; the
/// completions are the rest. Empty inputs give an empty prompt.
pub fn extract_prompt<T: PartialEq + Clone>(chosen: &[T], rejected: &[T], is_space: impl Fn(&T) -> bool) -> (Vec<T>, Vec<T>, Vec<T>) {
    let shorter = chosen.len().min(rejected.len());
    let mut idx = shorter.saturating_sub(1);
    if let Some(first_difference) = (0..shorter).find(|&i| chosen[i] != rejected[i]) {
        idx = first_difference;
        // TRL reads chosen[idx - 1] (the last item when idx is 0, a Python negative index); an
        // empty prompt is refused by the callers either way, so only idx > 0 matters.
        if idx > 0 && is_space(&chosen[idx - 1]) {
            idx -= 1;
        }
    }
    (chosen[..idx].to_vec(), chosen[idx..].to_vec(), rejected[idx..].to_vec())
}

/// TRL's `apply_chat_template` of an explicit-prompt preference example (what `ORPOTrainer` runs
/// on conversations): the prompt rendered with the generation prompt when its last turn is the
/// user's, continuing the final message when it is the assistant's; `prompt + chosen` and
/// `prompt + rejected` rendered whole; the prompt text cut to what both share with it (templates
/// that render the prompt differently alone), and each completion the rest of its text.
pub fn render_preference(
    template: &ChatTemplate,
    messages: &PreferenceMessages,
    location: &str,
) -> Result<(String, String, String), DataError> {
    render_preference_with(template, messages, &Map::new(), location)
}

/// [`render_preference`] with extra template variables `kwargs` for every rendering (TRL's
/// `maybe_apply_chat_template` passes the row's `chat_template_kwargs`).
pub fn render_preference_with(
    template: &ChatTemplate,
    messages: &PreferenceMessages,
    kwargs: &Map<String, Json>,
    location: &str,
) -> Result<(String, String, String), DataError> {
    let PreferenceMessages { prompt, chosen, rejected } = messages;
    let prompt_text = match prompt.last().map(|m| m.role.as_str()) {
        Some("user" | "tool") => template.render_with(prompt, true, kwargs)?,
        Some("assistant") => template.render_continuing_with(prompt, kwargs)?,
        Some(other) => {
            return Err(DataError::PreferenceTokens {
                location: location.into(),
                message: format!("Invalid role in the last message: {other}"),
            })
        }
        None => return Err(DataError::EmptyConversation { location: format!("{location} (the prompt)") }),
    };
    let joined = |completion: &[Message]| prompt.iter().chain(completion).cloned().collect::<Vec<_>>();
    let prompt_chosen = template.render_with(&joined(chosen), false, kwargs)?;
    let prompt_rejected = template.render_with(&joined(rejected), false, kwargs)?;
    let shared = common_prefix_bytes(&prompt_text, &prompt_chosen).min(common_prefix_bytes(&prompt_text, &prompt_rejected));
    Ok((prompt_text[..shared].to_string(), prompt_chosen[shared..].to_string(), prompt_rejected[shared..].to_string()))
}

/// Byte length of the longest common prefix of `a` and `b`, in whole characters.
fn common_prefix_bytes(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}

/// TRL's DPO tokenization of a row (conversations or text, see the module docs); then
/// [`PreferenceIds::kept`] and [`PreferenceIds::sequences`] apply `max_length`.
pub fn tokenize_dpo_row(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    row: &PreferenceRow,
    location: &str,
) -> Result<PreferenceIds, DataError> {
    tokenize_dpo_row_with(template, tokenizer, row, &Map::new(), location)
}

/// [`tokenize_dpo_row`] with the row's extra template variables `kwargs` (its `tools` and
/// `chat_template_kwargs` columns, [`crate::chat_template::row_template_kwargs`] with tools),
/// which TRL passes to the renderings of conversational rows.
pub fn tokenize_dpo_row_with(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    row: &PreferenceRow,
    kwargs: &Map<String, Json>,
    location: &str,
) -> Result<PreferenceIds, DataError> {
    match row {
        PreferenceRow::Conversation(m) => {
            tokenize_preference_conversation_with(template, tokenizer, &m.prompt, &m.chosen, &m.rejected, kwargs, location)
        }
        PreferenceRow::Text { prompt, chosen, rejected } => {
            tokenize_preference_text(tokenizer, prompt, chosen, rejected, template.eos_token(), location)
        }
    }
}

/// TRL's ORPO preparation of a row: conversations rendered by [`render_preference`], then
/// [`tokenize_orpo`] on the texts.
#[allow(clippy::too_many_arguments)]
pub fn tokenize_orpo_row(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    row: &PreferenceRow,
    bos_id: Option<u32>,
    eos_id: u32,
    max_length: usize,
    location: &str,
) -> Result<OrpoExample, DataError> {
    tokenize_orpo_row_with(template, tokenizer, row, &Map::new(), bos_id, eos_id, max_length, location)
}

/// [`tokenize_orpo_row`] with the row's `chat_template_kwargs` as extra template variables
/// ([`crate::chat_template::row_template_kwargs`] without tools: ORPO's
/// `maybe_apply_chat_template` reads only that column).
#[allow(clippy::too_many_arguments)]
pub fn tokenize_orpo_row_with(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    row: &PreferenceRow,
    kwargs: &Map<String, Json>,
    bos_id: Option<u32>,
    eos_id: u32,
    max_length: usize,
    location: &str,
) -> Result<OrpoExample, DataError> {
    let (prompt, chosen, rejected) = match row {
        PreferenceRow::Conversation(m) => render_preference_with(template, m, kwargs, location)?,
        PreferenceRow::Text { prompt, chosen, rejected } => (prompt.clone(), chosen.clone(), rejected.clone()),
    };
    tokenize_orpo(tokenizer, &prompt, &chosen, &rejected, bos_id, eos_id, max_length, location)
}

/// An ORPO row as `ORPOTrainer.tokenize_row` leaves it: the prompt, and prompt + completion for
/// chosen and rejected with the prompt labelled `IGNORE_INDEX`. (ORPO's NLL term is computed on
/// every non-padding token of the chosen sequence, prompt included; its log-odds term on the
/// labels.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrpoExample {
    pub prompt_ids: Vec<u32>,
    pub chosen: TokenizedExample,
    pub rejected: TokenizedExample,
}

/// `build_tokenized_answer`: tokenize `prompt + answer` whole; the answer is what follows the
/// tokenized prompt, moved one token back when the last prompt token merged with the answer.
fn build_tokenized_answer(tokenizer: &Tokenizer, prompt: &str, answer: &str, location: &str) -> Result<(Vec<u32>, Vec<u32>), DataError> {
    let full = encode_ids(tokenizer, &format!("{prompt}{answer}"), false, location)?;
    let prompt_ids = encode_ids(tokenizer, prompt, false, location)?;
    if prompt_ids.len() > full.len() {
        return Err(DataError::PreferenceTokens {
            location: location.into(),
            message: "Prompt input ids and answer input ids should have the same length.".into(),
        });
    }
    let mut start = prompt_ids.len();
    if prompt_ids[..] != full[..start] {
        start -= 1;
    }
    Ok((full[..start].to_vec(), full[start..].to_vec()))
}

/// TRL 1.16's ORPO tokenization (`ORPOTrainer.tokenize_row`, decoder-only) of a text pair:
/// prompt and `prompt + completion` tokenized without special tokens (`build_tokenized_answer`),
/// the prompts of chosen and rejected required to differ in at most their last token, `bos_id`
/// prepended to each prompt that does not start with it, `eos_id` appended to each completion
/// that does not end with it, and each completion cut to `max_length - prompt length` when the
/// pair is longer than `max_length` (the prompt is never truncated).
#[allow(clippy::too_many_arguments)]
pub fn tokenize_orpo(
    tokenizer: &Tokenizer,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    bos_id: Option<u32>,
    eos_id: u32,
    max_length: usize,
    location: &str,
) -> Result<OrpoExample, DataError> {
    let mut prompt_ids = encode_ids(tokenizer, prompt, false, location)?;
    let (mut chosen_prompt, mut chosen_ids) = build_tokenized_answer(tokenizer, prompt, chosen, location)?;
    let (mut rejected_prompt, mut rejected_ids) = build_tokenized_answer(tokenizer, prompt, rejected, location)?;
    prompt_ids.truncate(chosen_prompt.len().min(rejected_prompt.len()));
    let num_diff_tokens = chosen_prompt.iter().zip(&rejected_prompt).filter(|(a, b)| a != b).count();
    let num_diff_len = chosen_prompt.len().abs_diff(rejected_prompt.len());
    if num_diff_tokens > 1 || num_diff_len > 1 {
        return Err(DataError::PreferenceTokens {
            location: location.into(),
            message: "Chosen and rejected prompt_input_ids might only differ on the last token due to tokenizer merge ops.".into(),
        });
    }
    if let Some(bos) = bos_id {
        for ids in [&mut prompt_ids, &mut chosen_prompt, &mut rejected_prompt] {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }
    for ids in [&mut chosen_ids, &mut rejected_ids] {
        if ids.last() != Some(&eos_id) {
            ids.push(eos_id);
        }
    }
    let sequence = |prompt: Vec<u32>, mut answer: Vec<u32>| {
        if prompt.len() + answer.len() > max_length {
            answer.truncate(max_length.saturating_sub(prompt.len()));
        }
        let labels = std::iter::repeat_n(IGNORE_INDEX, prompt.len()).chain(answer.iter().map(|&id| id as i64)).collect();
        TokenizedExample { input_ids: prompt.into_iter().chain(answer).collect(), labels }
    };
    Ok(OrpoExample { prompt_ids, chosen: sequence(chosen_prompt, chosen_ids), rejected: sequence(rejected_prompt, rejected_ids) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_ends_where_prompt_and_full_sequences_diverge() {
        // The tokenized prompt's last token merged with the chosen completion: the prompt is cut
        // back to the common prefix and that token goes with each completion, as TRL does.
        let ids = PreferenceIds::from_full(&[1, 2, 3], &[1, 2, 4, 5], &[1, 2, 3, 6]);
        assert_eq!(ids, PreferenceIds { prompt_ids: vec![1, 2], chosen_ids: vec![4, 5], rejected_ids: vec![3, 6] });
    }

    #[test]
    fn sequences_are_truncated_like_trl_collator() {
        let ids = PreferenceIds { prompt_ids: vec![1, 2, 3], chosen_ids: vec![4, 5, 6], rejected_ids: vec![7] };
        let (c, r) = ids.sequences(None, TruncationMode::KeepStart);
        assert_eq!((c.input_ids, c.labels), (vec![1, 2, 3, 4, 5, 6], vec![-100, -100, -100, 4, 5, 6]));
        assert_eq!((r.input_ids, r.labels), (vec![1, 2, 3, 7], vec![-100, -100, -100, 7]));
        let (c, r) = ids.sequences(Some(4), TruncationMode::KeepStart);
        assert_eq!((c.input_ids, c.labels), (vec![1, 2, 3, 4], vec![-100, -100, -100, 4]));
        assert_eq!(r.input_ids, vec![1, 2, 3, 7]);
        let (c, _) = ids.sequences(Some(4), TruncationMode::KeepEnd);
        assert_eq!((c.input_ids, c.labels), (vec![3, 4, 5, 6], vec![-100, 4, 5, 6]));
        // keep_start drops a row whose prompt fills max_length; keep_end keeps it.
        assert!(ids.kept(Some(4), TruncationMode::KeepStart));
        assert!(!ids.kept(Some(3), TruncationMode::KeepStart));
        assert!(ids.kept(Some(3), TruncationMode::KeepEnd));
        assert!("keep_middle".parse::<TruncationMode>().is_err());
    }
}
