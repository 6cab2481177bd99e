//! Preference pairs to token ids, as TRL 1.16 prepares them for DPO and ORPO.
//!
//! **DPO** (`trl.DPOTrainer._prepare_dataset` + `DataCollatorForPreference`):
//! - text rows (what the handbook's formatting produces, [`crate::format`]): the EOS text is
//!   appended to chosen and rejected unless they end with it; `prompt`, `prompt + chosen` and
//!   `prompt + rejected` (string concatenation) are tokenized with the tokenizer's special tokens
//!   ([`tokenize_preference_text`]);
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
//! **ORPO** (`trl.experimental.orpo.ORPOTrainer.tokenize_row`, on the handbook's text rows):
//! [`tokenize_orpo`].

use crate::chat_template::{ChatTemplate, Message};
use crate::error::DataError;
use crate::tokenize::{encode_ids, TokenizedExample, IGNORE_INDEX};
use tokenizers::Tokenizer;

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

/// A tokenized preference pair before truncation (TRL's `prompt_ids`, `chosen_ids`,
/// `rejected_ids` dataset columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceIds {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
    let joined = |completion: &[Message]| prompt.iter().chain(completion).cloned().collect::<Vec<_>>();
    let prompt_ids = encode_ids(tokenizer, &template.render(prompt, true)?, false, location)?;
    let chosen_full = encode_ids(tokenizer, &template.render(&joined(chosen), false)?, false, location)?;
    let rejected_full = encode_ids(tokenizer, &template.render(&joined(rejected), false)?, false, location)?;
    Ok(PreferenceIds::from_full(&prompt_ids, &chosen_full, &rejected_full))
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
