//! Parity with TRL 1.16.0 / transformers 5.24.0 / torch 2.9.1: losses, every logged metric and the
//! gradient w.r.t. the policy logits (DPO: w.r.t. the policy's per-token log-probs), on the CPU
//! autodiff backend, to 1e-5 (max abs; relative for DPO values above 1).
//!
//! Fixtures: `tests/fixtures/objectives.json` and `tests/fixtures/dpo.json`, written by
//! `scripts/make_objective_goldens.py`, which calls TRL's own `SFTTrainer.compute_loss`,
//! `DPOTrainer._compute_loss` (every `loss_type`, lists with `loss_weights`, `use_weighting`,
//! `ld_alpha`, the f-divergences), `DPOTrainer.compute_ref_log_probs` and
//! `ORPOTrainer.get_batch_loss_metrics` (see its docstring). Inputs: logits `[2·3, 7, 11]`
//! (three chosen rows, then three rejected rows) with prompt prefixes and padding masked by
//! `-100`, and precomputed reference log-probs.

use alignment_core::backend::CpuAutodiff;
use alignment_objectives::{
    causal_lm_loss, causal_lm_loss_sum, dpo_loss_with_tails, ld_tail_labels, orpo_loss, sequence_logps, sequence_logps_many,
    sequence_logps_with, sft_loss, DpoConfig, DpoLossType, ExtraStats, Metrics, OrpoConfig, Reduction, SequenceLogps,
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
struct DpoFixture {
    versions: BTreeMap<String, String>,
    cases: Vec<DpoCase>,
    use_weighting_fails: BTreeMap<String, String>,
    reference_logits: Vec<f32>,
    reference_ld: Vec<ReferenceLd>,
}

#[derive(Deserialize)]
struct DpoCase {
    loss_type: Vec<String>,
    beta: f64,
    label_smoothing: f64,
    loss_weights: Option<Vec<f64>>,
    use_weighting: bool,
    ld_alpha: Option<f64>,
    discopop_tau: f64,
    f_divergence_type: String,
    f_alpha_divergence_coef: f64,
    loss: f64,
    metrics: BTreeMap<String, f64>,
    /// `[2B, T-1]`: position `t` is the log-prob of token `t + 1`; 0 where nothing is scored.
    grad_per_token_logps: Vec<f64>,
}

#[derive(Deserialize)]
struct ReferenceLd {
    ld_alpha: Option<f64>,
    chosen: Vec<f64>,
    rejected: Vec<f64>,
}

impl DpoCase {
    fn name(&self) -> String {
        let mut name = format!("dpo {:?} beta={}", self.loss_type, self.beta);
        for (key, value, default) in [
            ("ls", self.label_smoothing, 0.0),
            ("tau", self.discopop_tau, 0.05),
            ("f_alpha", self.f_alpha_divergence_coef, 0.5),
            ("ld_alpha", self.ld_alpha.unwrap_or(-1.0), -1.0),
        ] {
            if value != default {
                name += &format!(" {key}={value}");
            }
        }
        if let Some(w) = &self.loss_weights {
            name += &format!(" weights={w:?}");
        }
        if self.use_weighting {
            name += " wpo";
        }
        if self.f_divergence_type != "reverse_kl" {
            name += &format!(" {}", self.f_divergence_type);
        }
        name
    }

    fn config(&self) -> DpoConfig {
        DpoConfig {
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            use_weighting: self.use_weighting,
            ld_alpha: self.ld_alpha,
            discopop_tau: self.discopop_tau,
            f_divergence_type: self.f_divergence_type.parse().unwrap(),
            f_alpha_divergence_coef: self.f_alpha_divergence_coef,
            ..DpoConfig::from_names(&self.loss_type, self.loss_weights.as_deref()).unwrap()
        }
    }
}

#[derive(Deserialize)]
struct OrpoCase {
    beta: f64,
    #[serde(flatten)]
    case: LossCase,
}

fn dpo_fixture() -> DpoFixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dpo.json");
    let text = std::fs::read_to_string(path).expect("read the DPO fixture");
    let fixture: DpoFixture = serde_json::from_str(&text).expect("parse the DPO fixture");
    assert_eq!(fixture.versions.get("trl").map(String::as_str), Some("1.16.0"));
    fixture
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

/// `|got − want| ≤ TOL · max(1, |want|)` for every value, asserted, and printed.
fn check_relative(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, golden has {}", got.len(), want.len());
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0f64, f64::max);
    assert!(worst.is_finite() && worst <= TOL, "{what}: differs by {worst:e} (relative above 1)\n got  {got:?}\n want {want:?}");
    println!("{what:<72} max diff {worst:.2e}");
}

