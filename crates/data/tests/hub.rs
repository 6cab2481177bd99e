//! The hub path against a real HTTP server (tests/common/fake_hub.rs) that serves the fixture
//! datasets in the hub's layout: the repo listing (`/api/datasets/{repo}/revision/{rev}`) and
//! files (`/datasets/{repo}/resolve/{rev}/{file}`, with the `ETag`, `X-Repo-Commit` and
//! `Content-Range` headers `hf-hub` relies on); and split resolution from README `configs:` as
//! `datasets` does it, for hub repos and local directories. Each test has its own server and cache
//! directory and passes an explicit `HubConfig`; only `hub_config_from_process_environment`
//! reads the process environment.

#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignment_data::hub::{repo_cache_dir, HubClient, HubConfig};
use alignment_data::mixer::{mix_datasets, MixerConfig};
use alignment_data::source::{load_local, DatasetLoader, SplitSource};
use alignment_data::DataError;
use fake_hub::{write_repo, FakeHub, FakeRepo, COMMIT};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

fn fixture_hub() -> FakeHub {
    let mut repos = vec![
        FakeRepo::dataset("HuggingFaceH4/ultrachat_mini", fixtures().join("ultrachat_mini")),
        FakeRepo::dataset("HuggingFaceH4/ultrafeedback_mini", fixtures().join("ultrafeedback_mini")),
    ];
    let mut broken = FakeRepo::dataset("broken/listed_but_missing", fixtures().join("local_chat"));
    broken.listed_extra = vec!["data/train-00000-of-00001.parquet".to_string()];
    repos.push(broken);
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
    assert!(matches!(&err, DataError::NotLocalNorHub { hub, .. } if matches!(**hub, DataError::HubOfflineMiss { .. })), "{err}");
}

/// A README like HuggingFaceTB/smoltalk2's: configs `SFT`, `Mid`, `Preference`, none default,
/// each with named splits pointing at parquet shards in subfolders.
pub const SMOLTALK2_README: &str = "---
license: apache-2.0
configs:
- config_name: SFT
  data_files:
  - split: LongAlign_64k_Qwen3_32B_yarn_131k_think
    path: data/SFT/LongAlign_64k_Qwen3_32B_yarn_131k_think-*
  - split: OpenThoughts3_1.2M_think
    path: data/SFT/OpenThoughts3_1.2M_think-*
  - split: smoltalk_smollm3_everyday_conversations_no_think
    path: data/SFT/smoltalk_smollm3_everyday_conversations_no_think-*
- config_name: Mid
  data_files:
  - split: OpenThoughts3_1.2M
    path: data/Mid/OpenThoughts3_1.2M-*
- config_name: Preference
  data_files:
  - split: llama_3.1_tulu_3_8b_preference_mixture_no_think
    path: data/Preference/llama_3.1_tulu_3_8b_preference_mixture_no_think-*
  - split: tulu_3_8b_pref_personas_think
    path:
    - data/Preference/tulu_3_8b_pref_personas_think-00000-of-00001.parquet
---
# SmolTalk2 (stand-in)
";

/// A README like HuggingFaceTB/smoltalk's: configs `all`, `smol-magpie-ultra`, ... with
/// `train`/`test` splits; and a config without `data_files`, found by conventions in its
/// `data_dir`.
pub const SMOLTALK_README: &str = "---
configs:
- config_name: all
  data_files:
  - split: train
    path: data/all/train-*
  - split: test
    path: data/all/test-*
- config_name: smol-magpie-ultra
  data_files:
  - split: train
    path: data/smol-magpie-ultra/train-*
  - split: test
    path: data/smol-magpie-ultra/test-*
- config_name: by-convention
  data_dir: data/all
---
";

/// A README like HuggingFaceH4/ultrafeedback_binarized's: the `default` config, splits
/// `train_prefs`, `test_prefs`, `train_sft`, ... as `data/{split}-*`.
pub const ULTRAFEEDBACK_README: &str = "---
dataset_info:
  features:
  - name: prompt
    dtype: string
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: train_sft
    path: data/train_sft-*
  - split: test_prefs
    path: data/test_prefs-*
  - split: test_sft
    path: data/test_sft-*
---
";

