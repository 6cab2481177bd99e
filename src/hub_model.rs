//! `model_name_or_path: org/name` (at `model_revision`: a branch, tag or commit) downloaded from
//! the hub with hf-hub into the hub cache, in `huggingface_hub`'s layout
//! (`{cache}/models--org--name/{blobs,refs/<revision>,snapshots/<commit>}`), so a cache Python
//! filled serves here and the other way round; the snapshot directory is then used like any
//! local model directory.
//!
//! What is fetched: the configuration and tokenizer files the repo has ([`MODEL_FILES`]), and
//! the weights — `model.safetensors`, or `model.safetensors.index.json` and every shard it
//! names, or for a PEFT adapter repo `adapter_model.safetensors` (the adapter's base is resolved
//! by the caller the same way). Offline (`HF_HUB_OFFLINE=1`), or when the hub cannot be reached,
//! the snapshot `refs/<revision>` points to (or the one named by a commit revision) is used if
//! complete. `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE` and `HF_TOKEN` apply as for datasets
//! ([`HubConfig::from_env`]).

use alignment_data::hub::HubConfig;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Configuration, generation and tokenizer files downloaded when the repo has them.
pub const MODEL_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
];

const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Why a hub model could not be had, naming the repo, revision and file.
#[derive(Debug, thiserror::Error)]
pub enum HubModelError {
    /// The repo's listing failed (no such repo, no access, the hub unreachable) and no complete
    /// copy is cached.
    #[error("hub model `{repo}` at revision `{revision}` is not available from {endpoint}: {message}")]
    Unavailable { repo: String, revision: String, endpoint: String, message: String },
    /// Offline (`HF_HUB_OFFLINE`) and the cache holds no complete snapshot of the revision.
    #[error("hub model `{repo}` at revision `{revision}` is not in the hub cache {cache_dir} ({reason}), and HF_HUB_OFFLINE is set")]
    NotCached { repo: String, revision: String, cache_dir: PathBuf, reason: String },
    /// Downloading one file failed.
    #[error("hub model `{repo}` at revision `{revision}`, file `{file}`: {message}")]
    Download { repo: String, revision: String, file: String, message: String },
    /// The repo has no weights in a format read here.
    #[error("hub model `{repo}` at revision `{revision}` has neither model.safetensors, model.safetensors.index.json nor a PEFT adapter (adapter_config.json + adapter_model.safetensors); its files: {files:?}")]
    NoWeights { repo: String, revision: String, files: Vec<String> },
    /// The download lock could not be taken.
    #[error("locking {path}: {message}")]
    Lock { path: PathBuf, message: String },
    /// `model.safetensors.index.json` is not the index transformers writes.
    #[error("{path}: not a safetensors index ({message})")]
    BadIndex { path: PathBuf, message: String },
}

impl HubModelError {
    /// Whether the repo itself could not be had (as opposed to one of its files): the name may
    /// then be meant as a local path instead.
    pub fn is_repo_miss(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::NotCached { .. })
    }
}

/// [`resolve`] with the configuration of the environment.
pub fn resolve_from_env(repo: &str, revision: &str) -> Result<PathBuf, HubModelError> {
    resolve(&HubConfig::from_env(), repo, revision)
}