/// The scored positions of `labels` after the shift, `[rows][seq - 1]`: 1 where label `t + 1` counts.
fn shifted_masks(labels: Tensor<B, 2, Int>) -> Vec<Vec<f64>> {
    let [rows, seq] = labels.dims();
    let values: Vec<i64> = labels.into_data().iter::<i64>().collect();
    (0..rows).map(|r| (1..seq).map(|t| if values[r * seq + t] == -100 { 0.0 } else { 1.0 }).collect()).collect()
}

/// `logps` with its `sum` replaced by a leaf that tracks gradients (what the chunked training
/// step does: the objective differentiates the per-row sums only).
fn with_leaf_sum(logps: SequenceLogps<B>) -> (SequenceLogps<B>, Tensor<B, 1>) {
    let leaf = logps.sum.clone().detach().require_grad();
    (SequenceLogps { sum: leaf.clone(), ..logps }, leaf)
}

#[test]
fn dpo_losses_match_trl() {
    let f = fixture();
    let golden = dpo_fixture();
    let b = f.shape[0];
    let mut seen: Vec<&DpoCase> = Vec::new();
    for case in &golden.cases {
        let config = case.config();
        config.validate().unwrap_or_else(|e| panic!("{}: {e}", case.name()));
        let name = case.name();
        // One forward over [chosen; rejected], as TRL concatenates them; LD-DPO scores the tail
        // tokens as a second label set, WPO asks for log Σ p².
        let mut label_sets = vec![f.labels()];
        if config.ld_alpha.is_some() {
            label_sets.push(ld_tail_labels(f.labels()));
        }
        let masks: Vec<Vec<Vec<f64>>> = label_sets.iter().map(|l| shifted_masks(l.clone())).collect();
        let extra = ExtraStats { log_sum_sq_probs: config.needs_log_sum_sq_probs() };
        let (scored, leaves): (Vec<_>, Vec<_>) = sequence_logps_with(f.leaf(), label_sets, extra).into_iter().map(with_leaf_sum).unzip();
        let halves: Vec<(SequenceLogps<B>, SequenceLogps<B>)> = scored.into_iter().map(|s| s.split_at(b)).collect();
        let (chosen, rejected) = &halves[0];
        let tails = halves.get(1).map(|(c, r)| (c, r));
        let out = dpo_loss_with_tails(chosen, rejected, tails, f.floats(&f.reference_chosen), f.floats(&f.reference_rejected), &config);
        check_relative(&format!("{name} loss"), &values(out.loss.clone()), &[case.loss]);
        let metrics = out.metrics();
        let expected: Vec<&str> = case.metrics.keys().map(String::as_str).filter(|k| *k != "num_tokens").collect();
        let mut names: Vec<&str> = metrics.iter().map(|(n, _)| n).collect();
        names.sort_unstable();
        assert_eq!(names, expected, "{name}: metric names differ from TRL's");
        let got: Vec<f64> = expected.iter().map(|n| metrics.get(n).unwrap()).collect();
        let want: Vec<f64> = expected.iter().map(|n| case.metrics[*n]).collect();
        check_relative(&format!("{name} metrics ({})", expected.len()), &got, &want);
        // ∂loss/∂(token log-prob) = Σ over the label sets scoring it of ∂loss/∂(its row's sum).
        let grads = out.loss.backward();
        let row_grads: Vec<Vec<f64>> =
            leaves.iter().map(|l| l.grad(&grads).map_or(vec![0.0; 2 * b], |g| g.into_data().iter::<f64>().collect())).collect();
        let per_token: Vec<f64> = (0..2 * b)
            .flat_map(|r| {
                let (masks, row_grads) = (&masks, &row_grads);
                (0..f.shape[1] - 1).map(move |t| (0..masks.len()).map(|s| row_grads[s][r] * masks[s][r][t]).sum::<f64>())
            })
            .collect();
        check_relative(&format!("{name} grad"), &per_token, &case.grad_per_token_logps);
        seen.push(case);
    }
    // Coverage: every loss type at both betas, the list form, WPO, LD-DPO, the f-divergences.
    for loss_type in DpoLossType::NAMES {
        for beta in [0.1, 0.5] {
            assert!(seen.iter().any(|c| c.loss_type == [loss_type] && c.beta == beta), "no golden for {loss_type} beta={beta}");
        }
    }
    assert!(seen.iter().any(|c| c.loss_type.len() > 1 && c.loss_weights.is_some()));
    assert!(seen.iter().any(|c| c.loss_type.len() > 1 && c.loss_weights.is_none()));
    assert!(seen.iter().any(|c| c.use_weighting) && seen.iter().any(|c| c.ld_alpha == Some(0.0)));
    for divergence in ["forward_kl", "js_divergence", "alpha_divergence"] {
        assert!(seen.iter().any(|c| c.f_divergence_type == divergence), "no golden for {divergence}");
    }
}

