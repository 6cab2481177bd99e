//! LoRA and QLoRA through the training loop: only adapter parameters get optimizer state,
//! checkpoints and the final output are PEFT adapter directories, a resumed run logs the same
//! losses as an uninterrupted one, and an adapter trained here gives, in PyPI `peft` on the
//! transformers model, the logits it gives here.

use crate::common;
use crate::trainer_common::examples;

use alignment_core::backend::{Cpu, CpuAutodiff};
use alignment_models::CausalLm;
use alignment_objectives::Reduction;
use alignment_peft::{apply_lora, load_adapter, load_pretrained_4bit, LoraConfig, QuantConfig, TargetModules};
use alignment_trainer::tasks::SftTask;
use alignment_trainer::{train, AdapterOutput, Collation, Recipe, TrainOutcome, TrainerConfig};
use burn::tensor::Tensor;
use common::*;
use std::path::{Path, PathBuf};

fn lora() -> LoraConfig {
    LoraConfig::new(4, 8.0, TargetModules::AllLinear)
}

fn config(output_dir: &Path, resume_from: Option<&Path>) -> TrainerConfig {
    let recipe = Recipe::from_yaml_str(
        "learning_rate: 1.0e-2\nlr_scheduler_type: constant\nmax_steps: 6\nper_device_train_batch_size: 4\n\
         logging_steps: 1\nsave_strategy: steps\nsave_steps: 3\nseed: 3\n",
        "test recipe",
        &[format!("--output_dir={}", output_dir.display())],
    )
    .unwrap();
    let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
    config.quiet = true;
    config.resume_from = resume_from.map(Path::to_path_buf);
    config.adapter = Some(AdapterOutput { lora: lora(), base_model_name_or_path: base_fixture("tiny-llama").display().to_string() });
    config
}

fn qlora_model() -> CausalLm<CpuAutodiff> {
    let base = load_pretrained_4bit::<CpuAutodiff>(&base_fixture("tiny-llama"), &Default::default(), QuantConfig::default()).unwrap();
    apply_lora(base, &lora(), 0).unwrap()
}

fn losses(history: &[serde_json::Map<String, serde_json::Value>]) -> Vec<(u64, f64)> {
    history.iter().filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?))).collect()
}

/// The tensor names of the optimizer state in `checkpoint`.
fn optimizer_state_names(checkpoint: &Path) -> Vec<String> {
    let optimizer = std::fs::read(checkpoint.join("optimizer.safetensors")).unwrap();
    safetensors::SafeTensors::deserialize(&optimizer).unwrap().names().into_iter().map(String::from).collect()
}

/// Copies the step-3 checkpoint of the run in `full_dir` into `resumed_dir` (another run's
/// output_dir), for a run resuming from it there; its path.
fn copy_step_3_checkpoint(full_dir: &Path, resumed_dir: &Path) -> PathBuf {
    let checkpoint = resumed_dir.join("checkpoint-3");
    std::fs::create_dir_all(&checkpoint).unwrap();
    for entry in std::fs::read_dir(full_dir.join("checkpoint-3")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), checkpoint.join(entry.file_name())).unwrap();
    }
    checkpoint
}

/// The run resumed in `resumed_dir` from step 3 logged the uninterrupted run's losses for steps
/// 4-6 (`full_losses`), bit for bit, and saved the same final adapter file as `full_dir`.
fn assert_resumed_exactly(full_dir: &Path, full_losses: &[(u64, f64)], resumed_dir: &Path, resumed: &TrainOutcome) {
    let resumed_losses: Vec<(u64, f64)> = losses(&resumed.history).into_iter().filter(|(s, _)| *s > 3).collect();
    assert_eq!(resumed_losses, full_losses[3..].to_vec(), "bit-identical losses after resuming");
    let final_a = std::fs::read(full_dir.join("adapter_model.safetensors")).unwrap();
    let final_b = std::fs::read(resumed_dir.join("adapter_model.safetensors")).unwrap();
    assert!(final_a == final_b, "the same final adapter");
}

/// PyPI `peft` on the tiny Llama base with the adapter in `adapter_dir` gives the logits of
/// `trained` (that adapter loaded here) on the reference batch, within 1e-4.
fn assert_peft_gives_the_logits_of(trained: &CausalLm<Cpu>, adapter_dir: &Path, what: &str) {
    let r = reference("tiny-llama-lora");
    let ours = logits(trained, &reference_batch(&r));
    let theirs = peft_logits(&base_fixture("tiny-llama"), adapter_dir, &r);
    let diff = max_diff(&ours, &theirs, &r.attention_mask);
    println!("{what} in PEFT: max |logit diff| = {diff:.3e}");
    assert!(diff <= 1e-4, "{what}: {diff}");
}

