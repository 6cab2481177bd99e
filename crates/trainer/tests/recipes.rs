//! The shipped recipes load with the handbook's values; bad keys and overrides are clear errors.

use alignment_trainer::{Recipe, RecipeError, TrlConfig};
use std::path::PathBuf;

fn recipe(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes").join(rel)
}

#[test]
fn zephyr_recipes_load_with_handbook_hyperparameters() {
    let sft = Recipe::load(&recipe("zephyr-7b-beta/sft/config_full.yaml"), &[]).unwrap();
    assert_eq!(sft.model_name_or_path, "mistralai/Mistral-7B-v0.1");
    assert_eq!(sft.learning_rate, 2.0e-5);
    assert_eq!(sft.sft_max_length(), Some(2048));
    assert_eq!(sft.dataset_splits, vec!["train_sft", "test_sft"]);
    assert_eq!(sft.dataset_mixer.as_ref().unwrap()["HuggingFaceH4/ultrachat_200k"], 1.0);
    assert!(sft.chat_template.as_ref().unwrap().starts_with("{% for message in messages %}\n"));
    assert!(sft.inert_keys_set().iter().any(|k| k.starts_with("use_flash_attention_2 (")));
    assert!(sft.bf16 && !sft.inert_keys_set().iter().any(|k| k.starts_with("bf16")), "bf16: true is mixed precision, an acting key");
    assert!(alignment_trainer::TrainerConfig::from_recipe(&sft).unwrap().bf16);

    let dpo = Recipe::load(&recipe("zephyr-7b-beta/dpo/config_full.yaml"), &[]).unwrap();
    assert_eq!((dpo.beta, dpo.learning_rate, dpo.max_length, dpo.max_prompt_length), (0.01, 5.0e-7, Some(1024), Some(512)));
    assert_eq!(dpo.torch_dtype, None);

    let qlora = Recipe::load(&recipe("zephyr-7b-beta/dpo/config_qlora.yaml"), &[]).unwrap();
    assert!(qlora.use_peft && qlora.load_in_4bit);
    assert_eq!((qlora.lora_r, qlora.lora_alpha), (128, 128));
    assert_eq!(qlora.lora_target_modules.as_ref().unwrap().len(), 7);
}

#[test]
fn command_line_overrides_win_and_are_typed() {
    let overrides = ["--learning_rate=1e-4", "--num_train_epochs=5", "--lora_target_modules=[q_proj, v_proj]"].map(String::from);
    let r = Recipe::load(&recipe("zephyr-7b-beta/sft/config_qlora.yaml"), &overrides).unwrap();
    assert_eq!(r.learning_rate, 1e-4);
    assert_eq!(r.num_train_epochs, 5.0);
    assert_eq!(r.lora_target_modules.unwrap(), vec!["q_proj", "v_proj"]);
}

#[test]
fn unknown_key_lists_nearest_valid_keys() {
    let err = Recipe::from_yaml_str("model_name_or_path: x\nlearning_rat: 0.1\n", "test.yaml", &[]).unwrap_err();
    match &err {
        RecipeError::UnknownKey { key, suggestions, source_name } => {
            assert_eq!(key, "learning_rat");
            assert_eq!(source_name, "test.yaml");
            assert!(suggestions.starts_with("learning_rate"), "{err}");
        }
        other => panic!("expected UnknownKey, got {other}"),
    }
    let err = Recipe::from_yaml_str("model_name_or_path: x\n", "t", &["--per_device_batch_size=4".into()]).unwrap_err();
    assert!(err.to_string().contains("per_device_train_batch_size"), "{err}");
}

#[test]
fn wrong_types_and_malformed_overrides_are_errors() {
    let err = Recipe::from_yaml_str("learning_rate: fast\n", "t.yaml", &[]).unwrap_err().to_string();
    assert!(err.contains("learning_rate") || err.contains("invalid"), "{err}");
    assert!(matches!(Recipe::from_yaml_str("seed: 1\n", "t", &["learning_rate=1".into()]), Err(RecipeError::MalformedOverride(_))));
}

