//! The hub path against a real HTTP server (tiny_http) that serves the fixture datasets in the
//! hub's layout: the repo listing (`/api/datasets/{repo}/revision/{rev}`) and files
//! (`/datasets/{repo}/resolve/{rev}/{file}`, with the `ETag`, `X-Repo-Commit` and
//! `Content-Range` headers `hf-hub` relies on). Each test has its own server and cache
//! directory and passes an explicit `HubConfig`; only `hub_config_from_process_environment`
//! reads the process environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use alignment_data::hub::{repo_cache_dir, HubClient, HubConfig};
use alignment_data::mixer::{mix_datasets, MixerConfig};
use alignment_data::source::{list_files, load_local, DatasetLoader, SplitSource};
use alignment_data::DataError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

/// A stand-in for the hub: serves each repo from a directory; `listed_extra` files are listed
/// but answer 404 (a broken repo).
struct FakeHub {
    url: String,
    server: Option<Arc<tiny_http::Server>>,
    thread: Option<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<String>>>,
}

struct RepoDir {
    root: PathBuf,
    listed_extra: Vec<String>,
}

impl FakeHub {
    fn start(repos: BTreeMap<String, RepoDir>) -> Self {
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

    fn downloads(&self) -> usize {
        self.requests.lock().unwrap().iter().filter(|u| u.contains("/resolve/")).count()
    }

    /// Stops serving and closes the listening socket (dropping the last `Server` handle), so
    /// later connections are refused.
    fn stop(&mut self) {
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

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
}

fn respond(repos: &BTreeMap<String, RepoDir>, request: tiny_http::Request) {
    let url = request.url().to_string();
    let not_found = || tiny_http::Response::from_string("not found").with_status_code(404);
    // /api/datasets/{org}/{name}/revision/{rev}
    if let Some(rest) = url.strip_prefix("/api/datasets/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        if parts.len() == 4 && parts[2] == "revision" {
            if let Some(repo) = repos.get(&format!("{}/{}", parts[0], parts[1])) {
                let mut files = list_files(&repo.root).unwrap();
                files.extend(repo.listed_extra.iter().cloned());
                let siblings: Vec<Value> = files.iter().map(|f| json!({ "rfilename": f })).collect();
                let body = json!({ "id": format!("{}/{}", parts[0], parts[1]), "sha": COMMIT, "siblings": siblings });
                let response = tiny_http::Response::from_string(body.to_string()).with_header(header("Content-Type", "application/json"));
                let _ = request.respond(response);
                return;
            }
        }
        let _ = request.respond(not_found());
        return;
    }
    // /datasets/{org}/{name}/resolve/{rev}/{file...}
    if let Some(rest) = url.strip_prefix("/datasets/") {
        let parts: Vec<&str> = rest.splitn(5, '/').collect();
        if parts.len() == 5 && parts[2] == "resolve" {
            if let Some(repo) = repos.get(&format!("{}/{}", parts[0], parts[1])) {
                let path = repo.root.join(parts[4]);
                if let Ok(bytes) = std::fs::read(&path) {
                    let etag: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                    let range = request.headers().iter().find(|h| h.field.equiv("Range")).map(|h| h.value.as_str().to_string());
                    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                        Some(spec) => {
                            let (a, b) = spec.split_once('-').unwrap();
                            let a: usize = a.parse().unwrap();
                            let b = if b.is_empty() { bytes.len() - 1 } else { b.parse::<usize>().unwrap().min(bytes.len() - 1) };
                            (a, b)
                        }
                        None => (0, bytes.len() - 1),
                    };
                    let status = if range.is_some() { 206 } else { 200 };
                    let response = tiny_http::Response::from_data(bytes[start..=end].to_vec())
                        .with_status_code(status)
                        .with_header(header("ETag", &format!("\"{etag}\"")))
                        .with_header(header("X-Repo-Commit", COMMIT))
                        .with_header(header("Content-Range", &format!("bytes {start}-{end}/{}", bytes.len())));
                    let _ = request.respond(response);
                    return;
                }
            }
        }
    }
    let _ = request.respond(not_found());
}

fn fixture_hub() -> FakeHub {
    let mut repos = BTreeMap::new();
    for (id, dir) in [("HuggingFaceH4/ultrachat_mini", "ultrachat_mini"), ("HuggingFaceH4/ultrafeedback_mini", "ultrafeedback_mini")] {
        repos.insert(id.to_string(), RepoDir { root: fixtures().join(dir), listed_extra: vec![] });
    }
    repos.insert(
        "broken/listed_but_missing".to_string(),
        RepoDir { root: fixtures().join("local_chat"), listed_extra: vec!["data/train-00000-of-00001.parquet".to_string()] },
    );
    FakeHub::start(repos)
}

fn config(endpoint: &str, cache: &Path, offline: bool) -> HubConfig {
    HubConfig { endpoint: endpoint.to_string(), cache_dir: cache.to_path_buf(), offline, token: None }
}