#[test]
fn qlora_trains_saves_adapters_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let data = examples(16);
    let full_dir = tmp.path().join("full");
    let (_, full) = train(qlora_model(), &task, &data, &[], &config(&full_dir, None), &Default::default()).unwrap();
    let full_losses = losses(&full.history);
    assert_eq!(full_losses.len(), 6);
    println!("QLoRA losses: {full_losses:?}");
    assert!(full_losses[5].1 < full_losses[0].1 - 0.05, "loss should fall: {full_losses:?}");

    // Outputs: PEFT adapter directories, optimizer state for adapters only.
    for dir in [full_dir.clone(), full_dir.join("checkpoint-3")] {
        assert!(dir.join("adapter_model.safetensors").is_file() && dir.join("adapter_config.json").is_file(), "{}", dir.display());
        assert!(!dir.join("model.safetensors").exists(), "{}: the frozen base is not saved", dir.display());
    }
    let names = optimizer_state_names(&full_dir.join("checkpoint-3"));
    assert_eq!(names.len(), 2 * 2 * 14, "exp_avg and exp_avg_sq of A and B of 14 adapters: {names:?}");
    assert!(names.iter().all(|n| n.contains(".lora.")), "{names:?}");

    // Resume from the step-3 checkpoint in another directory: steps 4-6 log the same losses.
    let resumed_dir = tmp.path().join("resumed");
    let checkpoint = copy_step_3_checkpoint(&full_dir, &resumed_dir);
    let (_, resumed) = train(qlora_model(), &task, &data, &[], &config(&resumed_dir, Some(&checkpoint)), &Default::default()).unwrap();
    assert_resumed_exactly(&full_dir, &full_losses, &resumed_dir, &resumed);
}

#[test]
fn an_adapter_trained_here_gives_the_same_logits_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let base_dir = base_fixture("tiny-llama");
    let model = apply_lora(alignment_models::load_pretrained::<CpuAutodiff>(&base_dir, &Default::default()).unwrap(), &lora(), 0).unwrap();
    let output = tmp.path().join("out");
    let mut config = config(&output, None);
    config.save = alignment_trainer::train::SaveStrategy::No;
    train(model, &task, &examples(16), &[], &config, &Default::default()).unwrap();

    let r = reference("tiny-llama-lora");
    let batch = reference_batch(&r);
    let (trained, _) = load_adapter(load_base("tiny-llama"), &output).unwrap();
    let plain = logits(&load_base("tiny-llama"), &batch);
    assert!(max_diff(&logits::<Cpu>(&trained, &batch), &plain, &r.attention_mask) > 1e-2, "training should have moved the adapters");
    assert_peft_gives_the_logits_of(&trained, &output, "trained adapter");
}

#[test]
fn disable_dropout_trains_the_adapters_without_their_dropout() {
    // TRL's DPO/ORPO `disable_dropout`: adapters with lora_dropout 0.5 train as with 0, and the
    // saved adapter config keeps 0.5 (PEFT's config is untouched by `disable_dropout_in_model`).
    let tmp = tempfile::tempdir().unwrap();
    let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let run = |dropout: f64, disable_dropout: bool, name: &str| {
        let lora = LoraConfig { dropout, ..lora() };
        let base = alignment_models::load_pretrained::<CpuAutodiff>(&base_fixture("tiny-llama"), &Default::default()).unwrap();
        let output = tmp.path().join(name);
        let mut config = config(&output, None);
        config.max_steps = Some(3);
        config.save = alignment_trainer::train::SaveStrategy::No;
        config.disable_dropout = disable_dropout;
        config.adapter.as_mut().unwrap().lora.dropout = dropout;
        let (_, outcome) = train(apply_lora(base, &lora, 0).unwrap(), &task, &examples(16), &[], &config, &Default::default()).unwrap();
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(output.join("adapter_config.json")).unwrap()).unwrap();
        (losses(&outcome.history), saved["lora_dropout"].as_f64().unwrap())
    };
    let (without, _) = run(0.0, false, "no-dropout");
    let (disabled, saved) = run(0.5, true, "disabled");
    let (with, _) = run(0.5, false, "dropout");
    assert_eq!(disabled, without, "disable_dropout must train as lora_dropout 0");
    assert_eq!(saved, 0.5, "the adapter config keeps the recipe's lora_dropout");
    assert_ne!(with, without, "lora_dropout 0.5 must change the losses when dropout is on");
}