#[test]
fn mixer_keeps_yaml_order_and_overrides_replace_it() {
    let yaml = "dataset_mixer:\n  zeta/b: 0.5\n  alpha/a: 1.0\n  mid/c: 0.25\nresume_from_checkpoint: true\n";
    let recipe = alignment_trainer::Recipe::from_yaml_str(yaml, "test", &[]).unwrap();
    let order: Vec<String> = recipe.dataset_mixer_in_order().into_iter().map(|(k, _)| k).collect();
    assert_eq!(order, ["zeta/b", "alpha/a", "mid/c"], "YAML order, not alphabetical");
    assert_eq!(recipe.resume_from_checkpoint, Some(alignment_trainer::ResumeFrom::Latest(true)));
    let overridden = alignment_trainer::Recipe::from_yaml_str(
        yaml,
        "test",
        &["--dataset_mixer={y/1: 0.1, x/2: 0.2}".into(), "--resume_from_checkpoint=out/checkpoint-8".into()],
    )
    .unwrap();
    let order: Vec<(String, f64)> = overridden.dataset_mixer_in_order();
    assert_eq!(order, vec![("y/1".to_string(), 0.1), ("x/2".to_string(), 0.2)]);
    assert_eq!(overridden.resume_from_checkpoint, Some(alignment_trainer::ResumeFrom::Path("out/checkpoint-8".into())));
}

#[test]
fn trainer_settings_are_validated() {
    let recipe = alignment_trainer::Recipe::from_yaml_str("lr_scheduler_type: cosine_with_restarts_typo\n", "test", &[]).unwrap();
    let err = alignment_trainer::TrainerConfig::from_recipe(&recipe).unwrap_err().to_string();
    assert!(err.contains("lr_scheduler_type") && err.contains("cosine_with_restarts_typo"), "{err}");
    let recipe = alignment_trainer::Recipe::from_yaml_str("eval_strategy: sometimes\n", "test", &[]).unwrap();
    let err = alignment_trainer::TrainerConfig::from_recipe(&recipe).unwrap_err().to_string();
    assert!(err.contains("eval_strategy") && err.contains("sometimes"), "{err}");
}

#[test]
fn small_cpu_recipes_load() {
    for task in ["sft", "dpo", "orpo", "cpt"] {
        let r = Recipe::load(&recipe(&format!("smollm2-135m/{task}/config_cpu.yaml")), &[]).unwrap();
        assert_eq!(r.model_name_or_path, "HuggingFaceTB/SmolLM2-135M-Instruct", "{task}");
        assert_eq!(r.dataset_mixer_in_order()[0].0, "data/tiny-chat", "{task}");
        assert!(r.max_steps > 0, "{task}: the CPU demos are bounded by max_steps");
        alignment_trainer::TrainerConfig::from_recipe(&r).unwrap();
    }
}

#[test]
fn formatting_and_truncation_keys_follow_todays_handbook() {
    let r = Recipe::from_yaml_str("max_length: 256\n", "t", &[]).unwrap();
    assert!(!r.legacy_formatting, "TRL's conversational formatting is the default");
    assert_eq!(r.truncation_mode().unwrap(), alignment_data::TruncationMode::KeepStart);
    assert!(r.inert_keys_set().is_empty());
    // The old handbook's keys: the system-turn switch only acts with legacy formatting, and TRL 1.16
    // has no prompt-length truncation for decoder-only models.
    let r = Recipe::from_yaml_str("auto_insert_empty_system_msg: false\nmax_prompt_length: 128\n", "t", &[]).unwrap();
    let inert = r.inert_keys_set();
    assert!(inert.iter().any(|k| k.starts_with("max_prompt_length (")), "{inert:?}");
    assert!(inert.iter().any(|k| k.starts_with("auto_insert_empty_system_msg")), "{inert:?}");
    let r = Recipe::from_yaml_str("legacy_formatting: true\nauto_insert_empty_system_msg: false\n", "t", &[]).unwrap();
    assert!(r.legacy_formatting && r.inert_keys_set().is_empty());
    // truncation_side (the old tokenizer setting) maps onto TRL's truncation_mode; a contradiction is an error.
    let r = Recipe::from_yaml_str("truncation_side: left\n", "t", &[]).unwrap();
    assert_eq!(r.truncation_mode().unwrap(), alignment_data::TruncationMode::KeepEnd);
    let r = Recipe::from_yaml_str("truncation_side: left\ntruncation_mode: keep_start\n", "t", &[]).unwrap();
    assert!(r.truncation_mode().unwrap_err().to_string().contains("contradicts"));
    let r = Recipe::from_yaml_str("truncation_mode: keep_middle\n", "t", &[]).unwrap();
    assert!(r.truncation_mode().unwrap_err().to_string().contains("keep_middle"));
}

