//! The in-memory dataset: named rows of JSON values, and the handful of `datasets.Dataset`
//! operations the mixers need (select, select/remove columns, concatenate, shuffle,
//! train_test_split), each with Hugging Face `datasets`' semantics.

use serde_json::{Map, Value};
use std::sync::Arc;

use crate::error::DataError;
use crate::shuffle::{in_order, permutation};

/// One example: column name → value, in the dataset's column order. A chat dataset's
/// `messages` column holds an array of `{"content": ..., "role": ...}` objects.
pub type Row = Map<String, Value>;

/// Where one row came from, for error messages: its file (or hub split) and its index there,
/// plus its line in a JSON Lines file. It follows the row through selection, concatenation and
/// shuffling, so a bad row of a shuffled mix is reported where the user can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowOrigin {
    /// The file, or `repo[/config]:split` of a hub dataset.
    pub source: Arc<str>,
    /// The row's index in `source` (0-based, as `dataset[i]` indexes it).
    pub row: usize,
    /// The row's line in a JSON Lines file (1-based).
    pub line: Option<usize>,
}

impl RowOrigin {
    /// `source` with the line appended as `path:line` when known: the name an error gives.
    pub fn label(&self) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", self.source),
            None => self.source.to_string(),
        }
    }
}

/// A table of rows sharing one column list, with a name for error messages
/// (e.g. `HuggingFaceH4/ultrachat_200k:train_sft`). Every row has exactly the columns in
/// [`Dataset::columns`], in that order; a value absent from a JSON line is `null`, as `datasets`
/// fills it.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where the rows came from, for error messages.
    pub name: String,
    /// Column names, in order.
    pub columns: Vec<String>,
    /// The rows; each has exactly `columns`, in order.
    pub rows: Vec<Row>,
    /// Where each row came from ([`Dataset::origin`]); empty means row `i` is row `i` of `name`.
    pub origins: Vec<RowOrigin>,
}

/// Datasets are equal when their name, columns and rows are; where the rows came from is not
/// compared.
impl PartialEq for Dataset {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.columns == other.columns && self.rows == other.rows
    }
}

/// `test_size` of `train_test_split`: a fraction in (0, 1) or a number of rows, as in `datasets`
/// (a YAML `0.1` is a fraction, `100` a count).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum TestSize {
    /// A number of rows.
    Count(u64),
    /// A fraction of the rows; the test set has `ceil(fraction * len)` of them.
    Fraction(f64),
}

impl std::fmt::Display for TestSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestSize::Count(n) => write!(f, "{n}"),
            TestSize::Fraction(x) => write!(f, "{x:?}"),
        }
    }
}

impl Dataset {
    /// A dataset from rows whose keys may differ: the columns are the keys in first-seen order
    /// (as `datasets`' JSON loader infers them) and missing values become `null`.
    pub fn from_rows(name: impl Into<String>, rows: Vec<Row>) -> Self {
        let mut columns: Vec<String> = Vec::new();
        for row in &rows {
            for key in row.keys() {
                if !columns.iter().any(|c| c == key) {
                    columns.push(key.clone());
                }
            }
        }
        Self::with_columns(name, columns, rows)
    }

    /// A dataset with the given columns; each row is reordered to them, missing values are
    /// `null` and keys outside `columns` are dropped.
    pub fn with_columns(name: impl Into<String>, columns: Vec<String>, rows: Vec<Row>) -> Self {
        let rows = rows.into_iter().map(|row| conform(row, &columns)).collect();
        Self { name: name.into(), columns, rows, origins: Vec::new() }
    }

    /// The dataset with each row's origin given (one per row, in order).
    pub fn with_origins(mut self, origins: Vec<RowOrigin>) -> Self {
        debug_assert_eq!(origins.len(), self.rows.len());
        self.origins = if origins.len() == self.rows.len() { origins } else { Vec::new() };
        self
    }

    /// Where row `i` came from: recorded by the loader, else row `i` of this dataset's name.
    pub fn origin(&self, i: usize) -> RowOrigin {
        self.origins.get(i).cloned().unwrap_or_else(|| RowOrigin { source: Arc::from(self.name.as_str()), row: i, line: None })
    }

    fn all_origins(&self) -> Vec<RowOrigin> {
        if self.origins.len() == self.rows.len() {
            return self.origins.clone();
        }
        let source: Arc<str> = Arc::from(self.name.as_str());
        (0..self.rows.len()).map(|row| RowOrigin { source: source.clone(), row, line: None }).collect()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// `Dataset.select(indices)`: the rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Result<Self, DataError> {
        let rows = indices
            .iter()
            .map(|&i| {
                self.rows.get(i).cloned().ok_or_else(|| DataError::RowOutOfRange { dataset: self.name.clone(), index: i, len: self.len() })
            })
            .collect::<Result<_, _>>()?;
        let origins = indices.iter().map(|&i| self.origin(i)).collect();
        Ok(Self { name: self.name.clone(), columns: self.columns.clone(), rows, origins })
    }

