//! The handbook's scripts end to end on the real model: each objective (SFT, DPO, ORPO, CPT) runs
//! one update of SmolLM2-135M-Instruct on a few rows of the shipped tiny-chat dataset through
//! `run::run` (recipe → mixer → formatting → tokenization → trainer), logs TRL's metric names,
//! and leaves a model directory that loads again. Bad recipes fail with errors naming the key.

use alignment_handbook::core::backend::{Cpu, CpuAutodiff};
use alignment_handbook::models::load_pretrained;
use alignment_handbook::run::{run, Objective, RunError};
use alignment_handbook::trainer::{Recipe, TrlConfig};

fn recipe(task: &str, output_dir: &std::path::Path, extra: &[&str]) -> Recipe {
    recipe_file(task, "config_cpu.yaml", output_dir, extra)
}

fn recipe_file(task: &str, file: &str, output_dir: &std::path::Path, extra: &[&str]) -> Recipe {
    let path = alignment_handbook::reference::repo_root().join(format!("recipes/smollm2-135m/{task}/{file}"));
    let mut overrides: Vec<String> = vec![
        format!("--output_dir={}", output_dir.display()),
        format!("--dataset_mixer={{{}: 0.01}}", alignment_handbook::reference::repo_root().join("data/tiny-chat").display()),
        "--max_steps=1".into(),
        "--per_device_train_batch_size=2".into(),
        "--gradient_accumulation_steps=1".into(),
        "--eval_strategy=no".into(),
        "--eval_on_start=false".into(),
        "--save_strategy=no".into(),
        "--logging_steps=1".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let config = match task {
        "dpo" => TrlConfig::Dpo,
        "orpo" => TrlConfig::Orpo,
        _ => TrlConfig::Sft,
    };
    Recipe::load_for(config, &path, &overrides).unwrap()
}

/// `dir/adapter_config.json`, parsed.
fn adapter_config(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
}

#[test]
fn every_objective_trains_one_step_on_smollm2() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    // push_to_hub publishes into this directory (only this test pushes).
    std::env::set_var("ALIGNMENT_HANDBOOK_LOCAL_HUB", root.path().join("hub"));
    for (task, objective, metric) in [
        ("sft", Objective::Sft, "mean_token_accuracy"),
        ("dpo", Objective::Dpo, "rewards/accuracies"),
        ("orpo", Objective::Orpo, "log_odds_ratio"),
        ("cpt", Objective::Cpt, "mean_token_accuracy"),
    ] {
        let out = root.path().join(task);
        let hub_id = format!("--hub_model_id=pipeline-test/{task}");
        let outcome = run::<CpuAutodiff>(objective, &recipe(task, &out, &["--push_to_hub=true", &hub_id]), &device, true).unwrap();
        assert_eq!(outcome.steps, 1, "{task}");
        let logged = &outcome.history[0];
        for key in ["loss", "learning_rate", "grad_norm", "tokens_per_second", metric] {
            let value = logged.get(key).and_then(|v| v.as_f64());
            assert!(value.is_some_and(f64::is_finite), "{task}: `{key}` missing or not finite in {logged:?}");
        }
        let reloaded = load_pretrained::<Cpu>(&outcome.model_dir, &device).unwrap();
        assert_eq!(reloaded.config.num_layers, 30, "{task}");
        assert!(out.join("tokenizer.json").is_file() && out.join("metrics.jsonl").is_file(), "{task}");
        let pushed = alignment_handbook::run::resolve_model(&format!("pipeline-test/{task}")).unwrap();
        assert_eq!(std::fs::read(pushed.join("model.safetensors")).unwrap(), std::fs::read(out.join("model.safetensors")).unwrap());
        // Each task leaves two copies of a 135M model: free the disk before the next one.
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&pushed).unwrap();
    }
}