#[test]
fn every_key_either_acts_or_is_announced() {
    use alignment_trainer::recipe::{ACTING_KEYS, INERT_KEYS};
    let inert: Vec<&str> = INERT_KEYS.iter().map(|(k, _)| *k).collect();
    for key in Recipe::keys() {
        let (acts, silent) = (ACTING_KEYS.contains(&key.as_str()), inert.contains(&key.as_str()));
        assert!(acts ^ silent, "recipe key `{key}` must be in exactly one of ACTING_KEYS and INERT_KEYS");
    }
    for key in ACTING_KEYS.iter().chain(&inert) {
        assert!(Recipe::keys().iter().any(|k| k == key), "`{key}` is listed but is not a recipe key");
    }
    // Setting an inert key to something else than its default is named in the run's note, with why.
    let r = Recipe::from_yaml_str("torch_dtype: bfloat16\nfp16: true\ndataset_num_proc: 12\nddp_timeout: 100\n", "t", &[]).unwrap();
    let note = r.inert_keys_set().join(", ");
    for key in ["torch_dtype (", "fp16 (", "dataset_num_proc (", "ddp_timeout ("] {
        assert!(note.contains(key), "{note}");
    }
    // `dataset_num_proc` shapes packed rows (datasets' shards), so it is named only without packing.
    let packed = Recipe::from_yaml_str("packing: true\ndataset_num_proc: 12\n", "t", &[]).unwrap();
    assert!(!packed.inert_keys_set().join(", ").contains("dataset_num_proc"), "{:?}", packed.inert_keys_set());
}

#[test]
fn packing_strategies_are_trls() {
    use alignment_data::PackingStrategy;
    for (value, want) in [
        ("bfd", PackingStrategy::Bfd),
        ("ffd", PackingStrategy::Bfd),
        ("bfd_split", PackingStrategy::BfdSplit),
        ("bfd-requeue", PackingStrategy::BfdSplit),
        ("wrapped", PackingStrategy::Wrapped),
    ] {
        let r = Recipe::from_yaml_str(&format!("packing: true\npacking_strategy: {value}\n"), "t", &[]).unwrap();
        assert_eq!(r.packing_strategy().unwrap(), want, "{value}");
    }
    // `eval_packing` decides for the evaluation set; unset, `packing` does.
    let r = Recipe::from_yaml_str("packing: true\n", "t", &[]).unwrap();
    assert!(r.for_evaluation().packing);
    let r = Recipe::from_yaml_str("packing: true\neval_packing: false\n", "t", &[]).unwrap();
    assert!(r.packing && !r.for_evaluation().packing);
    let r = Recipe::from_yaml_str("eval_packing: true\n", "t", &[]).unwrap();
    assert!(!r.packing && r.for_evaluation().packing);
    let (key, message) = value_error("packing_strategy: best_fit\n", &[]);
    assert_eq!(key, "packing_strategy");
    assert!(message.contains("best_fit") && message.contains("bfd_split") && message.contains("wrapped"), "{message}");
}

