//! AdamW (and RMSprop) + global-norm clipping against torch.optim.AdamW / torch.optim.RMSprop
//! and clip_grad_norm_ (golden values from scripts/make_optimizer_goldens.py), including the
//! no-decay rule for norm weights.

use alignment_core::backend::CpuAutodiff;
use alignment_trainer::optimizer::{AdamW, AdamWConfig, UpdateRule};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use serde_json::Value;

#[derive(Module, Debug)]
struct Toy<B: Backend> {
    proj: Param<Tensor<B, 2>>,
    norm: Param<Tensor<B, 1>>,
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn adamw_with_clipping_matches_torch() {
    check_against_torch(include_str!("fixtures/adamw.json"), UpdateRule::AdamW);
}

#[test]
fn rmsprop_with_clipping_matches_torch() {
    check_against_torch(include_str!("fixtures/rmsprop.json"), UpdateRule::RmsProp);
    assert_eq!(UpdateRule::from_optim("rmsprop").unwrap(), UpdateRule::RmsProp);
    assert_eq!(UpdateRule::from_optim("paged_adamw_32bit").unwrap(), UpdateRule::AdamW);
    for name in ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"] {
        assert_eq!(UpdateRule::from_optim(name).unwrap(), UpdateRule::AdamW8bit, "{name}");
    }
    let eight_bit = UpdateRule::from_optim("lion_8bit").unwrap_err();
    assert!(eight_bit.contains("lion_8bit") && eight_bit.contains("8-bit"), "{eight_bit}");
}

fn check_against_torch(golden: &str, rule: UpdateRule) {
    let golden: Value = serde_json::from_str(golden).unwrap();
    let device = Default::default();
    let init = &golden["init"];
    let t2 = |v: &Value, shape: [usize; 2]| Tensor::<CpuAutodiff, 2>::from_data(TensorData::new(floats(v), shape), &device);
    let t1 = |v: &Value| Tensor::<CpuAutodiff, 1>::from_data(TensorData::new(floats(v), [4]), &device);
    let mut model = Toy { proj: Param::from_tensor(t2(&init["proj"], [3, 4])), norm: Param::from_tensor(t1(&init["norm"])) };
    let (x, y) = (t2(&init["x"], [2, 4]), t1(&init["y"]));
    let config = AdamWConfig {
        weight_decay: golden["weight_decay"].as_f64().unwrap(),
        max_grad_norm: golden["max_grad_norm"].as_f64(),
        rule,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(config);
    for (i, step) in golden["steps"].as_array().unwrap().iter().enumerate() {
        let out = x.clone().matmul(model.proj.val().transpose());
        let loss = out.square().sum() + (model.norm.val() * y.clone()).sum();
        let loss_value: f32 = loss.clone().into_scalar();
        assert!((loss_value - step["loss"].as_f64().unwrap() as f32).abs() < 1e-4, "step {i} loss");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (updated, report) = optimizer.step(step["lr"].as_f64().unwrap(), model, grads);
        let report = report.read();
        model = updated;
        let expected_norm = step["grad_norm"].as_f64().unwrap();
        assert!((report.grad_norm - expected_norm).abs() < 1e-4 * expected_norm, "step {i} grad norm");
        assert!(report.clip_coef < 1.0, "the fixture is meant to exercise clipping");
        for (name, ours, theirs) in [
            ("proj", model.proj.val().into_data().into_vec::<f32>().unwrap(), floats(&step["proj"])),
            ("norm", model.norm.val().into_data().into_vec::<f32>().unwrap(), floats(&step["norm"])),
        ] {
            let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-6, "step {i} {name}: max diff {diff}");
        }
    }
}

#[test]
fn decay_exclusion_follows_transformers() {
    use alignment_trainer::optimizer::excluded_from_decay;
    assert!(excluded_from_decay("layers.0.input_layernorm.weight"));
    assert!(excluded_from_decay("norm.weight"));
    assert!(excluded_from_decay("layers.3.self_attn.q_proj.bias"));
    assert!(!excluded_from_decay("layers.0.self_attn.q_proj.weight"));
    assert!(!excluded_from_decay("embed_tokens"));
}
