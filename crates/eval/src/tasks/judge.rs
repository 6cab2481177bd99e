//! Answers for the LLM-judged benchmarks, in the files their judges read unchanged.
//!
//! **MT-Bench** (FastChat `fastchat/llm_judge`): questions from `question.jsonl`
//! (`{question_id, category, turns: [first, second]}`); each turn is answered with the
//! conversation so far (the second turn sees the first question and the model's first answer),
//! rendered by the model's chat template with the generation prompt; sampling temperature per
//! category as FastChat's `temperature_config` (writing, roleplay 0.7; extraction, math, coding,
//! reasoning 0; stem, humanities 0.1; others 0.7; below 1e-4 greedy). Written as
//! `model_answer/<model_id>.jsonl`: `{question_id, answer_id, model_id, choices: [{index: 0,
//! turns: [answer1, answer2]}], tstamp}`, what `gen_judgment.py` reads.
//!
//! **AlpacaEval**: instructions from AlpacaEval's evaluation set (`alpaca_eval.json`, a JSON list
//! of `{instruction, dataset, ...}`), each one user message, answered greedily; written as
//! `outputs.json`, a JSON list of `{instruction, output, generator, dataset}`, what
//! `alpaca_eval --model_outputs outputs.json` reads.

use crate::error::EvalError;
use crate::model::{EvalModel, SamplingParams};
use crate::progress::Progress;
use crate::tasks::{str_field, TaskResult};
use alignment_core::write_atomic;
use alignment_data::{Dataset, Message};
use burn::tensor::backend::Backend;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// FastChat's `temperature_config` (`fastchat/llm_judge/common.py`); other categories use 0.7.
pub fn mt_bench_temperature(category: &str) -> f32 {
    match category {
        "writing" | "roleplay" => 0.7,
        "extraction" | "math" | "coding" | "reasoning" | "arena-hard-200" => 0.0,
        "stem" | "humanities" => 0.1,
        _ => 0.7,
    }
}

/// One MT-Bench question.
#[derive(Debug, Clone, PartialEq)]
pub struct MtBenchQuestion {
    pub question_id: Value,
    pub category: String,
    pub turns: Vec<String>,
}

/// Reads `question.jsonl` rows.
pub fn mt_bench_questions(dataset: &Dataset) -> Result<Vec<MtBenchQuestion>, EvalError> {
    (0..dataset.len())
        .map(|i| {
            let row = &dataset.rows[i];
            let question_id = row
                .get("question_id")
                .filter(|v| !v.is_null())
                .cloned()
                .ok_or_else(|| EvalError::row(&dataset.name, i, "no `question_id`"))?;
            let category = row.get("category").and_then(Value::as_str).unwrap_or("").to_string();
            let turns = row
                .get("turns")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|t| t.as_str().map(String::from)).collect::<Option<Vec<_>>>())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| EvalError::row(&dataset.name, i, "`turns` must be a non-empty list of strings"))?;
            Ok(MtBenchQuestion { question_id, category, turns })
        })
        .collect()
}

/// A deterministic answer id (FastChat writes a random shortuuid; judges do not read it).
fn answer_id(model: &str, question: &Value) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in model.bytes().chain(question.to_string().bytes()) {
        hash = (hash ^ byte as u64).wrapping_mul(0x100000001b3);
    }
    format!("{hash:016x}")
}

