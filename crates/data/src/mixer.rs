//! The handbook's two dataset mixers, with its semantics (see docs/data.md):
//!
//! - [`mix_datasets`]: the classic recipe keys `dataset_mixer: {id: fraction}` (in YAML order),
//!   `dataset_splits`, `dataset_configs`, `columns_to_keep`, shuffle with seed 42;
//! - [`mix_mixture`]: the newer `dataset_mixture: {datasets: [{id, config, split, columns,
//!   weight}], seed, test_split_size}`.
//!
//! Both load through a [`SplitSource`] and shuffle with numpy's permutation
//! ([`crate::shuffle`]), so they pick the same rows in the same order as the Python handbook.

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::dataset::{Dataset, TestSize};
use crate::error::DataError;
use crate::source::SplitSource;

/// One `dataset_mixer` entry: a dataset id and the fraction of its train splits to use.
#[derive(Debug, Clone, PartialEq)]
pub struct MixerEntry {
    /// Hub id or local path.
    pub id: String,
    /// Fraction of each train split taken (the first `int(fraction * len)` rows).
    pub fraction: f64,
}

/// `dataset_mixer`, in the order the recipe lists it (a YAML mapping, or a list of one-entry
/// mappings as the handbook's comments show it).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DatasetMixer(pub Vec<MixerEntry>);

impl<'de> Deserialize<'de> for DatasetMixer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MixerVisitor;
        impl<'de> Visitor<'de> for MixerVisitor {
            type Value = DatasetMixer;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of dataset id to fraction, or a list of such mappings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DatasetMixer, A::Error> {
                let mut entries = Vec::new();
                while let Some((id, fraction)) = map.next_entry::<String, f64>()? {
                    entries.push(MixerEntry { id, fraction });
                }
                Ok(DatasetMixer(entries))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DatasetMixer, A::Error> {
                let mut entries = Vec::new();
                while let Some(DatasetMixer(part)) = seq.next_element::<DatasetMixer>()? {
                    entries.extend(part);
                }
                Ok(DatasetMixer(entries))
            }
        }
        deserializer.deserialize_any(MixerVisitor)
    }
}

fn default_splits() -> Vec<String> {
    vec!["train".to_string(), "test".to_string()]
}
fn default_true() -> bool {
    true
}
fn default_mixer_seed() -> u64 {
    42
}

/// The classic handbook data arguments (`DataArguments` + `get_datasets`' arguments).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MixerConfig {
    /// Datasets and the fraction of their train splits to use, in order.
    pub dataset_mixer: DatasetMixer,
    /// Splits to load from every dataset; each name must contain "train" or "test"
    /// (default `[train, test]`).
    #[serde(default = "default_splits")]
    pub dataset_splits: Vec<String>,
    /// Config names, one per dataset (default: none).
    #[serde(default)]
    pub dataset_configs: Option<Vec<String>>,
    /// Columns kept from each dataset (those it has); `None` keeps all of them.
    #[serde(default)]
    pub columns_to_keep: Option<Vec<String>>,
    /// Shuffle the mixed train and test sets (default true).
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Shuffle seed (the handbook hard-codes 42).
    #[serde(default = "default_mixer_seed")]
    pub seed: u64,
}

impl MixerConfig {
    /// A config with the handbook's defaults for everything but the mixer.
    pub fn new(dataset_mixer: DatasetMixer) -> Self {
        Self { dataset_mixer, dataset_splits: default_splits(), dataset_configs: None, columns_to_keep: None, shuffle: true, seed: 42 }
    }
}

fn default_split() -> String {
    "train".to_string()
}
fn default_weight() -> Option<f64> {
    Some(1.0)
}

/// One dataset of a `dataset_mixture`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureDataset {
    /// Hub id or local path.
    pub id: String,
    /// Config name.
    #[serde(default)]
    pub config: Option<String>,
    /// The split to load (default `train`).
    #[serde(default = "default_split")]
    pub split: String,
    /// Columns selected (all must exist); `None` keeps all.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Fraction of the (shuffled) split to take; default 1.0 (shuffled, all rows); an explicit
    /// `null` takes every row unshuffled.
    #[serde(default = "default_weight")]
    pub weight: Option<f64>,
}

/// The newer handbook's `dataset_mixture`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetMixture {
    /// The datasets, in order.
    pub datasets: Vec<MixtureDataset>,
    /// Seed of every shuffle and of the split (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Hold out this fraction (or number) of the mixed rows as `test`.
    #[serde(default)]
    pub test_split_size: Option<TestSize>,
}

/// What a mixer returns: the `train` and `test` entries of the handbook's `DatasetDict`.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedSplits {
    /// Mixed training rows.
    pub train: Option<Dataset>,
    /// Mixed evaluation rows.
    pub test: Option<Dataset>,
}

/// Whether a split name is a train or test split, by the handbook's rule ("train" in the name
/// first, then "test").
fn is_train_split(split: &str) -> Result<bool, DataError> {
    if split.contains("train") {
        Ok(true)
    } else if split.contains("test") {
        Ok(false)
    } else {
        Err(DataError::UnknownSplitType { split: split.to_string() })
    }
}

