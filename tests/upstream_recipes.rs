//! Every training recipe of the upstream handbook (`recipes/upstream/`, verbatim copies) runs
//! unchanged for two updates, as a user would run it: only `--model_name_or_path` (a small local
//! model with SmolLM2's tokenizer), `--max_steps`, batch sizes and `--output_dir` on the command
//! line. Their datasets come from a local HTTP server standing in for the hub (HF_ENDPOINT):
//! for every dataset, config and split a recipe names, a repo with a README `configs:` block
//! naming each split's files, as the real repos are laid out (JSON Lines files of short synthetic
//! rows instead of parquet, enough of them for each recipe's `test_split_size`).

#[path = "../crates/data/tests/common/fake_hub.rs"]
mod fake_hub;

use alignment_handbook::core::backend::{Cpu, CpuAutodiff};
use alignment_handbook::data::{HubClient, HubConfig};
use alignment_handbook::models::weights::SaveDtype;
use alignment_handbook::models::{random_model, save_pretrained, ModelConfig};
use alignment_handbook::reference::{repo_root, smollm2_dir};
use alignment_handbook::run::{run, Objective};
use alignment_handbook::trainer::components::DataSource;
use alignment_handbook::trainer::Recipe;
use fake_hub::{files_under, FakeHub, FakeRepo};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
/// Rows per stand-in split: more than any recipe's `test_split_size` needs (3000 over 4 splits).
const ROWS_PER_SPLIT: usize = 1100;

/// The upstream recipes, by the script that runs them.
fn upstream_recipes() -> Vec<(PathBuf, Objective)> {
    let root = repo_root().join("recipes/upstream");
    files_under(&root)
        .into_iter()
        .filter(|f| f.ends_with(".yaml"))
        .map(|file| {
            let path = root.join(&file);
            let objective = match path.parent().unwrap().file_name().unwrap().to_str().unwrap() {
                "sft" => Objective::Sft,
                "dpo" => Objective::Dpo,
                "orpo" => Objective::Orpo,
                other => panic!("{file}: unknown stage {other}"),
            };
            (path, objective)
        })
        .collect()
}

/// Tokens kept from SmolLM2's vocabulary: every byte symbol and special token, and the merges
/// that stay inside it (the head and the log-softmax cost ∝ vocabulary: 24× cheaper than 49 152).
const VOCAB: usize = 2048;

