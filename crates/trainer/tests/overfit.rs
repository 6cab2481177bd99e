//! End-to-end gradient flow: the tiny Llama fixture, trained with our AdamW on one batch with a
//! next-token cross-entropy, drives its loss down (backward through embedding, RoPE, GQA
//! attention with masks, RMSNorm and the gated MLP on the autodiff CPU backend).

use alignment_core::backend::CpuAutodiff;
use alignment_models::{load_pretrained, Batch};
use alignment_trainer::optimizer::{AdamW, AdamWConfig};
use burn::optim::GradientsParams;
use burn::tensor::{activation::log_softmax, Int, Tensor, TensorData};
use std::path::PathBuf;

#[test]
fn tiny_llama_overfits_one_batch() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-llama");
    let device = Default::default();
    let mut model = load_pretrained::<CpuAutodiff>(&dir, &device).unwrap();
    let rows: Vec<Vec<u32>> = vec![(0..16).map(|i| (i * 7 + 3) % 256).collect(), (0..16).map(|i| (i * 11 + 5) % 256).collect()];
    let batch = Batch::from_ids(rows.clone());
    let targets: Vec<i64> = rows.iter().flat_map(|r| r[1..].iter().map(|&t| t as i64)).collect();
    let targets = Tensor::<CpuAutodiff, 2, Int>::from_data(TensorData::new(targets, [2 * 15, 1]), &device);
    let mut optimizer = AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() });
    let mut losses = Vec::new();
    for _ in 0..30 {
        let logits = model.forward(&batch, None);
        let [b, t, v] = logits.dims();
        let logits = logits.slice([0..b, 0..t - 1, 0..v]).reshape([b * (t - 1), v]);
        let loss = -log_softmax(logits, 1).gather(1, targets.clone()).mean();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads).0;
    }
    println!("loss: first {} last {}", losses[0], losses[losses.len() - 1]);
    assert!(losses[0] > 5.0, "random init should be near ln(256) = 5.55");
    assert!(losses[losses.len() - 1] < 1.0, "{losses:?}");
}