/// The three layouts above, written under `root` from the fixture parquet files; `extra`
/// names a file each layout also holds that the file-name conventions would pick up, so a test
/// shows the configs, not the conventions, chose.
fn write_card_repos(root: &Path) -> [(String, PathBuf); 3] {
    let uc = fixtures().join("ultrachat_mini/data");
    let uf = fixtures().join("ultrafeedback_mini/data");
    let (train0, train1, test) = (
        uc.join("train_sft-00000-of-00002.parquet"),
        uc.join("train_sft-00001-of-00002.parquet"),
        uc.join("test_sft-00000-of-00001.parquet"),
    );
    let (prefs, test_prefs) = (uf.join("train_prefs-00000-of-00001.parquet"), uf.join("test_prefs-00000-of-00001.parquet"));
    let smoltalk2 = root.join("smoltalk2");
    write_repo(
        &smoltalk2,
        Some(SMOLTALK2_README),
        &[
            ("data/SFT/OpenThoughts3_1.2M_think-00000-of-00002.parquet", &train0),
            ("data/SFT/OpenThoughts3_1.2M_think-00001-of-00002.parquet", &train1),
            ("data/SFT/LongAlign_64k_Qwen3_32B_yarn_131k_think-00000-of-00001.parquet", &test),
            ("data/SFT/smoltalk_smollm3_everyday_conversations_no_think-00000-of-00001.parquet", &test),
            ("data/Mid/OpenThoughts3_1.2M-00000-of-00001.parquet", &train1),
            ("data/Preference/llama_3.1_tulu_3_8b_preference_mixture_no_think-00000-of-00001.parquet", &prefs),
            ("data/Preference/tulu_3_8b_pref_personas_think-00000-of-00001.parquet", &test_prefs),
            ("data/train-00000-of-00001.parquet", &test),
        ],
    );
    let smoltalk = root.join("smoltalk");
    write_repo(
        &smoltalk,
        Some(SMOLTALK_README),
        &[
            ("data/all/train-00000-of-00002.parquet", &train0),
            ("data/all/train-00001-of-00002.parquet", &train1),
            ("data/all/test-00000-of-00001.parquet", &test),
            ("data/smol-magpie-ultra/train-00000-of-00001.parquet", &train1),
            ("data/smol-magpie-ultra/test-00000-of-00001.parquet", &test),
            ("data/train-00000-of-00001.parquet", &test),
        ],
    );
    let ultrafeedback = root.join("ultrafeedback_binarized");
    write_repo(
        &ultrafeedback,
        Some(ULTRAFEEDBACK_README),
        &[
            ("data/train_prefs-00000-of-00001.parquet", &prefs),
            ("data/test_prefs-00000-of-00001.parquet", &test_prefs),
            ("data/train_sft-00000-of-00002.parquet", &train0),
            ("data/train_sft-00001-of-00002.parquet", &train1),
            ("data/test_sft-00000-of-00001.parquet", &test),
            ("data/train-00000-of-00001.parquet", &test),
        ],
    );
    [
        ("HuggingFaceTB/smoltalk2".to_string(), smoltalk2),
        ("HuggingFaceTB/smoltalk".to_string(), smoltalk),
        ("HuggingFaceH4/ultrafeedback_binarized".to_string(), ultrafeedback),
    ]
}

/// What each (config, split) must load: the rows of these fixture files, in this order.
fn expected_card_splits() -> Vec<(&'static str, Option<&'static str>, &'static str, Vec<&'static str>)> {
    vec![
        (
            "smoltalk2",
            Some("SFT"),
            "OpenThoughts3_1.2M_think",
            vec!["ultrachat_mini/data/train_sft-00000-of-00002.parquet", "ultrachat_mini/data/train_sft-00001-of-00002.parquet"],
        ),
        ("smoltalk2", Some("SFT"), "LongAlign_64k_Qwen3_32B_yarn_131k_think", vec!["ultrachat_mini/data/test_sft-00000-of-00001.parquet"]),
        ("smoltalk2", Some("Mid"), "OpenThoughts3_1.2M", vec!["ultrachat_mini/data/train_sft-00001-of-00002.parquet"]),
        (
            "smoltalk2",
            Some("Preference"),
            "llama_3.1_tulu_3_8b_preference_mixture_no_think",
            vec!["ultrafeedback_mini/data/train_prefs-00000-of-00001.parquet"],
        ),
        (
            "smoltalk2",
            Some("Preference"),
            "tulu_3_8b_pref_personas_think",
            vec!["ultrafeedback_mini/data/test_prefs-00000-of-00001.parquet"],
        ),
        (
            "smoltalk",
            Some("all"),
            "train",
            vec!["ultrachat_mini/data/train_sft-00000-of-00002.parquet", "ultrachat_mini/data/train_sft-00001-of-00002.parquet"],
        ),
        ("smoltalk", Some("smol-magpie-ultra"), "train", vec!["ultrachat_mini/data/train_sft-00001-of-00002.parquet"]),
        ("smoltalk", Some("smol-magpie-ultra"), "test", vec!["ultrachat_mini/data/test_sft-00000-of-00001.parquet"]),
        ("smoltalk", Some("by-convention"), "test", vec!["ultrachat_mini/data/test_sft-00000-of-00001.parquet"]),
        ("ultrafeedback_binarized", None, "train_prefs", vec!["ultrafeedback_mini/data/train_prefs-00000-of-00001.parquet"]),
        (
            "ultrafeedback_binarized",
            Some("default"),
            "train_sft",
            vec!["ultrachat_mini/data/train_sft-00000-of-00002.parquet", "ultrachat_mini/data/train_sft-00001-of-00002.parquet"],
        ),
        ("ultrafeedback_binarized", None, "test_prefs", vec!["ultrafeedback_mini/data/test_prefs-00000-of-00001.parquet"]),
    ]
}

