//! Dataset sources, numpy-exact shuffling and the handbook's mixers, against goldens made by
//! `scripts/make_mixer_goldens.py` with numpy and Hugging Face `datasets`.

use std::path::{Path, PathBuf};

use alignment_data::dataset::{Dataset, TestSize};
use alignment_data::mixer::{mix_datasets, mix_mixture, DatasetMixer, DatasetMixture, MixerConfig, MixerEntry};
use alignment_data::shuffle::{permutation, seed_sequence_u64, NumpyRng};
use alignment_data::source::{load_file, load_local, resolve_split_files, DatasetLoader, SplitSource};
use alignment_data::DataError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

fn golden(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("golden file");
    serde_json::from_str(&text).expect("golden JSON")
}

fn u64s(value: &Value) -> Vec<u64> {
    value.as_array().expect("array").iter().map(|v| v.as_u64().expect("u64")).collect()
}

fn sha256_u64(values: &[usize]) -> String {
    let mut hasher = Sha256::new();
    for &v in values {
        hasher.update((v as u64).to_le_bytes());
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn numpy_seed_sequence_pcg64_and_permutation_match_goldens() {
    let g = golden("shuffle_goldens.json");
    for case in g["seed_sequence"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        assert_eq!(seed_sequence_u64(seed, 4), u64s(&case["words"]), "SeedSequence({seed})");
    }
    for case in g["raw"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = NumpyRng::new(seed);
        let raw: Vec<u64> = (0..6).map(|_| rng.next_u64()).collect();
        assert_eq!(raw, u64s(&case["values"]), "PCG64({seed}).random_raw");
    }
    let cases = g["permutations"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for case in cases {
        let (seed, n) = (case["seed"].as_u64().unwrap(), case["n"].as_u64().unwrap() as usize);
        let perm = permutation(seed, n);
        let expect = |key: &str| u64s(&case[key]).into_iter().map(|v| v as usize).collect::<Vec<_>>();
        if case.get("full").is_some() {
            assert_eq!(perm, expect("full"), "default_rng({seed}).permutation({n})");
        } else {
            assert_eq!(perm[..40], expect("head")[..], "head of default_rng({seed}).permutation({n})");
            assert_eq!(perm[n - 10..], expect("tail")[..], "tail of default_rng({seed}).permutation({n})");
        }
        assert_eq!(sha256_u64(&perm), case["sha256"].as_str().unwrap(), "sha256 of permutation({seed}, {n})");
    }
}

fn index_dataset(n: usize) -> Dataset {
    Dataset::from_rows("idx", (0..n).map(|i| json!({ "i": i }).as_object().unwrap().clone()).collect())
}

fn indices(ds: &Dataset) -> Vec<usize> {
    ds.rows.iter().map(|r| r["i"].as_u64().unwrap() as usize).collect()
}

fn test_size(value: &Value) -> TestSize {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn train_test_split_matches_datasets() {
    let g = golden("split_goldens.json");
    for case in g["cases"].as_array().unwrap() {
        let n = case["n"].as_u64().unwrap() as usize;
        let seed = case["seed"].as_u64().unwrap();
        let (train, test) = index_dataset(n).train_test_split(test_size(&case["test_size"]), seed).unwrap();
        let (train, test) = (indices(&train), indices(&test));
        assert_eq!(train.len() as u64, case["n_train"].as_u64().unwrap());
        assert_eq!(test.len() as u64, case["n_test"].as_u64().unwrap());
        if case.get("train").is_some() {
            assert_eq!(train, u64s(&case["train"]).into_iter().map(|v| v as usize).collect::<Vec<_>>(), "{case}");
            assert_eq!(test, u64s(&case["test"]).into_iter().map(|v| v as usize).collect::<Vec<_>>(), "{case}");
        } else {
            assert_eq!(sha256_u64(&train), case["train_sha256"].as_str().unwrap());
            assert_eq!(sha256_u64(&test), case["test_sha256"].as_str().unwrap());
        }
    }
    for case in g["errors"].as_array().unwrap() {
        let n = case["n"].as_u64().unwrap() as usize;
        let err = index_dataset(n).train_test_split(test_size(&case["test_size"]), 0).unwrap_err();
        match err {
            DataError::InvalidTestSize { message, .. } => assert_eq!(message, case["message"].as_str().unwrap()),
            other => panic!("unexpected error {other}"),
        }
    }
    // An empty dataset is returned as both halves, as datasets does.
    let (train, test) = index_dataset(0).train_test_split(TestSize::Fraction(0.1), 0).unwrap();
    assert!(train.is_empty() && test.is_empty());
}

#[test]
fn parquet_reads_nested_chat_columns() {
    let path = fixtures().join("ultrachat_mini/data/train_sft-00000-of-00002.parquet");
    let ds = load_file(&path, "uc").unwrap();
    assert_eq!(ds.columns, ["prompt", "prompt_id", "messages"]);
    assert_eq!(ds.len(), 7, "three row groups of a snappy file");
    assert_eq!(
        Value::Object(ds.rows[1].clone()),
        json!({
            "prompt": "uc-train-1 question 0",
            "prompt_id": "0001",
            "messages": [
                {"content": "uc-train-1 question 0", "role": "user"},
                {"content": "uc-train-1 answer 0", "role": "assistant"},
                {"content": "uc-train-1 question 1", "role": "user"},
                {"content": "uc-train-1 answer 1", "role": "assistant"},
            ]
        })
    );
    // Preference columns: two conversations and float64 scores; a zstd shard elsewhere.
    let prefs = load_file(&fixtures().join("ultrafeedback_mini/data/train_prefs-00000-of-00001.parquet"), "uf").unwrap();
    assert_eq!(prefs.columns, ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]);
    assert_eq!(prefs.rows[3]["score_chosen"], json!(8.25));
    assert_eq!(prefs.rows[3]["rejected"][1]["content"], json!("uf-train_prefs-3 bad answer"));
    let zstd = load_file(&fixtures().join("ultrachat_mini/data/train_sft-00001-of-00002.parquet"), "uc").unwrap();
    assert_eq!(zstd.rows[0]["prompt_id"], json!("0007"));
}

#[test]
fn local_directories_resolve_splits_in_shard_order() {
    let uc = load_local(&fixtures().join("ultrachat_mini"), None, "train_sft").unwrap();
    let ids: Vec<&str> = uc.rows.iter().map(|r| r["prompt_id"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..12).map(|i| format!("{i:04x}")).collect();
    assert_eq!(ids, expected, "shard 00000 then 00001, rows in file order");
    assert_eq!(load_local(&fixtures().join("ultrachat_mini"), None, "test_sft").unwrap().len(), 4);

    // JSON Lines: a key missing from some rows is null there, columns in first-seen order.
    let lc = load_local(&fixtures().join("local_chat"), None, "train_sft").unwrap();
    assert_eq!(lc.columns, ["messages", "prompt", "source"]);
    assert_eq!(lc.len(), 6, "blank line skipped");
    assert_eq!(lc.rows[0]["source"], json!("s0"));
    assert_eq!(lc.rows[1]["source"], Value::Null);
    assert_eq!(lc.rows[1].keys().collect::<Vec<_>>(), ["messages", "prompt", "source"]);
    // A JSON array file.
    let test = load_local(&fixtures().join("local_chat"), None, "test_sft").unwrap();
    assert_eq!(test.len(), 2);
    assert_eq!(test.rows[1]["messages"][3]["content"], json!("lc-test-1 answer 1"));
    // A single file is the split `train`.
    let file = fixtures().join("local_chat/train_sft.jsonl");
    assert_eq!(load_local(&file, None, "train").unwrap().len(), 6);
    assert!(matches!(load_local(&file, None, "test"), Err(DataError::MissingSplit { .. })));
}

#[test]
fn split_file_resolution_rule() {
    let files: Vec<String> = [
        ".hidden/train-00000-of-00001.parquet",
        "README.md",
        "data/test_sft-00000-of-00001.parquet",
        "data/train_sft-00000-of-00002.parquet",
        "data/train_sft-00001-of-00002.parquet",
        "default/validation/0000.parquet",
        "default/validation/0001.parquet",
        "other/train-00000-of-00001.parquet",
        "other/train/0000.parquet",
        "train.jsonl",
        "train_gen.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let resolve = |split: &str, config: Option<&str>| resolve_split_files(&files, split, config);
    assert_eq!(resolve("train_sft", None), ["data/train_sft-00000-of-00002.parquet", "data/train_sft-00001-of-00002.parquet"]);
    assert_eq!(resolve("train", None), ["train.jsonl"], "train does not take train_sft or train_gen");
    assert_eq!(resolve("train_gen", None), ["train_gen.json"]);
    assert_eq!(resolve("test_sft", None), ["data/test_sft-00000-of-00001.parquet"]);
    assert_eq!(resolve("validation", None), ["default/validation/0000.parquet", "default/validation/0001.parquet"]);
    assert_eq!(resolve("train", Some("other")), ["other/train-00000-of-00001.parquet"]);
    assert_eq!(resolve("validation", Some("default")), resolve("validation", None));
    assert!(resolve("test", None).is_empty());
}

/// Replaces the fixture names in a golden config by their paths.
fn localize(config: &Value) -> Value {
    let root = fixtures();
    let mut config = config.clone();
    if let Some(mixer) = config.get_mut("dataset_mixer").and_then(Value::as_object_mut) {
        let entries: Vec<(String, Value)> = mixer.iter().map(|(k, v)| (root.join(k).display().to_string(), v.clone())).collect();
        *mixer = entries.into_iter().collect();
    }
    if let Some(datasets) = config.get_mut("datasets").and_then(Value::as_array_mut) {
        for entry in datasets {
            let id = root.join(entry["id"].as_str().unwrap()).display().to_string();
            entry["id"] = Value::String(id);
        }
    }
    config
}

fn assert_split(name: &str, split: &str, got: Option<&Dataset>, want: &Value) {
    let got = got.unwrap_or_else(|| panic!("{name}: no {split} split"));
    assert_eq!(got.columns, u64s_or_strings(&want["columns"]), "{name} {split} columns");
    let want_rows = want["rows"].as_array().unwrap();
    assert_eq!(got.len(), want_rows.len(), "{name} {split} row count");
    for (i, (row, expected)) in got.rows.iter().zip(want_rows).enumerate() {
        assert_eq!(&Value::Object(row.clone()), expected, "{name} {split} row {i}");
        let keys: Vec<&String> = row.keys().collect();
        let want_keys: Vec<&String> = expected.as_object().unwrap().keys().collect();
        assert_eq!(keys, want_keys, "{name} {split} row {i} column order");
    }
}

fn u64s_or_strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

#[test]
fn mixers_reproduce_the_handbook_row_for_row() {
    let g = golden("mixer_goldens.json");
    let loader = DatasetLoader::local_only();
    let scenarios = g["scenarios"].as_array().unwrap();
    assert!(scenarios.len() >= 6);
    for scenario in scenarios {
        let name = scenario["name"].as_str().unwrap();
        let config = localize(&scenario["config"]);
        let mixed = match scenario["kind"].as_str().unwrap() {
            "mixer" => mix_datasets(&serde_json::from_value::<MixerConfig>(config).unwrap(), &loader),
            _ => mix_mixture(&serde_json::from_value::<DatasetMixture>(config).unwrap(), &loader),
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_split(name, "train", mixed.train.as_ref(), &scenario["train"]);
        match scenario.get("test") {
            Some(test) => assert_split(name, "test", mixed.test.as_ref(), test),
            None => assert!(mixed.test.is_none(), "{name}: unexpected test split"),
        }
    }
}

#[test]
fn unshuffled_mix_is_the_ordered_concatenation() {
    let g = golden("mixer_goldens.json");
    let scenario = &g["scenarios"][0];
    assert_eq!(scenario["name"], "classic_three_sources");
    let mut config: MixerConfig = serde_json::from_value(localize(&scenario["config"])).unwrap();
    config.shuffle = false;
    let mixed = mix_datasets(&config, &DatasetLoader::local_only()).unwrap();
    let train = mixed.train.unwrap();
    // int(0.5 * 12) = 6 ultrachat rows, int(0.3 * 8) = 2 ultrafeedback rows, all 6 local rows.
    let firsts: Vec<&str> = train.rows.iter().map(|r| r["messages"][0]["content"].as_str().unwrap()).collect();
    let mut expected: Vec<String> = (0..6).map(|i| format!("uc-train-{i} question 0")).collect();
    expected.extend((0..2).map(|i| format!("uf-train_sft-{i} question 0")));
    expected.extend((0..6).map(|i| format!("lc-train-{i} question 0")));
    assert_eq!(firsts, expected);
    // ... and shuffling it with seed 42 is the golden mix.
    let shuffled = train.shuffle(42);
    let want = scenario["train"]["rows"].as_array().unwrap();
    assert!(shuffled.rows.iter().zip(want).all(|(r, w)| &Value::Object(r.clone()) == w));
    assert_eq!(mixed.test.unwrap().len(), 4 + 3 + 2, "test splits are not subsampled");
}

#[test]
fn mixer_config_keeps_recipe_order() {
    let yaml = "dataset_mixer:\n  zeta/b: 0.5\n  alpha/a: 1\n  mid/c: 0.25\ndataset_splits:\n- train_sft\n- test_sft\ncolumns_to_keep: [messages]\n";
    let config: MixerConfig = serde_yaml::from_str(yaml).unwrap();
    let ids: Vec<&str> = config.dataset_mixer.0.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["zeta/b", "alpha/a", "mid/c"]);
    assert_eq!(config.dataset_mixer.0[1].fraction, 1.0);
    assert!(config.shuffle);
    assert_eq!(config.seed, 42);
    // The list-of-mappings spelling of the handbook's comments.
    let listed: DatasetMixer = serde_yaml::from_str("- z: 0.5\n- a: 0.3\n").unwrap();
    assert_eq!(listed.0, [MixerEntry { id: "z".into(), fraction: 0.5 }, MixerEntry { id: "a".into(), fraction: 0.3 }]);
    // Defaults of the classic keys.
    let minimal: MixerConfig = serde_yaml::from_str("dataset_mixer: {x: 1.0}").unwrap();
    assert_eq!(minimal.dataset_splits, ["train", "test"]);
    assert_eq!(minimal.columns_to_keep, None);
    // The mixture form and its defaults.
    let mixture: DatasetMixture = serde_yaml::from_str(
        "datasets:\n- id: a/b\n  columns: [messages]\n- id: c/d\n  split: train_sft\n  weight: 0.5\ntest_split_size: 100\n",
    )
    .unwrap();
    assert_eq!(mixture.seed, 0);
    assert_eq!(mixture.datasets[0].split, "train");
    assert_eq!(mixture.datasets[0].weight, Some(1.0));
    assert_eq!(mixture.test_split_size, Some(TestSize::Count(100)));
    let fraction: DatasetMixture = serde_yaml::from_str("datasets: [{id: a}]\ntest_split_size: 0.1").unwrap();
    assert_eq!(fraction.test_split_size, Some(TestSize::Fraction(0.1)));
}

fn uc() -> String {
    fixtures().join("ultrachat_mini").display().to_string()
}

fn classic(entries: &[(&str, f64)], splits: &[&str], keep: Option<&[&str]>) -> MixerConfig {
    let mut config = MixerConfig::new(DatasetMixer(
        entries.iter().map(|(id, fraction)| MixerEntry { id: id.to_string(), fraction: *fraction }).collect(),
    ));
    config.dataset_splits = splits.iter().map(|s| s.to_string()).collect();
    config.columns_to_keep = keep.map(|k| k.iter().map(|s| s.to_string()).collect());
    config
}

#[test]
fn mixer_errors_name_what_is_wrong() {
    let loader = DatasetLoader::local_only();
    let uc = uc();

    let err = mix_datasets(&classic(&[(&uc, 1.0)], &["train_sft", "validation"], None), &loader).unwrap_err();
    assert!(matches!(&err, DataError::UnknownSplitType { split } if split == "validation"));
    assert_eq!(err.to_string(), "Split type validation not recognized as one of test or train.");

    let err = mix_datasets(&classic(&[(&uc, 1.0)], &["train_gen"], None), &loader).unwrap_err();
    match &err {
        DataError::MissingSplit { split, found, .. } => {
            assert_eq!(split, "train_gen");
            assert!(found.contains(&"data/train_sft-00000-of-00002.parquet".to_string()), "{found:?}");
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("train_sft-00001-of-00002.parquet"), "{err}");

    let err = mix_datasets(&classic(&[(&uc, -0.1)], &["train_sft"], None), &loader).unwrap_err();
    assert!(matches!(err, DataError::InvalidFraction { .. }));
    assert!(err.to_string().contains("Dataset fractions cannot be negative"));

    let err = mix_datasets(&classic(&[(&uc, 1.5)], &["train_sft"], None), &loader).unwrap_err();
    assert!(matches!(err, DataError::FractionTooLarge { requested: 18, len: 12, .. }), "{err}");

    let err = mix_datasets(&classic(&[(&uc, 1.0)], &["train_sft"], Some(&["chosen"])), &loader).unwrap_err();
    match &err {
        DataError::NoColumnsKept { dataset, available, .. } => {
            assert!(dataset.contains("ultrachat_mini"));
            assert_eq!(available, &["prompt", "prompt_id", "messages"]);
        }
        other => panic!("{other}"),
    }

    let mut config = classic(&[(&uc, 1.0)], &["train_sft"], None);
    config.dataset_configs = Some(vec!["a".into(), "b".into()]);
    assert!(matches!(mix_datasets(&config, &loader), Err(DataError::InvalidMixer { .. })));

    let err = mix_datasets(&classic(&[("no/such/dir", 1.0)], &["train"], None), &loader).unwrap_err();
    assert!(matches!(&err, DataError::DatasetNotFound { id, .. } if id == "no/such/dir"));
    let err = mix_datasets(&classic(&[("org/name", 1.0)], &["train"], None), &loader).unwrap_err();
    assert!(matches!(err, DataError::DatasetNotFound { .. }), "a hub id without a hub client");

    // Mixture: a missing column names dataset and column; differing column sets are refused.
    let mixture: DatasetMixture = serde_json::from_value(json!({
        "datasets": [{"id": uc, "split": "train_sft", "columns": ["messages", "chosen"]}]
    }))
    .unwrap();
    match mix_mixture(&mixture, &loader).unwrap_err() {
        DataError::MissingColumn { dataset, column, available } => {
            assert!(dataset.ends_with("ultrachat_mini:train_sft"), "{dataset}");
            assert_eq!(column, "chosen");
            assert_eq!(available, ["prompt", "prompt_id", "messages"]);
        }
        other => panic!("{other}"),
    }
    let mixture: DatasetMixture = serde_json::from_value(json!({
        "datasets": [{"id": uc, "columns": ["messages"]}, {"id": uc, "columns": ["prompt"]}]
    }))
    .unwrap();
    let err = mix_mixture(&mixture, &loader).unwrap_err();
    assert!(err.to_string().contains("Column names must be consistent"), "{err}");
    let empty: DatasetMixture = serde_json::from_value(json!({"datasets": []})).unwrap();
    assert!(matches!(mix_mixture(&empty, &loader), Err(DataError::InvalidMixer { .. })));
}

#[test]
fn source_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("train.jsonl");
    std::fs::write(&bad, "{\"a\": 1}\n\n{\"a\": 2\n").unwrap();
    match load_file(&bad, "bad").unwrap_err() {
        DataError::MalformedJsonLine { path, line, .. } => {
            assert_eq!(path, bad);
            assert_eq!(line, 3);
        }
        other => panic!("{other}"),
    }
    std::fs::write(&bad, "{\"a\": 1}\n[1, 2]\n").unwrap();
    let err = load_file(&bad, "bad").unwrap_err();
    assert!(matches!(err, DataError::MalformedJsonLine { line: 2, .. }));
    assert!(err.to_string().contains("train.jsonl:2"), "{err}");

    // .json: an array, a columnar object, and an array with a non-object.
    let json_file = dir.path().join("rows.json");
    std::fs::write(&json_file, "{\n \"text\": [\"a\", \"b\"],\n \"n\": [1, 2]\n}\n").unwrap();
    let ds = load_file(&json_file, "cols").unwrap();
    assert_eq!(ds.rows[1], json!({"text": "b", "n": 2}).as_object().unwrap().clone());
    std::fs::write(&json_file, "[\"first\", \"second\"]").unwrap();
    assert_eq!(load_file(&json_file, "texts").unwrap().rows[0]["text"], json!("first"));
    std::fs::write(&json_file, "[{\"a\": 1}, 3]").unwrap();
    assert!(matches!(load_file(&json_file, "bad"), Err(DataError::InvalidJson { .. })));

    let parquet = dir.path().join("broken.parquet");
    std::fs::write(&parquet, b"PAR1 this is not parquet").unwrap();
    match load_file(&parquet, "broken").unwrap_err() {
        DataError::Parquet { path, .. } => assert_eq!(path, parquet),
        other => panic!("{other}"),
    }
    let csv = dir.path().join("train.csv");
    std::fs::write(&csv, "a,b\n").unwrap();
    assert!(matches!(load_file(&csv, "csv"), Err(DataError::UnsupportedFile { .. })));
    // A directory without the split lists the data files it has.
    match DatasetLoader::local_only().load_split(&dir.path().display().to_string(), None, "test") {
        Err(DataError::MissingSplit { found, .. }) => assert_eq!(found, ["broken.parquet", "rows.json", "train.jsonl"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn dataset_operations_follow_datasets() {
    let a = Dataset::from_rows("a", vec![json!({"x": 1, "y": "a"}).as_object().unwrap().clone()]);
    let b = Dataset::from_rows("b", vec![json!({"y": "b", "z": true}).as_object().unwrap().clone()]);
    let both = Dataset::concatenate("ab", vec![a.clone(), b]);
    assert_eq!(both.columns, ["x", "y", "z"]);
    assert_eq!(Value::Object(both.rows[1].clone()), json!({"x": null, "y": "b", "z": true}));
    assert!(matches!(a.select(&[0, 1]), Err(DataError::RowOutOfRange { index: 1, len: 1, .. })));
    let kept = both.clone().retain_columns(&["z".to_string(), "x".to_string()]).unwrap();
    assert_eq!(kept.columns, ["x", "z"], "dataset order, not keep order");
    let selected = both.select_columns(&["z".to_string(), "x".to_string()]).unwrap();
    assert_eq!(selected.columns, ["z", "x"], "select_columns order");
    assert_eq!(index_dataset(0).shuffle(42).len(), 0);
}

/// A row of a shuffled mix still knows its file and line: errors about it point there, not to
/// its position in the mix.
#[test]
fn mixed_rows_keep_their_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for (root, tag) in [(&a, "a"), (&b, "b")] {
        std::fs::create_dir_all(root).unwrap();
        // A blank line first: line numbers count it, row indices do not.
        let lines: Vec<String> = (0..20).map(|i| format!("{{\"text\": \"{tag}{i}\"}}")).collect();
        std::fs::write(root.join("train.jsonl"), format!("\n{}\n", lines.join("\n"))).unwrap();
    }
    let config = classic(&[(&a.display().to_string(), 1.0), (&b.display().to_string(), 0.5)], &["train"], None);
    let mixed = mix_datasets(&config, &DatasetLoader::local_only()).unwrap().train.unwrap();
    assert_eq!(mixed.len(), 30);
    for i in 0..mixed.len() {
        let text = mixed.rows[i]["text"].as_str().unwrap();
        let (tag, n) = text.split_at(1);
        let n: usize = n.parse().unwrap();
        let origin = mixed.origin(i);
        let file = if tag == "a" { &a } else { &b };
        assert_eq!(&*origin.source, file.join("train.jsonl").display().to_string(), "row {i}");
        assert_eq!((origin.row, origin.line), (n, Some(n + 2)), "row {i} ({text})");
        assert_eq!(origin.label(), format!("{}:{}", file.join("train.jsonl").display(), n + 2));
    }
}
