//! Parity with TRL 1.16.0 / transformers 5.24.0 / torch 2.9.1: losses, every logged metric and the
//! gradient w.r.t. the policy logits, on the CPU autodiff backend, to 1e-5 (max abs).
//!
//! Fixture: `tests/fixtures/objectives.json`, written by `scripts/make_objective_goldens.py`, which
//! calls TRL's own `SFTTrainer.compute_loss`, `DPOTrainer._compute_loss` and
//! `ORPOTrainer.get_batch_loss_metrics` (see its docstring). Inputs: logits `[2·3, 7, 11]`
//! (three chosen rows, then three rejected rows) with prompt prefixes and padding masked by
//! `-100`, and precomputed reference log-probs.

use alignment_core::backend::CpuAutodiff;
use alignment_objectives::{
    causal_lm_loss, causal_lm_loss_sum, dpo_loss, orpo_loss, sequence_logps, sequence_logps_many, sft_loss, DpoConfig, Metrics, OrpoConfig,
    Reduction,
};
use burn::tensor::{backend::AutodiffBackend, Int, Tensor, TensorData};
use serde::Deserialize;
use std::collections::BTreeMap;

type B = CpuAutodiff;
const TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    versions: BTreeMap<String, String>,
    shape: [usize; 3],
    logits: Vec<f32>,
    labels: Vec<i64>,
    full_labels: Vec<i64>,
    reference_chosen: Vec<f32>,
    reference_rejected: Vec<f32>,
    sequence_logps: SequenceGolden,
    sft: SftGolden,
    dpo: Vec<DpoCase>,
    orpo: Vec<OrpoCase>,
}

#[derive(Deserialize)]
struct SequenceGolden {
    sum: Vec<f64>,
    num_tokens: Vec<f64>,
    mean_logits: Vec<f64>,
    mean_logits_all: Vec<f64>,
    entropy_sum: Vec<f64>,
    num_correct: Vec<f64>,
    grad_weights: Vec<f32>,
    grad: Vec<f64>,
}

#[derive(Deserialize)]
struct LossCase {
    loss: f64,
    #[serde(default)]
    metrics: BTreeMap<String, f64>,
    grad: Vec<f64>,
}

#[derive(Deserialize)]
struct SftGolden {
    mean: LossCase,
    num_items_in_batch: f64,
    normalized: LossCase,
    sum: LossCase,
}

#[derive(Deserialize)]
struct DpoCase {
    loss_type: String,
    beta: f64,
    label_smoothing: f64,
    #[serde(flatten)]
    case: LossCase,
}

#[derive(Deserialize)]
struct OrpoCase {
    beta: f64,
    #[serde(flatten)]
    case: LossCase,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/objectives.json");
    let text = std::fs::read_to_string(path).expect("read the objectives fixture");
    let fixture: Fixture = serde_json::from_str(&text).expect("parse the objectives fixture");
    assert_eq!(fixture.versions.get("trl").map(String::as_str), Some("1.16.0"));
    fixture
}

impl Fixture {
    fn rows(&self) -> usize {
        2 * self.shape[0]
    }
    /// Fresh leaf logits `[2B, T, V]` tracking gradients.
    fn leaf(&self) -> Tensor<B, 3> {
        let [_, t, v] = self.shape;
        Tensor::<B, 3>::from_data(TensorData::new(self.logits.clone(), [self.rows(), t, v]), &Default::default()).require_grad()
    }
    fn int(&self, values: &[i64]) -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new(values.to_vec(), [self.rows(), self.shape[1]]), &Default::default())
    }
    fn labels(&self) -> Tensor<B, 2, Int> {
        self.int(&self.labels)
    }
    fn full_labels(&self) -> Tensor<B, 2, Int> {
        self.int(&self.full_labels)
    }
    fn floats(&self, values: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &Default::default())
    }
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