#[test]
fn trl_1_16_keys_load_and_unimplemented_values_are_refused_by_name() {
    // Accepted with the values a TRL 1.16 recipe writes; named as inert where they change nothing.
    let yaml = [
        "dtype: bfloat16",
        "model_init_kwargs: {low_cpu_mem_usage: true}",
        "use_dora: false",
        "lora_task_type: CAUSAL_LM",
        "pad_to_multiple_of: 8",
        "pad_token: <pad>",
        "activation_offloading: true",
        "dataset_streaming: true",
        "precompute_ref_batch_size: 4",
        "router_aux_loss_coef: 0.0",
        "sync_ref_model: false",
        "is_encoder_decoder: false",
    ]
    .join("\n");
    let r = Recipe::from_yaml_str(&yaml, "t", &[]).unwrap();
    let inert = r.inert_keys_set().join("; ");
    for key in ["dtype", "model_init_kwargs", "pad_token", "activation_offloading", "dataset_streaming", "precompute_ref_batch_size"] {
        assert!(inert.contains(&format!("{key} (")), "{key} not named: {inert}");
    }
    // `pad_to_multiple_of` acts (the batches' width; `Collation`), so it is not named inert; 0 is
    // refused by name (TRL would divide by it).
    assert!(!inert.contains("pad_to_multiple_of"), "{inert}");
    assert_eq!(r.pad_to_multiple_of, Some(8));
    assert_eq!(r.collation(3).width(9), 16);
    for (yaml, key) in [
        ("pad_to_multiple_of: 0\n", "pad_to_multiple_of"),
        ("lora_task_type: SEQ_CLS\n", "lora_task_type"),
        ("lora_target_parameters: [experts.gate_up_proj]\n", "lora_target_parameters"),
        ("router_aux_loss_coef: 0.001\n", "router_aux_loss_coef"),
        ("sync_ref_model: true\n", "sync_ref_model"),
        ("generate_during_eval: true\n", "generate_during_eval"),
        ("is_encoder_decoder: true\n", "is_encoder_decoder"),
    ] {
        assert_eq!(value_error(yaml, &[]).0, key, "{yaml}");
    }
}

/// Every field of the configs TRL 1.16 parses a handbook recipe into (ModelConfig,
/// ScriptArguments, SFTConfig, DPOConfig, ORPOConfig, TrainingArguments within them) loads as a
/// recipe key (`scripts/make_trl_config_keys.py` lists them).
#[test]
fn every_field_of_trls_configs_is_a_recipe_key() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_config_keys.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys = Recipe::keys();
    let mut missing = Vec::new();
    for (config, fields) in fixture["configs"].as_object().unwrap() {
        for field in fields.as_array().unwrap() {
            let field = field.as_str().unwrap();
            if !keys.iter().any(|k| k == field) {
                missing.push(format!("{config}.{field}"));
            }
        }
    }
    assert!(missing.is_empty(), "not recipe keys: {missing:?}");
}

