//! `model_name_or_path: org/name` from the hub, against a local HTTP server serving the hub's API
//! and resolve layout (crates/data/tests/common/fake_hub.rs): a single-file model, a sharded one
//! (the tiny fixture's weights split in two), a non-main revision, a PEFT adapter repo whose base
//! is a hub repo; the `huggingface_hub` cache layout; offline after a first download and with
//! nothing cached; and the error for a name that is neither a local path nor on the hub. Every
//! model loaded from the hub gives the same logits as the local fixture directory. No internet.

#[path = "../crates/data/tests/common/fake_hub.rs"]
mod fake_hub;

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::data::hub::HubConfig;
use alignment_handbook::hub_model::{resolve, HubModelError};
use alignment_handbook::models::{load_pretrained, Batch};
use alignment_handbook::reference::repo_root;
use alignment_handbook::run::{load_for_inference, resolve_model, resolve_model_at, RunError};
use fake_hub::{files_under, write_repo, FakeHub, FakeRepo, COMMIT};
use std::path::{Path, PathBuf};

const V2_COMMIT: &str = "2222222222222222222222222222222222222222";

fn tiny_llama() -> PathBuf {
    repo_root().join("crates/models/tests/fixtures/tiny-llama")
}

fn tiny_lora() -> PathBuf {
    repo_root().join("crates/peft/tests/fixtures/tiny-llama-lora")
}

/// Logits of the model (or adapter, merged into its base) in `dir` on a fixed batch.
fn logits(dir: &Path) -> Vec<f32> {
    let model = load_for_inference::<Cpu>(dir, &Default::default()).unwrap();
    model.forward(&Batch::from_ids(vec![vec![1, 5, 9, 2, 7, 3]]), None).into_data().into_vec().unwrap()
}