/// Answers every question, turn by turn (all first turns as one batch of prompts, then all second
/// turns, ...), and writes `<out_dir>/model_answer/<model_id>.jsonl`.
pub fn mt_bench<B: Backend>(
    model: &EvalModel<B>,
    dataset: &Dataset,
    max_new_tokens: usize,
    seed: u64,
    out_dir: &Path,
    quiet: bool,
) -> Result<TaskResult, EvalError> {
    let questions = mt_bench_questions(dataset)?;
    let max_turns = questions.iter().map(|q| q.turns.len()).max().unwrap_or(0);
    let mut answers: Vec<Vec<String>> = vec![Vec::new(); questions.len()];
    let mut tokens = 0usize;
    let progress = Progress::new("mt_bench", questions.iter().map(|q| q.turns.len() as u64).sum(), quiet);
    for turn in 0..max_turns {
        // Questions answered greedily and sampled ones are generated apart (their settings differ).
        let mut by_temperature: Vec<(f32, Vec<usize>)> = Vec::new();
        for (i, q) in questions.iter().enumerate().filter(|(_, q)| q.turns.len() > turn) {
            let t = mt_bench_temperature(&q.category);
            let t = if t < 1e-4 { 0.0 } else { t };
            match by_temperature.iter_mut().find(|(x, _)| *x == t) {
                Some((_, list)) => list.push(i),
                None => by_temperature.push((t, vec![i])),
            }
        }
        for (temperature, indices) in by_temperature {
            let prompts = indices
                .iter()
                .map(|&i| {
                    let q = &questions[i];
                    let mut messages = Vec::new();
                    for (t, question) in q.turns[..=turn].iter().enumerate() {
                        messages.push(Message::new("user", question.clone()));
                        if t < turn {
                            messages.push(Message::new("assistant", answers[i][t].clone()));
                        }
                    }
                    model.chat_prompt(&messages, &format!("{} question {}", dataset.name, q.question_id))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let params =
                SamplingParams { max_new_tokens, temperature, top_p: 1.0, seed: seed.wrapping_add(turn as u64 * 1_000_003), stop: vec![] };
            let outputs = model.generate(&prompts, &params, &progress)?;
            for (&i, output) in indices.iter().zip(outputs) {
                tokens += output.num_tokens;
                answers[i].push(output.text.trim().to_string());
            }
        }
    }
    progress.finish();
    let path = out_dir.join("model_answer").join(format!("{}.jsonl", model.name));
    let tstamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    write_atomic(&path, |w| {
        for (q, turns) in questions.iter().zip(&answers) {
            let line = json!({
                "question_id": q.question_id,
                "answer_id": answer_id(&model.name, &q.question_id),
                "model_id": model.name,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": tstamp,
            });
            writeln!(w, "{line}")?;
        }
        Ok(())
    })?;
    let mut result = TaskResult::new("mt_bench", &dataset.name, questions.len());
    let turns = answers.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    result.metric("answers", turns).metric("mean_answer_tokens", tokens as f64 / turns);
    result.metric("mean_answer_words", answers.iter().flatten().map(|a| a.split_whitespace().count()).sum::<usize>() as f64 / turns);
    result.notes.push(format!("answers for FastChat's judge: {}", path.display()));
    result.samples =
        questions.iter().zip(&answers).map(|(q, a)| json!({"question_id": q.question_id, "turns": q.turns, "answers": a})).collect();
    Ok(result)
}

/// Answers every AlpacaEval instruction greedily and writes `<out_dir>/alpaca_eval/outputs.json`
/// (the file's path is returned in the result's notes).
pub fn alpaca_eval<B: Backend>(
    model: &EvalModel<B>,
    dataset: &Dataset,
    max_new_tokens: usize,
    out_dir: &Path,
    quiet: bool,
) -> Result<TaskResult, EvalError> {
    let instructions = (0..dataset.len()).map(|i| str_field(dataset, i, "instruction").map(String::from)).collect::<Result<Vec<_>, _>>()?;
    let prompts = instructions
        .iter()
        .enumerate()
        .map(|(i, text)| model.chat_prompt(&[Message::new("user", text.clone())], &format!("{} row {i}", dataset.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let progress = Progress::new("alpaca_eval", prompts.len() as u64, quiet);
    let outputs = model.generate(&prompts, &SamplingParams::greedy(max_new_tokens), &progress)?;
    progress.finish();
    let records: Vec<Value> = instructions
        .iter()
        .zip(&outputs)
        .enumerate()
        .map(|(i, (instruction, output))| {
            let dataset_name = dataset.rows[i].get("dataset").and_then(Value::as_str).unwrap_or("");
            json!({"instruction": instruction, "output": output.text.trim(), "generator": model.name, "dataset": dataset_name})
        })
        .collect();
    let path: PathBuf = out_dir.join("alpaca_eval").join("outputs.json");
    write_atomic(&path, |w| {
        serde_json::to_writer_pretty(&mut *w, &records).map_err(std::io::Error::other)?;
        writeln!(w)
    })?;
    let mut result = TaskResult::new("alpaca_eval", &dataset.name, records.len());
    let n = outputs.len().max(1) as f64;
    result
        .metric("answers", outputs.len() as f64)
        .metric("mean_answer_tokens", outputs.iter().map(|o| o.num_tokens as f64).sum::<f64>() / n);
    result.notes.push(format!("outputs for AlpacaEval's judge: {}", path.display()));
    result.samples = records;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_follow_fastchat() {
        assert_eq!(mt_bench_temperature("math"), 0.0);
        assert_eq!(mt_bench_temperature("writing"), 0.7);
        assert_eq!(mt_bench_temperature("stem"), 0.1);
        assert_eq!(mt_bench_temperature("unknown"), 0.7);
    }

    #[test]
    fn questions_need_ids_and_turns() {
        let rows: Vec<alignment_data::Row> =
            serde_json::from_str(r#"[{"question_id": 81, "category": "writing", "turns": ["a", "b"]}, {"question_id": 82, "turns": []}]"#)
                .unwrap();
        let err = mt_bench_questions(&Dataset::from_rows("q", rows)).unwrap_err().to_string();
        assert!(err.contains("q row 1") && err.contains("turns"), "{err}");
        assert_eq!(answer_id("m", &json!(81)), answer_id("m", &json!(81)));
        assert_ne!(answer_id("m", &json!(81)), answer_id("m", &json!(82)));
    }
}
