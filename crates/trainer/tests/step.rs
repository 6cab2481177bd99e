//! The shapes of the training step (`step::forward_backward`): plain, chunked head, gradient
//! checkpointing, and both, give the same loss, metrics and gradients (≤ 1e-6 relative, f32),
//! for SFT, DPO and ORPO, tied and untied heads, LoRA with dropout and a 4-bit base.

mod common;

use alignment_core::backend::CpuAutodiff;
use alignment_models::{load_pretrained, CausalLm};
use alignment_objectives::{DpoConfig, OrpoConfig};
use alignment_peft::{apply_lora, load_pretrained_4bit, LoraConfig, QuantConfig, TargetModules};
use alignment_trainer::tasks::{precompute_reference, DpoTask, OrpoTask, PreferencePair, ReferenceLogps};
use alignment_trainer::{evaluate_with, forward_backward, Collation, Sequence, StepOptions, Task, IGNORE_INDEX};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

type B = CpuAutodiff;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures").join(name)
}

/// Gradients by parameter path.
fn named_gradients(model: &CausalLm<B>, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: BTreeMap<String, Vec<f32>>,
    }
    impl ModuleVisitor<B> for Collect<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<<B as AutodiffBackend>::InnerBackend, D>(param.id) {
                self.out.insert(self.path.join("."), g.into_data().into_vec::<f32>().unwrap());
            }
        }
    }
    let mut collect = Collect { grads, path: Vec::new(), out: BTreeMap::new() };
    model.visit(&mut collect);
    collect.out
}

/// Gradients by parameter path.
type Gradients = BTreeMap<String, Vec<f32>>;

/// Metrics and gradients of two micro-batches (scales 0.25 and 0.5) under `options`.
fn run<T: Task>(model: &CausalLm<B>, task: &T, examples: &[T::Example], options: StepOptions) -> (Vec<(String, f64)>, Gradients) {
    let device = Default::default();
    let mut accumulator = GradientsAccumulator::new();
    let refs: Vec<&T::Example> = examples.iter().collect();
    let (first, second) = refs.split_at(refs.len() / 2);
    let mut metrics = Vec::new();
    for (part, scale) in [(first, 0.25), (second, 0.5)] {
        let m = forward_backward(
            model,
            task,
            part,
            scale,
            &StepOptions { dropout_seed: 17 + metrics.len() as u64, ..options },
            &mut accumulator,
            &device,
        );
        metrics.extend(m.read().iter().map(|(k, v)| (k.to_string(), v)));
    }
    (metrics, named_gradients(model, &accumulator.grads()))
}