/// The QLoRA recipes: SFT on a 4-bit SmolLM2 lowers the eval loss and leaves a PEFT adapter;
/// DPO then starts from that adapter (merged into the 4-bit base) and trains a new one.
#[test]
fn qlora_sft_lowers_the_loss_and_dpo_starts_from_its_adapter() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    let sft_dir = root.path().join("sft-qlora");
    let sft = recipe_file(
        "sft",
        "config_qlora.yaml",
        &sft_dir,
        &[
            "--max_steps=8",
            "--learning_rate=1.0e-3",
            "--lora_dropout=0.0",
            "--eval_strategy=steps",
            "--eval_steps=8",
            "--eval_on_start=true",
            "--dataset_splits=[train_sft, test_sft]",
        ],
    );
    let outcome = run::<CpuAutodiff>(Objective::Sft, &sft, &device, true).unwrap();
    let eval: Vec<f64> = outcome.history.iter().filter_map(|e| e.get("eval_loss").and_then(|v| v.as_f64())).collect();
    println!("QLoRA SFT eval loss: {eval:?}");
    assert_eq!(eval.len(), 2, "before and after");
    assert!(eval[1] < eval[0] - 0.05, "QLoRA SFT should lower the eval loss: {eval:?}");
    assert!(sft_dir.join("adapter_model.safetensors").is_file() && !sft_dir.join("model.safetensors").exists());

    let dpo_dir = root.path().join("dpo-qlora");
    let model = format!("--model_name_or_path={}", sft_dir.display());
    let dpo = recipe_file("dpo", "config_qlora.yaml", &dpo_dir, &[&model]);
    let outcome = run::<CpuAutodiff>(Objective::Dpo, &dpo, &device, true).unwrap();
    let logged = &outcome.history[0];
    assert!(logged.get("rewards/margins").and_then(|v| v.as_f64()).is_some_and(f64::is_finite), "{logged:?}");
    let config = adapter_config(&dpo_dir);
    assert_eq!(config["base_model_name_or_path"], sft_dir.display().to_string(), "the DPO adapter applies on top of the SFT adapter");
    // Loading the DPO adapter chains through the SFT adapter to the base.
    let merged = alignment_handbook::run::load_for_inference::<Cpu>(&dpo_dir, &device).unwrap();
    assert_eq!(merged.config.num_layers, 30);
}

/// `lora_modules_to_save`: the named modules train whole beside the adapters and travel in the
/// adapter directory, as PEFT saves them.
#[test]
fn lora_modules_to_save_trains_and_saves_the_named_modules() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    let out = root.path().join("sft-lora-norms");
    let sft = recipe(
        "sft",
        &out,
        &["--use_peft=true", "--lora_modules_to_save=[norm]", "--learning_rate=1.0e-2", "--lr_scheduler_type=constant"],
    );
    let outcome = run::<CpuAutodiff>(Objective::Sft, &sft, &device, true).unwrap();
    assert_eq!(outcome.steps, 1);
    let config = adapter_config(&out);
    assert_eq!(config["modules_to_save"], serde_json::json!(["norm"]));
    let names = alignment_handbook::peft::adapter::adapter_tensor_names(&out).unwrap();
    // 30 layers' q/v adapters (A and B), 2 norms a layer and the final one.
    assert_eq!(names.len(), 30 * 2 * 2 + 30 * 2 + 1, "{names:?}");
    assert!(
        names.contains("base_model.model.model.norm.weight") && names.contains("base_model.model.model.layers.29.input_layernorm.weight")
    );
    let base = load_pretrained::<Cpu>(&alignment_handbook::run::resolve_model(&sft.model_name_or_path).unwrap(), &device).unwrap();
    let trained = alignment_handbook::run::load_for_inference::<Cpu>(&out, &device).unwrap();
    let moved = (trained.norm.weight.val() - base.norm.weight.val()).abs().max().into_scalar();
    assert!(moved > 1e-4, "the final norm trained: {moved}");
}

/// `use_dora: true`: the adapters are weight-decomposed (DoRA), their magnitudes trained and
/// saved under PEFT's names.
#[test]
fn use_dora_trains_and_saves_magnitudes() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("sft-dora");
    let sft = recipe("sft", &out, &["--use_peft=true", "--use_dora=true", "--lora_dropout=0.1"]);
    let outcome = run::<CpuAutodiff>(Objective::Sft, &sft, &Default::default(), true).unwrap();
    assert!(outcome.history[0].get("loss").and_then(|v| v.as_f64()).is_some_and(f64::is_finite), "{:?}", outcome.history);
    let config = adapter_config(&out);
    assert_eq!(config["use_dora"], true);
    let names = alignment_handbook::peft::adapter::adapter_tensor_names(&out).unwrap();
    // 30 layers' q and v: A, B and the magnitude.
    assert_eq!(names.len(), 30 * 2 * 3, "{names:?}");
    assert!(names.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"));
}

