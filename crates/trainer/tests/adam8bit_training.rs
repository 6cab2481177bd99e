//! `optim: adamw_bnb_8bit` through the training loop: the large projections keep 8-bit moments
//! (saved in bitsandbytes' names, codes as U8), the embedding, norms and small projections 32-bit
//! ones; the loss falls about as with 32-bit AdamW, not identically; a run resumed from its
//! checkpoint ends with the bits of one never interrupted.

use crate::common;

use alignment_core::backend::CpuAutodiff;
use alignment_models::load_pretrained;
use alignment_trainer::adam8bit::quantizes;
use alignment_trainer::{train, Recipe, TrainerConfig};
use common::{examples, fixture, logged_losses as losses, task};
use std::path::{Path, PathBuf};

fn config(output_dir: &Path, optim: &str, resume_from: Option<PathBuf>) -> TrainerConfig {
    let recipe = Recipe::from_yaml_str(
        &format!(
            "optim: {optim}\nlearning_rate: 3.0e-3\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nmax_steps: 8\n\
             per_device_train_batch_size: 3\ngradient_accumulation_steps: 2\nlogging_steps: 1\nsave_strategy: steps\n\
             save_steps: 4\nweight_decay: 0.01\nseed: 7\n"
        ),
        "test recipe",
        &[format!("--output_dir={}", output_dir.display())],
    )
    .unwrap();
    let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
    config.quiet = true;
    config.resume_from = resume_from;
    config
}

fn run(output_dir: &Path, optim: &str, resume_from: Option<PathBuf>) -> Vec<(u64, f64)> {
    let device = Default::default();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    train(model, &task(), &examples(24), &[], &config(output_dir, optim, resume_from), &device).unwrap();
    losses(output_dir)
}

#[test]
fn eight_bit_adamw_trains_saves_and_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let straight = root.path().join("straight");
    let eight_bit = run(&straight, "adamw_bnb_8bit", None);
    let full = run(&root.path().join("adamw"), "adamw_torch", None);
    assert_eq!(eight_bit.len(), 8);
    assert!(eight_bit[7].1 < eight_bit[0].1, "training lowers the loss: {eight_bit:?}");
    let gap = (eight_bit[7].1 - full[7].1).abs() / full[7].1;
    println!("final loss: 8-bit {} / 32-bit {} (relative gap {gap:.2e})", eight_bit[7].1, full[7].1);
    assert!(gap > 0.0 && gap < 0.05, "8-bit moments approximate AdamW's: {gap:e}");

    // The checkpoint: codes as U8 under bitsandbytes' names for the large parameters, f32 moments
    // for the others (the embedding among them).
    let bytes = std::fs::read(straight.join("checkpoint-4/optimizer.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut quantized, mut full_moments) = (0, 0);
    for name in file.names() {
        let view = file.tensor(name).unwrap();
        if let Some(param) = name.strip_suffix(".state1") {
            assert_eq!(view.dtype(), safetensors::Dtype::U8, "{name}");
            assert!(quantizes(param, view.shape()[0]), "{name}");
            let absmax = file.tensor(&format!("{param}.absmax1")).unwrap();
            assert_eq!(absmax.shape()[0], view.shape()[0].div_ceil(256), "{param}: one maximum a block of 256");
            quantized += 1;
        } else if let Some(param) = name.strip_suffix(".exp_avg") {
            assert!(!quantizes(param, view.shape()[0]), "{name}");
            full_moments += 1;
        }
    }
    println!("{quantized} parameters with 8-bit moments, {full_moments} with 32-bit ones");
    assert!(quantized >= 8 && full_moments >= 5, "{quantized} 8-bit, {full_moments} 32-bit");
    assert!(file.names().contains(&"embed_tokens.exp_avg"), "the embedding keeps 32-bit moments");

    // Resumed from checkpoint-4: steps 5..8 and the final weights as the run never interrupted.
    let resumed_dir = root.path().join("resumed");
    let resumed = run(&resumed_dir, "adamw_bnb_8bit", Some(straight.join("checkpoint-4")));
    let tail: Vec<_> = eight_bit.iter().filter(|(s, _)| *s > 4).collect();
    assert_eq!(resumed.iter().collect::<Vec<_>>(), tail, "losses after the resume");
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(weights(&straight) == weights(&resumed_dir), "final weights differ after the resume");
}