#[test]
fn dpo_refuses_what_trl_fails_on() {
    let golden = dpo_fixture();
    // WPO with each loss type: refused exactly where TRL raises (aot, aot_unpaired) or fails
    // in autograd (recorded by the golden script).
    for loss_type in DpoLossType::ALL {
        let label_smoothing = if loss_type == DpoLossType::ExoPair { 1e-3 } else { 0.0 };
        let config = DpoConfig { use_weighting: true, label_smoothing, ..DpoConfig::with_loss(loss_type) };
        let trl_fails =
            golden.use_weighting_fails.contains_key(loss_type.as_str()) || matches!(loss_type, DpoLossType::Aot | DpoLossType::AotUnpaired);
        match config.validate() {
            Ok(()) => assert!(!trl_fails, "{loss_type} with use_weighting fails in TRL but was accepted"),
            Err(e) => {
                assert!(trl_fails, "{loss_type} with use_weighting works in TRL but was refused: {e}");
                assert_eq!(e.key(), Some("use_weighting"));
            }
        }
    }
}

#[test]
fn ld_dpo_reference_logps_match_trl() {
    let f = fixture();
    let golden = dpo_fixture();
    let [rows, t, v] = [f.rows(), f.shape[1], f.shape[2]];
    let logits = Tensor::<B, 3>::from_data(TensorData::new(golden.reference_logits.clone(), [rows, t, v]), &Default::default());
    let mut scored = sequence_logps_many(logits, vec![f.labels(), ld_tail_labels(f.labels())]);
    let tail = scored.pop().unwrap().sum;
    let sum = scored.pop().unwrap().sum;
    assert!(golden.reference_ld.iter().any(|r| r.ld_alpha.is_none()) && golden.reference_ld.iter().any(|r| r.ld_alpha == Some(0.0)));
    for reference in &golden.reference_ld {
        let config = DpoConfig { ld_alpha: reference.ld_alpha, ..DpoConfig::default() };
        let logps = values(config.ld_logps(sum.clone(), Some(tail.clone())));
        let want: Vec<f64> = reference.chosen.iter().chain(&reference.rejected).copied().collect();
        check_relative(&format!("reference logps ld_alpha={:?}", reference.ld_alpha), &logps, &want);
        // The host-side form the trainer applies to precomputed values.
        let (sums, tails) = (values(sum.clone()), values(tail.clone()));
        let host: Vec<f64> = sums.iter().zip(&tails).map(|(s, t)| config.ld_logp(*s, *t)).collect();
        check_relative(&format!("reference logps ld_alpha={:?} (f64)", reference.ld_alpha), &host, &want);
    }
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
