//! The handbook's scripts end to end on the real model: each objective (SFT, DPO, ORPO, CPT) runs
//! one update of SmolLM2-135M-Instruct on a few rows of the shipped tiny-chat dataset through
//! `run::run` (recipe → mixer → formatting → tokenization → trainer), logs TRL's metric names,
//! and leaves a model directory that loads again. Bad recipes fail with errors naming the key.

use alignment_handbook::core::backend::{Cpu, CpuAutodiff};
use alignment_handbook::models::load_pretrained;
use alignment_handbook::run::{run, Objective, RunError};
use alignment_handbook::trainer::Recipe;

fn recipe(task: &str, output_dir: &std::path::Path, extra: &[&str]) -> Recipe {
    let path = alignment_handbook::reference::repo_root().join(format!("recipes/smollm2-135m/{task}/config_cpu.yaml"));
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
    Recipe::load(&path, &overrides).unwrap()
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
    }
}

#[test]
fn unsupported_and_invalid_settings_name_the_key() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    let err = run::<CpuAutodiff>(Objective::Sft, &recipe("sft", root.path(), &["--use_peft=true"]), &device, true).unwrap_err();
    assert!(matches!(err, RunError::Unsupported { key: "use_peft", .. }), "{err}");
    let err = run::<CpuAutodiff>(Objective::Sft, &recipe("sft", root.path(), &["--reduce_loss=average"]), &device, true).unwrap_err();
    assert!(matches!(err, RunError::Unsupported { key: "reduce_loss", .. }) && err.to_string().contains("sum"), "{err}");
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
