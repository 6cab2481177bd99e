//! GSM8K-style grade-school math: few-shot chain-of-thought prompts, greedy generation, exact
//! match of the final number — open-instruct's `eval/gsm/run_eval.py`:
//!
//! - rows are `{question, answer}` with the gold number after `####` in `answer` (GSM8K's
//!   layout); commas between digits are removed from it;
//! - the prompt is `"Answer the following questions.\n\n"` + the exemplars as
//!   `"Question: {q}\nAnswer: {chain of thought}"` joined by blank lines + `"\n\n"` (zero-shot:
//!   `"Answer the following question.\n\n"`), then `"Question: {question}"`; in chat format (the
//!   default, open-instruct's `--use_chat_format`) that is the user message, rendered with the
//!   generation prompt, and `"Answer:"` is appended (`" Answer:"` unless the rendered prompt ends
//!   with a space or newline); without, `"\nAnswer:"` follows and generation stops at a newline;
//! - the prediction is the last number in the output after removing commas between digits
//!   (`[-+]?\d*\.\d+|\d+`), or the whole output when it has none;
//! - it is right when equal to the gold number ignoring case and punctuation (Hugging Face
//!   `evaluate`'s `exact_match(ignore_case=True, ignore_punctuation=True)`).

use crate::error::EvalError;
use crate::model::{EvalModel, SamplingParams};
use crate::progress::Progress;
use crate::tasks::{mean_and_stderr, str_field, TaskResult};
use alignment_data::{Dataset, Message};
use burn::tensor::backend::Backend;
use regex::Regex;
use serde_json::json;
use std::sync::LazyLock;

static DIGIT_COMMA: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(\d),(\d)").expect("valid"));
static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[-+]?\d*\.\d+|\d+").expect("valid"));

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub question: String,
    /// The full answer (chain of thought, then `#### number`).
    pub solution: String,
    /// The number after `####`, commas removed.
    pub answer: String,
}

/// Reads `{question, answer}` rows.
pub fn problems(dataset: &Dataset) -> Result<Vec<Problem>, EvalError> {
    (0..dataset.len())
        .map(|i| {
            let question = str_field(dataset, i, "question")?.to_string();
            let solution = str_field(dataset, i, "answer")?.to_string();
            let answer = solution
                .split_once("####")
                .map(|(_, a)| DIGIT_COMMA.replace_all(a.trim(), "${1}${2}").into_owned())
                .ok_or_else(|| EvalError::row(&dataset.name, i, "`answer` has no `#### <number>` line"))?;
            Ok(Problem { question, solution, answer })
        })
        .collect()
}

/// The chain-of-thought text of an exemplar: its answer with `#### n` turned into the sentence
/// open-instruct's exemplars end with, `"So the answer is n."`.
pub fn chain_of_thought(problem: &Problem) -> String {
    let reasoning = problem.solution.split_once("####").map_or(problem.solution.as_str(), |(r, _)| r).trim();
    format!("{reasoning} So the answer is {}.", problem.answer)
}

/// The few-shot prefix: instructions and exemplars.
pub fn prompt_prefix(exemplars: &[Problem]) -> String {
    if exemplars.is_empty() {
        return "Answer the following question.\n\n".into();
    }
    let shots: Vec<String> = exemplars.iter().map(|e| format!("Question: {}\nAnswer: {}", e.question, chain_of_thought(e))).collect();
    format!("Answer the following questions.\n\n{}\n\n", shots.join("\n\n"))
}

/// open-instruct's answer extraction: the last number of `output` (commas between digits
/// removed), or the output itself when it has no number.
pub fn extract_answer(output: &str) -> String {
    let output = DIGIT_COMMA.replace_all(output, "${1}${2}");
    NUMBER.find_iter(&output).last().map_or_else(|| output.to_string(), |m| m.as_str().to_string())
}

/// `exact_match(ignore_case=True, ignore_punctuation=True)` of Hugging Face `evaluate`: both
/// strings lowercased and stripped of ASCII punctuation (`string.punctuation`), then compared.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    let normalize = |s: &str| s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect::<String>();
    normalize(prediction) == normalize(reference)
}

/// Options of the task.
#[derive(Debug, Clone)]
pub struct Gsm8kOptions {
    /// Exemplars taken from the start of the exemplar set (open-instruct: 8).
    pub shots: usize,
    /// Render the prompt with the chat template (open-instruct's `--use_chat_format`).
    pub chat: bool,
    /// Generation budget per problem (open-instruct: 512).
    pub max_new_tokens: usize,
    /// Strings that end an answer besides the model's stop tokens (open-instruct's
    /// `--additional_stop_sequence`, e.g. `<|eot_id|>` for a template whose end-of-turn marker is
    /// not an EOS id); the answer is cut before the first one.
    pub additional_stop: Vec<String>,
}

impl Default for Gsm8kOptions {
    fn default() -> Self {
        Self { shots: 8, chat: true, max_new_tokens: 512, additional_stop: Vec::new() }
    }
}

/// Greedy decoding within the budget, stopping at the additional stop strings and, for plain
/// prompts, at a newline — in chat format the model's end of turn ends the answer (as
/// open-instruct's `run_eval.py`).
fn sampling_params(options: &Gsm8kOptions) -> SamplingParams {
    let mut params = SamplingParams::greedy(options.max_new_tokens);
    params.stop = options.additional_stop.clone();
    if !options.chat {
        params.stop.push("\n".into());
    }
    params
}