/// A key a recipe leaves out means what the script's TRL config makes of it: every default of
/// `Recipe::defaults_for` equals TRL 1.16's after its `__post_init__`
/// (`scripts/make_trl_config_keys.py`), and transformers' for `TrainingArguments`. The only
/// differences are the keys left null here that the run resolves when it starts, each checked
/// or named below with what it becomes.
#[test]
fn defaults_equal_trls_configs() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_config_keys.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Null here, resolved by the run to TRL's value; or an artefact of how the fixture is built.
    let resolved_later: &[(&str, &str)] = &[
        ("eval_strategy", "null: its old name `evaluation_strategy`, else `no`"),
        ("loss_type", "null: DPO reads `sigmoid`; SFT computes TRL's `nll`"),
        ("dataset_text_field", "null: `text_column`, whose default is `text`"),
        ("hub_strategy", "null: named as having no effect; push_to_hub publishes the final model"),
        ("report_to", "null: named as having no effect; metrics go to metrics.jsonl"),
        ("disable_tqdm", "null: the progress bar shows, as with false"),
        ("debug", "an empty string where TRL holds an empty list: no debug modes"),
        ("accelerator_config", "null: accelerate's settings come from the launcher's config"),
        ("use_cpu", "the fixture is built with use_cpu=True (TRL refuses its default bf16 without a GPU)"),
        ("dataloader_pin_memory", "use_cpu=True turns it off in the fixture"),
    ];
    let configs = [
        ("TrainingArguments", TrlConfig::TrainingArguments),
        ("SFTConfig", TrlConfig::Sft),
        ("DPOConfig", TrlConfig::Dpo),
        ("ORPOConfig", TrlConfig::Orpo),
    ];
    for (name, config) in configs {
        let recipe = Recipe::defaults_for(config);
        let ours = serde_json::to_value(&recipe).unwrap();
        let theirs = fixture["defaults"][name].as_object().unwrap_or_else(|| panic!("no defaults for {name} in the fixture"));
        assert!(theirs.len() > 100, "{name}: {} fields", theirs.len());
        let mut differing = Vec::new();
        for (key, their) in theirs {
            let our = &ours[key.as_str()];
            let same_number = matches!((our.as_f64(), their.as_f64()), (Some(a), Some(b)) if a == b);
            if our == their || same_number {
                continue;
            }
            match key.as_str() {
                // transformers 5 resolves the new name from its deprecated alias; so does the run.
                "activation_checkpointing" => assert_eq!(Some(recipe.checkpointing()), their.as_bool(), "{name}.{key}"),
                "truncation_mode" => assert_eq!(recipe.truncation_mode().unwrap(), their.as_str().unwrap().parse().unwrap(), "{name}"),
                _ => differing.push(key.as_str()),
            }
        }
        let unexplained: Vec<&&str> = differing.iter().filter(|k| !resolved_later.iter().any(|(r, _)| r == *k)).collect();
        assert!(
            unexplained.is_empty(),
            "{name}: defaults differ from TRL's: {:?}",
            unexplained.iter().map(|k| format!("{k}: ours {} theirs {}", ours[**k], theirs[**k])).collect::<Vec<_>>()
        );
    }
    // What TRL's `_BaseConfig` and each config change over TrainingArguments.
    let sft = Recipe::defaults_for(TrlConfig::Sft);
    assert_eq!((sft.learning_rate, sft.logging_steps, sft.gradient_checkpointing, sft.bf16), (2e-5, 10.0, true, true));
    assert_eq!(Recipe::defaults_for(TrlConfig::Dpo).learning_rate, 1e-6);
    assert_eq!(Recipe::defaults_for(TrlConfig::Orpo).learning_rate, 1e-6);
    let base = Recipe::default();
    assert_eq!((base.learning_rate, base.logging_steps, base.gradient_checkpointing, base.bf16), (5e-5, 500.0, false, false));
}

/// A script's recipe leaves out what its TRL config sets: `bf16` becomes `not fp16` (TRL's
/// `bf16: None`), a written `bf16` or override wins, and the other defaults are the config's.
#[test]
fn a_script_reads_left_out_keys_as_its_trl_config() {
    let load = |config, yaml: &str, overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Recipe::from_yaml_str_for(config, yaml, "t", &overrides).unwrap()
    };
    let sft = load(TrlConfig::Sft, "max_steps: 1\n", &[]);
    assert!(sft.bf16 && sft.checkpointing());
    assert_eq!((sft.learning_rate, sft.logging_steps), (2e-5, 10.0));
    // fp16 without bf16: TRL resolves bf16 to false, so the pair is not a contradiction.
    let fp16 = load(TrlConfig::Dpo, "fp16: true\n", &[]);
    assert!(fp16.fp16 && !fp16.bf16);
    assert!(!load(TrlConfig::Sft, "bf16: false\n", &[]).bf16);
    assert!(!load(TrlConfig::Sft, "", &["--bf16=false"]).bf16);
    assert!(load(TrlConfig::Sft, "bf16: false\n", &["--bf16=true"]).bf16);
    // Written on both, still refused by name.
    let err = Recipe::from_yaml_str_for(TrlConfig::Sft, "fp16: true\nbf16: true\n", "t", &[]).unwrap_err();
    assert!(err.to_string().contains("fp16"), "{err}");
    let dpo = load(TrlConfig::Dpo, "learning_rate: 5.0e-7\ngradient_checkpointing: false\n", &[]);
    assert_eq!((dpo.learning_rate, dpo.checkpointing(), dpo.logging_steps), (5e-7, false, 10.0));
    // TrainingArguments alone keeps transformers' defaults.
    let plain = load(TrlConfig::TrainingArguments, "", &[]);
    assert!(!plain.bf16 && !plain.checkpointing());
    assert_eq!(plain.learning_rate, 5e-5);
}