#[test]
fn saved_modules_train_beside_the_adapters_resume_exactly_and_load_in_peft() {
    // `lora_modules_to_save`: the embedding, the head and every norm trained whole beside q/v
    // adapters, saved in the adapter file as PEFT saves them.
    let tmp = tempfile::tempdir().unwrap();
    let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let base_dir = base_fixture("tiny-llama");
    let mut lora = LoraConfig::new(4, 8.0, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    lora.modules_to_save = vec!["embed_tokens".into(), "lm_head".into(), "norm".into()];
    let model = || apply_lora(alignment_models::load_pretrained::<CpuAutodiff>(&base_dir, &Default::default()).unwrap(), &lora, 0).unwrap();
    let config = |output_dir: &Path, resume_from: Option<&Path>| {
        let mut config = config(output_dir, resume_from);
        config.adapter.as_mut().unwrap().lora = lora.clone();
        config
    };
    let full_dir = tmp.path().join("full");
    let (_, full) = train(model(), &task, &examples(16), &[], &config(&full_dir, None), &Default::default()).unwrap();
    let full_losses = losses(&full.history);
    assert_eq!(full_losses.len(), 6);

    // AdamW state for the 8 adapter tensors and the 2 + 1 + 2 × 2 saved weights.
    let names = optimizer_state_names(&full_dir.join("checkpoint-3"));
    assert_eq!(names.len(), 2 * (8 + 7), "{names:?}");

    // The saved weights moved; the frozen projections did not travel.
    let saved = alignment_peft::adapter::adapter_tensor_names(&full_dir).unwrap();
    assert_eq!(saved.len(), 8 + 7, "{saved:?}");
    let base = load_base("tiny-llama");
    let (trained, _) = load_adapter(load_base("tiny-llama"), &full_dir).unwrap();
    let moved = |a: Tensor<Cpu, 2>, b: Tensor<Cpu, 2>| (a - b).abs().max().into_scalar();
    assert!(moved(trained.embed_tokens.val(), base.embed_tokens.val()) > 1e-3, "the embedding trained");
    assert!(moved(trained.lm_head.as_ref().unwrap().weight.val(), base.lm_head.as_ref().unwrap().weight.val()) > 1e-3, "the head trained");
    assert!((trained.norm.weight.val() - base.norm.weight.val()).abs().max().into_scalar() > 1e-3, "the final norm trained");
    assert_eq!(
        moved(trained.layers[0].mlp.up_proj.weight.val(), base.layers[0].mlp.up_proj.weight.val()),
        0.0,
        "an unnamed projection stays frozen"
    );

    // Resumed from the step-3 checkpoint: the same losses and the same final adapter file.
    let resumed_dir = tmp.path().join("resumed");
    let checkpoint = copy_step_3_checkpoint(&full_dir, &resumed_dir);
    let (_, resumed) = train(model(), &task, &examples(16), &[], &config(&resumed_dir, Some(&checkpoint)), &Default::default()).unwrap();
    assert_resumed_exactly(&full_dir, &full_losses, &resumed_dir, &resumed);
    assert_peft_gives_the_logits_of(&trained, &full_dir, "trained adapter with saved modules");
}

#[test]
fn dora_trains_resumes_exactly_and_loads_in_peft() {
    // `use_dora`: the magnitudes train with the adapters, checkpoints carry them, PEFT gives the
    // trained adapter's logits; on a 4-bit base too (its weight norms from the dequantized base).
    let tmp = tempfile::tempdir().unwrap();
    let task = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let base_dir = base_fixture("tiny-llama");
    let mut lora = LoraConfig::new(4, 8.0, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    lora.use_dora = true;
    let dense = || apply_lora(alignment_models::load_pretrained::<CpuAutodiff>(&base_dir, &Default::default()).unwrap(), &lora, 0).unwrap();
    let config = |output_dir: &Path, resume_from: Option<&Path>| {
        let mut config = config(output_dir, resume_from);
        config.adapter.as_mut().unwrap().lora = lora.clone();
        config
    };
    let full_dir = tmp.path().join("full");
    let (_, full) = train(dense(), &task, &examples(16), &[], &config(&full_dir, None), &Default::default()).unwrap();
    let full_losses = losses(&full.history);
    assert!(full_losses[5].1 < full_losses[0].1 - 0.05, "loss should fall: {full_losses:?}");
    let names = optimizer_state_names(&full_dir.join("checkpoint-3"));
    assert_eq!(names.len(), 2 * (2 * 2 * 3), "exp_avg and exp_avg_sq of A, B and the magnitude of 4 adapters: {names:?}");

    let resumed_dir = tmp.path().join("resumed");
    let checkpoint = copy_step_3_checkpoint(&full_dir, &resumed_dir);
    let (_, resumed) = train(dense(), &task, &examples(16), &[], &config(&resumed_dir, Some(&checkpoint)), &Default::default()).unwrap();
    assert_resumed_exactly(&full_dir, &full_losses, &resumed_dir, &resumed);
    let (trained, _) = load_adapter(load_base("tiny-llama"), &full_dir).unwrap();
    assert_peft_gives_the_logits_of(&trained, &full_dir, "trained DoRA adapter");

    let quantized = || {
        let base = load_pretrained_4bit::<CpuAutodiff>(&base_dir, &Default::default(), QuantConfig::default()).unwrap();
        apply_lora(base, &lora, 0).unwrap()
    };
    let qlora_dir = tmp.path().join("qlora");
    let (_, qlora) = train(quantized(), &task, &examples(16), &[], &config(&qlora_dir, None), &Default::default()).unwrap();
    let qlora_losses = losses(&qlora.history);
    assert!(qlora_losses[5].1 < qlora_losses[0].1 - 0.05, "QLoRA + DoRA loss should fall: {qlora_losses:?}");
}
