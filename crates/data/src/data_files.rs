//! Which files make up one split of a dataset, as `datasets.load_dataset` decides for a hub repo
//! or a local directory:
//!
//! 1. The README's YAML front matter (`---` ... `---`), key `configs:` (datasets'
//!    `MetadataConfigs`): each entry has a `config_name` and `data_files` — a string, a list of
//!    strings (both the split `train`), or a list of `{split, path}` with `path` a string or a
//!    list — of glob patterns relative to the root (or to the entry's `data_dir`). Without
//!    `data_files`, the entry's files are found by the conventions below inside its `data_dir`.
//!    No config asked (or `default`, when no config has that name) means the default config: the
//!    only one, the one named `default`, or the one marked `default: true`.
//! 2. Without `configs:`, the file-name conventions of [`resolve_split_files`].
//!
//! Globs follow fsspec (as `datasets.data_files.resolve_pattern`): `*` and `?` stay within one
//! path segment, `[...]` is a character class, `**` as a whole segment spans any number of
//! segments; hidden files and directories (`.x`) and `__x` directories match only when the
//! pattern names them; `README.md`, `config.json` and the other files of
//! `datasets.data_files.FILES_TO_IGNORE` only when named exactly; only files with a data
//! extension count. A pattern without wildcards must match a file (datasets'
//! `FileNotFoundError`); a glob may match nothing.

use serde_yaml::Value;

use crate::error::DataError;
use crate::source::resolve_split_files;

/// The dataset card, whose YAML front matter may declare the configs.
pub const README: &str = "README.md";

/// Files a pattern matches only when it names them (`datasets.data_files.FILES_TO_IGNORE`).
const FILES_TO_IGNORE: [&str; 6] =
    ["README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip", "dataset_dict.json"];

/// Extensions a matched file must carry (any of its dot-suffixes) to count as data. Beyond the
/// formats read here, the common ones `datasets` reads, so such a file is reported as
/// unsupported instead of silently skipped.
const MATCHED_EXTENSIONS: [&str; 7] = ["parquet", "jsonl", "json", "csv", "tsv", "txt", "arrow"];

/// One entry of the README's `configs:`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// `config_name`.
    pub name: String,
    /// `data_files` as `(split, patterns)` in the card's order; `None` when absent.
    pub data_files: Option<Vec<(String, Vec<String>)>>,
    /// `data_dir`: the directory the patterns (or the conventions) apply in.
    pub data_dir: Option<String>,
    /// `default: true`.
    pub default: bool,
}

/// The YAML between the first line `---` and the next line `---`, as datasets'
/// `_split_yaml_from_readme` cuts it; `None` without front matter.
pub fn front_matter(readme: &str) -> Option<String> {
    let lines: Vec<&str> = readme.lines().collect();
    if lines.first().map(|l| l.trim_end_matches('\r')) != Some("---") {
        return None;
    }
    let end = lines[1..].iter().position(|l| l.trim_end_matches('\r') == "---")? + 1;
    Some(lines[1..end].join("\n"))
}

/// The `configs:` of a README (empty without front matter or without the key), checked as
/// datasets' `MetadataConfigs.from_dataset_card_data` checks them.
pub fn parse_configs(readme: &str) -> Result<Vec<DataConfig>, String> {
    let Some(yaml) = front_matter(readme) else { return Ok(Vec::new()) };
    let card: Value = serde_yaml::from_str(&yaml).map_err(|e| format!("invalid YAML front matter: {e}"))?;
    let Some(configs) = card.get("configs").filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let Value::Sequence(entries) = configs else { return Err(format!("expected `configs` to be a list, got {}", show(configs))) };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = match entry.get("config_name") {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => show(v),
            _ => return Err(format!("each config must have a `config_name`, got {}", show(entry))),
        };
        if out.iter().any(|c: &DataConfig| c.name == name) {
            return Err(format!("config `{name}` is declared twice"));
        }
        let data_files = entry.get("data_files").filter(|v| !v.is_null()).map(|v| data_files(&name, v)).transpose()?;
        let data_dir = match entry.get("data_dir") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.trim_matches('/').to_string()),
            Some(other) => return Err(format!("config `{name}`: `data_dir` must be a string, got {}", show(other))),
        };
        let default = matches!(entry.get("default"), Some(Value::Bool(true)));
        out.push(DataConfig { name, data_files, data_dir, default });
    }
    Ok(out)
}