/// `int(fraction * len)` with the handbook's checks: negative/NaN fractions are refused, and a
/// count past the end is an error as `select(range(n))` raises.
fn fraction_rows(dataset: &Dataset, fraction: f64) -> Result<usize, DataError> {
    if !fraction.is_finite() || fraction < 0.0 {
        return Err(DataError::InvalidFraction { dataset: dataset.name.clone(), fraction });
    }
    let requested = (fraction * dataset.len() as f64) as usize;
    if requested > dataset.len() {
        return Err(DataError::FractionTooLarge { dataset: dataset.name.clone(), fraction, requested, len: dataset.len() });
    }
    Ok(requested)
}

/// The handbook's `get_datasets` / `mix_datasets`: for each dataset (in mixer order) and each
/// split, load it and keep `columns_to_keep`; train splits are cut to their dataset's fraction,
/// test splits kept whole; each side is concatenated in order and shuffled with `seed`.
///
/// Checked before anything is loaded: the config count, the split names, the fractions.
pub fn mix_datasets(config: &MixerConfig, source: &dyn SplitSource) -> Result<MixedSplits, DataError> {
    let entries = &config.dataset_mixer.0;
    if let Some(configs) = &config.dataset_configs {
        if !configs.is_empty() && configs.len() != entries.len() {
            return Err(DataError::InvalidMixer {
                message: "The number of given dataset config names must be the same as the given number of datasets.".to_string(),
            });
        }
    }
    let kinds = config.dataset_splits.iter().map(|s| is_train_split(s)).collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = entries.iter().find(|e| !e.fraction.is_finite() || e.fraction < 0.0) {
        return Err(DataError::InvalidFraction { dataset: bad.id.clone(), fraction: bad.fraction });
    }
    let mut train_parts = Vec::new();
    let mut test_parts = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let ds_config = config.dataset_configs.as_ref().and_then(|c| c.get(index)).map(String::as_str);
        for (split, &is_train) in config.dataset_splits.iter().zip(&kinds) {
            let mut dataset = source.load_split(&entry.id, ds_config, split)?;
            if let Some(keep) = &config.columns_to_keep {
                dataset = dataset.retain_columns(keep)?;
            }
            if is_train {
                let n = fraction_rows(&dataset, entry.fraction)?;
                train_parts.push(dataset.head(n)?);
            } else {
                test_parts.push(dataset);
            }
        }
    }
    let finish = |name: &str, parts: Vec<Dataset>| {
        (!parts.is_empty()).then(|| {
            let mixed = Dataset::concatenate(name, parts);
            if config.shuffle {
                mixed.shuffle(config.seed)
            } else {
                mixed
            }
        })
    };
    let mixed = MixedSplits { train: finish("dataset_mixer:train", train_parts), test: finish("dataset_mixer:test", test_parts) };
    if mixed.train.is_none() && mixed.test.is_none() {
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        return Err(DataError::InvalidMixer {
            message: format!("datasets {ids:?} with splits {:?} give neither a train nor a test set", config.dataset_splits),
        });
    }
    Ok(mixed)
}

/// The newer handbook's `get_dataset` for a `dataset_mixture`: for each dataset, load its split,
/// select `columns`, and when it has a weight shuffle it with `seed` and take the first
/// `int(len * weight)` rows; concatenate in order, shuffle with `seed`, and if `test_split_size`
/// is set, `train_test_split(test_size, seed)`.
pub fn mix_mixture(mixture: &DatasetMixture, source: &dyn SplitSource) -> Result<MixedSplits, DataError> {
    if mixture.datasets.is_empty() {
        return Err(DataError::InvalidMixer { message: "No datasets were loaded from the mixture configuration".to_string() });
    }
    let column_sets: Vec<Vec<&String>> = mixture
        .datasets
        .iter()
        .filter_map(|d| d.columns.as_ref())
        .map(|c| {
            let mut set: Vec<&String> = c.iter().collect();
            set.sort();
            set.dedup();
            set
        })
        .collect();
    if column_sets.windows(2).any(|w| w[0] != w[1]) {
        return Err(DataError::InvalidMixer {
            message: format!(
                "Column names must be consistent across all dataset configurations in a mixture. Found different column sets: {column_sets:?}"
            ),
        });
    }
    let mut parts = Vec::new();
    for entry in &mixture.datasets {
        let mut dataset = source.load_split(&entry.id, entry.config.as_deref(), &entry.split)?;
        if let Some(columns) = &entry.columns {
            dataset = dataset.select_columns(columns)?;
        }
        if let Some(weight) = entry.weight {
            let n = fraction_rows(&dataset, weight)?;
            dataset = dataset.shuffle(mixture.seed).head(n)?;
        }
        parts.push(dataset);
    }
    let combined = Dataset::concatenate("dataset_mixture", parts).shuffle(mixture.seed);
    match mixture.test_split_size {
        Some(test_size) => {
            let (mut train, mut test) = combined.train_test_split(test_size, mixture.seed)?;
            train.name = "dataset_mixture:train".to_string();
            test.name = "dataset_mixture:test".to_string();
            Ok(MixedSplits { train: Some(train), test: Some(test) })
        }
        None => Ok(MixedSplits { train: Some(Dataset { name: "dataset_mixture:train".to_string(), ..combined }), test: None }),
    }
}
