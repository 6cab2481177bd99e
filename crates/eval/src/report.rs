//! Results: one JSON file per evaluated model (`results.json`, plus `samples_<task>.jsonl` with
//! every example's prompt, output and score), a readable table of them, and a side-by-side table
//! of several models (base, SFT, DPO).

use crate::error::EvalError;
use crate::tasks::TaskResult;
use alignment_core::write_atomic;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// Everything one evaluation run measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    /// The model's name (answer files use it too).
    pub model: String,
    /// Where it was loaded from.
    pub model_path: String,
    /// The settings the run used (batch size, token budgets, ...).
    pub settings: Value,
    /// One entry per task, in the order run.
    pub tasks: Vec<TaskResult>,
    /// Wall time of the whole run.
    pub seconds: f64,
}

fn format_value(value: &Value) -> String {
    match value.as_f64() {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e9 => format!("{v:.0}"),
        Some(v) => format!("{v:.4}"),
        None => "—".into(),
    }
}

impl EvalReport {
    /// A Markdown table: one line per task and metric (standard errors beside their metric).
    pub fn table(&self) -> String {
        let mut out =
            format!("{} ({})\n\n| task | examples | metric | value | ± stderr |\n|---|---|---|---|---|\n", self.model, self.model_path);
        for task in &self.tasks {
            for (name, value) in task.metrics.iter().filter(|(k, _)| !k.ends_with("_stderr")) {
                let stderr = task.metrics.get(&format!("{name}_stderr")).map(format_value).unwrap_or_default();
                out.push_str(&format!("| {} | {} | {name} | {} | {stderr} |\n", task.task, task.num_examples, format_value(value)));
            }
        }
        for task in &self.tasks {
            for note in &task.notes {
                out.push_str(&format!("\n- {}: {note}", task.task));
            }
        }
        out.push('\n');
        out
    }

    /// Writes `results.json` and `samples_<task>.jsonl` into `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<(), EvalError> {
        let json = serde_json::to_string_pretty(self).map_err(|e| EvalError::Config(e.to_string()))?;
        write_atomic(&dir.join("results.json"), |w| writeln!(w, "{json}"))?;
        for task in &self.tasks {
            write_atomic(&dir.join(format!("samples_{}.jsonl", task.task)), |w| {
                for sample in &task.samples {
                    writeln!(w, "{sample}")?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Reads a `results.json`.
    pub fn read(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::Read { path: path.into(), message: e.to_string() })?;
        serde_json::from_str(&text).map_err(|e| EvalError::Read { path: path.into(), message: e.to_string() })
    }
}

/// A Markdown table of several reports side by side: one line per task and metric (standard
/// errors left out), one column per report, `—` where a report lacks the metric.
pub fn comparison_table(reports: &[EvalReport]) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    for report in reports {
        for task in &report.tasks {
            for name in task.metrics.keys().filter(|k| !k.ends_with("_stderr")) {
                if !rows.iter().any(|(t, m)| t == &task.task && m == name) {
                    rows.push((task.task.clone(), name.clone()));
                }
            }
        }
    }
    let mut out = String::from("| task | metric |");
    for report in reports {
        out.push_str(&format!(" {} |", report.model));
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(reports.len()));
    out.push('\n');
    for (task, metric) in rows {
        out.push_str(&format!("| {task} | {metric} |"));
        for report in reports {
            let value = report.tasks.iter().find(|t| t.task == task).and_then(|t| t.metrics.get(&metric));
            out.push_str(&format!(" {} |", value.map(format_value).unwrap_or_else(|| "—".into())));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(model: &str, acc: f64) -> EvalReport {
        let mut task = TaskResult::new("mc", "data/eval/mc:test", 4);
        task.metric("acc", acc).metric("acc_stderr", 0.25);
        EvalReport { model: model.into(), model_path: "p".into(), settings: Value::Null, tasks: vec![task], seconds: 1.0 }
    }

    #[test]
    fn tables_show_metrics_per_model() {
        let table = report("base", 0.5).table();
        assert!(table.contains("| mc | 4 | acc | 0.5000 | 0.2500 |"), "{table}");
        let both = comparison_table(&[report("base", 0.5), report("dpo", 0.75)]);
        assert!(both.contains("| task | metric | base | dpo |"), "{both}");
        assert!(both.contains("| mc | acc | 0.5000 | 0.7500 |"), "{both}");
        assert!(!both.contains("stderr"));
    }

    #[test]
    fn reports_round_trip_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let original = report("base", 0.5);
        original.write(dir.path()).unwrap();
        assert_eq!(EvalReport::read(&dir.path().join("results.json")).unwrap(), original);
        assert!(dir.path().join("samples_mc.jsonl").is_file());
    }
}