fn inner_values<const D: usize>(t: Tensor<<B as AutodiffBackend>::InnerBackend, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// Max abs difference, asserted ≤ TOL, and printed (run with `--nocapture` to see the table).
fn check(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} values, golden has {}", got.len(), want.len());
    let diff = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f64, f64::max);
    assert!(diff.is_finite() && diff <= TOL, "{what}: max abs diff {diff:e} > {TOL:e}\n got  {got:?}\n want {want:?}");
    println!("{what:<52} max abs diff {diff:.2e}");
    diff
}

/// Every metric TRL logged (but `num_tokens`, the trainer's running total of input tokens) is
/// present with the same value, and nothing else is.
fn check_metrics(what: &str, got: &Metrics, want: &BTreeMap<String, f64>) {
    let expected: Vec<&str> = want.keys().map(String::as_str).filter(|k| *k != "num_tokens").collect();
    let mut names: Vec<&str> = got.iter().map(|(n, _)| n).collect();
    names.sort_unstable();
    assert_eq!(names, expected, "{what}: metric names differ from TRL's");
    let diff = expected.iter().map(|name| (got.get(name).unwrap() - want[*name]).abs()).fold(0.0f64, f64::max);
    assert!(diff <= TOL, "{what}: metrics differ by {diff:e}\n got  {got:?}\n want {want:?}");
    println!("{:<52} max abs diff {diff:.2e}", format!("{what} metrics ({})", expected.len()));
}

#[test]
fn sequence_logps_match_trl() {
    let f = fixture();
    let g = &f.sequence_logps;
    let leaf = f.leaf();
    let out = sequence_logps(leaf.clone(), f.labels());
    check("sequence_logps sum", &values(out.sum.clone()), &g.sum);
    check("sequence_logps num_tokens", &values(out.num_tokens.clone()), &g.num_tokens);
    check("sequence_logps mean_logits", &values(out.mean_logits.clone()), &g.mean_logits);
    check("sequence_logps mean_logits_all", &values(out.mean_logits_all.clone()), &g.mean_logits_all);
    check("sequence_logps entropy_sum", &values(out.entropy_sum.clone()), &g.entropy_sum);
    check("sequence_logps num_correct", &values(out.num_correct.clone()), &g.num_correct);
    let weighted = (out.sum * f.floats(&g.grad_weights)).sum();
    let grads = weighted.backward();
    check("sequence_logps grad (weighted sum)", &inner_values(leaf.grad(&grads).unwrap()), &g.grad);
}

#[test]
fn sft_losses_match_trl_and_transformers() {
    let f = fixture();
    let b = f.shape[0];
    let labels = f.full_labels().narrow(0, 0, b);
    let [_, t, v] = f.shape;
    let leaf = || Tensor::<B, 3>::from_data(TensorData::new(f.logits[..b * t * v].to_vec(), [b, t, v]), &Default::default()).require_grad();

    // Token mean: TRL SFTTrainer.compute_loss without num_items_in_batch.
    let x = leaf();
    let out = sft_loss(x.clone(), labels.clone(), Reduction::Mean);
    check("sft mean loss", &values(out.loss.clone()), &[f.sft.mean.loss]);
    check_metrics("sft mean", &out.metrics(), &f.sft.mean.metrics);
    let grads = out.loss.backward();
    check("sft mean grad", &inner_values(x.grad(&grads).unwrap()), &f.sft.mean.grad);
    // The metric-free path gives the same loss.
    let plain = causal_lm_loss(leaf(), labels.clone(), Reduction::Mean);
    check("causal_lm_loss mean", &values(plain), &[f.sft.mean.loss]);

    // Sum / num_items_in_batch: TRL SFTTrainer.compute_loss with num_items_in_batch.
    let x = leaf();
    let out = sft_loss(x.clone(), labels.clone(), Reduction::MeanOver(f.sft.num_items_in_batch));
    check("sft num_items_in_batch loss", &values(out.loss.clone()), &[f.sft.normalized.loss]);
    check_metrics("sft num_items_in_batch", &out.metrics(), &f.sft.normalized.metrics);
    let grads = out.loss.backward();
    check("sft num_items_in_batch grad", &inner_values(x.grad(&grads).unwrap()), &f.sft.normalized.grad);

    // Sum (open-instruct reduce_loss: sum): transformers ForCausalLMLoss with num_items_in_batch=1.
    let x = leaf();
    let loss = causal_lm_loss_sum(x.clone(), labels.clone());
    check("causal_lm_loss sum", &values(loss.clone()), &[f.sft.sum.loss]);
    let grads = loss.backward();
    check("causal_lm_loss sum grad", &inner_values(x.grad(&grads).unwrap()), &f.sft.sum.grad);
    let via_reduction = causal_lm_loss(leaf(), labels, Reduction::Sum);
    check("causal_lm_loss Reduction::Sum", &values(via_reduction), &[f.sft.sum.loss]);
}

