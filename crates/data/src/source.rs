//! Local dataset sources: `.jsonl`, `.json` and `.parquet` files, and directories in the hub's
//! layout, where a split name resolves to files by [`resolve_split_files`]. [`DatasetLoader`]
//! also reaches the hub ([`crate::hub`]) for ids that are not local paths.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::data_files::{resolve_data_files, README};
use crate::dataset::{Dataset, Row, RowOrigin};
use crate::error::DataError;
use crate::hub::{HubClient, HubConfig};
use crate::parquet_file::read_parquet;
use std::sync::Arc;

/// File extensions read as data; any other file in a dataset directory is ignored.
pub const DATA_EXTENSIONS: [&str; 3] = ["parquet", "jsonl", "json"];

/// Something that yields one split of a dataset by id: the mixers load through this.
pub trait SplitSource {
    /// The rows of `split` of dataset `id` (with an optional config name).
    fn load_split(&self, id: &str, config: Option<&str>, split: &str) -> Result<Dataset, DataError>;
}

/// Loads a dataset id as the handbook does: an existing local file or directory first, else a
/// hub dataset (`org/name`) when a hub client is configured.
#[derive(Debug)]
pub struct DatasetLoader {
    hub: Option<HubClient>,
}

impl DatasetLoader {
    /// Local paths only; a hub id is a [`DataError::DatasetNotFound`].
    pub fn local_only() -> Self {
        Self { hub: None }
    }

    /// Local paths, then the hub through `client`.
    pub fn with_hub(client: HubClient) -> Self {
        Self { hub: Some(client) }
    }

    /// Local paths, then the hub configured from the environment ([`HubConfig::from_env`]).
    pub fn from_env() -> Result<Self, DataError> {
        Ok(Self::with_hub(HubClient::new(HubConfig::from_env())?))
    }
}

impl SplitSource for DatasetLoader {
    fn load_split(&self, id: &str, config: Option<&str>, split: &str) -> Result<Dataset, DataError> {
        let path = Path::new(id);
        if path.exists() {
            return load_local(path, config, split);
        }
        let cwd = || std::env::current_dir().unwrap_or_default();
        match &self.hub {
            // The repo itself could not be listed: say the id is not a local path either.
            Some(hub) if is_hub_id(id) => hub.load_split(id, config, split).map_err(|e| match is_repo_miss(&e) {
                true => DataError::NotLocalNorHub { id: id.to_string(), cwd: cwd(), hub: Box::new(e) },
                false => e,
            }),
            _ => Err(DataError::DatasetNotFound { id: id.to_string(), cwd: cwd() }),
        }
    }
}

/// Whether a hub error means the repo could not be found or reached at all (as opposed to a
/// missing file or split of a repo that exists).
fn is_repo_miss(error: &DataError) -> bool {
    match error {
        DataError::Hub { file: None, .. } => true,
        DataError::HubOfflineMiss { what, .. } => what == crate::hub::REPO_LISTING,
        _ => false,
    }
}

/// Whether `id` has the shape of a hub repo id: `name` or `org/name`, of letters, digits, `-`,
/// `_` and `.`, not starting with `.`.
pub fn is_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    !parts.is_empty()
        && parts.len() <= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// One split of a local dataset: a data file (which only has the split `train`, as