fn relative(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

const MODES: [(&str, StepOptions); 4] = [
    ("plain", StepOptions { gradient_checkpointing: false, head_chunk_tokens: None, dropout_seed: 0 }),
    ("chunked", StepOptions { gradient_checkpointing: false, head_chunk_tokens: Some(5), dropout_seed: 0 }),
    ("checkpointed", StepOptions { gradient_checkpointing: true, head_chunk_tokens: None, dropout_seed: 0 }),
    ("both", StepOptions { gradient_checkpointing: true, head_chunk_tokens: Some(7), dropout_seed: 0 }),
];

/// Every mode gives the plain mode's metrics and gradients to `tolerance`.
fn assert_modes_agree<T: Task>(what: &str, model: &CausalLm<B>, task: &T, examples: &[T::Example]) {
    let (metrics, grads) = run(model, task, examples, MODES[0].1);
    assert!(!grads.is_empty() && grads.values().any(|g| g.iter().any(|&v| v != 0.0)), "{what}: no gradient");
    for (mode, options) in &MODES[1..] {
        let (m, g) = run(model, task, examples, *options);
        assert_eq!(m.len(), metrics.len(), "{what} {mode}: metric names");
        for ((name, a), (_, b)) in m.iter().zip(&metrics) {
            let err = (a - b).abs() / b.abs().max(1e-6);
            assert!(err <= 1e-6, "{what} {mode}: metric {name} {a} vs {b} ({err:e})");
        }
        assert_eq!(g.keys().collect::<Vec<_>>(), grads.keys().collect::<Vec<_>>(), "{what} {mode}: parameters with gradients");
        for (name, values) in &g {
            let err = relative(values, &grads[name]);
            assert!(err <= 1e-6, "{what} {mode}: gradient of {name} differs by {err:e}");
        }
    }
}

/// Rows of unequal lengths (padding), a third of each unlabelled.
fn rows(n: u32) -> Vec<Sequence> {
    common::examples(n)
}

fn pairs(n: u32) -> Vec<PreferencePair> {
    (0..n)
        .map(|i| {
            let prompt: Vec<u32> = (0..4 + i % 3).map(|t| (i * 13 + t * 7 + 1) % 256).collect();
            let row = |salt: u32, len: u32| {
                let mut ids = prompt.clone();
                ids.extend((0..len).map(|t| (salt * 31 + i * 17 + t * 5) % 256));
                let labels = ids.iter().enumerate().map(|(t, &id)| if t < prompt.len() { IGNORE_INDEX } else { id as i64 }).collect();
                Sequence::new(ids, labels)
            };
            let (chosen, rejected) = (-20.0 - i as f64, -22.5 + i as f64);
            let reference = ReferenceLogps { chosen, rejected, tails: Some([chosen / 4.0, rejected / 3.0]) };
            PreferencePair { chosen: row(1, 3 + i % 4), rejected: row(2, 5 - i % 3), reference: Some(reference) }
        })
        .collect()
}

#[test]
fn sft_untied_and_tied_heads() {
    let device = Default::default();
    for name in ["tiny-llama", "tiny-gemma"] {
        let model = load_pretrained::<B>(&fixture(name), &device).unwrap();
        assert_modes_agree(name, &model, &common::task(), &rows(6));
    }
}

/// SFT driven as an objective whose `∂loss/∂sum` only the loss's backward pass gives: the
/// chunked head's two passes, where SFT itself takes one walk.
struct TwoPassSft(alignment_trainer::tasks::SftTask);

impl Task for TwoPassSft {
    type Example = Sequence;
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn weight(&self, examples: &[&Sequence]) -> f64 {
        self.0.weight(examples)
    }
    fn num_tokens(&self, examples: &[&Sequence]) -> usize {
        self.0.num_tokens(examples)
    }
    fn scoring<I: burn::tensor::backend::Backend>(&self, examples: &[&Sequence], device: &I::Device) -> alignment_trainer::Scoring<I> {
        self.0.scoring(examples, device)
    }
    fn loss_from_logps<I: burn::tensor::backend::Backend>(
        &self,
        logps: Vec<alignment_objectives::SequenceLogps<I>>,
        examples: &[&Sequence],
        device: &I::Device,
    ) -> (Tensor<I, 1>, alignment_objectives::DeferredMetrics<I>) {
        self.0.loss_from_logps(logps, examples, device)
    }
}

/// SFT's one walk over the head's chunks (its `∂loss/∂sum` is −scale for every row, known before
/// the loss) gives the two passes' metrics and gradients bit for bit: trained untied and tied
/// heads, a frozen head under LoRA, with and without checkpointing.
#[test]
fn sft_one_walk_gives_the_two_passes_bits() {
    let device = Default::default();
    let sft = common::task();
    assert_eq!(sft.constant_sum_gradients(), Some(vec![-1.0]));
    let lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    let models = [
        ("tiny-llama", load_pretrained::<B>(&fixture("tiny-llama"), &device).unwrap()),
        ("tiny-gemma", load_pretrained::<B>(&fixture("tiny-gemma"), &device).unwrap()),
        ("lora", apply_lora(load_pretrained::<B>(&fixture("tiny-llama"), &device).unwrap(), &lora, 3).unwrap()),
    ];
    for (name, model) in &models {
        for (mode, options) in [&MODES[1], &MODES[3]] {
            let (metrics, grads) = run(model, &sft, &rows(6), *options);
            let (two_metrics, two_grads) = run(model, &TwoPassSft(common::task()), &rows(6), *options);
            assert!(grads.values().any(|g| g.iter().any(|&v| v != 0.0)), "{name} {mode}: no gradient");
            assert_eq!(metrics, two_metrics, "{name} {mode}: metrics");
            assert_eq!(grads, two_grads, "{name} {mode}: gradients");
        }
    }
}

#[test]
fn sliding_window_and_packed_documents() {
    let device = Default::default();
    let model = load_pretrained::<B>(&fixture("tiny-mistral"), &device).unwrap();
    let mut packed = rows(4);
    for (i, row) in packed.iter_mut().enumerate() {
        let n = row.len();
        row.document_ids = Some((0..n).map(|t| (t * (i + 2) / n) as u32).collect());
        row.position_ids = (0..n).map(|t| (t % 5) as i64).collect();
    }
    assert_modes_agree("tiny-mistral packed", &model, &common::task(), &packed);
}

#[test]
fn dpo_and_orpo() {
    let device = Default::default();
    let model = load_pretrained::<B>(&fixture("tiny-llama"), &device).unwrap();
    assert_modes_agree("dpo", &model, &DpoTask { config: DpoConfig::default(), collation: Collation::pad_with(0) }, &pairs(4));
    // Weighted lists with LD-DPO (two label sets) and WPO weights (the extra statistic), in
    // every mode. AOT sorts the pairs of the micro-batch and refuses WPO, so it goes without.
    let sorted = DpoConfig {
        ld_alpha: Some(0.3),
        label_smoothing: 0.1,
        ..DpoConfig::from_names(&["sigmoid_norm", "bco_pair", "aot_unpaired"], Some(&[0.5, 0.25, 1.0])).unwrap()
    };
    sorted.validate().unwrap();
    assert_modes_agree("dpo list+ld", &model, &DpoTask { config: sorted, collation: Collation::pad_with(0) }, &pairs(4));
    let wpo = DpoConfig {
        use_weighting: true,
        ld_alpha: Some(0.3),
        ..DpoConfig::from_names(&["sigmoid_norm", "bco_pair"], Some(&[0.5, 0.25])).unwrap()
    };
    wpo.validate().unwrap();
    assert_modes_agree("dpo wpo+ld", &model, &DpoTask { config: wpo, collation: Collation::pad_with(0) }, &pairs(4));
    assert_modes_agree("orpo", &model, &OrpoTask { config: OrpoConfig::default(), collation: Collation::pad_with(0) }, &pairs(4));
}

/// The reference precomputed from the policy itself (in batches padded differently from the
/// evaluation's): every log-ratio is 0 whatever `ld_alpha`, so sigmoid DPO is ln 2 and the rewards
/// 0 — only if the reference's LD-weighted log-probs are the policy's. `ld_alpha` = 1 is plain
/// DPO; other values change the logged log-probs.
#[test]
fn dpo_reference_from_the_policy_gives_zero_margins_for_any_ld_alpha() {
    let device = Default::default();
    let model = load_pretrained::<B>(&fixture("tiny-llama"), &device).unwrap();
    let mut examples = pairs(4);
    precompute_reference(&model, &mut examples, 3, Collation::pad_with(0), None, &device).unwrap();
    assert!(examples.iter().all(|p| p.reference.is_some_and(|r| r.tails.is_some())));
    let mut logps = Vec::new();
    for ld_alpha in [None, Some(0.0), Some(0.3), Some(1.0)] {
        for head_chunk_tokens in [None, Some(5)] {
            let task = DpoTask { config: DpoConfig { ld_alpha, ..DpoConfig::default() }, collation: Collation::pad_with(0) };
            let metrics: BTreeMap<String, f64> =
                evaluate_with(&model, &task, &examples, 4, head_chunk_tokens, &device).into_iter().collect();
            let what = format!("ld_alpha {ld_alpha:?}, head chunk {head_chunk_tokens:?}");
            assert!((metrics["eval_loss"] - std::f64::consts::LN_2).abs() < 1e-5, "{what}: {metrics:?}");
            assert!(metrics["eval_rewards/margins"].abs() < 1e-5 && metrics["eval_rewards/chosen"].abs() < 1e-5, "{what}: {metrics:?}");
            logps.push((ld_alpha, metrics["eval_logps/chosen"]));
        }
    }
    let of = |alpha: Option<f64>| logps.iter().find(|(a, _)| *a == alpha).unwrap().1;
    assert!((of(None) - of(Some(1.0))).abs() < 1e-4, "{logps:?}");
    assert!(of(Some(0.0)) > of(Some(0.3)) && of(Some(0.3)) > of(None), "dropping tail tokens raises the log-probs: {logps:?}");
}

#[test]
fn lora_with_dropout_and_a_4bit_base() {
    let device = Default::default();
    let mut config = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    config.dropout = 0.2;
    // B starts at zero; one plain update makes both factors matter, so start from nonzero B.
    let perturb = |model: CausalLm<B>| {
        let mut model = model;
        for layer in &mut model.layers {
            for (_, linear) in layer.linears_mut() {
                if let Some(adapter) = linear.lora.as_mut() {
                    let b = adapter.b.val();
                    adapter.b = Param::from_tensor((b.ones_like() * 0.01).require_grad());
                }
            }
        }
        model
    };
    let dense = perturb(apply_lora(load_pretrained::<B>(&fixture("tiny-llama"), &device).unwrap(), &config, 3).unwrap());
    assert_modes_agree("lora dropout", &dense, &common::task(), &rows(6));
    let nf4 = load_pretrained_4bit::<B>(&fixture("tiny-llama"), &device, QuantConfig::nf4(true)).unwrap();
    let qlora = perturb(apply_lora(nf4, &config, 3).unwrap());
    assert_modes_agree("qlora dropout", &qlora, &common::task(), &rows(6));
}
