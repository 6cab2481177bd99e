//! Behaviour that the TRL goldens do not cover: parsing and validation errors, edge cases (rows
//! without scored tokens), splitting, token counting and the metrics container.

use alignment_core::backend::CpuAutodiff;
use alignment_objectives::{
    causal_lm_loss, dpo_loss, dpo_loss_with_tails, ld_tail_labels, num_scored_tokens, orpo_loss, sequence_logps, DpoConfig, DpoLossType,
    FDivergence, Metrics, ObjectiveError, OrpoConfig, Reduction, IGNORE_INDEX,
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
    assert_eq!(
        err.to_string(),
        r#"unknown DPO loss_type "sigmoidd": expected one of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm"#
    );
    assert!(matches!(err, ObjectiveError::UnknownValue { .. }));
    for name in DpoLossType::NAMES {
        assert_eq!(name.parse::<DpoLossType>().unwrap().to_string(), name);
    }
    assert_eq!("js_divergence".parse::<FDivergence>().unwrap(), FDivergence::JsDivergence);
    assert!("kl".parse::<FDivergence>().unwrap_err().to_string().contains("reverse_kl, forward_kl"));
}
#[test]
fn unknown_reduction_is_an_error() {
    assert_eq!("sum".parse::<Reduction>().unwrap(), Reduction::Sum);
    assert_eq!("mean".parse::<Reduction>().unwrap(), Reduction::Mean);
    let err = "avg".parse::<Reduction>().unwrap_err().to_string();
    assert_eq!(err, r#"unknown reduce_loss "avg": expected one of mean, sum"#);
}

/// The recipe key a refused configuration is blamed on, and its message.
fn refused(config: &DpoConfig) -> (&'static str, String) {
    let err = config.validate().unwrap_err();
    (err.key().expect("DPO validation names the key"), err.to_string())
}

#[test]
fn dpo_config_from_recipe_names() {
    let ok = DpoConfig::default();
    assert_eq!((ok.beta, ok.losses.clone(), ok.label_smoothing), (0.1, vec![(DpoLossType::Sigmoid, 1.0)], 0.0));
    assert_eq!((ok.use_weighting, ok.ld_alpha, ok.discopop_tau, ok.f_divergence_type), (false, None, 0.05, FDivergence::ReverseKl));
    assert_eq!(DpoConfig::from_names(&["sigmoid"], None).unwrap(), ok);

    let mpo = DpoConfig::from_names(&["sigmoid", "bco_pair", "sft"], Some(&[0.8, 0.2, 1.0])).unwrap();
    assert_eq!(mpo.losses, vec![(DpoLossType::Sigmoid, 0.8), (DpoLossType::BcoPair, 0.2), (DpoLossType::Sft, 1.0)]);
    let unweighted = DpoConfig::from_names(&["ipo".to_string(), "hinge".to_string()], None).unwrap();
    assert_eq!(unweighted.losses, vec![(DpoLossType::Ipo, 1.0), (DpoLossType::Hinge, 1.0)]);

    let err = DpoConfig::from_names(&["sigmoid", "ipo"], Some(&[1.0])).unwrap_err();
    assert_eq!(err.key(), Some("loss_weights"));
    assert!(err.to_string().contains("got 1 weights for 2 loss types"), "{err}");
    let err = DpoConfig::from_names(&["sigmoid", "kto"], None).unwrap_err();
    assert_eq!(err.key(), Some("loss_type"));
    assert!(err.to_string().starts_with(r#"loss_type: unknown DPO loss_type "kto""#), "{err}");
    assert_eq!(DpoConfig::from_names::<&str>(&[], None).unwrap_err().key(), Some("loss_type"));
}

#[test]
fn dpo_config_validation_names_the_key() {
    let ok = DpoConfig::default();
    ok.validate().unwrap();
    let robust = DpoConfig::with_loss(DpoLossType::Robust);
    DpoConfig { label_smoothing: 0.1, ..robust.clone() }.validate().unwrap();
    DpoConfig { label_smoothing: 1e-3, ..DpoConfig::with_loss(DpoLossType::ExoPair) }.validate().unwrap();
    DpoConfig { label_smoothing: 0.1, ..DpoConfig::with_loss(DpoLossType::AotUnpaired) }.validate().unwrap();
    DpoConfig { discopop_tau: 0.5, ..DpoConfig::with_loss(DpoLossType::Discopop) }.validate().unwrap();
    DpoConfig { ld_alpha: Some(0.0), use_weighting: true, ..ok.clone() }.validate().unwrap();
    DpoConfig { f_divergence_type: FDivergence::AlphaDivergence, f_alpha_divergence_coef: 0.3, ..ok.clone() }.validate().unwrap();

    let cases: Vec<(DpoConfig, &str, &str)> = vec![
        (DpoConfig { beta: 0.0, ..ok.clone() }, "beta", "beta must be a positive number"),
        (DpoConfig { label_smoothing: 0.5, ..robust.clone() }, "label_smoothing", "[0, 0.5)"),
        (DpoConfig { label_smoothing: 0.1, ..ok.clone() }, "label_smoothing", "no effect on the sigmoid DPO loss"),
        (DpoConfig::with_loss(DpoLossType::ExoPair), "label_smoothing", "greater than 0"),
        (DpoConfig { losses: vec![(DpoLossType::Sigmoid, f64::NAN)], ..ok.clone() }, "loss_weights", "finite"),
        (DpoConfig { losses: vec![], ..ok.clone() }, "loss_type", "no loss type"),
        (DpoConfig { use_weighting: true, ..DpoConfig::with_loss(DpoLossType::Aot) }, "use_weighting", "sort samples"),
        (DpoConfig { use_weighting: true, ..DpoConfig::with_loss(DpoLossType::Hinge) }, "use_weighting", "fails inside TRL 1.16"),
        (DpoConfig { ld_alpha: Some(1.5), ..ok.clone() }, "ld_alpha", "[0, 1]"),
        (DpoConfig { discopop_tau: 0.0, ..DpoConfig::with_loss(DpoLossType::Discopop) }, "discopop_tau", "positive"),
        (DpoConfig { discopop_tau: 0.1, ..ok.clone() }, "discopop_tau", "no effect without the discopop"),
        (
            DpoConfig { f_divergence_type: FDivergence::ForwardKl, ..DpoConfig::with_loss(DpoLossType::BcoPair) },
            "f_divergence_type",
            "bco_pair",
        ),
        (DpoConfig { f_alpha_divergence_coef: 0.7, ..ok.clone() }, "f_alpha_divergence_coef", "no effect"),
    ];
    for (config, key, message) in cases {
        let (got_key, got) = refused(&config);
        assert_eq!(got_key, key, "{config:?}: {got}");
        assert!(got.starts_with(&format!("{key}: ")) && got.contains(message), "{config:?}: {got}");
    }
    assert!(OrpoConfig { beta: f64::NAN }.validate().is_err());
    OrpoConfig::default().validate().unwrap();
}

#[test]
fn ld_tail_labels_keep_the_tokens_past_the_shared_length() {
    let i = IGNORE_INDEX;
    // Pair 0: chosen scores 3 tokens, rejected 1; pair 1: chosen 1, rejected 2.
    let l = labels(&[&[i, 5, 6, 7], &[i, i, 4, i], &[i, i, 8, i], &[2, i, 3, 1]]);
    let tails: Vec<i64> = ld_tail_labels(l).into_data().iter::<i64>().collect();
    assert_eq!(tails, vec![i, i, 6, 7, i, i, i, i, i, i, i, i, i, i, i, 1]);
}

#[test]
fn ld_alpha_one_and_the_full_sft_mixture_reduce_to_plain_losses() {
    let x = logits(4, 4, 5);
    let i = IGNORE_INDEX;
    let l = labels(&[&[i, 1, 2, 3], &[i, 4, i, i], &[i, 0, 1, i], &[i, 2, 3, 4]]);
    let tail_labels = ld_tail_labels(l.clone());
    let (chosen, rejected) = sequence_logps(x.clone(), l).split_at(2);
    let (tail_c, tail_r) = sequence_logps(x, tail_labels).split_at(2);
    let reference = || Tensor::<B, 1>::from_floats([-4.0, -5.0], &Default::default());
    let plain = dpo_loss(&chosen, &rejected, reference(), reference(), &DpoConfig::default());
    let ld_one = DpoConfig { ld_alpha: Some(1.0), ..DpoConfig::default() };
    let ld = dpo_loss_with_tails(&chosen, &rejected, Some((&tail_c, &tail_r)), reference(), reference(), &ld_one);
    assert!((values(plain.loss.clone())[0] - values(ld.loss)[0]).abs() < 1e-6);
    // A weighted list is the weighted sum of its parts.
    let mixed = DpoConfig::from_names(&["sigmoid", "sft"], Some(&[0.5, 2.0])).unwrap();
    let sft = dpo_loss(&chosen, &rejected, reference(), reference(), &DpoConfig::with_loss(DpoLossType::Sft));
    let both = dpo_loss(&chosen, &rejected, reference(), reference(), &mixed);
    let want = 0.5 * values(plain.loss)[0] + 2.0 * values(sft.loss)[0];
    assert!((values(both.loss)[0] - want).abs() < 1e-6);
    assert_eq!(values(sft.losses.clone())[0], values(sft.losses)[1], "sft is one batch value per pair");
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