/// `load_dataset("json", data_files=file)` names it) or a directory resolved as `datasets` does
/// ([`resolve_data_files`]: its README.md's `configs:`, else [`resolve_split_files`]).
pub fn load_local(path: &Path, config: Option<&str>, split: &str) -> Result<Dataset, DataError> {
    let name = format!("{}:{split}", path.display());
    if path.is_file() {
        if split != "train" {
            return Err(DataError::MissingSplit {
                dataset: path.display().to_string(),
                split: split.to_string(),
                found: vec![format!("{} (a single file is the split `train`)", path.display())],
            });
        }
        return load_file(path, &name);
    }
    let files = list_files(path)?;
    let readme_path = path.join(README);
    let readme = match readme_path.is_file() {
        true => Some(std::fs::read_to_string(&readme_path).map_err(|source| DataError::Io { path: readme_path.clone(), source })?),
        false => None,
    };
    let chosen = resolve_data_files(&files, readme.as_deref(), &path.display().to_string(), config, split)?;
    if chosen.is_empty() {
        return Err(DataError::MissingSplit {
            dataset: path.display().to_string(),
            split: split.to_string(),
            found: files.into_iter().filter(|f| is_data_file(f)).collect(),
        });
    }
    let paths: Vec<PathBuf> = chosen.iter().map(|f| path.join(f)).collect();
    load_files(&paths, &name)
}

/// The rows of several data files, concatenated in the given order (columns united, as
/// `concatenate_datasets`).
pub fn load_files(paths: &[PathBuf], name: &str) -> Result<Dataset, DataError> {
    let parts = paths.iter().map(|p| load_file(p, name)).collect::<Result<Vec<_>, _>>()?;
    Ok(Dataset::concatenate(name, parts))
}

/// One data file, by extension: `.parquet`, or `.jsonl` / `.json` (JSON Lines, a JSON array of
/// objects — or of strings, which become `{"text": ...}` — or one object of equal-length column
/// arrays).
///
/// Each row records its origin (the file, its row index there, and its line in a JSON Lines
/// file), which errors about the row name.
pub fn load_file(path: &Path, name: &str) -> Result<Dataset, DataError> {
    let (dataset, lines) = match extension(&path.to_string_lossy()) {
        Some("parquet") => (read_parquet(path, name)?, None),
        Some("jsonl" | "json") => read_json(path, name)?,
        _ => return Err(DataError::UnsupportedFile { path: path.to_path_buf() }),
    };
    let source: Arc<str> = Arc::from(path.display().to_string().as_str());
    let origins = (0..dataset.len())
        .map(|row| RowOrigin { source: source.clone(), row, line: lines.as_ref().and_then(|l: &Vec<usize>| l.get(row).copied()) })
        .collect();
    Ok(dataset.with_origins(origins))
}

fn extension(file: &str) -> Option<&str> {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.rsplit_once('.').map(|(_, ext)| ext).filter(|ext| DATA_EXTENSIONS.contains(ext))
}

fn is_data_file(file: &str) -> bool {
    extension(file).is_some()
}

/// The data files of `split` among `files` (paths relative to the dataset root, `/`-separated,
/// sorted) for a dataset without README `configs:` ([`resolve_data_files`] applies those first). The rule, a subset of `datasets`' inference plus the split-named directories the
/// hub's parquet conversion writes:
///
/// 1. With a `config` other than `default`, only files under `{config}/` count, and the paths
///    below are relative to it.
/// 2. Files directly in the root or in `data/` whose name is `{split}.{ext}` or starts with
///    `{split}-` (this covers the hub's `data/{split}-00000-of-00003.parquet` shards, which is
///    `datasets`' `SPLIT_PATTERN_SHARDED`, and `{split}.jsonl`). `train` does not pick up
///    `train_sft-*`: the character after the split name must be `-` or `.`.
/// 3. If rule 2 matches nothing: every data file under a directory `{split}/`, `data/{split}/`
///    or (without a config) `default/{split}/`.
///
/// Only `.parquet`, `.jsonl` and `.json` files count, hidden files and directories are skipped,
/// and the result keeps the sorted order of `files` (shard order, as `datasets` reads them).
pub fn resolve_split_files(files: &[String], split: &str, config: Option<&str>) -> Vec<String> {
    let prefix = match config {
        Some(c) if c != "default" && !c.is_empty() => format!("{c}/"),
        _ => String::new(),
    };
    let candidates: Vec<(&String, &str)> = files
        .iter()
        .filter(|f| is_data_file(f) && !f.split('/').any(|part| part.starts_with('.')))
        .filter_map(|f| f.strip_prefix(prefix.as_str()).map(|rel| (f, rel)))
        .collect();
    let named = |base: &str| {
        base.strip_prefix(split).is_some_and(|rest| rest.starts_with('-') || extension(base).is_some_and(|ext| rest == format!(".{ext}")))
    };
    let direct: Vec<String> = candidates
        .iter()
        .filter(|(_, rel)| {
            let (dir, base) = rel.rsplit_once('/').unwrap_or(("", *rel));
            (dir.is_empty() || dir == "data") && named(base)
        })
        .map(|(f, _)| (*f).clone())
        .collect();
    if !direct.is_empty() {
        return direct;
    }
    let mut dirs = vec![format!("{split}/"), format!("data/{split}/")];
    if prefix.is_empty() {
        dirs.push(format!("default/{split}/"));
    }
    candidates.iter().filter(|(_, rel)| dirs.iter().any(|d| rel.starts_with(d.as_str()))).map(|(f, _)| (*f).clone()).collect()
}

