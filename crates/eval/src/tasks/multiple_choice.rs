//! Log-likelihood multiple choice, scored as lm-evaluation-harness scores `multiple_choice` tasks
//! (MMLU, ARC, HellaSwag, TruthfulQA-MC1): each choice is a continuation `" " + choice` of the
//! question's context; the prediction is the choice of highest log-likelihood (`acc`) or of highest
//! log-likelihood per character of the choice (`acc_norm`, `lls / len(choice)`).
//!
//! Rows are read in MMLU's layout (`question`, `choices` list, `answer` index) or ARC's
//! (`question`, `choices: {text, label}`, `answerKey`). Two prompt styles:
//! - [`PromptStyle::Cloze`] (ARC, the default): `"Question: {question}\nAnswer:"`, continuations
//!   the choice texts;
//! - [`PromptStyle::Letters`] (MMLU): `"{question}\nA. {c0}\nB. {c1}\n...Answer:"`, continuations
//!   the letters, after the description `"The following are multiple choice questions (with
//!   answers) about {subject}.\n\n"` when rows have a `subject`.

use crate::error::EvalError;
use crate::loglikelihood::LoglikelihoodRequest;
use crate::model::EvalModel;
use crate::progress::Progress;
use crate::tasks::{mean_and_stderr, TaskResult};
use alignment_data::Dataset;
use burn::tensor::backend::Backend;
use serde_json::{json, Value};

/// How the question and choices become a context and continuations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptStyle {
    /// `Question: ...\nAnswer:` + ` choice text` (lm-evaluation-harness' ARC).
    #[default]
    Cloze,
    /// The choices listed with letters, continuations ` A`, ` B`, ... (lm-evaluation-harness' MMLU).
    Letters,
}

impl std::str::FromStr for PromptStyle {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, EvalError> {
        match s {
            "cloze" => Ok(Self::Cloze),
            "letters" => Ok(Self::Letters),
            other => Err(EvalError::Config(format!("unknown multiple-choice style `{other}` (expected cloze or letters)"))),
        }
    }
}

/// One question.
#[derive(Debug, Clone, PartialEq)]
pub struct McQuestion {
    pub question: String,
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub gold: usize,
    /// MMLU's subject, if given.
    pub subject: Option<String>,
}

/// Reads the rows of `dataset` as questions (MMLU or ARC layout).
pub fn questions(dataset: &Dataset) -> Result<Vec<McQuestion>, EvalError> {
    dataset
        .rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let bad = |m: String| EvalError::row(&dataset.name, i, m);
            let question = row.get("question").and_then(Value::as_str).ok_or_else(|| bad("no string `question`".into()))?.to_string();
            let (choices, labels): (Vec<String>, Vec<String>) = match row.get("choices") {
                Some(Value::Array(items)) => {
                    let texts = items.iter().map(|c| c.as_str().map(String::from)).collect::<Option<Vec<_>>>();
                    (texts.ok_or_else(|| bad("`choices` must be a list of strings".into()))?, vec![])
                }
                Some(Value::Object(arc)) => {
                    let list = |key: &str| {
                        arc.get(key)
                            .and_then(Value::as_array)
                            .and_then(|a| a.iter().map(|c| c.as_str().map(String::from)).collect::<Option<Vec<_>>>())
                    };
                    (list("text").ok_or_else(|| bad("`choices.text` must be a list of strings".into()))?, list("label").unwrap_or_default())
                }
                _ => return Err(bad("no `choices` (a list of strings, or {text, label})".into())),
            };
            if choices.len() < 2 {
                return Err(bad(format!("{} choice(s); a question needs at least two", choices.len())));
            }
            let present = |key: &str| row.get(key).filter(|v| !v.is_null());
            let gold = match (present("answer"), present("answerKey")) {
                (Some(Value::Number(n)), _) => n.as_u64().map(|n| n as usize),
                (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => {
                    labels.iter().position(|l| l == s).or_else(|| letter_index(s)).or_else(|| s.parse().ok())
                }
                _ => None,
            }
            .ok_or_else(|| bad("no usable `answer` (an index) or `answerKey` (a label)".into()))?;
            if gold >= choices.len() {
                return Err(bad(format!("answer {gold} is out of range for {} choices", choices.len())));
            }
            let subject = row.get("subject").and_then(Value::as_str).map(String::from);
            Ok(McQuestion { question, choices, gold, subject })
        })
        .collect()
}

fn letter_index(s: &str) -> Option<usize> {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c @ 'A'..='Z'), None) => Some(c as usize - 'A' as usize),
        _ => None,
    }
}