/// Solves every problem of `dataset` with exemplars from `exemplars`; metric `exact_match`.
pub fn run<B: Backend>(
    model: &EvalModel<B>,
    dataset: &Dataset,
    exemplars: &[Problem],
    options: &Gsm8kOptions,
    quiet: bool,
) -> Result<TaskResult, EvalError> {
    let problems = problems(dataset)?;
    let prefix = prompt_prefix(&exemplars[..options.shots.min(exemplars.len())]);
    let mut prompts = Vec::with_capacity(problems.len());
    let mut texts = Vec::with_capacity(problems.len());
    for (i, p) in problems.iter().enumerate() {
        let location = format!("{} row {i}", dataset.name);
        let text = if options.chat {
            let rendered = model.template.render(&[Message::new("user", format!("{prefix}Question: {}", p.question.trim()))], true)?;
            let answer = if rendered.ends_with('\n') || rendered.ends_with(' ') { "Answer:" } else { " Answer:" };
            format!("{rendered}{answer}")
        } else {
            format!("{prefix}Question: {}\nAnswer:", p.question.trim())
        };
        // The chat template writes its own special tokens; a plain prompt gets the tokenizer's.
        prompts.push(if options.chat { model.encode_with(&text, false, &location)? } else { model.encode(&text, &location)? });
        texts.push(text);
    }
    let params = sampling_params(options);
    let progress = Progress::new("gsm8k", problems.len() as u64, quiet);
    let outputs = model.generate(&prompts, &params, &progress)?;
    progress.finish();
    let mut scores = Vec::with_capacity(problems.len());
    let mut result = TaskResult::new("gsm8k", &dataset.name, problems.len());
    for ((p, output), text) in problems.iter().zip(&outputs).zip(&texts) {
        let prediction = extract_answer(&output.text);
        let correct = exact_match(&prediction, &p.answer);
        scores.push(f64::from(correct));
        result.samples.push(json!({"prompt": text, "question": p.question, "answer": p.answer, "model_output": output.text, "prediction": prediction, "correct": correct}));
    }
    let (m, se) = mean_and_stderr(&scores);
    result.metric("exact_match", m).metric("exact_match_stderr", se);
    result.metric("mean_output_tokens", outputs.iter().map(|o| o.num_tokens as f64).sum::<f64>() / outputs.len().max(1) as f64);
    result.notes.push(format!("{} exemplars, {} format", options.shots.min(exemplars.len()), if options.chat { "chat" } else { "plain" }));
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_takes_the_last_number_without_thousands_commas() {
        assert_eq!(extract_answer("She pays 3 * 4 = 12 dollars, so 1,234,567 in all."), "1234567");
        assert_eq!(extract_answer("The answer is -3.5."), "-3.5");
        assert_eq!(extract_answer("So the answer is 18."), "18");
        assert_eq!(extract_answer("no digits here"), "no digits here");
        // Python's re.sub leaves "1,2,3" as "12,3": the matches do not overlap.
        assert_eq!(extract_answer("1,2,3"), "3");
        assert_eq!(DIGIT_COMMA.replace_all("1,2,3", "${1}${2}"), "12,3");
    }

    #[test]
    fn additional_stop_strings_join_the_plain_prompts_newline() {
        let chat = Gsm8kOptions { additional_stop: vec!["<|eot_id|>".into()], ..Default::default() };
        assert_eq!(sampling_params(&chat).stop, ["<|eot_id|>"]);
        assert_eq!(sampling_params(&Gsm8kOptions { chat: false, ..chat }).stop, ["<|eot_id|>", "\n"]);
        assert!(sampling_params(&Gsm8kOptions::default()).stop.is_empty());
        assert_eq!(sampling_params(&Gsm8kOptions::default()).max_new_tokens, 512);
    }

    #[test]
    fn exact_match_ignores_case_and_punctuation() {
        assert!(exact_match("18", "18"));
        assert!(exact_match("-5", "5"), "`-` is punctuation, as in evaluate's exact_match");
        assert!(!exact_match("18", "180"));
        assert!(exact_match("3.5", "35"));
    }

    #[test]
    fn prompts_follow_open_instruct() {
        let e = Problem { question: "1+1?".into(), solution: "1+1=2.\n#### 2".into(), answer: "2".into() };
        assert_eq!(
            prompt_prefix(std::slice::from_ref(&e)),
            "Answer the following questions.\n\nQuestion: 1+1?\nAnswer: 1+1=2. So the answer is 2.\n\n"
        );
        assert_eq!(prompt_prefix(&[]), "Answer the following question.\n\n");
        let rows: Vec<alignment_data::Row> = serde_json::from_str(r#"[{"question": "q", "answer": "x\n#### 1,200"}]"#).unwrap();
        assert_eq!(problems(&Dataset::from_rows("d", rows)).unwrap()[0].answer, "1200");
        let rows: Vec<alignment_data::Row> = serde_json::from_str(r#"[{"question": "q", "answer": "no marker"}]"#).unwrap();
        assert!(problems(&Dataset::from_rows("d", rows)).unwrap_err().to_string().contains("d row 0"));
    }
}