/// `data_files` as datasets' `sanitize_patterns` reads it from YAML.
fn data_files(config: &str, value: &Value) -> Result<Vec<(String, Vec<String>)>, String> {
    let invalid = || {
        format!(
            "config `{config}`: expected `data_files` to be a string, a list of strings, or a list of {{split, path}} with path a string or a list, got {}",
            show(value)
        )
    };
    let strings = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Sequence(items) => items.iter().map(|i| i.as_str().map(str::to_string)).collect(),
            _ => None,
        }
    };
    match value {
        Value::String(s) => Ok(vec![("train".to_string(), vec![s.clone()])]),
        Value::Sequence(items) if items.iter().any(Value::is_mapping) => {
            let mut splits: Vec<(String, Vec<String>)> = Vec::new();
            for item in items {
                let Value::Mapping(map) = item else { return Err(invalid()) };
                let split = item.get("split").and_then(Value::as_str).ok_or_else(invalid)?;
                let paths = item.get("path").and_then(strings).ok_or_else(invalid)?;
                if map.len() != 2 {
                    return Err(invalid());
                }
                if !is_split_name(split) {
                    return Err(format!("config `{config}`: split name `{split}` must match ^\\w+(\\.\\w+)*$"));
                }
                if splits.iter().any(|(s, _)| s == split) {
                    return Err(format!("config `{config}`: split `{split}` is listed twice in data_files"));
                }
                splits.push((split.to_string(), paths));
            }
            Ok(splits)
        }
        Value::Sequence(_) => Ok(vec![("train".to_string(), strings(value).ok_or_else(invalid)?)]),
        _ => Err(invalid()),
    }
}

/// datasets' `_split_re`: `^\w+(\.\w+)*$`.
fn is_split_name(split: &str) -> bool {
    !split.is_empty() && split.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

fn show(value: &Value) -> String {
    serde_yaml::to_string(value).map(|s| s.trim().replace('\n', " ")).unwrap_or_default()
}

/// The config a request means: `asked` by name, else (none asked, or `default` when no config
/// bears that name) the default config of datasets' `get_default_config_name`.
pub fn select_config<'a>(configs: &'a [DataConfig], dataset: &str, asked: Option<&str>) -> Result<&'a DataConfig, DataError> {
    let available = || configs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    if let Some(name) = asked.filter(|n| !n.is_empty()) {
        if let Some(found) = configs.iter().find(|c| c.name == name) {
            return Ok(found);
        }
        if name != "default" {
            return Err(DataError::UnknownConfig { dataset: dataset.to_string(), config: name.to_string(), available: available() });
        }
    }
    let defaults: Vec<&DataConfig> = configs.iter().filter(|c| configs.len() == 1 || c.name == "default" || c.default).collect();
    match defaults.as_slice() {
        [one] => Ok(one),
        [] => Err(DataError::NoDefaultConfig { dataset: dataset.to_string(), available: available() }),
        several => Err(DataError::DatasetCard {
            dataset: dataset.to_string(),
            message: format!("several default configs: {:?}", several.iter().map(|c| &c.name).collect::<Vec<_>>()),
        }),
    }
}