/// The single-file tiny model plus tokenizer and generation files, and files never fetched.
fn single_file_repo(root: &Path) {
    let tokenizer = repo_root().join("crates/data/tests/fixtures/tokenization/tiny-chatml");
    write_repo(
        root,
        Some("# tiny\n"),
        &[
            ("config.json", &tiny_llama().join("config.json")),
            ("model.safetensors", &tiny_llama().join("model.safetensors")),
            ("tokenizer.json", &tokenizer.join("tokenizer.json")),
            ("tokenizer_config.json", &tokenizer.join("tokenizer_config.json")),
            ("pytorch_model.bin", &tiny_llama().join("model.safetensors")),
        ],
    );
    std::fs::write(root.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
    std::fs::write(root.join("chat_template.jinja"), "{{ messages }}").unwrap();
}

/// The tiny model's weights split into two shards with a transformers index.
fn sharded_repo(root: &Path) {
    write_repo(root, None, &[("config.json", &tiny_llama().join("config.json"))]);
    let bytes = std::fs::read(tiny_llama().join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            part.iter().map(|n| (n.clone(), tensors.tensor(n).unwrap())).collect();
        safetensors::tensor::serialize_to_file(views, None, &root.join(&file)).unwrap();
        for name in part {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(root.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// The LoRA fixture with its base named as the hub repo `base`.
fn adapter_repo(root: &Path, base: &str) {
    write_repo(root, None, &[("adapter_model.safetensors", &tiny_lora().join("adapter_model.safetensors"))]);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_lora().join("adapter_config.json")).unwrap()).unwrap();
    config["base_model_name_or_path"] = base.into();
    std::fs::write(root.join("adapter_config.json"), config.to_string()).unwrap();
}

fn hub_config(endpoint: &str, cache: &Path, offline: bool) -> HubConfig {
    HubConfig { endpoint: endpoint.to_string(), cache_dir: cache.to_path_buf(), offline, token: None }
}

#[test]
fn hub_models_download_into_the_hub_cache_and_load_like_the_local_directory() {
    let repos = tempfile::tempdir().unwrap();
    let (single, sharded, empty) = (repos.path().join("single"), repos.path().join("sharded"), repos.path().join("empty"));
    single_file_repo(&single);
    sharded_repo(&sharded);
    write_repo(&empty, Some("# no weights\n"), &[("config.json", &tiny_llama().join("config.json"))]);
    let mut hub = FakeHub::start(vec![
        FakeRepo::model("test/tiny-llama", &single),
        FakeRepo::model("test/tiny-llama", &sharded).at("v2", V2_COMMIT),
        FakeRepo::model("test/tiny-llama-sharded", &sharded),
        FakeRepo::model("test/no-weights", &empty),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let online = hub_config(&hub.url, cache.path(), false);
    let want = logits(&tiny_llama());

    // A single-file model: the config, tokenizer and weights files, in huggingface_hub's layout.
    let dir = resolve(&online, "test/tiny-llama", "main").unwrap();
    let repo_dir = cache.path().join("models--test--tiny-llama");
    assert_eq!(dir, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(
        files_under(&dir),
        ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "README.md and pytorch_model.bin are not fetched"
    );
    assert!(std::fs::symlink_metadata(dir.join("model.safetensors")).unwrap().file_type().is_symlink(), "snapshots link to blobs");
    assert!(std::fs::canonicalize(dir.join("model.safetensors"))
        .unwrap()
        .starts_with(std::fs::canonicalize(repo_dir.join("blobs")).unwrap()));
    assert_eq!(logits(&dir), want, "same logits as the local fixture");
    let downloads = hub.downloads();
    assert_eq!(resolve(&online, "test/tiny-llama", "main").unwrap(), dir);
    assert_eq!(hub.downloads(), downloads, "the cached files are not downloaded again");

    // A sharded model: the index and both shards.
    let sharded_dir = resolve(&online, "test/tiny-llama-sharded", "main").unwrap();
    assert_eq!(
        files_under(&sharded_dir),
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    );
    assert_eq!(logits(&sharded_dir), want);
    // Several processes (ranks) at once: one downloads, the others wait and find the files.
    let sharded_requests = || hub.requests().iter().filter(|u| u.contains("tiny-llama-sharded/resolve/")).count();
    let one_download = sharded_requests();
    let other_cache = tempfile::tempdir().unwrap();
    let concurrent = hub_config(&hub.url, other_cache.path(), false);
    let dirs: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| resolve(&concurrent, "test/tiny-llama-sharded", "main").unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(dirs.iter().all(|d| d == &dirs[0] && d.starts_with(other_cache.path())), "{dirs:?}");
    assert_eq!(sharded_requests(), 2 * one_download, "each file downloaded once more, not three times");

    // Another revision of the same repo: its own commit, ref and snapshot.
    let v2 = resolve(&online, "test/tiny-llama", "v2").unwrap();
    assert_eq!(v2, repo_dir.join("snapshots").join(V2_COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/v2")).unwrap(), V2_COMMIT);
    assert!(v2.join("model.safetensors.index.json").is_file() && !v2.join("model.safetensors").exists());
    assert_eq!(logits(&v2), want);

    // A repo without weights read here; a repo the hub does not have.
    let err = resolve(&online, "test/no-weights", "main").unwrap_err();
    assert!(matches!(&err, HubModelError::NoWeights { repo, files, .. } if repo == "test/no-weights" && files.len() == 2), "{err}");
    let err = resolve(&online, "test/missing", "main").unwrap_err();
    assert!(err.is_repo_miss() && err.to_string().contains("test/missing") && err.to_string().contains("404"), "{err}");

    // Offline after the downloads: the same snapshots, by branch, tag or commit, with no request.
    hub.stop();
    let offline = hub_config(&hub.url, cache.path(), true);
    assert_eq!(resolve(&offline, "test/tiny-llama", "main").unwrap(), dir);
    assert_eq!(resolve(&offline, "test/tiny-llama", "v2").unwrap(), v2);
    assert_eq!(resolve(&offline, "test/tiny-llama", V2_COMMIT).unwrap(), v2);
    assert_eq!(resolve(&offline, "test/tiny-llama-sharded", "main").unwrap(), sharded_dir);
    // Online but the hub gone: the cache, as transformers falls back to it.
    assert_eq!(resolve(&online, "test/tiny-llama", "main").unwrap(), dir);
    // Offline, a revision or repo never downloaded: named, with the cache and HF_HUB_OFFLINE.
    for (repo, revision) in [("test/tiny-llama", "v3"), ("test/never", "main")] {
        let err = resolve(&offline, repo, revision).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, HubModelError::NotCached { .. }), "{message}");
        assert!(message.contains(&format!("`{repo}`")) && message.contains(&format!("`{revision}`")) && message.contains("HF_HUB_OFFLINE"));
        assert!(message.contains(&cache.path().display().to_string()), "{message}");
    }
    // A snapshot missing a shard is not complete.
    std::fs::remove_file(sharded_dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(matches!(resolve(&offline, "test/tiny-llama-sharded", "main").unwrap_err(), HubModelError::NotCached { .. }));
}

/// The one test of this file that sets the process environment (hub endpoint and cache).
#[test]
fn model_names_resolve_through_the_hub_with_adapters_and_say_where_they_looked() {
    let repos = tempfile::tempdir().unwrap();
    let (base, adapter) = (repos.path().join("base"), repos.path().join("adapter"));
    single_file_repo(&base);
    adapter_repo(&adapter, "test/tiny-llama");
    let hub = FakeHub::start(vec![FakeRepo::model("test/tiny-llama", &base), FakeRepo::model("test/tiny-llama-lora", &adapter)]);
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &hub.url);
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
    std::env::set_var("ALIGNMENT_HANDBOOK_LOCAL_HUB", tmp.path().join("local-hub"));
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_TOKEN");

    // An adapter repo whose base is a hub repo: both downloaded, the merge as from local files.
    let dir = resolve_model("test/tiny-llama-lora").unwrap();
    assert!(dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file());
    assert_eq!(logits(&dir), logits(&tiny_lora()));
    assert!(tmp.path().join("hub/models--test--tiny-llama/snapshots").join(COMMIT).join("model.safetensors").is_file());
    assert_eq!(load_pretrained::<Cpu>(&resolve_model("test/tiny-llama").unwrap(), &Default::default()).unwrap().config.num_layers, 2);

    // Neither a local directory nor on the hub: both named.
    let cwd = std::env::current_dir().unwrap();
    let err = resolve_model("data/no-such-model").unwrap_err();
    let message = err.to_string();
    assert!(matches!(&err, RunError::ModelNotFound { name, .. } if name == "data/no-such-model"), "{message}");
    assert!(
        message.contains(&format!("relative to {}", cwd.display())) && message.contains("on the hub") && message.contains("404"),
        "{message}"
    );
    let err = resolve_model("./no/such/dir").unwrap_err().to_string();
    assert!(err.contains("relative to") && err.contains("hub model id"), "{err}");
    let err = resolve_model_at("test/tiny-llama", "no-such-branch").unwrap_err().to_string();
    assert!(err.contains("`no-such-branch`") && err.contains("404"), "{err}");

    // Offline with nothing cached: a clear error naming repo and revision.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert_eq!(resolve_model("test/tiny-llama-lora").unwrap(), dir, "cached: found offline");
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("empty"));
    let err = resolve_model_at("test/tiny-llama", "main").unwrap_err().to_string();
    assert!(err.contains("`test/tiny-llama`") && err.contains("`main`") && err.contains("HF_HUB_OFFLINE"), "{err}");
    std::env::remove_var("HF_HUB_OFFLINE");
}
