//! Behaviour that the TRL goldens do not cover: parsing and validation errors, edge cases (rows
//! without scored tokens), splitting, token counting and the metrics container.

use alignment_core::backend::CpuAutodiff;
use alignment_objectives::{
    causal_lm_loss, dpo_loss, num_scored_tokens, orpo_loss, sequence_logps, DpoConfig, DpoLossType, Metrics, ObjectiveError, OrpoConfig,
    Reduction, IGNORE_INDEX,
};
use burn::tensor::{Int, Tensor, TensorData};

type B = CpuAutodiff;

fn logits(b: usize, t: usize, v: usize) -> Tensor<B, 3> {
    let data: Vec<f32> = (0..b * t * v).map(|i| ((i as f32) * 0.61).sin() * 2.0).collect();
    Tensor::from_data(TensorData::new(data, [b, t, v]), &Default::default()).require_grad()
}

fn labels(rows: &[&[i64]]) -> Tensor<B, 2, Int> {
    let t = rows[0].len();
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), t]), &Default::default())
}

fn values(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

#[test]
fn unknown_dpo_loss_type_lists_the_valid_ones() {
    let err = "sigmoidd".parse::<DpoLossType>().unwrap_err();
    assert_eq!(err.to_string(), r#"unknown DPO loss_type "sigmoidd": expected one of sigmoid, ipo, hinge, robust"#);
    // TRL has more loss types; the ones not implemented here are refused the same way.
    assert!(matches!("exo_pair".parse::<DpoLossType>(), Err(ObjectiveError::UnknownValue { .. })));
    for name in DpoLossType::NAMES {
        assert_eq!(name.parse::<DpoLossType>().unwrap().to_string(), name);
    }
}

#[test]
fn unknown_reduction_is_an_error() {
    assert_eq!("sum".parse::<Reduction>().unwrap(), Reduction::Sum);
    assert_eq!("mean".parse::<Reduction>().unwrap(), Reduction::Mean);
    let err = "avg".parse::<Reduction>().unwrap_err().to_string();
    assert_eq!(err, r#"unknown reduce_loss "avg": expected one of mean, sum"#);
}

#[test]
fn dpo_config_validation() {
    let ok = DpoConfig::default();
    assert_eq!((ok.beta, ok.loss_type, ok.label_smoothing), (0.1, DpoLossType::Sigmoid, 0.0));
    ok.validate().unwrap();
    DpoConfig { loss_type: DpoLossType::Robust, label_smoothing: 0.1, ..ok }.validate().unwrap();

    let err = DpoConfig { loss_type: DpoLossType::Robust, label_smoothing: 0.5, ..ok }.validate().unwrap_err();
    assert!(err.to_string().contains("[0, 0.5)"), "{err}");
    let err = DpoConfig { label_smoothing: 0.1, ..ok }.validate().unwrap_err();
    assert!(err.to_string().contains("no effect on the sigmoid DPO loss"), "{err}");
    let err = DpoConfig { beta: 0.0, ..ok }.validate().unwrap_err();
    assert!(err.to_string().contains("beta must be a positive number"), "{err}");
    assert!(OrpoConfig { beta: f64::NAN }.validate().is_err());
    OrpoConfig::default().validate().unwrap();
}

#[test]
fn rows_without_scored_tokens_give_zero_not_nan() {
    let x = logits(2, 4, 5);
    let all_ignored = labels(&[&[IGNORE_INDEX; 4], &[IGNORE_INDEX; 4]]);
    let out = sequence_logps(x.clone(), all_ignored.clone());
    assert_eq!(values(out.sum.clone()), vec![0.0, 0.0]);
    assert_eq!(values(out.mean()), vec![0.0, 0.0]);
    assert_eq!(values(out.mean_logits.clone()), vec![0.0, 0.0]);
    let loss = causal_lm_loss(x.clone(), all_ignored, Reduction::Mean);
    assert_eq!(values(loss.clone()), vec![0.0]);
    let grads = loss.backward();
    let grad: Vec<f64> = x.grad(&grads).unwrap().into_data().iter::<f64>().collect();
    assert!(grad.iter().all(|g| *g == 0.0), "no scored token, no gradient");

    // A label in the first position is never scored (nothing predicts it).
    let first_only = labels(&[&[3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]);
    assert_eq!(num_scored_tokens(&first_only), 0);
    let single_position = sequence_logps(logits(1, 1, 5), labels(&[&[2]]));
    assert_eq!(values(single_position.num_tokens), vec![0.0]);
}

#[test]
fn shift_scores_label_t_plus_one_with_logits_t() {
    // Logits favour token (t + 1) % 5 at position t, strongly; labels follow that pattern.
    let (t, v) = (4, 5);
    let mut data = vec![0.0f32; t * v];
    for pos in 0..t {
        data[pos * v + (pos + 1) % v] = 20.0;
    }
    let x = Tensor::<B, 3>::from_data(TensorData::new(data, [1, t, v]), &Default::default());
    let good = sequence_logps(x.clone(), labels(&[&[IGNORE_INDEX, 1, 2, 3]]));
    let bad = sequence_logps(x, labels(&[&[IGNORE_INDEX, 0, 1, 2]]));
    assert!(values(good.sum.clone())[0] > -1e-6, "{:?}", values(good.sum));
    assert!(values(bad.sum)[0] < -50.0);
    assert_eq!(values(good.num_correct), vec![3.0]);
    assert_eq!(values(good.num_tokens), vec![3.0]);
}

#[test]
fn split_at_and_token_counts() {
    let x = logits(3, 4, 5);
    let l = labels(&[&[IGNORE_INDEX, 1, 2, 3], &[IGNORE_INDEX, IGNORE_INDEX, 4, IGNORE_INDEX], &[0, 1, 2, 3]]);
    assert_eq!(num_scored_tokens(&l), 3 + 1 + 3);
    let all = sequence_logps(x, l);
    let sums = values(all.sum.clone());
    let (head, tail) = all.split_at(1);
    assert_eq!(values(head.sum), sums[..1].to_vec());
    assert_eq!(values(tail.sum), sums[1..].to_vec());
    assert_eq!(values(tail.num_tokens), vec![1.0, 3.0]);
}

#[test]
fn reference_log_probs_get_no_gradient_and_rewards_are_detached() {
    let x = logits(2, 4, 5);
    let l = labels(&[&[IGNORE_INDEX, 1, 2, 3], &[IGNORE_INDEX, 4, 0, 1]]);
    let (chosen, rejected) = sequence_logps(x.clone(), l).split_at(1);
    let reference = Tensor::<B, 1>::from_floats([-4.0], &Default::default()).require_grad();
    let out = dpo_loss(&chosen, &rejected, reference.clone(), reference.clone(), &DpoConfig::default());
    assert_eq!(out.losses.dims(), [1]);
    let grads = out.loss.backward();
    assert!(reference.grad(&grads).is_none(), "the reference is a constant");
    assert!(x.grad(&grads).is_some());
    // Sigmoid DPO at a zero margin is log 2.
    let zero = dpo_loss(&chosen, &chosen, reference.clone(), reference, &DpoConfig::default());
    assert!((values(zero.loss)[0] - std::f64::consts::LN_2).abs() < 1e-6);
}

#[test]
fn orpo_without_odds_term_is_the_nll() {
    let x = logits(2, 4, 5);
    let l = labels(&[&[IGNORE_INDEX, 1, 2, 3], &[IGNORE_INDEX, 4, 0, 1]]);
    let (chosen, rejected) = sequence_logps(x, l).split_at(1);
    let nll = chosen.mean_nll();
    let out = orpo_loss(&chosen, &rejected, nll.clone(), &OrpoConfig { beta: 0.0 });
    assert_eq!(values(out.loss.clone()), values(nll));
    let metrics = out.metrics();
    assert_eq!(metrics.get("rewards/chosen"), Some(0.0));
    assert!(metrics.get("log_odds_chosen").unwrap().is_finite());
}

#[test]
fn metrics_keep_order_merge_and_average() {
    let a = Metrics::new().with("loss", 1.0).with("rewards/chosen", 2.0);
    let b = Metrics::new().with("loss", 3.0).with("grad_norm", 5.0);
    let mean = Metrics::mean(&[a.clone(), b.clone()]);
    assert_eq!(mean.iter().collect::<Vec<_>>(), vec![("loss", 2.0), ("rewards/chosen", 2.0), ("grad_norm", 5.0)]);

    let mut merged = a.clone();
    merged.merge(&b);
    assert_eq!(merged.iter().collect::<Vec<_>>(), vec![("loss", 3.0), ("rewards/chosen", 2.0), ("grad_norm", 5.0)]);
    assert_eq!(merged.len(), 3);

    let json = serde_json::to_string(&a.with_prefix("eval_").with("nan", f64::NAN)).unwrap();
    assert_eq!(json, r#"{"eval_loss":1.0,"eval_rewards/chosen":2.0,"nan":null}"#);
    assert!(Metrics::mean(&[]).is_empty());
}