#[test]
fn training_arguments_keys_act_or_are_refused_by_name() {
    use alignment_trainer::recipe::{ACTING_KEYS, REFUSED_UNLESS_DEFAULT};
    let load = |yaml: &str| Recipe::from_yaml_str(yaml, "t", &[]).unwrap();
    // transformers 5's `activation_checkpointing` decides over `gradient_checkpointing`, its alias.
    assert!(load("gradient_checkpointing: true\n").checkpointing());
    assert!(!load("gradient_checkpointing: true\nactivation_checkpointing: false\n").checkpointing());
    let r = load("activation_checkpointing: true\n");
    assert!(alignment_trainer::TrainerConfig::from_recipe(&r).unwrap().step.gradient_checkpointing);
    // Their defaults load; another value of a refused key is an error naming it.
    assert!(REFUSED_UNLESS_DEFAULT.iter().all(|(k, _)| ACTING_KEYS.contains(k)));
    for (yaml, key) in [
        ("neftune_noise_alpha: 5\n", "neftune_noise_alpha"),
        ("label_smoothing_factor: 0.1\n", "label_smoothing_factor"),
        ("load_best_model_at_end: true\n", "load_best_model_at_end"),
        ("metric_for_best_model: eval_loss\n", "metric_for_best_model"),
        ("train_sampling_strategy: group_by_length\n", "train_sampling_strategy"),
        ("dataloader_drop_last: true\n", "dataloader_drop_last"),
        ("fsdp: full_shard\n", "fsdp"),
        ("deepspeed: ds_zero3.json\n", "deepspeed"),
        ("auto_find_batch_size: true\n", "auto_find_batch_size"),
    ] {
        let (got, message) = value_error(yaml, &[]);
        assert_eq!(got, key, "{yaml}: {message}");
    }
    let r = load("train_sampling_strategy: random\ndataloader_num_workers: 4\ntorch_compile: true\nlocal_rank: 0\n");
    let inert = r.inert_keys_set().join("; ");
    assert!(["dataloader_num_workers (", "torch_compile (", "local_rank ("].iter().all(|k| inert.contains(k)), "{inert}");
}

#[test]
fn torch_compile_mode_replays_steps_in_its_graph_modes_and_is_named_otherwise() {
    use alignment_trainer::{GraphMode, TrainerConfig};
    let load = |yaml: &str| Recipe::from_yaml_str(yaml, "t", &[]).unwrap();
    for mode in ["reduce-overhead", "max-autotune"] {
        let r = load(&format!("torch_compile_mode: {mode}\n"));
        assert!(r.inert_keys_set().iter().all(|k| !k.starts_with("torch_compile")), "{mode}: {:?}", r.inert_keys_set());
        assert_eq!(TrainerConfig::from_recipe(&r).unwrap().step_graphs, Some(GraphMode::Capture), "{mode}");
    }
    for yaml in
        ["torch_compile: true\n", "torch_compile: true\ntorch_compile_mode: default\n", "torch_compile_mode: max-autotune-no-cudagraphs\n"]
    {
        let r = load(yaml);
        assert!(r.inert_keys_set().iter().any(|k| k.starts_with("torch_compile")), "{yaml}: {:?}", r.inert_keys_set());
        assert_eq!(TrainerConfig::from_recipe(&r).unwrap().step_graphs, None, "{yaml}");
    }
    let (key, message) = value_error("torch_compile_mode: fastest\n", &[]);
    assert_eq!(key, "torch_compile_mode", "{message}");
    assert!(message.contains("fastest"), "{message}");
}