    /// `Dataset.select(range(n))`: the first `n` rows (an error past the end, as in `datasets`).
    pub fn head(self, n: usize) -> Result<Self, DataError> {
        if n > self.len() {
            return Err(DataError::RowOutOfRange { dataset: self.name, index: n - 1, len: self.rows.len() });
        }
        let mut rows = self.rows;
        rows.truncate(n);
        let mut origins = self.origins;
        origins.truncate(n);
        Ok(Self { rows, origins, ..self })
    }

    /// `Dataset.select_columns(columns)`: exactly these columns, in this order; an error naming
    /// the dataset when one is absent.
    pub fn select_columns(self, columns: &[String]) -> Result<Self, DataError> {
        if let Some(missing) = columns.iter().find(|c| !self.columns.contains(c)) {
            return Err(DataError::MissingColumn { dataset: self.name, column: missing.clone(), available: self.columns });
        }
        let origins = self.origins;
        Ok(Self { origins, ..Self::with_columns(self.name, columns.to_vec(), self.rows) })
    }

    /// The handbook's `remove_columns([c for c in columns if c not in keep])`: the dataset's own
    /// columns that are in `keep`, in the dataset's order. Keeping none is an error
    /// ([`DataError::NoColumnsKept`]) where `datasets` would silently return zero rows.
    pub fn retain_columns(self, keep: &[String]) -> Result<Self, DataError> {
        let columns: Vec<String> = self.columns.iter().filter(|c| keep.contains(c)).cloned().collect();
        if columns.is_empty() {
            return Err(DataError::NoColumnsKept { dataset: self.name, keep: keep.to_vec(), available: self.columns });
        }
        let origins = self.origins;
        Ok(Self { origins, ..Self::with_columns(self.name, columns, self.rows) })
    }

    /// `concatenate_datasets(parts)`: rows in order; the columns are the first part's followed by
    /// any new ones in order of appearance, a column a part lacks being `null` in its rows.
    pub fn concatenate(name: impl Into<String>, parts: Vec<Dataset>) -> Self {
        let mut columns: Vec<String> = Vec::new();
        for part in &parts {
            for column in &part.columns {
                if !columns.contains(column) {
                    columns.push(column.clone());
                }
            }
        }
        let keep_origins = parts.iter().any(|p| !p.origins.is_empty());
        let origins: Vec<RowOrigin> = if keep_origins { parts.iter().flat_map(|p| p.all_origins()).collect() } else { Vec::new() };
        let rows = parts.into_iter().flat_map(|p| p.rows).collect();
        Self { origins, ..Self::with_columns(name, columns, rows) }
    }

    /// `Dataset.shuffle(seed=seed)`: the rows in the order `np.random.default_rng(seed).permutation(len)`.
    pub fn shuffle(self, seed: u64) -> Self {
        let order = permutation(seed, self.len());
        let origins = order.iter().map(|&i| self.origin(i)).collect();
        let rows = in_order(self.rows, &order);
        Self { name: self.name, columns: self.columns, rows, origins }
    }

    /// `Dataset.train_test_split(test_size=..., seed=seed)` (shuffled, not stratified): returns
    /// `(train, test)`. The test rows are the first `n_test` of the seed's permutation, the train
    /// rows the rest, in permutation order; the same checks as `datasets` (an empty dataset is
    /// returned as both halves).
    pub fn train_test_split(self, test_size: TestSize, seed: u64) -> Result<(Self, Self), DataError> {
        let n = self.len();
        if n == 0 {
            return Ok((self.clone(), self));
        }
        let (n_test, n_train) = split_sizes(n, test_size).map_err(|message| DataError::InvalidTestSize {
            dataset: self.name.clone(),
            test_size: test_size.to_string(),
            message,
        })?;
        let order = permutation(seed, n);
        let test = self.select(&order[..n_test])?;
        let train = self.select(&order[n_test..n_test + n_train])?;
        Ok((train, test))
    }
}

/// `datasets`' `n_test`, `n_train` for a `test_size` (no `train_size`), or its error message.
fn split_sizes(n: usize, test_size: TestSize) -> Result<(usize, usize), String> {
    let n_test = match test_size {
        TestSize::Count(c) if c == 0 || c >= n as u64 => None,
        TestSize::Count(c) => Some(c as usize),
        TestSize::Fraction(f) if !(f > 0.0 && f < 1.0) => None,
        TestSize::Fraction(f) => Some((f * n as f64).ceil() as usize),
    };
    let Some(n_test) = n_test else {
        return Err(format!(
            "test_size={test_size} should be either positive and smaller than the number of samples {n} or a float in the (0, 1) range"
        ));
    };
    let n_train = n - n_test;
    if n_train == 0 {
        return Err(format!(
            "With n_samples={n}, test_size={test_size} and train_size=None, the resulting train set will be empty. Adjust any of the aforementioned parameters."
        ));
    }
    Ok((n_test, n_train))
}

fn conform(mut row: Row, columns: &[String]) -> Row {
    if row.len() == columns.len() && row.keys().zip(columns).all(|(k, c)| k == c) {
        return row;
    }
    columns.iter().map(|c| (c.clone(), row.remove(c).unwrap_or(Value::Null))).collect()
}
