//! Atomic writes: outputs appear whole or not at all.
//!
//! A file is written to a temporary sibling, flushed to disk, then renamed over the target;
//! a directory (a checkpoint, a saved model) is assembled in a temporary sibling directory and
//! renamed into place when complete. A crash at any point leaves the previous version intact.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An I/O failure, naming the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct IoError {
    /// What was being done ("writing", "renaming", ...).
    pub action: &'static str,
    /// The file or directory involved.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// Wraps an `std::io::Error` with the action and path it concerns.
    pub fn new(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self { action, path: path.into(), source }
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file atomically: `fill` writes the content into a buffered writer on a temporary
/// sibling, which is synced and renamed over `path` only if `fill` succeeds.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<(), IoError>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| IoError::new("creating directory", parent, e))?;
    }
    let tmp = temp_sibling(path);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut writer = BufWriter::new(file);
        fill(&mut writer)?;
        writer.flush()?;
        writer.get_ref().sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(IoError::new("writing", path, e));
    }
    fs::rename(&tmp, path).map_err(|e| IoError::new("renaming into place", path, e))
}

/// A directory being assembled; it becomes visible at its final path only on [`AtomicDir::commit`].
/// Dropping it without committing removes the partial content.
pub struct AtomicDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts assembling `target` in a fresh temporary sibling directory.
    pub fn new(target: impl Into<PathBuf>) -> Result<Self, IoError> {
        let target = target.into();
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| IoError::new("creating directory", parent, e))?;
        }
        let staging = temp_sibling(&target);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| IoError::new("clearing", &staging, e))?;
        }
        fs::create_dir_all(&staging).map_err(|e| IoError::new("creating directory", &staging, e))?;
        Ok(Self { target, staging, committed: false })
    }

    /// Where files should be written while assembling.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Replaces `target` with the assembled directory. An existing target is moved aside first and
    /// removed only after the new one is in place.
    pub fn commit(mut self) -> Result<PathBuf, IoError> {
        let old = self.target.with_file_name(format!(
            ".{}.old-{}",
            self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let had_old = self.target.exists();
        if had_old {
            fs::rename(&self.target, &old).map_err(|e| IoError::new("moving aside", &self.target, e))?;
        }
        fs::rename(&self.staging, &self.target).map_err(|e| IoError::new("renaming into place", &self.target, e))?;
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_previous_content() {
        let dir = std::env::temp_dir().join(format!("atomic-test-{}", std::process::id()));
        let path = dir.join("out.txt");
        write_atomic(&path, |w| w.write_all(b"first")).unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("out.txt"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "first");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file was not cleaned up");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uncommitted_dir_is_invisible_and_removed() {
        let root = std::env::temp_dir().join(format!("atomic-dir-{}", std::process::id()));
        let target = root.join("model");
        {
            let staging = AtomicDir::new(&target).unwrap();
            fs::write(staging.path().join("a"), b"x").unwrap();
            assert!(!target.exists());
        }
        assert!(!target.exists());
        let staging = AtomicDir::new(&target).unwrap();
        fs::write(staging.path().join("a"), b"y").unwrap();
        staging.commit().unwrap();
        assert_eq!(fs::read(target.join("a")).unwrap(), b"y");
        fs::remove_dir_all(&root).unwrap();
    }
}
