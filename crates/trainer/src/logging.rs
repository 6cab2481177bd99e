//! What a run reports: a progress bar (loss, learning rate, tokens/s), a JSON-lines metrics file
//! a user can plot (`metrics.jsonl`, one object per logging or evaluation step, with
//! transformers' key names), and an SVG plot of the train and eval loss at the end.

use alignment_core::{write_atomic, IoError};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Running weighted means of named metrics over micro-batches or a logging window.
#[derive(Debug, Clone, Default)]
pub struct MetricsAccumulator {
    entries: Vec<(String, f64, f64)>, // name, weighted sum, total weight
}

impl MetricsAccumulator {
    /// Adds `metrics`, each weighted by `weight` (label tokens for SFT, pairs for DPO). A
    /// micro-batch of weight 0 (no scored token) contributes nothing: its undefined means
    /// (accuracy over no token) do not turn the window's into NaN.
    pub fn add<'a>(&mut self, metrics: impl IntoIterator<Item = (&'a str, f64)>, weight: f64) {
        for (name, value) in metrics {
            let (sum, weight) = if weight == 0.0 { (0.0, 0.0) } else { (value * weight, weight) };
            match self.entries.iter_mut().find(|(n, _, _)| n == name) {
                Some(entry) => {
                    entry.1 += sum;
                    entry.2 += weight;
                }
                None => self.entries.push((name.to_string(), sum, weight)),
            }
        }
    }

    /// The weighted means, in first-seen order, each name prefixed with `prefix`. With no weight
    /// at all, the loss is 0 (steps that scored nothing have loss 0, as TRL's `clamp(min=1)`
    /// gives) and every other metric undefined (NaN, logged as null).
    pub fn means(&self, prefix: &str) -> Vec<(String, f64)> {
        self.entries
            .iter()
            .map(|(n, s, w)| {
                let mean = if *w > 0.0 {
                    s / w
                } else if n == "loss" {
                    0.0
                } else {
                    f64::NAN
                };
                (format!("{prefix}{n}"), mean)
            })
            .collect()
    }

    /// Every metric as (name, weighted sum, total weight), in first-seen order.
    pub fn sums(&self) -> Vec<(String, f64, f64)> {
        self.entries.clone()
    }

    /// Adds weighted sums as [`Self::sums`] returns them (e.g. summed over ranks).
    pub fn add_sums(&mut self, sums: &[(String, f64, f64)]) {
        for (name, sum, weight) in sums {
            match self.entries.iter_mut().find(|(n, _, _)| n == name) {
                Some(entry) => {
                    entry.1 += sum;
                    entry.2 += weight;
                }
                None => self.entries.push((name.clone(), *sum, *weight)),
            }
        }
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets everything (start of a new logging window).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Appends one JSON object per line to `metrics.jsonl`, flushed after each line so a killed run
/// keeps what it logged.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    history: Vec<Map<String, Value>>,
}

impl MetricsLog {
    /// Opens (creating) `path`. On resume the entries after `keep_until_step` are dropped so the
    /// resumed run does not log the same steps twice.
    pub fn open(path: &Path, keep_until_step: Option<u64>) -> Result<Self, IoError> {
        let mut history = Vec::new();
        if let Some(last) = keep_until_step {
            if let Ok(text) = std::fs::read_to_string(path) {
                for line in text.lines() {
                    if let Ok(Value::Object(entry)) = serde_json::from_str::<Value>(line) {
                        if entry.get("step").and_then(Value::as_u64).is_some_and(|s| s <= last) {
                            history.push(entry);
                        }
                    }
                }
            }
            write_atomic(path, |w| {
                for entry in &history {
                    writeln!(w, "{}", Value::Object(entry.clone()))?;
                }
                Ok(())
            })?;
        } else if path.exists() {
            std::fs::remove_file(path).map_err(|e| IoError::new("removing", path, e))?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| IoError::new("creating directory", parent, e))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| IoError::new("opening", path, e))?;
        Ok(Self { path: path.into(), file, history })
    }

    /// Writes one entry.
    pub fn write(&mut self, entry: Map<String, Value>) -> Result<(), IoError> {
        let line = Value::Object(entry.clone()).to_string();
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| IoError::new("appending to", &self.path, e))?;
        self.history.push(entry);
        Ok(())
    }

    /// Everything logged so far (including entries kept from before a resume).
    pub fn history(&self) -> &[Map<String, Value>] {
        &self.history
    }
}

/// Builds a log entry from `step`, `epoch` and named values (non-finite values become null).
pub fn entry(step: u64, epoch: f64, values: &[(String, f64)]) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("step".into(), step.into());
    map.insert("epoch".into(), Value::from((epoch * 1e4).round() / 1e4));
    for (k, v) in values {
        map.insert(k.clone(), serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number));
    }
    map
}

/// The terminal progress bar; hidden when stderr is not a terminal or `quiet` is set.
pub fn progress_bar(total_steps: u64, start: u64, quiet: bool) -> ProgressBar {
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total_steps) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps (eta {eta}) {msg}").expect("valid template"),
    );
    bar.set_position(start);
    bar
}

/// Plots the `loss` and `eval_loss` series of `history` against `step` as an SVG at `path`.
pub fn plot_losses(history: &[Map<String, Value>], path: &Path, title: &str) -> Result<(), String> {
    use plotters::prelude::*;
    let series = |key: &str| -> Vec<(f64, f64)> {
        history.iter().filter_map(|e| Some((e.get("step")?.as_f64()?, e.get(key)?.as_f64()?))).filter(|(_, v)| v.is_finite()).collect()
    };
    let train = series("loss");
    let eval = series("eval_loss");
    if train.is_empty() && eval.is_empty() {
        return Ok(());
    }
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    let (x_max, y_min, y_max) =
        all.iter().fold((1.0f64, f64::INFINITY, f64::NEG_INFINITY), |(x, lo, hi), (s, v)| (x.max(*s), lo.min(*v), hi.max(*v)));
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| e.to_string())?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
                .map_err(|e| e.to_string())?
                .label("train loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        }
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), &RED).point_size(3))
                .map_err(|e| e.to_string())?
                .label("eval loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    write_atomic(path, |w| w.write_all(svg.as_bytes())).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_weights_means() {
        let mut acc = MetricsAccumulator::default();
        acc.add([("loss", 1.0)], 1.0);
        acc.add([("loss", 4.0)], 3.0);
        assert_eq!(acc.means("eval_"), vec![("eval_loss".to_string(), 13.0 / 4.0)]);
    }

    #[test]
    fn resumed_log_drops_entries_after_the_checkpoint_and_plot_is_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=4 {
            log.write(entry(step, 0.1, &[("loss".into(), 5.0 - step as f64)])).unwrap();
        }
        let log = MetricsLog::open(&path, Some(2)).unwrap();
        assert_eq!(log.history().len(), 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        let svg = dir.path().join("loss.svg");
        plot_losses(log.history(), &svg, "test").unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    }
}