/// `bnb_4bit_quant_type: fp4`: the QLoRA recipe trains on an FP4 base.
#[test]
fn qlora_recipe_trains_on_an_fp4_base() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("sft-qlora-fp4");
    let sft = recipe_file("sft", "config_qlora.yaml", &out, &["--bnb_4bit_quant_type=fp4"]);
    let outcome = run::<CpuAutodiff>(Objective::Sft, &sft, &Default::default(), true).unwrap();
    let loss = outcome.history[0].get("loss").and_then(|v| v.as_f64());
    assert!(loss.is_some_and(f64::is_finite), "{:?}", outcome.history);
    assert!(out.join("adapter_model.safetensors").is_file());
    let err = run::<CpuAutodiff>(
        Objective::Sft,
        &recipe_file("sft", "config_qlora.yaml", &out, &["--bnb_4bit_quant_type=int4"]),
        &Default::default(),
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("int4") && err.to_string().contains("fp4"), "{err}");
}

#[test]
fn unsupported_and_invalid_settings_name_the_key() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    let err = run::<CpuAutodiff>(Objective::Sft, &recipe("sft", root.path(), &["--load_in_4bit=true"]), &device, true).unwrap_err();
    assert!(matches!(err, RunError::Unsupported { key: "load_in_4bit", .. }) && err.to_string().contains("use_peft"), "{err}");
    let err = run::<CpuAutodiff>(
        Objective::Sft,
        &recipe("sft", root.path(), &["--use_peft=true", "--lora_target_modules=[q_proj, qq_proj]"]),
        &device,
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("qq_proj"), "{err}");
    // SmolLM2 ties its head to its embedding: training one apart from the other is refused.
    let err = run::<CpuAutodiff>(
        Objective::Sft,
        &recipe("sft", root.path(), &["--use_peft=true", "--lora_modules_to_save=[embed_tokens]"]),
        &device,
        true,
    )
    .unwrap_err();
    assert!(
        matches!(err, RunError::Unsupported { key: "lora_modules_to_save", .. }) && err.to_string().contains("tie_word_embeddings"),
        "{err}"
    );
    let err = run::<CpuAutodiff>(Objective::Sft, &recipe("sft", root.path(), &["--reduce_loss=average"]), &device, true).unwrap_err();
    assert!(err.to_string().contains("`reduce_loss`") && err.to_string().contains("sum"), "{err}");
    let err = run::<CpuAutodiff>(Objective::Dpo, &recipe("dpo", root.path(), &["--loss_type=sigmoidd"]), &device, true).unwrap_err();
    assert!(err.to_string().contains("sigmoidd") && err.to_string().contains("ipo"), "{err}");
    let err = run::<CpuAutodiff>(Objective::Sft, &recipe("sft", root.path(), &["--dataset_splits=[train_sft, validation]"]), &device, true)
        .unwrap_err();
    assert!(err.to_string().contains("validation"), "{err}");
    let err = run::<CpuAutodiff>(Objective::Sft, &recipe("sft", root.path(), &["--model_name_or_path=/nonexistent/model"]), &device, true)
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model"), "{err}");
}

#[test]
fn recipe_chat_template_overrides_the_tokenizers() {
    use alignment_handbook::data::{Message, ZEPHYR_TEMPLATE};
    use alignment_handbook::run::{resolve_model, TextTools};
    let dir = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    let messages = [Message::new("user", "Hi"), Message::new("assistant", "Hello!")];
    let own = TextTools::load(&dir, None).unwrap();
    assert!(own.template.render(&messages, false).unwrap().starts_with("<|im_start|>"), "SmolLM2's own ChatML template");
    let zephyr = TextTools::load(&dir, Some(ZEPHYR_TEMPLATE)).unwrap();
    // The handbook's Zephyr template with SmolLM2's eos_token.
    assert_eq!(zephyr.template.render(&messages, false).unwrap(), "<|user|>\nHi<|im_end|>\n<|assistant|>\nHello!<|im_end|>\n");
    let broken = TextTools::load(&dir, Some("{% for m in messages %}{{ m.content }"));
    assert!(broken.is_err_and(|e| e.to_string().contains("syntax")), "a malformed template is a clear error");
}