/// The files of `split` among `files` (sorted, `/`-separated, relative to the dataset root),
/// `readme` being the text of the root's `README.md` if there is one. Empty when the file-name
/// conventions find nothing; an error when the card's configs do not have the config or split
/// asked (naming the available ones), or a pattern without wildcards matches no file.
pub fn resolve_data_files(
    files: &[String],
    readme: Option<&str>,
    dataset: &str,
    config: Option<&str>,
    split: &str,
) -> Result<Vec<String>, DataError> {
    let configs = match readme {
        Some(text) => parse_configs(text).map_err(|message| DataError::DatasetCard { dataset: dataset.to_string(), message })?,
        None => Vec::new(),
    };
    if configs.is_empty() {
        return Ok(resolve_split_files(files, split, config));
    }
    let chosen = select_config(&configs, dataset, config)?;
    let dir_prefix = chosen.data_dir.as_deref().filter(|d| !d.is_empty()).map(|d| format!("{d}/")).unwrap_or_default();
    let Some(splits) = &chosen.data_files else {
        // No data_files: the conventions, inside data_dir.
        let inside: Vec<String> = files.iter().filter_map(|f| f.strip_prefix(dir_prefix.as_str()).map(str::to_string)).collect();
        return Ok(resolve_split_files(&inside, split, None).into_iter().map(|f| format!("{dir_prefix}{f}")).collect());
    };
    let Some((_, patterns)) = splits.iter().find(|(s, _)| s == split) else {
        return Err(DataError::MissingConfigSplit {
            dataset: dataset.to_string(),
            config: chosen.name.clone(),
            split: split.to_string(),
            available: splits.iter().map(|(s, _)| s.clone()).collect(),
        });
    };
    let mut out = Vec::new();
    for pattern in patterns {
        let pattern = format!("{dir_prefix}{}", pattern.trim_start_matches("./"));
        let matched: Vec<&String> = files.iter().filter(|f| pattern_selects(&pattern, f)).collect();
        if matched.is_empty() && !has_wildcards(&pattern) {
            return Err(DataError::DataFilesNotFound {
                dataset: dataset.to_string(),
                config: chosen.name.clone(),
                split: split.to_string(),
                pattern,
            });
        }
        out.extend(matched.into_iter().cloned());
    }
    Ok(out)
}

fn has_wildcards(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Whether `pattern` selects the data file `path` (datasets' `resolve_pattern` rules: hidden and
/// special parts, ignored files, data extensions).
fn pattern_selects(pattern: &str, path: &str) -> bool {
    if !glob_match(pattern, path) {
        return false;
    }
    let base = path.rsplit('/').next().unwrap_or(path);
    let pattern_base = pattern.rsplit('/').next().unwrap_or(pattern);
    if FILES_TO_IGNORE.contains(&base) && pattern_base != base {
        return false;
    }
    let hidden = |s: &str| s.split('/').filter(|p| p.starts_with('.') && !p.chars().all(|c| c == '.')).count();
    let parent = |s: &str| s.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
    let special = |s: &str| s.split('/').filter(|p| p.starts_with("__")).count();
    if hidden(path) != hidden(pattern) || special(&parent(path)) != special(&parent(pattern)) {
        return false;
    }
    base.split('.').skip(1).any(|suffix| MATCHED_EXTENSIONS.contains(&suffix))
}

/// fsspec's glob on `/`-separated relative paths: `**` as a whole segment spans zero or more
/// segments; within a segment, `*` any run of characters, `?` one character, `[...]` a class
/// (`[!...]` or `[^...]` negated).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    match_segments(&pattern, &path)
}

fn match_segments(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((first, rest)) => path.split_first().is_some_and(|(p, path_rest)| {
            let first: Vec<char> = first.chars().collect();
            let p: Vec<char> = p.chars().collect();
            match_segment(&first, &p) && match_segments(rest, path_rest)
        }),
    }
}

fn match_segment(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|skip| match_segment(rest, &text[skip..])),
        Some(('?', rest)) => !text.is_empty() && match_segment(rest, &text[1..]),
        Some(('[', rest)) => match class(rest) {
            Some((matches, after)) => text.first().is_some_and(|&c| matches(c)) && match_segment(after, &text[1..]),
            None => text.first() == Some(&'[') && match_segment(rest, &text[1..]),
        },
        Some((c, rest)) => text.first() == Some(c) && match_segment(rest, &text[1..]),
    }
}

