//! Bad input, as a careless or unlucky user gives it, through the example binaries: each case
//! runs `zephyr_sft`, `zephyr_dpo`, `orpo` or `generate` on a tiny model (SmolLM2's tokenizer,
//! two layers of width 32, random weights) and a few rows of the repo's tiny-chat data, and
//! asserts a non-zero exit (not a panic), a message naming the culprit, and an output_dir left as
//! it was. Then the runs that must succeed around those rules: stale staging directories removed,
//! `overwrite_output_dir` replacing a previous run, a non-finite loss stopping a run before
//! anything non-finite is saved.

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::models::{random_model, write_pretrained, ModelConfig, SaveDtype};
use alignment_handbook::reference::{repo_root, smollm2_dir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The example binary `name`, built beside this test: `cargo test` builds the examples with the
/// tests; a lone `cargo test --test integration bad_input::` builds a missing one here, but uses an existing one
/// as it is (after changing the sources, `cargo build --examples` first).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let path = profile_dir.join("examples").join(name);
    if !path.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.current_dir(repo_root()).args(["build", "--example", name]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success() && path.is_file(), "building the `{name}` example");
    }
    path
}

/// A tiny Llama with SmolLM2's tokenizer files; `vocab_size` and `max_position_embeddings` as given.
fn tiny_model(dir: &Path, vocab_size: usize, max_position_embeddings: usize) -> PathBuf {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "torch_dtype": "float32"
    });
    let config = ModelConfig::from_json_str(&config.to_string()).unwrap();
    let model = random_model::<Cpu>(config, 7, &Default::default(), None).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    write_pretrained(&model, dir, SaveDtype::F32, Some(&smollm2_dir().unwrap())).unwrap();
    dir.to_path_buf()
}

/// `n` rows of a tiny-chat file, as a JSON Lines file `name` in `dir`.
fn data_file(dir: &Path, source: &str, name: &str, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let text = std::fs::read_to_string(repo_root().join("data/tiny-chat").join(source)).unwrap();
    let rows: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(dir.join(name), rows.join("\n") + "\n").unwrap();
}