/// Every file under `root` (following symlinks, as the hub cache's snapshots are links), as
/// sorted `/`-separated relative paths.
pub fn list_files(root: &Path) -> Result<Vec<String>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|source| DataError::Io { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| DataError::Io { path: dir.clone(), source })?;
            let child = rel.join(entry.file_name());
            let full = root.join(&child);
            if full.is_dir() {
                stack.push(child);
            } else if full.is_file() {
                let parts: Vec<String> = child.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The rows of a `.json`/`.jsonl` file, with each row's line when the file is JSON Lines.
fn read_json(path: &Path, name: &str) -> Result<(Dataset, Option<Vec<usize>>), DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let invalid = |message: String| DataError::InvalidJson { path: path.to_path_buf(), message };
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let rows = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(row) => Ok(row),
                Value::String(s) => Ok(Row::from_iter([("text".to_string(), Value::String(s))])),
                other => Err(invalid(format!("array element {i} is not an object: {other}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((Dataset::from_rows(name, rows), None));
    }
    match read_json_lines(path, text) {
        Ok(rows) => {
            let (rows, lines): (Vec<Row>, Vec<usize>) = rows.into_iter().unzip();
            Ok((Dataset::from_rows(name, rows), Some(lines)))
        }
        // A `.json` file that is not JSON Lines may be one object of columns.
        Err(line_error) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(columns)) => columnar_rows(columns).map(|rows| (Dataset::from_rows(name, rows), None)).map_err(invalid),
            _ => Err(line_error),
        },
    }
}

fn read_json_lines(path: &Path, text: &str) -> Result<Vec<(Row, usize)>, DataError> {
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |message: String| DataError::MalformedJsonLine { path: path.to_path_buf(), line: index + 1, message };
        match serde_json::from_str::<Value>(line).map_err(|e| malformed(e.to_string()))? {
            Value::Object(row) => rows.push((row, index + 1)),
            other => return Err(malformed(format!("expected a JSON object, found {other}"))),
        }
    }
    Ok(rows)
}

fn columnar_rows(columns: serde_json::Map<String, Value>) -> Result<Vec<Row>, String> {
    let mut len = None;
    for (key, value) in &columns {
        let Value::Array(values) = value else {
            return Err(format!("top-level object: `{key}` is not an array of column values"));
        };
        if *len.get_or_insert(values.len()) != values.len() {
            return Err(format!("top-level object: column `{key}` has {} values, expected {}", values.len(), len.unwrap_or(0)));
        }
    }
    let mut rows: Vec<Row> = (0..len.unwrap_or(0)).map(|_| Row::new()).collect();
    for (key, value) in columns {
        if let Value::Array(values) = value {
            for (row, v) in rows.iter_mut().zip(values) {
                row.insert(key.clone(), v);
            }
        }
    }
    Ok(rows)
}