#[test]
fn dpo_losses_match_trl() {
    let f = fixture();
    let b = f.shape[0];
    let mut seen = Vec::new();
    for case in &f.dpo {
        let config = DpoConfig { beta: case.beta, loss_type: case.loss_type.parse().unwrap(), label_smoothing: case.label_smoothing };
        config.validate().unwrap();
        let name = format!("dpo {} beta={} ls={}", case.loss_type, case.beta, case.label_smoothing);
        // One forward over [chosen; rejected], as TRL concatenates them, then split.
        let leaf = f.leaf();
        let (chosen, rejected) = sequence_logps(leaf.clone(), f.labels()).split_at(b);
        let out = dpo_loss(&chosen, &rejected, f.floats(&f.reference_chosen), f.floats(&f.reference_rejected), &config);
        check(&format!("{name} loss"), &values(out.loss.clone()), &[case.case.loss]);
        check_metrics(&name, &out.metrics(), &case.case.metrics);
        let grads = out.loss.backward();
        check(&format!("{name} grad"), &inner_values(leaf.grad(&grads).unwrap()), &case.case.grad);
        seen.push((case.loss_type.clone(), case.beta, case.label_smoothing));
    }
    for loss_type in ["sigmoid", "ipo", "hinge", "robust"] {
        for beta in [0.1, 0.5] {
            assert!(seen.iter().any(|(l, b, _)| l == loss_type && *b == beta), "no golden for {loss_type} beta={beta}");
        }
    }
    assert!(seen.iter().any(|(l, _, ls)| l == "robust" && *ls == 0.1), "no golden for robust with label smoothing");
}

#[test]
fn orpo_loss_matches_trl() {
    let f = fixture();
    let b = f.shape[0];
    assert!(f.orpo.iter().any(|c| c.beta == 0.1));
    for case in &f.orpo {
        let name = format!("orpo beta={}", case.beta);
        let leaf = f.leaf();
        let chosen_logits = leaf.clone().narrow(0, 0, b);
        let rejected_logits = leaf.clone().narrow(0, b, b);
        // Chosen rows: completion labels for the odds ratio, prompt+completion labels for the NLL,
        // from one logsumexp.
        let mut chosen = sequence_logps_many(chosen_logits, vec![f.labels().narrow(0, 0, b), f.full_labels().narrow(0, 0, b)]);
        let chosen_full = chosen.pop().unwrap();
        let chosen = chosen.pop().unwrap();
        let rejected = sequence_logps(rejected_logits, f.labels().narrow(0, b, b));
        let out = orpo_loss(&chosen, &rejected, chosen_full.mean_nll(), &OrpoConfig { beta: case.beta });
        check(&format!("{name} loss"), &values(out.loss.clone()), &[case.case.loss]);
        check_metrics(&name, &out.metrics(), &case.case.metrics);
        let grads = out.loss.backward();
        check(&format!("{name} grad"), &inner_values(leaf.grad(&grads).unwrap()), &case.case.grad);
    }
}