/// A `[...]` class (the part after `[`): its predicate and the pattern after `]`; `None` when
/// unterminated (then `[` is literal).
#[allow(clippy::type_complexity)]
fn class(rest: &[char]) -> Option<(Box<dyn Fn(char) -> bool + '_>, &[char])> {
    let negated = matches!(rest.first(), Some('!' | '^'));
    let body_start = usize::from(negated);
    // A `]` right after `[` (or `[!`) is a member, as in fnmatch.
    let close = rest.iter().enumerate().skip(body_start + 1).find(|(_, &c)| c == ']').map(|(i, _)| i)?;
    let body = &rest[body_start..close];
    let matches = move |c: char| {
        let mut i = 0;
        let mut hit = false;
        while i < body.len() {
            if i + 2 < body.len() && body[i + 1] == '-' {
                hit |= body[i] <= c && c <= body[i + 2];
                i += 3;
            } else {
                hit |= body[i] == c;
                i += 1;
            }
        }
        hit != negated
    };
    Some((Box::new(matches), &rest[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_follow_fsspec() {
        assert!(glob_match("data/*.parquet", "data/a.parquet"));
        assert!(!glob_match("data/*.parquet", "data/sub/a.parquet"));
        assert!(glob_match("data/**/*.parquet", "data/a.parquet"));
        assert!(glob_match("data/**/*.parquet", "data/x/y/a.parquet"));
        assert!(glob_match("**", "a/b/c.json"));
        assert!(glob_match("data/train_prefs-*", "data/train_prefs-00000-of-00001.parquet"));
        assert!(!glob_match("data/train-*", "data/train_prefs-00000-of-00001.parquet"));
        assert!(glob_match("data/train-[0-9][0-9]*.parquet", "data/train-01.parquet"));
        assert!(!glob_match("data/train-[!0-9]*.parquet", "data/train-01.parquet"));
        assert!(glob_match("a?c.json", "abc.json"));
        assert!(!glob_match("a?c.json", "a/c.json"));
    }

    #[test]
    fn hidden_ignored_and_non_data_files_need_naming() {
        assert!(!pattern_selects("**", ".hidden/a.parquet"));
        assert!(pattern_selects(".hidden/*", ".hidden/a.parquet"));
        assert!(!pattern_selects("*", "README.md"));
        assert!(!pattern_selects("**", "__pycache__/a.json"));
        assert!(!pattern_selects("*", "notes.md"));
        assert!(pattern_selects("*", "rows.json"));
    }

    #[test]
    fn front_matter_is_cut_as_datasets_does() {
        assert_eq!(front_matter("---\na: 1\n---\n# Title"), Some("a: 1".to_string()));
        assert_eq!(front_matter("# Title\n---\na: 1\n---"), None);
        assert_eq!(front_matter("---\na: 1\n"), None);
    }

    #[test]
    fn data_files_shapes() {
        let card = "---\nconfigs:\n- config_name: a\n  data_files: x/*.parquet\n- config_name: b\n  data_files: [p.json, q.json]\n\
                    - config_name: c\n  default: true\n  data_files:\n  - split: train\n    path: t/*\n  - split: test\n    path: [u/*, v/*]\n\
                    - config_name: d\n  data_dir: sub\n---\n";
        let configs = parse_configs(card).unwrap();
        assert_eq!(configs[0].data_files, Some(vec![("train".into(), vec!["x/*.parquet".into()])]));
        assert_eq!(configs[1].data_files, Some(vec![("train".into(), vec!["p.json".into(), "q.json".into()])]));
        assert_eq!(configs[2].data_files.as_ref().unwrap()[1], ("test".into(), vec!["u/*".into(), "v/*".into()]));
        assert!(configs[2].default);
        assert_eq!((configs[3].data_files.clone(), configs[3].data_dir.as_deref()), (None, Some("sub")));
        assert_eq!(select_config(&configs, "ds", None).unwrap().name, "c");
        assert_eq!(select_config(&configs, "ds", Some("default")).unwrap().name, "c");

        let bad = "---\nconfigs:\n- config_name: a\n  data_files:\n  - split: train-x\n    path: t/*\n---\n";
        assert!(parse_configs(bad).unwrap_err().contains("train-x"));
        let bad = "---\nconfigs:\n- data_files: t/*\n---\n";
        assert!(parse_configs(bad).unwrap_err().contains("config_name"));
        let bad = "---\nconfigs:\n- config_name: a\n  data_files: {train: t/*}\n---\n";
        assert!(parse_configs(bad).unwrap_err().contains("config `a`"));
    }
}
