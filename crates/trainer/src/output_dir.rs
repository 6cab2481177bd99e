//! The rules of `output_dir`, as transformers' `Trainer` states them:
//!
//! - a run refuses an `output_dir` that holds a previous run's files, unless it resumes from a
//!   checkpoint (`resume_from_checkpoint`) or `overwrite_output_dir: true`;
//! - with `overwrite_output_dir`, what the previous run left (checkpoints, model or adapter
//!   files, metrics, plot) is removed once the run is known to start — after the model and data
//!   are loaded — so a run that fails early leaves the old one intact; files this crate does not
//!   write are left alone;
//! - staging directories that a killed save left behind (`.checkpoint-N.tmp-<pid>`,
//!   `.final-model.tmp-<pid>`, see `alignment_core::atomic`) are removed when the process that
//!   made them is gone, and the removal is reported on stderr.

use crate::TrainError;
use std::path::{Path, PathBuf};

/// Files and directories a run writes into `output_dir` (beside `checkpoint-*`).
const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "loss.svg",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "trainer_state.json",
    "optimizer.safetensors",
];

/// Whether `name` is something a run writes into its `output_dir`.
fn is_run_output(name: &str) -> bool {
    RUN_FILES.contains(&name) || name.strip_prefix("checkpoint-").is_some_and(|s| s.parse::<u64>().is_ok())
}

/// The process id in a staging name `.<target>.tmp-<pid>` or `.<target>.old-<pid>`.
fn staging_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp-").or_else(|| rest.rsplit_once(".old-"))?;
    pid.parse().ok()
}

/// Whether process `pid` is running (on Linux, by `/proc`; elsewhere only this process counts).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    proc.is_dir() && proc.join(pid.to_string()).exists()
}

/// Removes staging files and directories in `dir` left by processes that are no longer running,
/// printing what was removed; returns the removed paths.
pub fn remove_stale_staging(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = staging_pid(&name) else { continue };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        match result {
            Ok(()) => {
                eprintln!("removed {}: left by an interrupted save (process {pid}, no longer running)", path.display());
                removed.push(path);
            }
            Err(e) => eprintln!("warning: could not remove the stale staging entry {}: {e}", path.display()),
        }
    }
    removed
}

/// A previous run's files in `dir` (sorted), ignoring staging entries.
pub fn previous_run_files(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| staging_pid(name).is_none())
        .collect();
    found.sort();
    found
}

/// Checks that a run may write into `output_dir`: it is absent or empty, the run resumes, or
/// `overwrite` is set. Nothing is changed on disk.
pub fn check_reusable(output_dir: &Path, resuming: bool, overwrite: bool) -> Result<(), TrainError> {
    if resuming || overwrite {
        return Ok(());
    }
    let found = previous_run_files(output_dir);
    if found.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = found.iter().take(6).map(String::as_str).collect();
    let more = if found.len() > shown.len() { format!(" and {} more", found.len() - shown.len()) } else { String::new() };
    Err(TrainError::OutputDirInUse { path: output_dir.to_path_buf(), found: format!("{}{more}", shown.join(", ")) })
}

/// Refuses to clear `output_dir` when it is the directory the tokenizer (and so usually the
/// model) is read from: its files are still needed, and the previous model would be lost.
pub fn refuse_source_dir(output_dir: &Path, source: Option<&Path>) -> Result<(), TrainError> {
    let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok().is_some_and(|b| a == b));
    match source {
        Some(source) if same(output_dir, source) => Err(TrainError::Config {
            key: "output_dir".into(),
            message: format!(
                "{} is also where the model and tokenizer are read from; overwrite_output_dir would delete them: choose another output_dir",
                output_dir.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// Removes what a previous run left in `output_dir` (`overwrite_output_dir: true`): its
/// checkpoints and the files a run writes; anything else stays. Prints what was removed.
pub fn clear_previous_run(output_dir: &Path) -> Result<(), TrainError> {
    let mut removed = Vec::new();
    for name in previous_run_files(output_dir).into_iter().filter(|n| is_run_output(n)) {
        let path = output_dir.join(&name);
        let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        result.map_err(|e| alignment_core::IoError::new("removing the previous run's", &path, e))?;
        removed.push(name);
    }
    if !removed.is_empty() {
        eprintln!("overwrite_output_dir: removed the previous run's {} from {}", removed.join(", "), output_dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_give_their_pid() {
        assert_eq!(staging_pid(".checkpoint-4.tmp-1234"), Some(1234));
        assert_eq!(staging_pid(".final-model.tmp-77"), Some(77));
        assert_eq!(staging_pid(".checkpoint-4.old-9"), Some(9));
        assert_eq!(staging_pid("checkpoint-4"), None);
        assert_eq!(staging_pid(".hidden"), None);
    }

    #[test]
    fn stale_staging_is_removed_and_live_staging_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum (4194304) is never alive.
        let dead = dir.path().join(".checkpoint-2.tmp-999999999");
        let live = dir.path().join(format!(".final-model.tmp-{}", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("model.safetensors"), b"partial").unwrap();
        }
        let removed = remove_stale_staging(dir.path());
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists());
        assert!(previous_run_files(dir.path()).is_empty(), "staging entries are not a previous run");
    }

    #[test]
    fn a_used_output_dir_is_refused_unless_overwritten_or_resumed() {
        let dir = tempfile::tempdir().unwrap();
        check_reusable(dir.path(), false, false).unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), b"{}\n").unwrap();
        std::fs::create_dir(dir.path().join("checkpoint-3")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let err = check_reusable(dir.path(), false, false).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl") && err.contains("overwrite_output_dir"), "{err}");
        check_reusable(dir.path(), true, false).unwrap();
        check_reusable(dir.path(), false, true).unwrap();
        assert!(refuse_source_dir(dir.path(), Some(dir.path())).unwrap_err().to_string().contains("another output_dir"));
        refuse_source_dir(dir.path(), None).unwrap();
        clear_previous_run(dir.path()).unwrap();
        assert_eq!(previous_run_files(dir.path()), vec!["notes.txt".to_string()], "only the run's own files are removed");
    }
}
