//! What replaying the training step as a CUDA graph asks of it, checked on libtorch's CPU
//! kernels (`--features tch`; the capture itself needs a GPU: `bench_train train --cuda-graph`
//! on the device). A replay launches the captured kernels on the memory they used, so the step's
//! state — every parameter, AdamW's moments, its step count and learning rate — must be updated
//! where it is, step after step, and a step over batches uploaded beforehand must train as the
//! step that uploads its own batch does.
#![cfg(feature = "tch")]

use alignment_handbook::core::backend::Torch;
use alignment_handbook::models::{random_model, CausalLm, ModelConfig};
use alignment_handbook::objectives::{DpoConfig, OrpoConfig, Reduction};
use alignment_handbook::step_check::{dpo_pair, read_metrics, sft_row, train_step, train_step_prepared};
use alignment_handbook::trainer::optimizer::{AdamW, AdamWConfig};
use alignment_handbook::trainer::tasks::{DpoTask, OrpoTask, PreferencePair, SftTask};
use alignment_handbook::trainer::tch_graph::state_addresses;
use alignment_handbook::trainer::{prepare, Collation, PreparedBatch, Sequence, StepOptions, Task};
use alignment_peft::{apply_lora, LoraConfig, TargetModules};
use burn::backend::libtorch::LibTorchDevice;
use burn::backend::Autodiff;
use burn::tensor::FloatDType;
use std::path::PathBuf;

type Train = Autodiff<Torch>;

fn tiny_model(lora: bool, mixed: bool) -> CausalLm<Train> {
    let shape = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/shapes/tiny.json");
    let config = ModelConfig::from_file(&shape).expect("the tiny shape");
    let mut model = random_model::<Train>(config, 7, &LibTorchDevice::Cpu, None).expect("a random model");
    if lora {
        let mut config = LoraConfig::new(8, 16.0, TargetModules::AllLinear);
        config.dropout = 0.0;
        model = apply_lora(model, &config, 7).expect("adapters");
    }
    model.set_matmul_dtype(mixed.then_some(FloatDType::BF16));
    model
}

/// Three steps of `task` over `batches` on a fresh tiny model: each step's loss and, after it,
/// where the step's state lives. `prepared_once`: the batches uploaded before the first step
/// (`prepare`, then `train_step_prepared`, as `--cuda-graph` runs them); otherwise each step
/// uploads its own (`train_step`).
fn three_steps<T: Task>(
    task: &T,
    batches: &[Vec<&T::Example>],
    (lora, mixed, lean): (bool, bool, bool),
    prepared_once: bool,
) -> (Vec<f64>, Vec<Vec<(String, usize)>>) {
    let device = LibTorchDevice::Cpu;
    let mut model = tiny_model(lora, mixed);
    let options = StepOptions::for_model(&model, lean, lean);
    let mut optimizer = AdamW::<Torch>::new(AdamWConfig::default());
    let prepared: Vec<PreparedBatch<Train>> = batches.iter().map(|b| prepare(&model, task, b, &device)).collect();
    let (mut losses, mut addresses) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (updated, pending) = if prepared_once {
            let (m, p, _, _) = train_step_prepared(model, task, batches, &prepared, &mut optimizer, 1e-3, &options, false, &device);
            (m, p)
        } else {
            let (m, p, _, _) = train_step(model, task, batches, &mut optimizer, 1e-3, &options, false, &device);
            (m, p)
        };
        model = updated;
        losses.push(read_metrics(pending)["loss"]);
        addresses.push(state_addresses(&model, &optimizer));
    }
    (losses, addresses)
}

/// Three steps over batches uploaded once leave every parameter, moment and AdamW scalar where
/// the first step put them — SFT with full fine-tuning and LoRA, f32 and mixed precision, the
/// plain step and the lean one (checkpointing, chunked head), DPO and ORPO — and their losses equal
/// those of the step that uploads its own batch each time, bit for bit.
#[test]
fn the_libtorch_step_updates_its_state_in_place() {
    let sft = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let rows: Vec<Sequence> = (0..4).map(|i| sft_row(24, 512, 100 + i)).collect();
    let sft_batches: Vec<Vec<&Sequence>> = rows.chunks(2).map(|c| c.iter().collect()).collect();
    let dpo = DpoTask { config: DpoConfig::default(), collation: Collation::pad_with(0) };
    let pairs: Vec<PreferencePair> = (0..4).map(|i| dpo_pair(24, 512, 200 + i)).collect();
    let dpo_batches: Vec<Vec<&PreferencePair>> = pairs.chunks(2).map(|c| c.iter().collect()).collect();
    let orpo = OrpoTask { config: OrpoConfig::default(), collation: Collation::pad_with(0) };
    let cases = [
        ("sft", (false, false, false)),
        ("sft", (false, true, false)),
        ("sft", (true, true, false)),
        ("sft", (false, true, true)),
        ("dpo", (false, true, false)),
        ("dpo", (false, true, true)),
        ("orpo", (false, true, false)),
    ];
    for (task, shape) in cases {
        let case = format!("{task}, (lora, mixed, lean) {shape:?}");
        let run = |prepared_once| match task {
            "sft" => three_steps(&sft, &sft_batches, shape, prepared_once),
            "dpo" => three_steps(&dpo, &dpo_batches, shape, prepared_once),
            _ => three_steps(&orpo, &dpo_batches, shape, prepared_once),
        };
        let (losses, addresses) = run(true);
        assert!(addresses[0].len() > 2, "{case}: the step's state was listed");
        for (step, later) in addresses.iter().enumerate().skip(1) {
            assert_eq!(later.len(), addresses[0].len(), "{case}: step {} changed the state's size", step + 1);
            if let Some(((name, was), (_, is))) = addresses[0].iter().zip(later).find(|(a, b)| a.1 != b.1) {
                panic!("{case}: step {} moved {name} ({was:#x} → {is:#x})", step + 1);
            }
        }
        let (uploading, _) = run(false);
        assert_eq!(losses, uploading, "{case}: the step over uploaded batches trains differently");
        assert!(losses[2] < losses[0], "{case}: the loss did not fall: {losses:?}");
    }
}
