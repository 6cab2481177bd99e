//! ZeRO-3's partitioned weights inside one process (a world of one): the model with its
//! embedding and projections held as `ShardedWeight`s computes the dense model's loss, hands
//! each of them the dense model's weight gradient through the recorded backward steps (the
//! norms keep their usual gradients), and gathers back to the same weights. The multi-rank
//! behaviour (halves, collectives inside the passes) is in data_parallel.rs.

use crate::common;

use alignment_core::backend::CpuAutodiff;
use alignment_distributed::LocalCommunicator;
use alignment_models::load_pretrained;
use alignment_trainer::zero3::{gathered, partition, Group};
use alignment_trainer::Task;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use common::{examples, fixture, task};
use std::sync::Arc;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn partitioned_weights_get_the_dense_gradients_and_gather_back() {
    let device = Default::default();
    let dense = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let group = Arc::new(Group::new(Box::new(LocalCommunicator::new())));
    let (sharded, weights) = partition(dense.clone(), &group).unwrap();
    assert_eq!(weights.len(), 1 + 7 * dense.layers.len() + usize::from(dense.lm_head.is_some()));
    assert_eq!(sharded.embed_tokens.dims(), [0, 0], "the dense embedding is gone");
    for layer in &sharded.layers {
        for (name, linear) in layer.linears() {
            assert_eq!(linear.weight.dims(), [0, 0], "{name}: the dense parameter is gone");
            assert!(linear.compressed.is_some(), "{name}");
        }
    }

    let data = examples(3);
    let batch: Vec<_> = data.iter().collect();
    let sft = task();
    let (dense_loss, _) = sft.loss(&dense, &batch, &device);
    let (sharded_loss, _) = sft.loss(&sharded, &batch, &device);
    let (dense_loss, sharded_loss) = (values(dense_loss.clone())[0], values(sharded_loss.clone())[0]);
    assert!((dense_loss - sharded_loss).abs() <= 1e-6 * dense_loss.abs(), "{dense_loss} vs {sharded_loss}");

    let dense_grads = sft.loss(&dense, &batch, &device).0.backward();
    let sharded_grads = sft.loss(&sharded, &batch, &device).0.backward();
    group.check().unwrap();
    let dense_linears = dense.layers.iter().flat_map(|l| l.linears().map(|(_, linear)| values(linear.weight.grad(&dense_grads).unwrap())));
    // The embedding first (tied: its gradient sums the lookup's and the head's).
    let dense_weights = std::iter::once(values(dense.embed_tokens.grad(&dense_grads).unwrap())).chain(dense_linears);
    let mut worst = 0.0f32;
    for (weight, expected) in weights.iter().zip(dense_weights) {
        let got = values(weight.take_gradient());
        let scale = expected.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let diff = max_abs_difference(&expected, &got);
        worst = worst.max(diff / scale);
        assert!(diff <= 1e-5 * scale, "{}: ∂W differs by {diff:e} (largest {scale:e})", weight.path);
        assert!(values(weight.take_gradient()).iter().all(|&g| g == 0.0), "taking the gradient resets it");
    }
    println!("largest ∂W difference relative to the largest entry: {worst:.2e}");
    // The norms stay ordinary parameters with ordinary gradients.
    let norm = |m: &alignment_models::CausalLm<CpuAutodiff>, g| values(m.norm.weight.grad(g).unwrap());
    let diff = max_abs_difference(&norm(&dense, &dense_grads), &norm(&sharded, &sharded_grads));
    assert!(diff <= 1e-6, "final norm gradient differs by {diff:e}");

    let whole = gathered(&sharded.valid(), &weights, &group).unwrap();
    let digest = |m: &alignment_models::CausalLm<_>| {
        alignment_models::pretrained::named_tensors(m).into_iter().map(|t| (t.name, t.values)).collect::<Vec<_>>()
    };
    assert!(digest(&whole) == digest(&dense.valid()), "gathering gives back the exact weights");
}

/// With LoRA the base is frozen: it is partitioned all the same (only gathered, no gradient is
/// computed for it), and the adapters get the dense model's gradients.
#[test]
fn a_frozen_lora_base_is_partitioned_and_adapters_get_the_dense_gradients() {
    use alignment_models::compressed::CompressedWeight;
    use alignment_peft::{apply_lora, LoraConfig, TargetModules};
    let device = Default::default();
    let lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    let dense = apply_lora(load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap(), &lora, 0).unwrap();
    let group = Arc::new(Group::new(Box::new(LocalCommunicator::new())));
    let (sharded, weights) = partition(dense.clone(), &group).unwrap();
    assert_eq!(weights.len(), 1 + 7 * dense.layers.len() + usize::from(dense.lm_head.is_some()));
    assert!(weights.iter().all(|w| !w.is_trainable()), "the base is frozen");

    let data = examples(3);
    let batch: Vec<_> = data.iter().collect();
    let dense_grads = task().loss(&dense, &batch, &device).0.backward();
    let sharded_grads = task().loss(&sharded, &batch, &device).0.backward();
    group.check().unwrap();
    let adapters = |m: &alignment_models::CausalLm<CpuAutodiff>, g| -> Vec<Vec<f32>> {
        m.layers
            .iter()
            .flat_map(|l| l.linears().map(|(_, linear)| linear.lora.as_ref().unwrap()))
            .flat_map(|a| [values(a.a.grad(g).unwrap()), values(a.b.grad(g).unwrap())])
            .collect()
    };
    let (expected, got) = (adapters(&dense, &dense_grads), adapters(&sharded, &sharded_grads));
    assert_eq!(expected.len(), 2 * 7 * dense.layers.len());
    for (e, g) in expected.iter().zip(&got) {
        let scale = e.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(max_abs_difference(e, g) <= 1e-5 * scale.max(1e-12), "adapter gradient differs");
    }
    let whole = gathered(&sharded.valid(), &weights, &group).unwrap();
    assert!(
        !whole.embed_tokens.is_require_grad() && !whole.layers[0].self_attn.q_proj.weight.is_require_grad(),
        "gathered weights stay frozen"
    );
}
