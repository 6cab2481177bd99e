//! Named scalar metrics, in the order they were recorded, with TRL's names (`loss`,
//! `rewards/chosen`, ...), so a jsonl log of this trainer reads like a TRL `trainer_state.json`.

use serde::ser::{Serialize, SerializeMap, Serializer};

/// An ordered list of `(name, value)` pairs with unique names.
///
/// Objectives return one per micro-batch; the trainer averages them over the micro-batches of a
/// logging window with [`Metrics::mean`] (what TRL does: each `compute_loss` appends to
/// `self._metrics[mode][name]`, and `log` averages each list), adds its own (`learning_rate`,
/// `grad_norm`, `num_tokens`, `epoch`) with [`Metrics::merge`], and writes one JSON object per line
/// (`Serialize` keeps the insertion order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    entries: Vec<(String, f64)>,
}

impl Metrics {
    /// No metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`: replaces the value in place if `name` is present, else appends.
    pub fn insert(&mut self, name: impl Into<String>, value: f64) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
    }

    /// Builder form of [`insert`](Self::insert).
    pub fn with(mut self, name: impl Into<String>, value: f64) -> Self {
        self.insert(name, value);
        self
    }

    /// The value recorded under `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), *v))
    }

    /// Number of metrics.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Inserts every metric of `other` (its values win on a name clash).
    pub fn merge(&mut self, other: &Metrics) {
        for (name, value) in other.iter() {
            self.insert(name, value);
        }
    }

    /// A copy with every name prefixed, e.g. `"eval_"` (transformers' `metric_key_prefix`).
    pub fn with_prefix(&self, prefix: &str) -> Metrics {
        Metrics { entries: self.entries.iter().map(|(n, v)| (format!("{prefix}{n}"), *v)).collect() }
    }

    /// Per-name mean over several records (e.g. the micro-batches of one logging window). A name
    /// is averaged over the records that have it; names keep the order of first appearance.
    pub fn mean(records: &[Metrics]) -> Metrics {
        let mut sums: Vec<(String, f64, usize)> = Vec::new();
        for record in records {
            for (name, value) in record.iter() {
                match sums.iter_mut().find(|(n, _, _)| n == name) {
                    Some(entry) => {
                        entry.1 += value;
                        entry.2 += 1;
                    }
                    None => sums.push((name.to_string(), value, 1)),
                }
            }
        }
        Metrics { entries: sums.into_iter().map(|(n, s, c)| (n, s / c as f64)).collect() }
    }
}

/// A JSON object in insertion order (non-finite values become `null` with `serde_json`).
impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (name, value) in &self.entries {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'a> IntoIterator for &'a Metrics {
    type Item = (&'a str, f64);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, f64)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl FromIterator<(String, f64)> for Metrics {
    fn from_iter<I: IntoIterator<Item = (String, f64)>>(iter: I) -> Self {
        let mut metrics = Metrics::new();
        for (name, value) in iter {
            metrics.insert(name, value);
        }
        metrics
    }
}

/// Metrics still on the device: the equally long `[n]` rows an objective reads, and the host
/// function that turns them into named values. A trainer keeps these through a logging window
/// and reads them once there ([`DeferredMetrics::read`]: one device-to-host transfer), so no
/// step waits on the device for numbers nobody looks at yet. A clone reads the same tensors: what
/// a step replayed as a CUDA graph rewrites at each replay.
#[derive(Clone)]
pub struct DeferredMetrics<B: burn::tensor::backend::Backend> {
    rows: Vec<burn::tensor::Tensor<B, 1>>,
    finish: FinishMetrics,
}

/// Turns the rows read from the device into named metrics.
type FinishMetrics = std::sync::Arc<dyn Fn(&[Vec<f64>]) -> Metrics + Send + Sync>;

impl<B: burn::tensor::backend::Backend> DeferredMetrics<B> {
    /// `rows` (detached, equally long), turned into metrics by `finish` once read.
    pub fn new(rows: Vec<burn::tensor::Tensor<B, 1>>, finish: impl Fn(&[Vec<f64>]) -> Metrics + Send + Sync + 'static) -> Self {
        Self { rows, finish: std::sync::Arc::new(finish) }
    }

    /// Reads the rows (waiting for the device) and computes the metrics.
    pub fn read(self) -> Metrics {
        (self.finish)(&host(self.rows))
    }

    /// The same metrics over copies of the rows (one device copy each): what a step replayed as
    /// a CUDA graph keeps of each replay, since the next replay rewrites the rows themselves.
    pub fn copied(&self) -> Self {
        Self { rows: self.rows.iter().map(|row| row.clone().mul_scalar(1.0)).collect(), finish: self.finish.clone() }
    }

    /// The same metrics, rewritten by `f` after reading (e.g. a value rescaled by the caller).
    pub fn map(self, f: impl Fn(Metrics) -> Metrics + Send + Sync + 'static) -> Self {
        let finish = self.finish;
        Self { rows: self.rows, finish: std::sync::Arc::new(move |rows| f(finish(rows))) }
    }
}

impl<B: burn::tensor::backend::Backend> std::fmt::Debug for DeferredMetrics<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredMetrics").field("rows", &self.rows.len()).finish()
    }
}

/// Reads equally long `[n]` tensors back to the host as `f64`s, in one transfer.
pub(crate) fn host<B: burn::tensor::backend::Backend>(rows: Vec<burn::tensor::Tensor<B, 1>>) -> Vec<Vec<f64>> {
    let k = rows.len();
    if k == 0 {
        return Vec::new();
    }
    let n = rows[0].dims()[0];
    let flat: Vec<f64> = burn::tensor::Tensor::stack::<2>(rows, 0).into_data().iter::<f64>().collect();
    (0..k).map(|i| flat[i * n..(i + 1) * n].to_vec()).collect()
}

/// Mean of a slice, `0` when empty (TRL logs `0.0` for empty token counts).
pub(crate) fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// `numerator / denominator`, `0` when the denominator is 0 (TRL's `if total_tokens > 0 else 0.0`).
pub(crate) fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}