/// The local snapshot directory of model repo `repo` at `revision`, downloading what is missing
/// (see the module documentation).
pub fn resolve(config: &HubConfig, repo: &str, revision: &str) -> Result<PathBuf, HubModelError> {
    if config.offline {
        return cached_snapshot(&config.cache_dir, repo, revision).map_err(|reason| HubModelError::NotCached {
            repo: repo.into(),
            revision: revision.into(),
            cache_dir: config.cache_dir.clone(),
            reason,
        });
    }
    let unavailable = |message: String| HubModelError::Unavailable {
        repo: repo.into(),
        revision: revision.into(),
        endpoint: config.endpoint.clone(),
        message,
    };
    let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.clone())
        .with_progress(true)
        .build()
        .map_err(|e| unavailable(e.to_string()))?;
    let handle = api.repo(Repo::with_revision(repo.into(), RepoType::Model, revision.into()));
    let info = match handle.info() {
        Ok(info) => info,
        // Unreachable (not an HTTP error status): the cache, as transformers falls back to it.
        Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Transport(_)) => {
            return cached_snapshot(&config.cache_dir, repo, revision)
                .map_err(|reason| unavailable(format!("{e}; and the hub cache {} has no copy ({reason})", config.cache_dir.display())));
        }
        Err(e) => return Err(unavailable(e.to_string())),
    };
    let snapshot = snapshot_dir(&config.cache_dir, repo, &info.sha);
    // One process downloads at a time (data-parallel ranks start together); hf-hub's own blob
    // lock gives up after five seconds and would download again.
    let _lock = DownloadLock::acquire(&config.cache_dir, repo)?;
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let fetch = |file: &str| -> Result<PathBuf, HubModelError> {
        let cached = snapshot.join(file);
        if cached.is_file() {
            return Ok(cached);
        }
        handle.download(file).map_err(|e| HubModelError::Download {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
            message: e.to_string(),
        })
    };
    let has = |file: &str| listed.iter().any(|f| f == file);
    let weights: Vec<String> = if has(WEIGHTS) {
        vec![WEIGHTS.into()]
    } else if has(WEIGHTS_INDEX) {
        let mut files = shards(&fetch(WEIGHTS_INDEX)?)?;
        files.push(WEIGHTS_INDEX.into());
        files
    } else if has(ADAPTER_WEIGHTS) && has("adapter_config.json") {
        vec![ADAPTER_WEIGHTS.into()]
    } else {
        return Err(HubModelError::NoWeights { repo: repo.into(), revision: revision.into(), files: listed });
    };
    for file in MODEL_FILES.iter().filter(|f| has(f)).map(|f| f.to_string()).chain(weights) {
        let path = fetch(&file)?;
        if !path.starts_with(&snapshot) {
            // The file came from another commit than the listing's (the branch moved meanwhile).
            return Err(HubModelError::Download {
                repo: repo.into(),
                revision: revision.into(),
                file,
                message: format!("downloaded into {}, not the listed commit {}; retry", path.display(), info.sha),
            });
        }
    }
    Ok(snapshot)
}

/// An exclusive lock on `{cache}/.locks/models--org--name.download.lock` (beside the locks
/// `huggingface_hub` keeps there), released when dropped.
struct DownloadLock(std::fs::File);

impl DownloadLock {
    fn acquire(cache_dir: &Path, repo: &str) -> Result<Self, HubModelError> {
        let dir = cache_dir.join(".locks");
        let path = dir.join(format!("{}.download.lock", Repo::model(repo.into()).folder_name()));
        let failed = |e: std::io::Error| HubModelError::Lock { path: path.clone(), message: e.to_string() };
        std::fs::create_dir_all(&dir).map_err(failed)?;
        let file = std::fs::File::create(&path).map_err(failed)?;
        file.lock().map_err(failed)?;
        Ok(Self(file))
    }
}

impl Drop for DownloadLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// `{cache}/models--org--name/snapshots/{commit}`.
pub fn snapshot_dir(cache_dir: &Path, repo: &str, commit: &str) -> PathBuf {
    cache_dir.join(Repo::model(repo.into()).folder_name()).join("snapshots").join(commit)
}

/// The shard files `index` names (its `weight_map` values), sorted and without repeats.
fn shards(index: &Path) -> Result<Vec<String>, HubModelError> {
    let bad = |message: String| HubModelError::BadIndex { path: index.to_path_buf(), message };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files = map
        .values()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(format!("weight_map value {v} is not a file name"))))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bad_name) = files.iter().find(|f| f.starts_with('/') || f.split('/').any(|p| p == "..")) {
        return Err(bad(format!("shard `{bad_name}` is outside the repo")));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The cached snapshot of `repo` at `revision` (`refs/<revision>`, or the commit itself) when it
/// holds a loadable model or adapter; else why not.
pub fn cached_snapshot(cache_dir: &Path, repo: &str, revision: &str) -> Result<PathBuf, String> {
    let repo_dir = cache_dir.join(Repo::model(repo.into()).folder_name());
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(commit) => commit.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => revision.to_string(),
        Err(_) => return Err(format!("no {}", repo_dir.join("refs").join(revision).display())),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let has = |file: &str| snapshot.join(file).is_file();
    let complete = if has(WEIGHTS) {
        has("config.json")
    } else if has(WEIGHTS_INDEX) {
        has("config.json") && shards(&snapshot.join(WEIGHTS_INDEX)).map_err(|e| e.to_string())?.iter().all(|f| has(f))
    } else {
        has("adapter_config.json") && has(ADAPTER_WEIGHTS)
    };
    if complete {
        Ok(snapshot)
    } else {
        Err(format!("{} lacks the config or weights", snapshot.display()))
    }
}
