//! What the loop does with steps that score nothing and with values that are not finite: a step
//! without a scored token contributes nothing (loss 0, no gradient, as TRL's `clamp(min=1)`),
//! token ids past the vocabulary are refused before training, and a NaN loss stops the run,
//! naming the step, before anything is saved.

use crate::common;

use alignment_core::backend::{Cpu, CpuAutodiff};
use alignment_models::load_pretrained;
use alignment_trainer::{train, Recipe, Sequence, TrainError, TrainerConfig, IGNORE_INDEX};
use burn::module::AutodiffModule;
use common::{examples, fixture, task};
use std::path::Path;

fn config(output_dir: &Path, extra: &str) -> TrainerConfig {
    // `extra` replaces the base keys it sets (a key written twice is an error).
    let set_by_extra = |line: &str| extra.lines().any(|e| e.split(':').next() == line.split(':').next());
    let base: String =
        ["learning_rate: 1.0e-3", "max_steps: 2", "per_device_train_batch_size: 2", "logging_steps: 1", "save_strategy: \"no\""]
            .iter()
            .filter(|line| !set_by_extra(line))
            .map(|line| format!("{line}\n"))
            .collect();
    let recipe =
        Recipe::from_yaml_str(&format!("{base}{extra}"), "test recipe", &[format!("--output_dir={}", output_dir.display())]).unwrap();
    let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
    config.quiet = true;
    config
}

fn weights(model: &alignment_models::CausalLm<Cpu>) -> Vec<f32> {
    alignment_models::pretrained::named_tensors(model).into_iter().flat_map(|t| t.values).collect()
}

#[test]
fn a_step_that_scores_no_token_contributes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    // Every label ignored: the assistant turns were all truncated away.
    let unscored: Vec<Sequence> =
        examples(4).into_iter().map(|s| Sequence::new(s.input_ids.clone(), vec![IGNORE_INDEX; s.input_ids.len()])).collect();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let before = weights(&model.valid());
    let (trained, outcome) = train(model, &task(), &unscored, &[], &config(dir.path(), ""), &device).unwrap();
    for entry in &outcome.history {
        assert_eq!(entry["loss"].as_f64(), Some(0.0), "{entry:?}");
        assert_eq!(entry["grad_norm"].as_f64(), Some(0.0), "{entry:?}");
    }
    assert_eq!(weights(&trained.valid()), before, "no gradient, no update");
}

#[test]
fn token_ids_past_the_vocabulary_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let vocab = model.config.vocab_size as u32;
    let mut data = examples(4);
    data[2].input_ids[1] = vocab + 5;
    let err = train(model, &task(), &data, &[], &config(dir.path(), ""), &device).unwrap_err();
    assert!(matches!(err, TrainError::TokenOutOfVocab { .. }), "{err}");
    assert!(err.to_string().contains(&format!("training example 2 has token id {}", vocab + 5)), "{err}");
    assert!(!dir.path().join("metrics.jsonl").exists(), "nothing written");
}

#[test]
fn a_nan_loss_stops_the_run_naming_the_step_before_anything_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    // A learning rate past f32's range: the first update makes the weights infinite.
    let mut config = config(dir.path(), "max_steps: 3\nlogging_steps: 3\n");
    config.learning_rate = 1e39;
    let err = train(model, &task(), &examples(8), &[], &config, &device).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TrainError::NonFinite { step: 2, .. }), "{message}");
    assert!(message.contains("2 rows") && message.contains("no checkpoint was saved"), "{message}");
    assert!(!dir.path().join("model.safetensors").exists() && !dir.path().join("config.json").exists());
}