fn rows_of(files: &[&str]) -> Vec<alignment_data::Row> {
    files.iter().flat_map(|f| alignment_data::load_file(&fixtures().join(f), "x").unwrap().rows).collect()
}

/// Loads `(repo, config, split)` of the card layouts.
type LoadSplit<'a> = &'a dyn Fn(&str, Option<&str>, &str) -> Result<alignment_data::Dataset, DataError>;

/// Checks every expected split and every error of the three layouts through `load`.
fn check_card_layouts(load: LoadSplit, name: &dyn Fn(&str) -> String) {
    for (repo, config, split, files) in expected_card_splits() {
        let got = load(repo, config, split).unwrap_or_else(|e| panic!("{repo} {config:?} {split}: {e}"));
        assert_eq!(got.rows, rows_of(&files), "{repo} {config:?} {split}");
    }
    // No config asked where several are declared and none is the default.
    match load("smoltalk2", None, "OpenThoughts3_1.2M_think").unwrap_err() {
        DataError::NoDefaultConfig { dataset, available } => {
            assert_eq!(dataset, name("smoltalk2"));
            assert_eq!(available, ["SFT", "Mid", "Preference"]);
        }
        other => panic!("{other}"),
    }
    // `train` is not found by the conventions (data/train-*) when the card declares configs.
    assert!(matches!(load("smoltalk", None, "train").unwrap_err(), DataError::NoDefaultConfig { .. }));
    // An unknown config, an unknown split: each names what was asked and lists what there is.
    let err = load("smoltalk2", Some("RL"), "train").unwrap_err();
    assert!(
        matches!(&err, DataError::UnknownConfig { config, available, .. } if config == "RL" && available == &["SFT", "Mid", "Preference"]),
        "{err}"
    );
    let err = load("smoltalk2", Some("Mid"), "train").unwrap_err();
    match &err {
        DataError::MissingConfigSplit { dataset, config, split, available } => {
            assert_eq!((dataset.as_str(), config.as_str(), split.as_str()), (name("smoltalk2").as_str(), "Mid", "train"));
            assert_eq!(available, &["OpenThoughts3_1.2M"]);
        }
        other => panic!("{other}"),
    }
    let message = err.to_string();
    assert!(message.contains("`Mid`") && message.contains("`train`") && message.contains("OpenThoughts3_1.2M"), "{message}");
    let err = load("ultrafeedback_binarized", None, "train").unwrap_err();
    assert!(
        matches!(&err, DataError::MissingConfigSplit { config, available, .. } if config == "default" && available.len() == 4),
        "{err}"
    );
}

#[test]
fn dataset_card_configs_choose_the_files_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = write_card_repos(tmp.path());
    let dir_of = |repo: &str| repos.iter().find(|(_, d)| d.ends_with(repo)).unwrap().1.clone();
    check_card_layouts(&|repo, config, split| load_local(&dir_of(repo), config, split), &|repo| dir_of(repo).display().to_string());

    // A data_files path without wildcards that names no file; a malformed card.
    let broken = tmp.path().join("broken");
    write_repo(
        &broken,
        Some("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/missing.parquet\n---\n"),
        &[],
    );
    let err = load_local(&broken, None, "train").unwrap_err();
    assert!(matches!(&err, DataError::DataFilesNotFound { pattern, .. } if pattern == "data/missing.parquet"), "{err}");
    std::fs::write(broken.join("README.md"), "---\nconfigs:\n- config_name: a\n  data_files: 3\n---\n").unwrap();
    let err = load_local(&broken, None, "train").unwrap_err();
    assert!(matches!(&err, DataError::DatasetCard { .. }) && err.to_string().contains("README.md"), "{err}");
    // A README without configs: the conventions, as before.
    let plain = tmp.path().join("plain");
    write_repo(
        &plain,
        Some("# A dataset\n"),
        &[("data/train-00000-of-00001.parquet", &fixtures().join("ultrachat_mini/data/test_sft-00000-of-00001.parquet"))],
    );
    assert_eq!(load_local(&plain, None, "train").unwrap().rows, rows_of(&["ultrachat_mini/data/test_sft-00000-of-00001.parquet"]));
}

