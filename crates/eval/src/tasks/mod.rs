//! The tasks: what data each reads, how it prompts the model and how it scores the answers.
//!
//! | task | kind | metrics |
//! |---|---|---|
//! | `mc` | log-likelihood multiple choice ([`multiple_choice`]) | `acc`, `acc_norm` |
//! | `gsm8k` | few-shot chain-of-thought generation, final number ([`gsm8k`]) | `exact_match` |
//! | `ifeval` | verifiable instructions ([`ifeval`]) | prompt/instruction-level strict and loose accuracy |
//! | `preference` | log-probs of chosen vs rejected ([`preference`]) | reward accuracy and margin (DPO's implicit reward), win/tie/loss |
//! | `mt_bench` | two-turn answers for FastChat's judge ([`judge`]) | answer count and length |
//! | `alpaca_eval` | answers for AlpacaEval's judge ([`judge`]) | answer count and length |

pub mod gsm8k;
pub mod ifeval;
pub mod judge;
pub mod multiple_choice;
pub mod preference;

use crate::error::EvalError;
use alignment_data::source::{DatasetLoader, SplitSource};
use alignment_data::Dataset;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The outcome of one task on one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskResult {
    /// The task's name (`mc`, `gsm8k`, ...).
    pub task: String,
    /// Where its data came from (`path:split` or `hub-id:split`).
    pub dataset: String,
    /// Examples scored.
    pub num_examples: usize,
    /// Metric name → value, in a fixed order.
    pub metrics: Map<String, Value>,
    /// Things a reader should know (skipped rows, files written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Wall time of the task.
    #[serde(default)]
    pub seconds: f64,
    /// Per-example records (prompt, output, score), written beside the results.
    #[serde(skip)]
    pub samples: Vec<Value>,
}

impl TaskResult {
    /// An empty result of `task` over `num_examples` examples of `dataset`.
    pub fn new(task: &str, dataset: &str, num_examples: usize) -> Self {
        Self {
            task: task.into(),
            dataset: dataset.into(),
            num_examples,
            metrics: Map::new(),
            notes: Vec::new(),
            seconds: 0.0,
            samples: Vec::new(),
        }
    }

    /// Records a metric (non-finite values as null).
    pub fn metric(&mut self, name: &str, value: f64) -> &mut Self {
        self.metrics.insert(name.into(), serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number));
        self
    }

    /// A metric's value, if recorded and finite.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).and_then(Value::as_f64)
    }
}

/// Mean and standard error of the mean (`sample std / sqrt(n)`, lm-evaluation-harness'
/// `mean_stderr`); `(NaN, NaN)` for no values, stderr `NaN` for one.
pub fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (variance / n).sqrt())
}

/// The tasks the evaluation command knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    MultipleChoice,
    Gsm8k,
    IfEval,
    Preference,
    MtBench,
    AlpacaEval,
}

impl Task {
    /// Every task, in report order.
    pub const ALL: [Task; 6] = [Task::MultipleChoice, Task::Gsm8k, Task::IfEval, Task::Preference, Task::MtBench, Task::AlpacaEval];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Task::MultipleChoice => "mc",
            Task::Gsm8k => "gsm8k",
            Task::IfEval => "ifeval",
            Task::Preference => "preference",
            Task::MtBench => "mt_bench",
            Task::AlpacaEval => "alpaca_eval",
        }
    }

    /// The repository's own small set for the task (CC0, `data/eval/`), relative to the
    /// repository root; the preference task uses tiny-chat's held-out pairs. A single file is the
    /// split `train`, as `datasets` names it.
    pub fn default_source(self) -> DataSource {
        let (id, split) = match self {
            Task::MultipleChoice => ("data/eval/mc", "test"),
            Task::Gsm8k => ("data/eval/gsm8k", "test"),
            Task::IfEval => ("data/eval/ifeval", "test"),
            Task::Preference => ("data/tiny-chat", "test_prefs"),
            Task::MtBench => ("data/eval/mt_bench/question.jsonl", "train"),
            Task::AlpacaEval => ("data/eval/alpaca_eval/alpaca_eval.json", "train"),
        };
        DataSource { id: id.into(), split: split.into(), config: None }
    }
}

impl std::str::FromStr for Task {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, EvalError> {
        Task::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            let known: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
            EvalError::Config(format!("unknown task `{s}` (known: {})", known.join(", ")))
        })
    }
}

/// Where a task's rows come from: a local `.jsonl`/`.json`/`.parquet` file or dataset directory,
/// or a hub dataset id, with its split and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSource {
    /// A path or `org/name` on the hub.
    pub id: String,
    /// The split (a local file is read whole whatever its split).
    pub split: String,
    /// The hub config (`main` for `openai/gsm8k`), if any.
    pub config: Option<String>,
}

impl DataSource {
    /// Parses `ID[:SPLIT][@CONFIG]` (e.g. `openai/gsm8k:test@main`, `data/eval/mc`), the split
    /// defaulting to `default_split`.
    pub fn parse(text: &str, default_split: &str) -> Self {
        let (rest, config) = match text.rsplit_once('@') {
            Some((rest, config)) if !config.contains('/') => (rest, Some(config.to_string())),
            _ => (text, None),
        };
        let (id, split) = match rest.rsplit_once(':') {
            Some((id, split)) if !split.contains('/') && !split.is_empty() => (id, split),
            _ => (rest, default_split),
        };
        Self { id: id.into(), split: split.into(), config }
    }

    /// Loads the rows: a local path first, else the hub (`HF_ENDPOINT`, the hub cache, offline
    /// mode), through alignment-data's loader.
    pub fn load(&self, loader: &DatasetLoader) -> Result<Dataset, EvalError> {
        Ok(loader.load_split(&self.id, self.config.as_deref(), &self.split)?)
    }
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, self.split)?;
        if let Some(config) = &self.config {
            write!(f, "@{config}")?;
        }
        Ok(())
    }
}

/// Row `i`'s string field `field`, or an error naming the dataset, row and field.
pub(crate) fn str_field<'a>(dataset: &'a Dataset, i: usize, field: &str) -> Result<&'a str, EvalError> {
    dataset.rows[i].get(field).and_then(Value::as_str).ok_or_else(|| EvalError::row(&dataset.name, i, format!("no string field `{field}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_sources_parse_split_and_config() {
        assert_eq!(
            DataSource::parse("openai/gsm8k:test@main", "train"),
            DataSource { id: "openai/gsm8k".into(), split: "test".into(), config: Some("main".into()) }
        );
        assert_eq!(DataSource::parse("data/eval/mc", "test"), DataSource { id: "data/eval/mc".into(), split: "test".into(), config: None });
        assert_eq!(DataSource::parse("cais/mmlu@abstract_algebra", "test").config.as_deref(), Some("abstract_algebra"));
    }

    #[test]
    fn stderr_is_the_sample_std_over_sqrt_n() {
        let (m, se) = mean_and_stderr(&[1.0, 0.0, 1.0, 0.0]);
        assert_eq!(m, 0.5);
        assert!((se - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    }
}