/// A scratch directory with the tiny model, a small chat dataset (`data/`) and an output_dir path.
struct Scene {
    _root: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().to_path_buf();
        let model = tiny_model(&path.join("model"), 49152, 1024);
        let data = path.join("data");
        data_file(&data, "train_sft.jsonl", "train_sft.jsonl", 12);
        data_file(&data, "train_prefs.jsonl", "train_prefs.jsonl", 12);
        Self { _root: root, root: path.clone(), model, data, out: path.join("out") }
    }

    /// A recipe for the scene (`objective`: sft, dpo or orpo) written to a file, with `extra` YAML lines.
    fn recipe(&self, objective: &str, extra: &str) -> PathBuf {
        let split = if objective == "sft" { "train_sft" } else { "train_prefs" };
        let text = format!(
            "model_name_or_path: {}\ndataset_mixer:\n  {}: 1.0\ndataset_splits: [{split}]\nmax_steps: 2\n\
             per_device_train_batch_size: 2\ngradient_accumulation_steps: 1\nlearning_rate: 1.0e-3\nlogging_steps: 1\n\
             save_strategy: \"no\"\neval_strategy: \"no\"\nmax_seq_length: 128\nmax_length: 128\noutput_dir: {}\n{extra}",
            self.model.display(),
            self.data.display(),
            self.out.display()
        );
        // `extra` replaces the base keys it sets (a key written twice is itself an error).
        let key = |line: &str| line.split(':').next().unwrap_or_default().trim().to_string();
        let replaced: Vec<String> = extra.lines().filter(|l| !l.starts_with(' ') && l.contains(':')).map(key).collect();
        let (base, _) = text.split_at(text.len() - extra.len());
        let mut kept = String::new();
        let mut skipping = false;
        for line in base.lines() {
            if !line.starts_with(' ') {
                skipping = replaced.contains(&key(line));
            }
            if !skipping {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        let text = kept + extra;
        let path = self.root.join(format!("{objective}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn run(binary_name: &str, args: &[String]) -> Output {
    Command::new(binary(binary_name)).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap()
}

/// Every file under `dir` with its contents (empty when `dir` does not exist).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Sets a NaN into one element of tensor `name` of `dir/model.safetensors`.
fn poison(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        file.tensors().into_iter().map(|(n, v)| (n.to_string(), v.shape().to_vec(), v.data().to_vec())).collect();
    let target = tensors.iter_mut().find(|(n, _, _)| n == name).unwrap();
    target.2[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
}

/// One bad-input case: what to change, which binary, what the message must name.
struct Case {
    name: &'static str,
    binary: &'static str,
    objective: &'static str,
    recipe: &'static str,
    /// Prepares the scene (returns extra command-line arguments).
    setup: fn(&Scene) -> Vec<String>,
    /// Substrings the error message must contain (`{model}`, `{data}` are the scene's paths).
    expect: &'static [&'static str],
}

#[test]
fn bad_input_fails_naming_the_culprit_and_leaves_output_dir_untouched() {
    let cases = [
        Case {
            name: "a model with a NaN weight",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |s| {
                poison(&s.model, "model.layers.1.mlp.up_proj.weight");
                vec![]
            },
            expect: &["model.layers.1.mlp.up_proj.weight", "non-finite"],
        },
        Case {
            name: "a tokenizer with ids past the model's vocabulary",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |s| {
                tiny_model(&s.model, 1000, 1024);
                vec![]
            },
            expect: &["tokenizer", "{model}", "1000", "vocab_size"],
        },
        Case {
            name: "an output_dir holding a previous run",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |s| {
                std::fs::create_dir_all(s.out.join("checkpoint-7")).unwrap();
                std::fs::write(s.out.join("checkpoint-7/trainer_state.json"), b"{}").unwrap();
                std::fs::write(s.out.join("metrics.jsonl"), b"{\"step\": 7, \"loss\": 1.0}\n").unwrap();
                std::fs::write(s.out.join("model.safetensors"), b"the previous run's model").unwrap();
                vec![]
            },
            expect: &["output_dir", "metrics.jsonl", "overwrite_output_dir"],
        },
        Case {
            name: "an overwrite that fails before training starts",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "overwrite_output_dir: true\n",
            setup: |s| {
                std::fs::create_dir_all(&s.out).unwrap();
                std::fs::write(s.out.join("metrics.jsonl"), b"{\"step\": 7, \"loss\": 1.0}\n").unwrap();
                std::fs::write(s.out.join("model.safetensors"), b"the previous run's model").unwrap();
                vec!["--learning_rate=.nan".into()]
            },
            expect: &["learning_rate"],
        },
        Case {
            name: "a dataset fraction of 0",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |s| vec![format!("--dataset_mixer={{{}: 0.0}}", s.data.display())],
            expect: &["training set is empty", "fraction", "{data}: 0"],
        },
        Case {
            name: "no train split",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |s| {
                data_file(&s.data, "test_sft.jsonl", "test_sft.jsonl", 4);
                vec!["--dataset_splits=[test_sft]".into()]
            },
            expect: &["training set is empty", "no train split", "test_sft"],
        },
        Case {
            name: "every DPO pair dropped by truncation",
            binary: "zephyr_dpo",
            objective: "dpo",
            recipe: "",
            setup: |_| vec!["--max_length=4".into()],
            expect: &["training set is empty", "all 12 rows", "max_length 4"],
        },
        Case {
            name: "every ORPO pair's completion truncated away",
            binary: "orpo",
            objective: "orpo",
            recipe: "",
            setup: |_| vec!["--max_length=4".into()],
            expect: &["training set is empty", "all 12 rows", "max_length 4"],
        },
        Case {
            name: "a malformed row in the mix",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |s| {
                let path = s.data.join("train_sft.jsonl");
                let text = std::fs::read_to_string(&path).unwrap();
                let mut lines: Vec<String> = text.lines().map(String::from).collect();
                lines[8] = r#"{"prompt": "hi", "prompt_id": "x", "messages": "not a list"}"#.into();
                std::fs::write(&path, lines.join("\n") + "\n").unwrap();
                vec![]
            },
            expect: &["train_sft.jsonl:9", "row 8", "messages"],
        },
        Case {
            name: "a NaN learning rate",
            binary: "zephyr_sft",
            objective: "sft",
            recipe: "",
            setup: |_| vec!["--learning_rate=.nan".into()],
            expect: &["learning_rate"],
        },
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let scene = Scene::new();
        let recipe = scene.recipe(case.objective, case.recipe);
        let mut args = vec![recipe.display().to_string()];
        args.extend((case.setup)(&scene));
        let before = snapshot(&scene.out);
        let output = run(case.binary, &args);
        let message = stderr(&output);
        let expected: Vec<String> = case
            .expect
            .iter()
            .map(|e| e.replace("{model}", &scene.model.display().to_string()).replace("{data}", &scene.data.display().to_string()))
            .collect();
        let missing: Vec<&String> = expected.iter().filter(|e| !message.contains(e.as_str())).collect();
        println!("{}:\n  {}", case.name, message.trim_end().replace('\n', "\n  "));
        if output.status.code() != Some(1) {
            failures.push(format!("{}: exit {:?} (expected 1)\n{message}", case.name, output.status.code()));
        } else if !missing.is_empty() {
            failures.push(format!("{}: the message lacks {missing:?}\n{message}", case.name));
        } else if snapshot(&scene.out) != before {
            failures.push(format!("{}: output_dir changed", case.name));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

#[test]
fn a_non_finite_loss_stops_the_run_before_anything_non_finite_is_saved() {
    let scene = Scene::new();
    // A learning rate past f32's range makes the first update infinite: the next loss is NaN.
    let recipe = scene.recipe("sft", "max_steps: 4\n");
    let output = run("zephyr_sft", &[recipe.display().to_string(), "--learning_rate=1.0e39".into()]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("optimizer step 2: the loss is NaN") && message.contains("2 rows"), "{message}");
    assert!(!scene.out.join("model.safetensors").exists(), "no final model is written");

    // Saving after every step: the infinite weights of step 1 are refused at the save itself.
    let output = run(
        "zephyr_sft",
        &[
            recipe.display().to_string(),
            "--learning_rate=1.0e39".into(),
            "--save_strategy=steps".into(),
            "--save_steps=1".into(),
            "--overwrite_output_dir=true".into(),
        ],
    );
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains("optimizer step 1: the update left non-finite weights, so nothing was saved"), "{message}");
    assert!(!scene.out.join("model.safetensors").exists(), "no final model is written");
    for (_, dir) in alignment_handbook::trainer::checkpoint::list_checkpoints(&scene.out) {
        alignment_handbook::models::load_pretrained::<Cpu>(&dir, &Default::default())
            .unwrap_or_else(|e| panic!("checkpoint {} is not a finite model: {e}", dir.display()));
    }
    let staging: Vec<String> = std::fs::read_dir(&scene.out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(staging.is_empty(), "no staging directory is left: {staging:?}");
}

#[test]
fn stale_staging_is_removed_and_overwrite_replaces_the_previous_run() {
    let scene = Scene::new();
    let stale = scene.out.join(".checkpoint-3.tmp-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"half a checkpoint").unwrap();
    std::fs::write(scene.out.join("adapter_config.json"), b"{}").unwrap();
    std::fs::write(scene.out.join("notes.txt"), b"the user's").unwrap();
    let recipe = scene.recipe("sft", "overwrite_output_dir: true\n");
    let output = run("zephyr_sft", &[recipe.display().to_string()]);
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(!stale.exists() && message.contains(".checkpoint-3.tmp-999999999"), "{message}");
    assert!(!scene.out.join("adapter_config.json").exists(), "the previous run's adapter is removed beside the new full model");
    assert!(scene.out.join("model.safetensors").is_file() && scene.out.join("notes.txt").is_file());
}

#[test]
fn generate_refuses_a_prompt_longer_than_the_context() {
    let scene = Scene::new();
    let model = tiny_model(&scene.root.join("short-context"), 49152, 16);
    let prompt = "word ".repeat(40);
    let output =
        run("generate", &["--model".into(), model.display().to_string(), "--prompt".into(), prompt, "--max-new-tokens".into(), "2".into()]);
    let message = stderr(&output);
    assert!(!output.status.success() && output.status.code() != Some(101), "{message}");
    assert!(message.contains("max_position_embeddings") && message.contains("16"), "{message}");
}

/// A long row: one SFT conversation and one preference pair whose answer is ~6000 tokens.
fn long_rows() -> (alignment_handbook::data::Dataset, alignment_handbook::data::Dataset) {
    use alignment_handbook::data::Dataset;
    let long = "many words ".repeat(3000);
    let message = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let sft_row = serde_json::json!({"messages": [message("user", "Say it."), message("assistant", &long)]});
    let pref_row = serde_json::json!({
        "chosen": [message("user", "Say it."), message("assistant", &long)],
        "rejected": [message("user", "Say it."), message("assistant", "No.")],
    });
    (
        Dataset::from_rows("long", vec![sft_row.as_object().unwrap().clone()]),
        Dataset::from_rows("long", vec![pref_row.as_object().unwrap().clone()]),
    )
}

/// With `max_seq_length` / `max_length` left out, a long row is truncated to TRL's default of
/// 1024 tokens (SFT, DPO, ORPO), not tokenized and trained whole.
#[test]
fn long_rows_are_truncated_to_trls_default_when_max_length_is_left_out() {
    use alignment_handbook::run::{preference_examples, sft_examples, Objective, TextTools, TRL_DEFAULT_MAX_LENGTH};
    let recipe = alignment_handbook::trainer::Recipe::from_yaml_str("learning_rate: 1.0e-5\n", "test recipe", &[]).unwrap();
    assert_eq!((recipe.max_seq_length, recipe.max_length), (None, Some(TRL_DEFAULT_MAX_LENGTH)));
    let tools = TextTools::load(&smollm2_dir().unwrap(), None).unwrap();
    let (sft, prefs) = long_rows();
    let examples = sft_examples(&recipe, &tools, &sft).unwrap();
    assert_eq!(examples.len(), 1);
    assert_eq!(examples[0].len(), TRL_DEFAULT_MAX_LENGTH, "the SFT row is cut to 1024 tokens");
    for objective in [Objective::Dpo, Objective::Orpo] {
        let pairs = preference_examples(&recipe, &tools, &prefs, objective).unwrap();
        assert_eq!(pairs.len(), 1, "{objective:?}");
        assert!(pairs[0].chosen.len() <= TRL_DEFAULT_MAX_LENGTH, "{objective:?}: chosen has {} tokens", pairs[0].chosen.len());
        assert!(pairs[0].chosen.len() > TRL_DEFAULT_MAX_LENGTH / 2, "{objective:?}: chosen has {} tokens", pairs[0].chosen.len());
    }
}

/// `max_length: null` means what it means to TRL 1.16: SFT and DPO keep the whole row, ORPO's
/// trainer truncates to 512, and packing, which needs a row length, refuses it by name.
#[test]
fn a_null_max_length_is_no_truncation_as_in_trl() {
    use alignment_handbook::run::{cpt_examples, preference_examples, sft_examples, Objective, RunError, TextTools, ORPO_NULL_MAX_LENGTH};
    use alignment_handbook::trainer::TrlConfig;
    let load = |config, yaml: &str| alignment_handbook::trainer::Recipe::from_yaml_str_for(config, yaml, "test recipe", &[]).unwrap();
    let tools = TextTools::load(&smollm2_dir().unwrap(), None).unwrap();
    let (sft, prefs) = long_rows();
    let text =
        alignment_handbook::data::Dataset::from_rows("text", vec![serde_json::json!({"text": "Some words."}).as_object().unwrap().clone()]);
    let recipe = load(TrlConfig::Sft, "max_length: null\n");
    assert_eq!(recipe.max_length, None);
    let whole = sft_examples(&recipe, &tools, &sft).unwrap();
    assert_eq!(whole.len(), 1);
    assert!(whole[0].len() > 5000, "the SFT row is kept whole: {} tokens", whole[0].len());
    let dpo = preference_examples(&load(TrlConfig::Dpo, "max_length: null\n"), &tools, &prefs, Objective::Dpo).unwrap();
    assert!(dpo[0].chosen.len() > 5000, "DPO keeps the whole pair: {} tokens", dpo[0].chosen.len());
    let orpo = preference_examples(&load(TrlConfig::Orpo, "max_length: null\n"), &tools, &prefs, Objective::Orpo).unwrap();
    assert_eq!(orpo[0].chosen.len(), ORPO_NULL_MAX_LENGTH, "ORPO truncates to TRL's 512");
    for (what, result) in [
        ("sft", sft_examples(&load(TrlConfig::Sft, "max_length: null\npacking: true\n"), &tools, &sft)),
        ("cpt", cpt_examples(&load(TrlConfig::Sft, "max_length: null\n"), &tools, &text)),
    ] {
        match result {
            Err(e @ RunError::Unsupported { key: "max_length", .. }) => assert!(e.to_string().contains("packing"), "{what}: {e}"),
            other => panic!("{what}: expected max_length refused with packing, got {:?}", other.map(|e| e.len())),
        }
    }
}