#[test]
fn dataset_card_configs_choose_the_files_on_the_hub_and_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let repos = write_card_repos(tmp.path());
    let mut hub = FakeHub::start(repos.iter().map(|(id, dir)| FakeRepo::dataset(id, dir)).collect());
    let id_of = |repo: &str| repos.iter().find(|(_, d)| d.ends_with(repo)).unwrap().0.clone();
    let cache = tempfile::tempdir().unwrap();
    let online = HubClient::new(config(&hub.url, cache.path(), false)).unwrap();
    check_card_layouts(&|repo, config, split| online.load_split(&id_of(repo), config, split), &id_of);
    // Only the README and the chosen files were downloaded (never the convention's data/train-*).
    assert!(!hub.requests().iter().any(|u| u.ends_with("data/train-00000-of-00001.parquet")), "{:?}", hub.requests());
    let cached = repo_cache_dir(cache.path(), "HuggingFaceTB/smoltalk2").join("snapshots").join(COMMIT);
    assert!(cached.join("README.md").is_file() && cached.join("data/SFT/OpenThoughts3_1.2M_think-00001-of-00002.parquet").is_file());

    // Offline, from the cache: the same rows and the same errors.
    hub.stop();
    let offline = HubClient::new(config(&hub.url, cache.path(), true)).unwrap();
    check_card_layouts(&|repo, config, split| offline.load_split(&id_of(repo), config, split), &id_of);
}

#[test]
fn a_dataset_id_neither_local_nor_on_the_hub_says_both() {
    let hub = fixture_hub();
    let cache = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    // Not a directory here, and no such repo on the hub (404).
    let loader = DatasetLoader::with_hub(HubClient::new(config(&hub.url, cache.path(), false)).unwrap());
    let err = loader.load_split("data/tiny-chat", None, "train").unwrap_err();
    let message = err.to_string();
    assert!(matches!(&err, DataError::NotLocalNorHub { id, .. } if id == "data/tiny-chat"), "{err}");
    assert!(message.contains(&format!("relative to {}", cwd.display())) && message.contains("hub") && message.contains("404"), "{message}");
    // The hub unreachable (nothing listens on port 9) and nothing cached.
    let loader = DatasetLoader::with_hub(HubClient::new(config("http://127.0.0.1:9", cache.path(), false)).unwrap());
    let err = loader.load_split("data/tiny-chat", None, "train").unwrap_err();
    assert!(matches!(&err, DataError::NotLocalNorHub { .. }) && err.to_string().contains(&cwd.display().to_string()), "{err}");
    // A path that cannot be a hub id.
    let err = loader.load_split("./data/tiny-chat", None, "train").unwrap_err();
    assert!(matches!(&err, DataError::DatasetNotFound { cwd: c, .. } if c == &cwd), "{err}");
    // A repo that exists but lacks the split: the split is blamed, not the id.
    let loader = DatasetLoader::with_hub(HubClient::new(config(&hub.url, cache.path(), false)).unwrap());
    let err = loader.load_split("HuggingFaceH4/ultrachat_mini", None, "validation").unwrap_err();
    assert!(matches!(&err, DataError::MissingSplit { .. }), "{err}");
}

/// `datasets` 5.2's own answers (scripts/make_data_files_goldens.py): for each README and file
/// list, the files of each (config, split), or the error it raises.
#[test]
fn dataset_card_resolution_matches_the_datasets_library() {
    let goldens: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("data_files_goldens.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in goldens["cases"].as_array().unwrap() {
        let mut files: Vec<String> = case["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
        files.push("README.md".into());
        files.sort();
        let readme = case["readme"].as_str().unwrap();
        for query in case["queries"].as_array().unwrap() {
            let (config, split) = (query["config"].as_str(), query["split"].as_str().unwrap());
            let at = format!("{} {config:?} {split}", case["name"]);
            let got = alignment_data::data_files::resolve_data_files(&files, Some(readme), "ds", config, split);
            match (query.get("files"), got) {
                (Some(want), Ok(got)) => assert_eq!(&serde_json::json!(got), want, "{at}"),
                (None, Err(err)) => {
                    let kind = match err {
                        DataError::NoDefaultConfig { .. } => "no_default_config",
                        DataError::UnknownConfig { .. } => "unknown_config",
                        DataError::MissingConfigSplit { .. } => "missing_split",
                        DataError::DataFilesNotFound { .. } => "file_not_found",
                        other => panic!("{at}: {other}"),
                    };
                    assert_eq!(kind, query["error"], "{at}");
                }
                (want, got) => panic!("{at}: datasets gives {want:?} / {}, we give {got:?}", query["error"]),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 25);
}