/// The context and the continuations (choice strings, without the `" "` delimiter) of a question.
pub fn prompt(question: &McQuestion, style: PromptStyle) -> (String, Vec<String>) {
    match style {
        PromptStyle::Cloze => (format!("Question: {}\nAnswer:", question.question), question.choices.clone()),
        PromptStyle::Letters => {
            let letters: Vec<String> = (0..question.choices.len()).map(|i| ((b'A' + i as u8) as char).to_string()).collect();
            let mut context = match &question.subject {
                Some(subject) => {
                    format!("The following are multiple choice questions (with answers) about {}.\n\n", subject.replace('_', " "))
                }
                None => String::new(),
            };
            context.push_str(question.question.trim());
            for (letter, choice) in letters.iter().zip(&question.choices) {
                context.push_str(&format!("\n{letter}. {choice}"));
            }
            context.push_str("\nAnswer:");
            (context, letters)
        }
    }
}

/// lm-evaluation-harness' `acc` and `acc_norm` of one question from its choices' log-likelihoods:
/// `(argmax lls, argmax lls / len(choice))` (first index on ties, as `np.argmax`; length in
/// characters, as Python's `len`).
pub fn predictions(lls: &[f64], choices: &[String]) -> (usize, usize) {
    let argmax = |values: &mut dyn Iterator<Item = f64>| {
        let mut best = (0, f64::NEG_INFINITY);
        for (i, v) in values.enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        best.0
    };
    let pred = argmax(&mut lls.iter().copied());
    let pred_norm = argmax(&mut lls.iter().zip(choices).map(|(ll, c)| ll / c.chars().count() as f64));
    (pred, pred_norm)
}

/// Scores every question: metrics `acc`, `acc_norm` (with their standard errors).
pub fn run<B: Backend>(model: &EvalModel<B>, dataset: &Dataset, style: PromptStyle, quiet: bool) -> Result<TaskResult, EvalError> {
    let questions = questions(dataset)?;
    let mut requests = Vec::new();
    for q in &questions {
        let (context, continuations) = prompt(q, style);
        requests.extend(continuations.iter().map(|c| LoglikelihoodRequest { context: context.clone(), continuation: format!(" {c}") }));
    }
    let progress = Progress::new("multiple choice", requests.len() as u64, quiet);
    let scores = model.loglikelihood(&requests, &progress)?;
    progress.finish();
    let mut offset = 0;
    let (mut acc, mut acc_norm, mut samples) = (Vec::new(), Vec::new(), Vec::new());
    for q in &questions {
        let (_, continuations) = prompt(q, style);
        let lls: Vec<f64> = scores[offset..offset + continuations.len()].iter().map(|s| s.logprob).collect();
        offset += continuations.len();
        let (pred, pred_norm) = predictions(&lls, &continuations);
        acc.push(f64::from(pred == q.gold));
        acc_norm.push(f64::from(pred_norm == q.gold));
        samples.push(json!({"question": q.question, "choices": q.choices, "gold": q.gold, "loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm}));
    }
    let mut result = TaskResult::new("mc", &dataset.name, questions.len());
    let (m, se) = mean_and_stderr(&acc);
    result.metric("acc", m).metric("acc_stderr", se);
    let (m, se) = mean_and_stderr(&acc_norm);
    result.metric("acc_norm", m).metric("acc_norm_stderr", se);
    result.samples = samples;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_norm_divides_by_characters_and_ties_go_to_the_first() {
        let choices = vec!["a".to_string(), "bbbb".to_string()];
        // -2 vs -4: acc picks 0; per character -2 vs -1: acc_norm picks 1.
        assert_eq!(predictions(&[-2.0, -4.0], &choices), (0, 1));
        assert_eq!(predictions(&[-1.0, -1.0], &["x".into(), "y".into()]), (0, 0));
        // Characters, not bytes: "é" is one.
        assert_eq!(predictions(&[-2.0, -2.2], &["éé".into(), "ab".into()]), (0, 0));
    }

    #[test]
    fn reads_mmlu_and_arc_rows_and_builds_both_prompts() {
        let rows = r#"[{"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "elementary_mathematics"},
                       {"question": "Sky?", "choices": {"text": ["green", "blue"], "label": ["A", "B"]}, "answerKey": "B"}]"#;
        let rows: Vec<alignment_data::Row> = serde_json::from_str(rows).unwrap();
        let questions = questions(&Dataset::from_rows("t", rows)).unwrap();
        assert_eq!(questions[0].gold, 1);
        assert_eq!(questions[1].gold, 1);
        let (context, conts) = prompt(&questions[0], PromptStyle::Letters);
        assert_eq!(
            context,
            "The following are multiple choice questions (with answers) about elementary mathematics.\n\n2+2?\nA. 3\nB. 4\nAnswer:"
        );
        assert_eq!(conts, vec!["A", "B"]);
        let (context, conts) = prompt(&questions[1], PromptStyle::Cloze);
        assert_eq!(context, "Question: Sky?\nAnswer:");
        assert_eq!(conts, vec!["green", "blue"]);
    }

    #[test]
    fn bad_rows_name_the_row() {
        let rows: Vec<alignment_data::Row> = serde_json::from_str(r#"[{"question": "q", "choices": ["a", "b"], "answer": 5}]"#).unwrap();
        let err = questions(&Dataset::from_rows("mine", rows)).unwrap_err().to_string();
        assert!(err.contains("mine row 0") && err.contains("out of range"), "{err}");
    }
}
