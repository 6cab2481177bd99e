//! A stand-in for the Hugging Face hub over real HTTP (tiny_http), serving dataset and model
//! repos from local directories, one directory per revision, as `hf-hub` (and
//! `huggingface_hub`) talk to it:
//!
//! - `GET /api/{datasets,models}/{repo}/revision/{rev}`: `{"id", "sha", "siblings": [{"rfilename"}]}`;
//! - `GET /datasets/{repo}/resolve/{rev}/{file}` and `GET /{repo}/resolve/{rev}/{file}`: the bytes,
//!   with the `ETag`, `X-Repo-Commit` and `Content-Range` headers hf-hub relies on (its first,
//!   ranged request reads the metadata).
//!
//! `{rev}` is a revision name or the commit it is served at. Reusable from any test crate of the
//! workspace that has `tiny_http`, `serde_json` and `sha2` as dev-dependencies:
//! `#[path = "<relative path>/crates/data/tests/common/fake_hub.rs"] mod fake_hub;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The commit every repo is at unless [`FakeRepo::at`] says otherwise.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Whether a repo is a dataset or a model (their URLs differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dataset,
    Model,
}

/// One revision of one repo: its files are those under `root`.
#[derive(Debug, Clone)]
pub struct FakeRepo {
    pub kind: Kind,
    pub id: String,
    pub revision: String,
    pub commit: String,
    pub root: PathBuf,
    /// Files listed but answering 404 (a broken repo).
    pub listed_extra: Vec<String>,
}

impl FakeRepo {
    /// Dataset repo `id` at `main` ([`COMMIT`]) with the files under `root`.
    pub fn dataset(id: &str, root: impl Into<PathBuf>) -> Self {
        Self { kind: Kind::Dataset, id: id.into(), revision: "main".into(), commit: COMMIT.into(), root: root.into(), listed_extra: vec![] }
    }

    /// Model repo `id` at `main` ([`COMMIT`]) with the files under `root`.
    pub fn model(id: &str, root: impl Into<PathBuf>) -> Self {
        Self { kind: Kind::Model, ..Self::dataset(id, root) }
    }

    /// The same repo at another revision (branch or tag) and commit.
    pub fn at(mut self, revision: &str, commit: &str) -> Self {
        self.revision = revision.into();
        self.commit = commit.into();
        self
    }
}

/// The running server; stops when dropped.
pub struct FakeHub {
    /// `http://127.0.0.1:<port>`: the `HF_ENDPOINT`.
    pub url: String,
    server: Option<Arc<tiny_http::Server>>,
    thread: Option<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    /// Serves `repos` on a free local port.
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind"));
        let url = format!("http://{}", server.server_addr().to_ip().expect("ip address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (srv, log) = (Arc::clone(&server), Arc::clone(&requests));
        let thread = std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                log.lock().unwrap().push(request.url().to_string());
                respond(&repos, request);
            }
        });
        Self { url, server: Some(server), thread: Some(thread), requests }
    }

    /// Every request URL so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many file requests (`/resolve/`) were made.
    pub fn downloads(&self) -> usize {
        self.requests().iter().filter(|u| u.contains("/resolve/")).count()
    }

    /// Stops serving and closes the listening socket, so later connections are refused.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.unblock();
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
            drop(server);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every file under `root`, as sorted `/`-separated relative paths.
pub fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let child = rel.join(entry.unwrap().file_name());
            if root.join(&child).is_dir() {
                stack.push(child);
            } else {
                out.push(child.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/"));
            }
        }
    }
    out.sort();
    out
}

/// Writes a repo directory: `README.md` with `readme` (when given), and each `(path, source)`
/// copied from the file `source`.
pub fn write_repo(root: &Path, readme: Option<&str>, files: &[(&str, &Path)]) {
    std::fs::create_dir_all(root).unwrap();
    if let Some(text) = readme {
        std::fs::write(root.join("README.md"), text).unwrap();
    }
    for (path, source) in files {
        let to = root.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(source, &to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", source.display(), to.display()));
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
}

fn find<'a>(repos: &'a [FakeRepo], kind: Kind, id: &str, revision: &str) -> Option<&'a FakeRepo> {
    let revision = revision.replace("%2F", "/").replace("%2f", "/");
    repos.iter().find(|r| r.kind == kind && r.id == id && (r.revision == revision || r.commit == revision))
}

fn respond(repos: &[FakeRepo], request: tiny_http::Request) {
    let url = request.url().split('?').next().unwrap_or_default().to_string();
    let not_found = || tiny_http::Response::from_string("not found").with_status_code(404);
    for (prefix, kind) in [("/api/datasets/", Kind::Dataset), ("/api/models/", Kind::Model)] {
        if let Some(rest) = url.strip_prefix(prefix) {
            let parts: Vec<&str> = rest.splitn(4, '/').collect();
            let id = parts.get(..2).map(|p| p.join("/")).unwrap_or_default();
            match find(repos, kind, &id, parts.get(3).copied().unwrap_or_default()).filter(|_| parts.get(2) == Some(&"revision")) {
                Some(repo) => {
                    let mut files = files_under(&repo.root);
                    files.extend(repo.listed_extra.iter().cloned());
                    let siblings: Vec<Value> = files.iter().map(|f| json!({ "rfilename": f })).collect();
                    let body = json!({ "id": id, "sha": repo.commit, "siblings": siblings });
                    let response =
                        tiny_http::Response::from_string(body.to_string()).with_header(header("Content-Type", "application/json"));
                    let _ = request.respond(response);
                }
                None => {
                    let _ = request.respond(not_found());
                }
            }
            return;
        }
    }
    let (kind, rest) = match url.strip_prefix("/datasets/") {
        Some(rest) => (Kind::Dataset, rest),
        None => (Kind::Model, url.trim_start_matches('/')),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        if let Some(repo) = find(repos, kind, &format!("{}/{}", parts[0], parts[1]), parts[3]) {
            if let Ok(bytes) = std::fs::read(repo.root.join(parts[4])) {
                let etag: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                let range = request.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.as_str().to_string());
                let last = bytes.len().saturating_sub(1);
                let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
                    Some((a, b)) => {
                        (a.parse().unwrap_or(0), if b.is_empty() { last } else { b.parse::<usize>().unwrap_or(last).min(last) })
                    }
                    None => (0, last),
                };
                let body = if bytes.is_empty() { Vec::new() } else { bytes[start..=end].to_vec() };
                let response = tiny_http::Response::from_data(body)
                    .with_status_code(if range.is_some() { 206 } else { 200 })
                    .with_header(header("ETag", &format!("\"{etag}\"")))
                    .with_header(header("X-Repo-Commit", &repo.commit))
                    .with_header(header("Content-Range", &format!("bytes {start}-{end}/{}", bytes.len())));
                let _ = request.respond(response);
                return;
            }
        }
    }
    let _ = request.respond(not_found());
}