#[test]
fn sft_only_keys_are_those_set_away_from_their_defaults() {
    // What a DPO or ORPO run names as having no effect: SFT's keys, only when the recipe sets them.
    use alignment_trainer::recipe::{ACTING_KEYS, SFT_ONLY_KEYS};
    assert!(SFT_ONLY_KEYS.iter().all(|k| ACTING_KEYS.contains(k)), "SFT-only keys act for SFT");
    assert!(Recipe::default().sft_only_keys_set().is_empty());
    let r = Recipe::from_yaml_str(
        "shuffle_dataset: true
packing: true
beta: 0.2
",
        "t",
        &["--reduce_loss=sum".into()],
    )
    .unwrap();
    assert!(r.shuffle_dataset);
    assert_eq!(r.sft_only_keys_set(), vec!["packing", "shuffle_dataset", "reduce_loss"]);
    let r = Recipe::from_yaml_str(
        "packing_strategy: bfd
shuffle_dataset: false
",
        "t",
        &[],
    )
    .unwrap();
    assert!(r.sft_only_keys_set().is_empty(), "{:?}", r.sft_only_keys_set());
}

fn value_error(yaml: &str, overrides: &[&str]) -> (String, String) {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Recipe::from_yaml_str(yaml, "recipe.yaml", &overrides) {
        Err(RecipeError::Value { key, message }) => (key, message),
        other => panic!("{yaml:?} {overrides:?}: expected a value error, got {other:?}"),
    }
}

#[test]
fn nonsense_values_are_errors_naming_their_key() {
    for (yaml, key) in [
        ("learning_rate: .nan\n", "learning_rate"),
        ("learning_rate: -1e-5\n", "learning_rate"),
        ("adam_beta1: 1.0\n", "adam_beta1"),
        ("adam_beta2: -0.1\n", "adam_beta2"),
        ("save_steps: 0\n", "save_steps"),
        ("logging_steps: 0\n", "logging_steps"),
        ("eval_steps: -2\n", "eval_steps"),
        ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps"),
        ("per_device_train_batch_size: 0\n", "per_device_train_batch_size"),
        ("beta: 0\n", "beta"),
        ("warmup_ratio: 1.5\n", "warmup_ratio"),
        ("max_length: 0\n", "max_length"),
        ("eval_strategy: steps\nevaluation_strategy: steps\n", "evaluation_strategy"),
        ("bf16: true\nfp16: true\n", "fp16"),
        ("output_dir: ''\n", "output_dir"),
        ("num_train_epochs: 0\n", "num_train_epochs"),
        ("dataset_mixer: {a: 1}\ndataset_name: b\n", "dataset_name"),
        ("packing_strategy: ffd2\n", "packing_strategy"),
        ("reference_free: true\n", "reference_free"),
    ] {
        let (got, message) = value_error(yaml, &[]);
        assert_eq!(got, key, "{yaml:?}: {message}");
    }
    // The same through a command-line override.
    assert_eq!(value_error("", &["--learning_rate=-1"]).0, "learning_rate");
}

#[test]
fn errors_point_at_where_the_value_was_written() {
    // A type error in an override blames the override, names the key, and shows no source location of ours.
    let err = Recipe::from_yaml_str("learning_rate: 1e-5\n", "recipe.yaml", &["--max_steps=ten".to_string()]).unwrap_err().to_string();
    assert!(err.contains("--max_steps=ten") && err.contains("max_steps") && !err.contains("recipe.yaml") && !err.contains(".rs:"), "{err}");
    // One in the file blames the file.
    let err = Recipe::from_yaml_str("max_steps: ten\n", "recipe.yaml", &[]).unwrap_err().to_string();
    assert!(err.contains("recipe.yaml") && err.contains("max_steps") && !err.contains(".rs:"), "{err}");
    // A key written twice is refused, not silently last-one-wins.
    let err = Recipe::from_yaml_str("learning_rate: 1e-5\nlearning_rate: 2e-5\n", "recipe.yaml", &[]).unwrap_err().to_string();
    assert!(err.contains("duplicate") && err.contains("learning_rate"), "{err}");
}

