//! Datasets from the Hugging Face hub, through the `hf-hub` crate (sync API), cached in
//! `huggingface_hub`'s layout (`{cache}/datasets--org--name/{refs,blobs,snapshots}`) so a cache
//! filled by Python works here and the other way round.
//!
//! A split is loaded by listing the repo's files at a revision
//! (`GET {endpoint}/api/datasets/{repo}/revision/{rev}`), choosing the split's data files with
//! [`resolve_data_files`] (the README.md's `configs:`, else file-name conventions), downloading the missing ones
//! (`GET {endpoint}/datasets/{repo}/resolve/{rev}/{file}`) and reading them. Offline
//! (`HF_HUB_OFFLINE=1`), or when the hub cannot be reached, the listing and the files come from
//! the cache alone.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::data_files::{resolve_data_files, README};
use crate::dataset::Dataset;
use crate::error::DataError;
use crate::source::{list_files, load_files, DATA_EXTENSIONS};

/// What [`DataError::HubOfflineMiss`] names when not even the repo's listing is cached.
pub const REPO_LISTING: &str = "the repo listing";

/// The hub's address when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the hub is, where its cache lives, and whether to use the network: explicit, so tests
/// (and callers) need not touch process-wide environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// Base URL, without a trailing `/` (`HF_ENDPOINT`, default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The hub cache directory: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// Use the cache only (`HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` set to 1/ON/YES/TRUE).
    pub offline: bool,
    /// Bearer token: `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token`.
    pub token: Option<String>,
}

impl HubConfig {
    /// The configuration `huggingface_hub` would use in this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The configuration from a variable lookup (`from_env` with `std::env::var`); empty values
    /// count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let endpoint = get("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache =
                get("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(get("HOME").unwrap_or_default()).join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let offline = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"]
            .iter()
            .any(|name| var(name).is_some_and(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")));
        let token_file = get("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let token =
            get("HF_TOKEN").or_else(|| std::fs::read_to_string(token_file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()));
        Self { endpoint, cache_dir, offline, token }
    }
}

/// The files of a dataset repo at one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoSnapshot {
    /// The commit the listing is at.
    pub commit: String,
    /// Every file of the repo, as sorted `/`-separated paths (offline: those in the cache).
    pub files: Vec<String>,
    /// Whether the listing is the cache's (offline, or the hub unreachable).
    pub from_cache: bool,
}

/// A hub client for dataset repos (`hf_hub::api::sync::Api` plus the offline rules).
#[derive(Debug)]
pub struct HubClient {
    config: HubConfig,
    api: Option<Api>,
}

impl HubClient {
    /// A client for `config`; offline, it never opens a connection.
    pub fn new(config: HubConfig) -> Result<Self, DataError> {
        let api = if config.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
                .with_endpoint(config.endpoint.clone())
                .with_token(config.token.clone())
                .with_progress(false)
                .build()
                .map_err(|e| DataError::Hub { repo: config.endpoint.clone(), file: None, message: e.to_string() })?;
            Some(api)
        };
        Ok(Self { config, api })
    }