/// A Llama with SmolLM2's chat template and special tokens, its BPE vocabulary cut to [`VOCAB`]
/// tokens, 2 small layers, random weights.
fn tiny_model(dir: &Path) -> PathBuf {
    let smollm2 = smollm2_dir().unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(smollm2.join("config.json")).unwrap()).unwrap();
    for (key, value) in [
        ("hidden_size", 32),
        ("intermediate_size", 64),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("vocab_size", VOCAB),
    ] {
        config[key] = json!(value);
    }
    let config = ModelConfig::from_json_str(&config.to_string()).unwrap();
    let model = random_model::<Cpu>(config, 5, &Default::default(), None).unwrap();
    let saved = save_pretrained(&model, &dir.join("tiny-smollm2"), SaveDtype::F32, Some(&smollm2)).unwrap();
    let mut tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(smollm2.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    vocab.retain(|_, id| id.as_u64().unwrap() < VOCAB as u64);
    let kept: BTreeSet<String> = vocab.keys().cloned().collect();
    let merges = tokenizer["model"]["merges"].as_array_mut().unwrap();
    merges.retain(|m| {
        let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
        kept.contains(a) && kept.contains(b) && kept.contains(&format!("{a}{b}"))
    });
    assert!(tokenizer["added_tokens"].as_array().unwrap().iter().all(|t| t["id"].as_u64().unwrap() < VOCAB as u64));
    std::fs::write(saved.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    saved
}

/// What one stand-in repo holds: its (config, split) pairs and whether rows are preference pairs
/// and carry `chat_template_kwargs`.
#[derive(Default)]
struct RepoPlan {
    splits: BTreeSet<(String, String)>,
    /// Read by a packing recipe (`max_length` up to 65 536 tokens per packed row): a couple of
    /// rows per split, so the packed rows stay a few thousand tokens long.
    packed: bool,
    preference: bool,
    template_kwargs: bool,
}

/// Stand-in row `i`: a short conversation (SFT) or preference pair in the hub datasets'
/// columns (`prompt`, `chosen`, `rejected`, `messages`, scores), kept short so that recipes
/// evaluating on thousands of rows stay quick.
fn stand_in_row(i: usize, preference: bool) -> serde_json::Map<String, Value> {
    let (a, b) = (i % 97, i % 13);
    let question = format!("What is {a} plus {b}?");
    let user = json!({"role": "user", "content": question});
    let answer = |sum: usize| json!({"role": "assistant", "content": format!("{a} plus {b} is {sum}.")});
    let row = if preference {
        json!({
            "prompt": question,
            "chosen": [user, answer(a + b)],
            "rejected": [user, answer(a + b + 1)],
            "messages": [user, answer(a + b)],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        })
    } else {
        json!({"prompt": question, "messages": [user, answer(a + b)]})
    };
    let Value::Object(map) = row else { unreachable!() };
    map
}

/// Writes the stand-in repos under `root/<org>/<name>` and returns their directories by id.
fn write_repos(root: &Path, plans: &BTreeMap<String, RepoPlan>) -> BTreeMap<String, PathBuf> {
    let mut dirs = BTreeMap::new();
    for (id, plan) in plans {
        let dir = root.join(id);
        let mut configs: BTreeMap<&str, Vec<(&str, String)>> = BTreeMap::new();
        for (config, split) in &plan.splits {
            let file = if config == "default" {
                format!("data/{split}-00000-of-00001.jsonl")
            } else {
                format!("data/{config}/{split}-00000-of-00001.jsonl")
            };
            let path = dir.join(&file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut lines = String::new();
            for i in 0..if plan.packed { 2 } else { ROWS_PER_SPLIT } {
                let mut row = stand_in_row(i, plan.preference);
                if plan.template_kwargs {
                    row.insert("chat_template_kwargs".into(), json!({"enable_thinking": i % 2 == 0}));
                }
                lines.push_str(&Value::Object(row).to_string());
                lines.push('\n');
            }
            std::fs::write(&path, lines).unwrap();
            configs.entry(config.as_str()).or_default().push((split.as_str(), file.replace("-00000-of-00001", "-*")));
        }
        let mut readme = String::from("---\nconfigs:\n");
        for (config, splits) in &configs {
            readme.push_str(&format!("- config_name: {config}\n  data_files:\n"));
            for (split, pattern) in splits {
                readme.push_str(&format!("  - split: {split}\n    path: {pattern}\n"));
            }
        }
        readme.push_str("---\n# stand-in\n");
        std::fs::write(dir.join("README.md"), readme).unwrap();
        dirs.insert(id.clone(), dir);
    }
    dirs
}

#[test]
fn every_upstream_recipe_runs_unchanged() {
    let recipes = upstream_recipes();
    assert!(recipes.len() >= 22, "the upstream recipes are in recipes/upstream: found {}", recipes.len());
    let root = tempfile::tempdir().unwrap();

    // What each recipe reads, as the run itself interprets it; and the runs, two at a time
    // below, queued so that recipes pushing to the same hub repo (`hub_model_id`; without one,
    // each run pushes under its own output_dir's name) run one after the other.
    let mut plans: BTreeMap<String, RepoPlan> = BTreeMap::new();
    let mut queue: BTreeMap<String, Vec<&(PathBuf, Objective)>> = BTreeMap::new();
    for entry @ (path, objective) in &recipes {
        let recipe = Recipe::load_for(objective.trl_config(), path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        queue.entry(recipe.hub_model_id.clone().unwrap_or_else(|| path.display().to_string())).or_default().push(entry);
        let preference = *objective != Objective::Sft;
        match DataSource::from_recipe(&recipe).unwrap() {
            DataSource::Mixture(mixture) => {
                for d in mixture.datasets {
                    let plan = plans.entry(d.id).or_default();
                    plan.splits.insert((d.config.unwrap_or_else(|| "default".into()), d.split));
                    plan.preference |= preference;
                    plan.packed |= recipe.packing;
                    plan.template_kwargs |= d.columns.iter().flatten().any(|c| c == "chat_template_kwargs");
                }
            }
            DataSource::Named { id, config } => {
                let plan = plans.entry(id).or_default();
                for split in [&recipe.dataset_train_split, &recipe.dataset_test_split] {
                    plan.splits.insert((config.clone().unwrap_or_else(|| "default".into()), split.clone()));
                }
                plan.preference |= preference;
            }
            DataSource::Mixer(mixer) => {
                for entry in mixer.dataset_mixer.0 {
                    let plan = plans.entry(entry.id).or_default();
                    for split in &mixer.dataset_splits {
                        plan.splits.insert(("default".into(), split.clone()));
                    }
                    plan.preference |= preference;
                }
            }
        }
    }
    let repos = write_repos(&root.path().join("repos"), &plans);
    let hub = FakeHub::start(repos.into_iter().map(|(id, dir)| FakeRepo::dataset(&id, dir)).collect());
    std::env::set_var("HF_ENDPOINT", &hub.url);
    std::env::set_var("HF_HOME", root.path().join("hf-home"));
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("ALIGNMENT_HANDBOOK_LOCAL_HUB", root.path().join("local-hub"));
    let model = tiny_model(root.path());

    // Every stand-in file downloaded once, before the runs share the cache: two runs fetching
    // the same missing file would race on it.
    let client = HubClient::new(HubConfig::from_env()).unwrap();
    for (id, plan) in &plans {
        for (config, split) in &plan.splits {
            client.load_split(id, Some(config.as_str()), split).unwrap_or_else(|e| panic!("{id} {config}/{split}: {e}"));
        }
    }

    // Two runs at a time: each is mostly single-threaded host work on this tiny model.
    let queue = std::sync::Mutex::new(queue.into_values().collect::<Vec<_>>());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    // Its own statement: the lock is released before the group runs.
                    let next = queue.lock().unwrap().pop();
                    let Some(group) = next else { break };
                    for (path, objective) in group {
                        if let Err(failure) = run_recipe(path, *objective, &model, root.path()) {
                            failures.lock().unwrap().push(failure);
                        }
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    drop(hub);
    assert!(failures.is_empty(), "{} of {} upstream recipes failed:\n{}", failures.len(), recipes.len(), failures.join("\n"));
}

/// Runs the upstream recipe `path` for two updates on `model` (module docs), its output under
/// `root/runs`; what went wrong, named by the recipe, if it did not train.
fn run_recipe(path: &Path, objective: Objective, model: &Path, root: &Path) -> Result<(), String> {
    let started = std::time::Instant::now();
    let name = path.strip_prefix(repo_root().join("recipes/upstream")).unwrap().display().to_string().replace(['/', '.'], "_");
    let out = root.join("runs").join(&name);
    let overrides: Vec<String> = vec![
        format!("--model_name_or_path={}", model.display()),
        "--max_steps=2".into(),
        "--per_device_train_batch_size=2".into(),
        "--per_device_eval_batch_size=16".into(),
        "--gradient_accumulation_steps=1".into(),
        format!("--output_dir={}", out.display()),
    ];
    let outcome = Recipe::load_for(objective.trl_config(), path, &overrides)
        .map_err(|e| e.to_string())
        .and_then(|recipe| run::<CpuAutodiff>(objective, &recipe, &Default::default(), true).map_err(|e| e.to_string()));
    let result = match outcome {
        Ok(outcome) => {
            let logged = outcome.history.iter().find(|e| e.contains_key("loss"));
            let loss = logged.and_then(|e| e["loss"].as_f64());
            match outcome.steps == 2 && loss.is_some_and(f64::is_finite) {
                true => Ok(()),
                false => Err(format!("{name}: {} steps, logged loss {loss:?}", outcome.steps)),
            }
        }
        Err(e) => Err(format!("{name}: {e}")),
    };
    eprintln!("{name}: {:.1} s{}", started.elapsed().as_secs_f64(), if result.is_err() { " (failed)" } else { "" });
    let _ = std::fs::remove_dir_all(&out);
    result
}