#[test]
fn todays_handbook_data_keys_are_read() {
    use alignment_trainer::components::DataSource;
    let yaml = "dataset_mixture:\n  datasets:\n    - id: org/a\n      config: default\n      split: train_sft\n      columns: [messages]\n      weight: 0.5\n    - id: org/b\n      split: test_sft\n  seed: 3\n  test_split_size: 0.1\n";
    let r = Recipe::from_yaml_str(yaml, "t", &[]).unwrap();
    let DataSource::Mixture(m) = DataSource::from_recipe(&r).unwrap() else { panic!("a mixture") };
    assert_eq!((m.datasets.len(), m.seed, m.datasets[0].weight, m.datasets[1].weight), (2, 3, Some(0.5), Some(1.0)));
    assert_eq!(m.datasets[0].config.as_deref(), Some("default"));
    let typo = Recipe::from_yaml_str("dataset_mixture:\n  datasets:\n    - id: org/a\n      wieght: 0.5\n", "t", &[]).unwrap();
    let err = DataSource::from_recipe(&typo).unwrap_err().to_string();
    assert!(err.contains("dataset_mixture") && err.contains("wieght"), "{err}");
    let r = Recipe::from_yaml_str("dataset_name: org/smoltalk\ndataset_config: all\n", "t", &[]).unwrap();
    assert_eq!(DataSource::from_recipe(&r).unwrap(), DataSource::Named { id: "org/smoltalk".into(), config: Some("all".into()) });
    let none = Recipe::from_yaml_str("learning_rate: 1e-5\n", "t", &[]).unwrap();
    assert!(DataSource::from_recipe(&none).unwrap_err().to_string().contains("names no dataset"));
}

#[test]
fn fractional_and_epoch_intervals_follow_transformers() {
    use alignment_trainer::train::SaveStrategy;
    let r = Recipe::from_yaml_str("save_strategy: steps\nsave_steps: 0.25\nlogging_steps: 0.1\neval_strategy: epoch\n", "t", &[]).unwrap();
    let config = alignment_trainer::TrainerConfig::from_recipe(&r).unwrap();
    assert!(config.eval_every_epoch && config.eval_steps.is_none());
    let resolved = config.with_intervals_for(10);
    assert_eq!(resolved.save, SaveStrategy::Steps(3)); // ceil(10 × 0.25)
    assert_eq!(resolved.logging_steps, 1);
    assert_eq!(config.with_intervals_for(95).logging_steps, 10); // ceil(9.5)
    let r = Recipe::from_yaml_str("save_steps: 2.5\n", "t", &[]).unwrap();
    let err = alignment_trainer::TrainerConfig::from_recipe(&r).unwrap_err().to_string();
    assert!(err.contains("save_steps"), "{err}");
    let r = Recipe::from_yaml_str("optim: lion_8bit\n", "t", &[]).unwrap();
    let err = alignment_trainer::TrainerConfig::from_recipe(&r).unwrap_err().to_string();
    assert!(err.contains("optim") && err.contains("8-bit"), "{err}");
    let r = Recipe::from_yaml_str("optim: adamw_bnb_8bit\n", "t", &[]).unwrap();
    assert!(r.inert_keys_set().iter().all(|k| !k.starts_with("optim")), "8-bit moments act: {:?}", r.inert_keys_set());
}

#[test]
fn docs_name_every_inert_key() {
    let doc = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/recipes.md")).unwrap();
    for (key, why) in alignment_trainer::recipe::INERT_KEYS {
        assert!(doc.contains(&format!("| `{key}` | {why} |")), "docs/recipes.md lacks the row of `{key}`");
    }
}
