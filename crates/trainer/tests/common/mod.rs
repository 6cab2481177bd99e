//! Helpers shared by the trainer's tests that run the loop (resume.rs, data_parallel.rs, adam8bit_training.rs), and
//! by the tests elsewhere that train on the same sequences (`#[path]` modules: alignment-peft's training.rs, the
//! root's qlora_bf16_adapters.rs).

#![allow(dead_code)]

use alignment_objectives::{DeferredMetrics, Reduction, SequenceLogps};
use alignment_trainer::tasks::SftTask;
use alignment_trainer::{Collation, Scoring, Sequence, Task, IGNORE_INDEX};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use std::path::{Path, PathBuf};

/// The tiny random Llama checkpoint of the models crate.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-llama")
}

/// `n` sequences of 6..=17 tokens, the first third of each unlabelled (a "prompt").
pub fn examples(n: u32) -> Vec<Sequence> {
    (0..n)
        .map(|i| {
            let len = 6 + (i as usize * 5) % 12;
            let ids: Vec<u32> = (0..len as u32).map(|t| (i * 37 + t * 11 + 3) % 256).collect();
            let labels = ids.iter().enumerate().map(|(t, &id)| if t < len / 3 { IGNORE_INDEX } else { id as i64 }).collect();
            Sequence::new(ids, labels)
        })
        .collect()
}

/// Token-mean SFT.
pub fn task() -> SftTask {
    SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" }
}

/// SFT that runs `before_loss` before each micro-batch's forward pass: how a test slows, counts or ends
/// the process it runs in at a chosen point of training.
pub struct HookedSft<F: Fn()> {
    pub inner: SftTask,
    pub before_loss: F,
}

impl<F: Fn()> Task for HookedSft<F> {
    type Example = Sequence;
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn weight(&self, examples: &[&Sequence]) -> f64 {
        self.inner.weight(examples)
    }
    fn num_tokens(&self, examples: &[&Sequence]) -> usize {
        self.inner.num_tokens(examples)
    }
    fn sequences<'a>(&self, example: &'a Sequence) -> Vec<&'a Sequence> {
        self.inner.sequences(example)
    }
    fn scoring<B: Backend>(&self, examples: &[&Sequence], device: &B::Device) -> Scoring<B> {
        (self.before_loss)();
        self.inner.scoring(examples, device)
    }
    fn constant_sum_gradients(&self) -> Option<Vec<f64>> {
        self.inner.constant_sum_gradients()
    }
    fn loss_from_logps<B: Backend>(
        &self,
        logps: Vec<SequenceLogps<B>>,
        examples: &[&Sequence],
        device: &B::Device,
    ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
        self.inner.loss_from_logps(logps, examples, device)
    }
}

/// The `(step, loss)` pairs a run logged to `output_dir/metrics.jsonl`.
pub fn logged_losses(output_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|e| Some((e["step"].as_u64()?, e.get("loss")?.as_f64()?)))
        .collect()
}

/// libtest's name for the test function `function` of the module at `module_path`
/// (`module_path!()`): in tests/integration.rs a test's name starts with its file's module, and a
/// test that runs itself as a child process (`--exact`) must name it so.
pub fn test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_binary, module)) => format!("{module}::{function}"),
        None => function.to_string(),
    }
}
