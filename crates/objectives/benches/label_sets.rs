//! ORPO's scoring of two label sets over one batch of logits, forward and backward, on the CPU:
//! the recorded step (`sequence_logps_many`: one logsumexp, one backward pass writing the
//! softmax's gradient over the logits) against burn's composed operations, which ORPO ran before
//! (the logits cast whole, a differentiable logsumexp that keeps `exp(z − max)`, a gather per
//! label set, each gather's gradient scattered into its own logits-sized zeros).
//!
//! Both compute `∂/∂z Σₖ Σ log pᵏ` and TRL's per-position statistics (mean logit, entropy,
//! argmax: `logprobs::position_stats`' tensor operations, in the same runs of 2²⁴ values), and
//! read back one value of each so that all is computed. Criterion's "elements" are logits.
//!
//! `cargo bench -p alignment-objectives --bench label_sets -- --warm-up-time 1 --measurement-time 10`
//!
//! Peak memory of one variant (the bench binary under scripts/peak_heap.sh, filtered to it):
//! `bash scripts/peak_heap.sh target/release/deps/label_sets-* --bench composed` (or `recorded`).

use alignment_objectives::sequence_logps_many;
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

type B = Autodiff<NdArray<f32>>;

/// Chosen and rejected rows of 512 positions over a 32k vocabulary (Mistral's, Llama 2's).
const ROWS: usize = 4;
const SEQ: usize = 512;
const VOCAB: usize = 32_000;

/// ORPO's two label sets: the completion (the second half of each row), and prompt with
/// completion (every position).
fn label_sets(device: &burn::backend::ndarray::NdArrayDevice) -> Vec<Tensor<B, 2, Int>> {
    let ids: Vec<i64> = (0..ROWS * SEQ).map(|i| ((i * 7919 + 13) % VOCAB) as i64).collect();
    let completion: Vec<i64> = ids.iter().enumerate().map(|(i, &id)| if i % SEQ < SEQ / 2 { -100 } else { id }).collect();
    [completion, ids].into_iter().map(|l| Tensor::from_data(TensorData::new(l, [ROWS, SEQ]), device)).collect()
}

/// The statistics of `logits` (detached) given their logsumexp, as `logprobs::position_stats`
/// computes them on the CPU: runs of positions of at most 2²⁴ values; one value of each read.
fn statistics(logits: Tensor<B, 3>, lse: Tensor<B, 3>) -> f32 {
    let [rows, seq, vocab] = logits.dims();
    let run = ((1 << 24) / (rows * vocab)).max(1);
    let mut read = 0.0;
    for start in (0..seq).step_by(run) {
        let len = run.min(seq - start);
        let (z, lse) = (logits.clone().inner().narrow(1, start, len), lse.clone().inner().narrow(1, start, len));
        let mean = z.clone().mean_dim(2);
        let neg_logp = lse - z.clone();
        let entropy = ((-neg_logp.clone()).exp() * neg_logp).sum_dim(2);
        let argmax = z.argmax(2);
        read += mean.slice([0..1, 0..1, 0..1]).into_scalar() + entropy.slice([0..1, 0..1, 0..1]).into_scalar();
        read += argmax.slice([0..1, 0..1, 0..1]).into_scalar() as f32;
    }
    read
}

/// `Σₖ Σ log pᵏ` by burn's composed operations, and the statistics, as ORPO's scoring was
/// built before the recorded step took several label sets.
fn composed(logits: Tensor<B, 3>, label_sets: &[Tensor<B, 2, Int>]) -> (Tensor<B, 1>, f32) {
    let max = logits.clone().detach().max_dim(2);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(2).log() + max;
    let read = statistics(logits.clone().detach(), lse.clone().detach());
    let [rows, seq] = label_sets[0].dims();
    let total = label_sets
        .iter()
        .map(|labels| {
            // The shift and mask of `logprobs::ShiftedTargets`.
            let pad = Tensor::<B, 2, Int>::full([rows, 1], -100, &labels.device());
            let shifted = Tensor::cat(vec![labels.clone().slice([0..rows, 1..seq]), pad], 1);
            let ignored = shifted.clone().equal_elem(-100);
            let mask = ignored.clone().bool_not().float();
            let picked = logits.clone().gather(2, shifted.mask_fill(ignored, 0).unsqueeze_dim::<3>(2));
            ((picked - lse.clone()).squeeze_dim::<2>(2) * mask).sum()
        })
        .reduce(|a, b| a + b);
    (total.expect("label sets"), read)
}

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let logits = Tensor::<B, 3>::random([ROWS, SEQ, VOCAB], Distribution::Normal(0.0, 2.0), &device).inner();
    let sets = label_sets(&device);
    let mut group = c.benchmark_group("orpo_two_label_sets");
    group.throughput(Throughput::Elements((ROWS * SEQ * VOCAB) as u64));
    group.sample_size(10);
    let step = |recorded: bool| {
        let z = Tensor::<B, 3>::from_inner(logits.clone()).require_grad();
        let (total, read) = if recorded {
            let scored = sequence_logps_many(z.clone(), sets.clone());
            let read = scored.iter().map(|s| s.mean_logits.clone().sum() + s.entropy_sum.clone().sum() + s.num_correct.clone().sum());
            let read = read.map(|t| t.inner().into_scalar()).sum::<f32>();
            (scored.into_iter().map(|s| s.sum.sum()).reduce(|a, b| a + b).expect("label sets"), read)
        } else {
            composed(z.clone(), &sets)
        };
        let grads = total.backward();
        let dz = z.grad(&grads).expect("the logits are tracked");
        // One value read back: the gradient has been computed.
        read + dz.slice([0..1, 0..1, 0..1]).into_scalar()
    };
    group.bench_function(BenchmarkId::new("composed", format!("{ROWS}x{SEQ}x{VOCAB}")), |b| b.iter(|| black_box(step(false))));
    group.bench_function(BenchmarkId::new("recorded", format!("{ROWS}x{SEQ}x{VOCAB}")), |b| b.iter(|| black_box(step(true))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