    /// The configuration in use.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The repo's files at `revision`: from the hub, or from the cache when offline or when the
    /// hub cannot be reached (an HTTP error status is not a reason to fall back).
    pub fn list_files(&self, repo: &str, revision: &str) -> Result<RepoSnapshot, DataError> {
        let Some(api) = &self.api else {
            return self.cached_snapshot(repo, revision).ok_or_else(|| self.offline_miss(repo, REPO_LISTING.into()));
        };
        let handle = api.repo(Repo::with_revision(repo.to_string(), RepoType::Dataset, revision.to_string()));
        match handle.info() {
            Ok(info) => {
                let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
                files.sort();
                Ok(RepoSnapshot { commit: info.sha, files, from_cache: false })
            }
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Transport(_)) => self
                .cached_snapshot(repo, revision)
                .ok_or_else(|| DataError::Hub { repo: repo.to_string(), file: None, message: e.to_string() }),
            Err(e) => Err(DataError::Hub { repo: repo.to_string(), file: None, message: e.to_string() }),
        }
    }

    /// The local path of `file` of the snapshot: the cached copy when there is one, else a
    /// download (an error offline).
    pub fn fetch(&self, repo: &str, revision: &str, snapshot: &RepoSnapshot, file: &str) -> Result<PathBuf, DataError> {
        let cached = self.repo_dir(repo).join("snapshots").join(&snapshot.commit).join(file);
        if cached.is_file() {
            return Ok(cached);
        }
        let Some(api) = &self.api else {
            return Err(self.offline_miss(repo, format!("file `{file}`")));
        };
        api.repo(Repo::with_revision(repo.to_string(), RepoType::Dataset, revision.to_string()))
            .download(file)
            .map_err(|e| DataError::Hub { repo: repo.to_string(), file: Some(file.to_string()), message: e.to_string() })
    }

    /// One split of a hub dataset at the `main` revision (files chosen as `datasets` does:
    /// [`resolve_data_files`], from the repo's README.md `configs:` or file-name conventions).
    pub fn load_split(&self, repo: &str, config: Option<&str>, split: &str) -> Result<Dataset, DataError> {
        self.load_split_at(repo, "main", config, split)
    }

    /// One split of a hub dataset at `revision` (a branch, tag or commit).
    pub fn load_split_at(&self, repo: &str, revision: &str, config: Option<&str>, split: &str) -> Result<Dataset, DataError> {
        let snapshot = self.list_files(repo, revision)?;
        let readme = match snapshot.files.iter().any(|f| f == README) {
            true => {
                let path = self.fetch(repo, revision, &snapshot, README)?;
                Some(std::fs::read_to_string(&path).map_err(|source| DataError::Io { path, source })?)
            }
            false => None,
        };
        let chosen = match resolve_data_files(&snapshot.files, readme.as_deref(), repo, config, split) {
            // The cache only holds what was downloaded: the file may be on the hub.
            Err(DataError::DataFilesNotFound { .. }) if snapshot.from_cache => Vec::new(),
            other => other?,
        };
        if chosen.is_empty() && snapshot.from_cache {
            // The cache only holds what was downloaded: the split may exist on the hub.
            return Err(self.offline_miss(repo, format!("split `{split}`")));
        }
        if chosen.is_empty() {
            let found =
                snapshot.files.iter().filter(|f| DATA_EXTENSIONS.iter().any(|ext| f.ends_with(&format!(".{ext}")))).cloned().collect();
            return Err(DataError::MissingSplit { dataset: repo.to_string(), split: split.to_string(), found });
        }
        let paths = chosen.iter().map(|file| self.fetch(repo, revision, &snapshot, file)).collect::<Result<Vec<_>, _>>()?;
        let name = match config {
            Some(c) => format!("{repo}/{c}:{split}"),
            None => format!("{repo}:{split}"),
        };
        // Rows are reported as rows of the hub split, not of the cached files.
        let dataset = load_files(&paths, &name)?;
        let source: std::sync::Arc<str> = std::sync::Arc::from(name.as_str());
        let origins = (0..dataset.len()).map(|row| crate::dataset::RowOrigin { source: source.clone(), row, line: None }).collect();
        Ok(dataset.with_origins(origins))
    }

    /// `{cache}/datasets--org--name`.
    fn repo_dir(&self, repo: &str) -> PathBuf {
        repo_cache_dir(&self.config.cache_dir, repo)
    }

    /// The listing of the cached snapshot that `refs/{revision}` points to (or of the snapshot
    /// named by `revision` when it is a commit).
    fn cached_snapshot(&self, repo: &str, revision: &str) -> Option<RepoSnapshot> {
        let dir = self.repo_dir(repo);
        let commit = std::fs::read_to_string(dir.join("refs").join(revision))
            .ok()
            .map(|c| c.trim().to_string())
            .or_else(|| is_commit(revision).then(|| revision.to_string()))?;
        let snapshot = dir.join("snapshots").join(&commit);
        let files = list_files(&snapshot).ok()?;
        Some(RepoSnapshot { commit, files, from_cache: true })
    }

    fn offline_miss(&self, repo: &str, what: String) -> DataError {
        DataError::HubOfflineMiss { repo: repo.to_string(), what, cache_dir: self.config.cache_dir.clone() }
    }
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The cache directory a repo would use (for tests and tools that inspect the cache).
pub fn repo_cache_dir(cache_dir: &Path, repo: &str) -> PathBuf {
    cache_dir.join(Repo::new(repo.to_string(), RepoType::Dataset).folder_name())
}