#[test]
fn hub_download_cache_and_offline() {
    let mut hub = fixture_hub();
    let cache = tempfile::tempdir().unwrap();
    let repo = "HuggingFaceH4/ultrachat_mini";
    let local = load_local(&fixtures().join("ultrachat_mini"), None, "train_sft").unwrap();

    let online = HubClient::new(config(&hub.url, cache.path(), false)).unwrap();
    let ds = online.load_split(repo, None, "train_sft").unwrap();
    assert_eq!(ds.rows, local.rows, "the same rows as the local directory, shard order kept");
    assert_eq!(ds.columns, local.columns);
    assert_eq!(ds.name, "HuggingFaceH4/ultrachat_mini:train_sft");
    // A row is reported as a row of the hub split, not of a cached shard file.
    let last = ds.origin(ds.len() - 1);
    assert_eq!((last.label(), last.row), ("HuggingFaceH4/ultrachat_mini:train_sft".to_string(), ds.len() - 1));
    assert_eq!(hub.downloads(), 2 * 2, "a metadata and a content request per shard");

    // huggingface_hub's cache layout: refs/main → commit, snapshots/<commit>/<file> → blob.
    let repo_dir = repo_cache_dir(cache.path(), repo);
    assert_eq!(repo_dir, cache.path().join("datasets--HuggingFaceH4--ultrachat_mini"));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert!(repo_dir.join("snapshots").join(COMMIT).join("data/train_sft-00001-of-00002.parquet").is_file());

    // Online again: the listing is fetched, the cached files are not.
    let again = online.load_split(repo, None, "train_sft").unwrap();
    assert_eq!(again.rows, local.rows);
    assert_eq!(hub.downloads(), 4, "no new download");

    hub.stop();
    // Offline (HF_HUB_OFFLINE=1), server gone: listing and files from the cache.
    let offline = HubClient::new(config(&hub.url, cache.path(), true)).unwrap();
    assert_eq!(offline.load_split(repo, None, "train_sft").unwrap().rows, local.rows);
    // A split never downloaded is an offline miss naming repo and split.
    match offline.load_split(repo, None, "test_sft").unwrap_err() {
        DataError::HubOfflineMiss { repo: r, what, cache_dir } => {
            assert_eq!(r, repo);
            assert_eq!(what, "split `test_sft`");
            assert_eq!(cache_dir, cache.path());
        }
        other => panic!("{other}"),
    }
    // A file listed in the cached snapshot but missing from it names the file.
    let snapshot = offline.list_files(repo, "main").unwrap();
    assert!(snapshot.from_cache);
    match offline.fetch(repo, "main", &snapshot, "data/test_sft-00000-of-00001.parquet").unwrap_err() {
        DataError::HubOfflineMiss { what, .. } => assert_eq!(what, "file `data/test_sft-00000-of-00001.parquet`"),
        other => panic!("{other}"),
    }
    // Online but unreachable: falls back to the cache, as huggingface_hub does.
    let unreachable = HubClient::new(config(&hub.url, cache.path(), false)).unwrap();
    assert_eq!(unreachable.load_split(repo, None, "train_sft").unwrap().rows, local.rows);

    // With an empty cache, both fail clearly.
    let empty = tempfile::tempdir().unwrap();
    let err = HubClient::new(config(&hub.url, empty.path(), true)).unwrap().load_split(repo, None, "train_sft").unwrap_err();
    assert!(matches!(&err, DataError::HubOfflineMiss { what, .. } if what == "the repo listing"), "{err}");
    assert!(err.to_string().contains(repo) && err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    let err = HubClient::new(config(&hub.url, empty.path(), false)).unwrap().load_split(repo, None, "train_sft").unwrap_err();
    assert!(matches!(&err, DataError::Hub { repo: r, file: None, .. } if r == repo), "{err}");
}

#[test]
fn hub_http_errors_name_repo_and_file() {
    let hub = fixture_hub();
    let cache = tempfile::tempdir().unwrap();
    let client = HubClient::new(config(&hub.url, cache.path(), false)).unwrap();

    let err = client.load_split("nobody/nothing", None, "train").unwrap_err();
    match &err {
        DataError::Hub { repo, file: None, message } => {
            assert_eq!(repo, "nobody/nothing");
            assert!(message.contains("404"), "{message}");
        }
        other => panic!("{other}"),
    }

    let err = client.load_split("broken/listed_but_missing", None, "train").unwrap_err();
    match &err {
        DataError::Hub { repo, file: Some(file), message } => {
            assert_eq!(repo, "broken/listed_but_missing");
            assert_eq!(file, "data/train-00000-of-00001.parquet");
            assert!(message.contains("404"), "{message}");
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("data/train-00000-of-00001.parquet"));

    match client.load_split("HuggingFaceH4/ultrachat_mini", None, "validation").unwrap_err() {
        DataError::MissingSplit { dataset, split, found } => {
            assert_eq!(dataset, "HuggingFaceH4/ultrachat_mini");
            assert_eq!(split, "validation");
            assert_eq!(found.len(), 3, "{found:?}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn mixer_over_the_hub_matches_the_golden_mix() {
    let hub = fixture_hub();
    let cache = tempfile::tempdir().unwrap();
    let loader = DatasetLoader::with_hub(HubClient::new(config(&hub.url, cache.path(), false)).unwrap());
    let goldens: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("mixer_goldens.json")).unwrap()).unwrap();
    let scenario = &goldens["scenarios"][0];
    assert_eq!(scenario["name"], "classic_three_sources");
    // Two datasets from the hub, one local directory, in the golden's order.
    let local_chat = fixtures().join("local_chat").display().to_string();
    let yaml = format!(
        "dataset_mixer:\n  HuggingFaceH4/ultrachat_mini: 0.5\n  HuggingFaceH4/ultrafeedback_mini: 0.3\n  {local_chat}: 1.0\n\
         dataset_splits: [train_sft, test_sft]\ncolumns_to_keep: [messages]\n"
    );
    let config: MixerConfig = serde_yaml::from_str(&yaml).unwrap();
    let mixed = mix_datasets(&config, &loader).unwrap();
    for split in ["train", "test"] {
        let got = if split == "train" { mixed.train.as_ref() } else { mixed.test.as_ref() }.unwrap();
        let want = scenario[split]["rows"].as_array().unwrap();
        let got: Vec<Value> = got.rows.iter().map(|r| Value::Object(r.clone())).collect();
        assert_eq!(&got, want, "{split}");
    }
    // A hub id through the loader's SplitSource interface.
    assert_eq!(loader.load_split("HuggingFaceH4/ultrafeedback_mini", None, "test_prefs").unwrap().len(), 3);
}

#[test]
fn hub_config_from_variables() {
    let vars = |pairs: &[(&str, &str)]| {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubConfig::from_vars(move |k| map.get(k).cloned())
    };
    let defaults = vars(&[("HOME", "/home/u")]);
    assert_eq!(defaults.endpoint, "https://huggingface.co");
    assert_eq!(defaults.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert!(!defaults.offline);

    let set = vars(&[("HF_ENDPOINT", "http://127.0.0.1:9/"), ("HF_HOME", "/data/hf"), ("HF_HUB_OFFLINE", "1"), ("HF_TOKEN", "hf_x")]);
    assert_eq!(set.endpoint, "http://127.0.0.1:9");
    assert_eq!(set.cache_dir, PathBuf::from("/data/hf/hub"));
    assert!(set.offline);
    assert_eq!(set.token.as_deref(), Some("hf_x"));

    assert_eq!(vars(&[("HF_HOME", "/a"), ("HF_HUB_CACHE", "/b")]).cache_dir, PathBuf::from("/b"));
    assert_eq!(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]).cache_dir, PathBuf::from("/x/huggingface/hub"));
    for (value, offline) in [("true", true), ("ON", true), ("yes", true), ("0", false), ("", false), ("no", false)] {
        assert_eq!(vars(&[("HF_HUB_OFFLINE", value)]).offline, offline, "HF_HUB_OFFLINE={value}");
    }
    assert!(vars(&[("HF_DATASETS_OFFLINE", "1")]).offline);

    // The token file under HF_HOME.
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("token"), "hf_file\n").unwrap();
    assert_eq!(vars(&[("HF_HOME", home.path().to_str().unwrap())]).token.as_deref(), Some("hf_file"));
}

/// The only test here that reads (and sets) process environment variables.
#[test]
fn hub_config_from_process_environment() {
    let mut hub = fixture_hub();
    let home = tempfile::tempdir().unwrap();
    for name in ["HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH"] {
        std::env::remove_var(name);
    }
    std::env::set_var("HF_ENDPOINT", &hub.url);
    std::env::set_var("HF_HOME", home.path());
    let config = HubConfig::from_env();
    assert_eq!(config.endpoint, hub.url);
    assert_eq!(config.cache_dir, home.path().join("hub"));
    assert!(!config.offline);
    let loaded = DatasetLoader::from_env().unwrap().load_split("HuggingFaceH4/ultrafeedback_mini", None, "train_prefs").unwrap();
    assert_eq!(loaded.len(), 10);

    hub.stop();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let cached = DatasetLoader::from_env().unwrap().load_split("HuggingFaceH4/ultrafeedback_mini", None, "train_prefs").unwrap();
    assert_eq!(cached.rows, loaded.rows);

    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", empty.path());
    let err = DatasetLoader::from_env().unwrap().load_split("HuggingFaceH4/ultrafeedback_mini", None, "train_prefs").unwrap_err();
    assert!(matches!(err, DataError::HubOfflineMiss { .. }), "{err}");
}
