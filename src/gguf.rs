//! `model_name_or_path` naming a GGUF file (llama.cpp's format): a local `path/to/model.gguf`, or
//! `owner/repo/file.gguf`, a file of a model repo on the hub (downloaded with hf-hub into the
//! hub cache, revision `model_revision`; `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE` and `HF_TOKEN`
//! apply as for datasets).
//!
//! A GGUF model is converted once into a Hugging Face directory (`alignment_models::convert_gguf`:
//! f32 weights, tokenizer, chat template), cached under `<cache>/gguf/<file stem>-<sha256 prefix>`
//! and used from there like any model directory: trained models are saved in the same layout.

use crate::reference::{cache_dir, ReferenceError};
use alignment_core::IoError;
use alignment_data::hub::HubConfig;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Whether `name` names a GGUF file (by its extension).
pub fn is_gguf_name(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".gguf")
}

/// Whether `dir` holds a complete converted model.
pub fn is_complete_model_dir(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"].iter().all(|f| dir.join(f).is_file())
}

/// Runs `f` holding an exclusive lock on `<target>.lock`, so concurrent processes (and test
/// threads) converting or downloading the same asset do it once.
pub fn with_lock<T>(target: &Path, f: impl FnOnce() -> Result<T, ReferenceError>) -> Result<T, ReferenceError> {
    let lock_path = target.with_file_name(format!("{}.lock", target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    if let Some(parent) = lock_path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| IoError::new("creating directory", parent, e))?;
    }
    let lock = File::create(&lock_path).map_err(|e| IoError::new("creating", &lock_path, e))?;
    lock.lock().map_err(|e| IoError::new("locking", &lock_path, e))?;
    let result = f();
    let _ = lock.unlock();
    result
}

/// Converts the GGUF at `gguf` into `dir` unless a complete conversion is already there; returns
/// `dir`.
pub fn convert_once(gguf: &Path, dir: &Path) -> Result<PathBuf, ReferenceError> {
    if is_complete_model_dir(dir) {
        return Ok(dir.to_path_buf());
    }
    with_lock(dir, || {
        if !is_complete_model_dir(dir) {
            eprintln!("converting {} to a Hugging Face directory in {}", gguf.display(), dir.display());
            alignment_models::convert_gguf(gguf, dir)?;
        }
        Ok(dir.to_path_buf())
    })
}

/// The cached Hugging Face directory of the local GGUF file `path` (converted on first use; the
/// cache key is the file's content).
pub fn converted_dir(path: &Path) -> Result<PathBuf, ReferenceError> {
    let digest = crate::pypi::sha256_file(path)?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    convert_once(path, &cache_dir().join("gguf").join(format!("{stem}-{}", &digest[..16])))
}

/// The local path of `file` in the hub model repo `repo` at `revision`: the hub cache's copy, or
/// a download (an error when offline).
pub fn hub_file(config: &HubConfig, repo: &str, revision: &str, file: &str) -> Result<PathBuf, ReferenceError> {
    use hf_hub::{Cache, Repo, RepoType};
    let hub_error = |message: String| ReferenceError::Hub { repo: repo.to_string(), file: file.to_string(), message };
    let handle = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::new(config.cache_dir.clone());
    if let Some(path) = cache.repo(handle.clone()).get(file) {
        return Ok(path);
    }
    if config.offline {
        return Err(hub_error(format!("not in the hub cache {} and HF_HUB_OFFLINE is set", config.cache_dir.display())));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.clone())
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    api.repo(handle).get(file).map_err(|e| hub_error(e.to_string()))
}

/// `owner/repo/path/file.gguf` split into the repo id and the file's path in it.
pub fn split_hub_name(name: &str) -> Option<(&str, &str)> {
    let mut parts = name.splitn(3, '/');
    let (owner, repo, file) = (parts.next()?, parts.next()?, parts.next()?);
    let plain = |s: &str| !s.is_empty() && s != "." && s != "..";
    (plain(owner) && plain(repo) && !file.is_empty() && !name.starts_with('/')).then(|| (&name[..owner.len() + 1 + repo.len()], file))
}

/// The Hugging Face directory for the GGUF `name` (a local file, or `owner/repo/file.gguf` on
/// the hub at `revision`), converted on first use.
pub fn resolve(name: &str, revision: &str) -> Result<PathBuf, ReferenceError> {
    let path = Path::new(name);
    if path.is_file() {
        return converted_dir(path);
    }
    match split_hub_name(name) {
        Some((repo, file)) if !name.starts_with('.') => {
            let local = hub_file(&HubConfig::from_env(), repo, revision, file)?;
            converted_dir(&local)
        }
        _ => Err(ReferenceError::Missing {
            what: format!("GGUF file `{name}`: no such local file, and not of the form owner/repo/file.gguf"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_split_into_repo_and_file() {
        assert_eq!(split_hub_name("org/model-GGUF/model.Q4_K_M.gguf"), Some(("org/model-GGUF", "model.Q4_K_M.gguf")));
        assert_eq!(split_hub_name("org/model/sub/dir/m.gguf"), Some(("org/model", "sub/dir/m.gguf")));
        assert_eq!(split_hub_name("model.gguf"), None);
        assert_eq!(split_hub_name("/abs/path/model.gguf"), None);
        assert!(is_gguf_name("x/Model.GGUF"));
    }
}
