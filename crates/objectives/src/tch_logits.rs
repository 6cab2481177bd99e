//! The loss's passes over the logits on the libtorch backends as torch's own kernels, over runs
//! of whole rows (positions) of at most
//! [`STATS_CHUNK_ELEMENTS`](crate::logprobs::STATS_CHUNK_ELEMENTS) logits each — libtorch's
//! counterpart of `logits_kernel.rs` and `cpu_logits.rs`:
//!
//! ```text
//! forward     logp = log_softmax(z) in f32         picked logpᵏ = logp[yᵏ]        reads z (half) once
//!  + statistics p = exp(logp), H = −Σ p logp, Σ p², mean z, argmax z       (when the caller asks)
//! backward    p = softmax(z) in f32,  ∂z = −(Σₖ ∂logpᵏ) · p  written in z's type over z,
//!             then at the labelled ids Σₖ ∂logpᵏ − (Σₖ ∂logpᵏ) · p[y] in f32, rounded once
//! ```
//!
//! burn's operations ran the same formulas as a dozen element-wise passes per run (a cast of
//! the half-type run to f32, the max, the difference, its `exp`, the sum; again for the
//! statistics; a cast, `exp`, product, scatter and cast back for the gradient): 3.7 GB over
//! vocabulary-sized tensors per 256 tokens of a 128k vocabulary (`scripts/gpu/vocab_traffic.py`),
//! where PyTorch's cast to f32, `log_softmax` and their backward move 1.18 GB. Here the forward pass is one
//! `log_softmax` that reads the half-type logits and writes f32 (the kernel autocast's
//! `cross_entropy` uses), the statistics read those log-probabilities (the products for `H` and
//! `Σ p²` as batched dot products, which write nothing vocabulary-sized), and the backward pass is
//! a `softmax` and one product that writes the gradient in the logits' own type over the logits
//! (when nothing else holds them), so the f32 logits never exist whole and the f32 gradient
//! never at all.
//!
//! The gradient at a labelled id is `∂logp · (1 − p[y])`, which rounding `−∂logp · p[y]` to bf16
//! first would ruin when `p[y]` is near 1: it is computed in f32 and written over the product's
//! value with one rounding, as the tensor operations round it. Values agree with burn's
//! composed operations to f32 rounding (torch's kernels sum in another order). Only for burn's
//! libtorch backends ([`is_libtorch`]); `ALIGNMENT_LOGITS_KERNEL=0` keeps the tensor operations.

use crate::logprobs::{logits_kernels_enabled, position_runs, ExtraStats, PositionStats};
use alignment_core::precision::float_type;
use alignment_core::torch_storage::{float_storage, from_float_storage, from_int_storage, int_storage, is_libtorch, kind_of};
use burn::backend::libtorch::TchTensor;
use burn::tensor::{backend::Backend, Int, Tensor};
use tch::Kind;

/// Whether `logits` `[.., vocab]` of `B` take these passes: a libtorch backend, the switch on,
/// a vocabulary.
fn applies<B: Backend>(logits: &Tensor<B, 3>) -> bool {
    is_libtorch::<B>() && logits_kernels_enabled() && logits.dims()[2] > 0
}

/// The kind the passes compute in for logits of `kind`: f64 for f64, f32 otherwise.
fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// What the forward pass returns: `(logp [batch, seq, sets], lse [batch, seq, 1], the
/// statistics when asked for)`, in the backend's own float type.
pub(crate) type Forward<B> = (Tensor<B, 3>, Tensor<B, 3>, Option<PositionStats<B>>);

/// `[batch, seq, n]` as `[batch · seq, n]` rows: a view of contiguous tensors (the head's
/// product), a contiguous copy otherwise.
fn rows(t: &tch::Tensor) -> tch::Tensor {
    let last = *t.size().last().expect("a tensor with dimensions");
    t.reshape([-1, last])
}

/// Consecutive runs of at most `run_elements` logits (one row at least) over `rows` rows of
/// `vocab`: each run a contiguous block of whole rows, so torch's softmax kernels, which want
/// contiguous input, read it in place (a run of positions across the batch would be strided
/// and copied first).
fn row_runs(rows: usize, vocab: usize, run_elements: usize) -> Vec<std::ops::Range<usize>> {
    position_runs([1, rows, vocab], run_elements)
}

/// `logp`, `lse` and (when `stats` asks) the per-position statistics of `targets` `[batch, seq,
/// sets]` under `logits` `[batch, seq, vocab]` of a libtorch backend (or its autodiff, untracked),
/// from one `log_softmax` per run of at most `run_elements` logits; the inputs back on any
/// other backend. Targets must lie in `0..vocab`.
#[allow(clippy::type_complexity)]
pub(crate) fn forward<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
    run_elements: usize,
    stats: Option<ExtraStats>,
) -> Result<Forward<B>, (Tensor<B, 3>, Tensor<B, 3, Int>)> {
    let sets = targets.dims()[2];
    if sets == 0 || !applies(&logits) {
        return Err((logits, targets));
    }
    let [batch, seq, vocab] = logits.dims();
    let (Some(z), Some(y)) = (float_storage(logits.clone()), int_storage(targets.clone())) else { return Err((logits, targets)) };
    let wide = kind_of(float_type::<B>());
    let (z, y) = (rows(&z.tensor), rows(&y.tensor));
    let compute = compute_kind(z.kind());
    let (mut logp, mut lse, mut parts) = (Vec::new(), Vec::new(), Vec::new());
    tch::no_grad(|| {
        for run in row_runs(batch * seq, vocab, run_elements) {
            let (start, len) = (run.start as i64, run.len() as i64);
            let (z_run, y_run) = (z.narrow(0, start, len), y.narrow(0, start, len));
            let logp_run = z_run.log_softmax(-1, compute);
            logp.push(logp_run.gather(1, &y_run, false));
            // Any column gives the logsumexp, `z[y] − log p(y)`: the first label set's.
            let first = y_run.narrow(1, 0, 1);
            lse.push(z_run.gather(1, &first, false).to_kind(compute) - logp_run.gather(1, &first, false));
            if let Some(extra) = stats {
                parts.push(run_statistics(&z_run, &logp_run, extra, compute));
            }
        }
    });
    let joined = |parts: Vec<tch::Tensor>, last: usize| {
        let t = tch::Tensor::cat(&parts, 0).reshape([batch as i64, seq as i64, last as i64]).to_kind(wide);
        from_float_storage::<B, 3>(TchTensor::new(t))
    };
    let stats = stats.map(|_| statistics_tensors::<B>(parts, [batch, seq], wide));
    Ok((joined(logp, sets), joined(lse, 1), stats))
}

/// The per-position statistics of `logits` (detached) of a libtorch backend, from one
/// `log_softmax` per run of at most `run_elements` logits; `None` on any other backend.
pub(crate) fn position_stats<B: Backend>(logits: &Tensor<B, 3>, extra: ExtraStats, run_elements: usize) -> Option<PositionStats<B>> {
    if !applies(logits) {
        return None;
    }
    let [batch, seq, vocab] = logits.dims();
    let z = rows(&float_storage(logits.clone())?.tensor);
    let compute = compute_kind(z.kind());
    let parts = tch::no_grad(|| {
        let run = |run: std::ops::Range<usize>| {
            let z_run = z.narrow(0, run.start as i64, run.len() as i64);
            run_statistics(&z_run, &z_run.log_softmax(-1, compute), extra, compute)
        };
        row_runs(batch * seq, vocab, run_elements).into_iter().map(run).collect()
    });
    Some(statistics_tensors::<B>(parts, [batch, seq], kind_of(float_type::<B>())))
}

/// One run's statistics, `[rows]` each.
struct RunStatistics {
    mean_logit: tch::Tensor,
    entropy: tch::Tensor,
    argmax: tch::Tensor,
    log_sum_sq_probs: Option<tch::Tensor>,
}

/// One run's mean logit, entropy, argmax and (when asked) `log Σ p²`, from its `[rows, vocab]`
/// logits and their f32 log-probabilities.
fn run_statistics(z: &tch::Tensor, logp: &tch::Tensor, extra: ExtraStats, compute: Kind) -> RunStatistics {
    let [rows, vocab] = <[i64; 2]>::try_from(z.size()).expect("[rows, vocab] logits");
    let p = logp.exp();
    // Σ_v p·logp and Σ_v p·p per row as [rows, 1, vocab] × [rows, vocab, 1] products: each
    // operand read once, nothing vocabulary-sized written.
    let row = |t: &tch::Tensor| t.reshape([rows, 1, vocab]);
    let column = |t: &tch::Tensor| t.reshape([rows, vocab, 1]);
    RunStatistics {
        mean_logit: z.mean_dim(-1, false, compute),
        entropy: -row(&p).bmm(&column(logp)).reshape([rows]),
        argmax: z.argmax(-1, false),
        log_sum_sq_probs: extra.log_sum_sq_probs.then(|| row(&p).bmm(&column(&p)).log().reshape([rows])),
    }
}

/// The runs' statistics joined (in row order) as `[batch, seq]` tensors of `B` (floats in `wide`).
fn statistics_tensors<B: Backend>(parts: Vec<RunStatistics>, [batch, seq]: [usize; 2], wide: Kind) -> PositionStats<B> {
    let join = |pieces: Vec<&tch::Tensor>| tch::Tensor::cat(&pieces, 0).reshape([batch as i64, seq as i64]);
    let float = |t: tch::Tensor| from_float_storage::<B, 2>(TchTensor::new(t.to_kind(wide)));
    let with_sum_sq = parts.first().is_some_and(|p| p.log_sum_sq_probs.is_some());
    PositionStats {
        mean_logit: float(join(parts.iter().map(|p| &p.mean_logit).collect())),
        entropy: float(join(parts.iter().map(|p| &p.entropy).collect())),
        argmax: from_int_storage::<B, 2>(TchTensor::new(join(parts.iter().map(|p| &p.argmax).collect()))),
        log_sum_sq_probs: with_sum_sq.then(|| float(join(parts.iter().filter_map(|p| p.log_sum_sq_probs.as_ref()).collect()))),
    }
}

/// `∂z` for `token_logps`' backward pass (`grad` and `targets` `[batch, seq, sets]`), in the
/// logits' type, written over `logits` of a libtorch backend (over a new tensor where another
/// handle holds them or they are not contiguous), one run of rows at a time; the logits back
/// on any other backend.
pub(crate) fn backward<B: Backend>(
    logits: Tensor<B, 3>,
    grad: &Tensor<B, 3>,
    targets: &Tensor<B, 3, Int>,
    run_elements: usize,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    if targets.dims()[2] == 0 || !applies(&logits) {
        return Err(logits);
    }
    let [batch, seq, vocab] = logits.dims();
    let (Some(g), Some(y)) = (float_storage(grad.clone()), int_storage(targets.clone())) else { return Err(logits) };
    // Moved, not cloned: this step's handle may be the logits' only one.
    let Some(z) = float_storage(logits) else { unreachable!("a libtorch backend, checked by applies") };
    let compute = compute_kind(z.tensor.kind());
    let (y, g) = (rows(&y.tensor), rows(&g.tensor).to_kind(compute));
    let out = if z.can_mut() && z.tensor.is_contiguous() {
        z.tensor.shallow_clone()
    } else {
        tch::Tensor::empty(z.tensor.size(), (z.tensor.kind(), z.tensor.device()))
    };
    let (z_rows, out_rows) = (rows(&z.tensor), rows(&out));
    tch::no_grad(|| {
        for run in row_runs(batch * seq, vocab, run_elements) {
            let (start, len) = (run.start as i64, run.len() as i64);
            let (z_run, y_run, g_run) = (z_rows.narrow(0, start, len), y.narrow(0, start, len), g.narrow(0, start, len));
            let p = z_run.softmax(-1, compute);
            // [rows, 1]
            let neg_total = -g_run.sum_dim_intlist(-1, true, compute);
            // At each labelled id, the gradients of every label set naming it: Σⱼ [yⱼ = yₖ] ∂logpⱼ.
            let same = y_run.unsqueeze(-1).eq_tensor(&y_run.unsqueeze(-2)).to_kind(compute); // [rows, sets, sets]
            let named = same.matmul(&g_run.unsqueeze(-1)).squeeze_dim(-1);
            let labelled = named + &neg_total * p.gather(1, &y_run, false);
            let mut out_run = out_rows.narrow(0, start, len);
            // After the softmax read z_run: the product may overwrite it.
            let _ = p.mul_out(&out_run, &neg_total);
            let _ = out_run.scatter_(1, &y_run, &labelled.to_kind(out_run.kind()));
        }
    });
    Ok(from_float_storage(TchTensor::from_existing(out, z.storage)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::{logsumexp_vocab, position_stats_in_chunks, STATS_CHUNK_ELEMENTS};
    use alignment_core::backend::{Torch, TorchAutodiff};
    use burn::backend::libtorch::LibTorchDevice;
    use burn::tensor::FloatDType;
    use burn::tensor::{IndexingUpdateOp, Tolerance};

    /// `[2, 5, 300]` logits with a tie for the largest logit in one row and a near-certain
    /// token in another, and two label sets that share some tokens (the near-certain one too).
    fn setup() -> (Tensor<Torch, 3>, Tensor<Torch, 3, Int>) {
        let device = LibTorchDevice::Cpu;
        let logits = spread([2, 5, 300], 9.0);
        let logits = logits.slice_assign([0..1, 1..2, 7..8], Tensor::full([1, 1, 1], 40.0, &device));
        let logits = logits.slice_assign([0..1, 1..2, 200..201], Tensor::full([1, 1, 1], 40.0, &device));
        // p ≈ 0.99 at token 9 of position (1, 3): 1 − p is far from f32's rounding, and a bf16
        // rounding of −p·∂logp before adding ∂logp would move the gradient there by ≈ 20 %.
        let logits = logits.slice_assign([1..2, 3..4, 0..300], Tensor::zeros([1, 1, 300], &device));
        let logits = logits.slice_assign([1..2, 3..4, 9..10], Tensor::full([1, 1, 1], (299.0f32 * 99.0).ln(), &device));
        let first = Tensor::<Torch, 2, Int>::from_data([[0, 7, 3, 299, 7], [1, 1, 0, 9, 12]], &device);
        let second = Tensor::<Torch, 2, Int>::from_data([[0, 200, 4, 299, 8], [2, 1, 0, 9, 11]], &device);
        (logits, Tensor::stack(vec![first, second], 2))
    }

    /// Fixed values spread over `[−amplitude, amplitude]` (a tolerance met once is met every run).
    fn spread(shape: [usize; 3], amplitude: f32) -> Tensor<Torch, 3> {
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> =
            (0..n).map(|i| amplitude * ((i as f32 * 0.618_034).fract() * 2.0 - 1.0) * (i as f32 * 0.37).sin().abs().sqrt()).collect();
        Tensor::from_data(burn::tensor::TensorData::new(values, shape), &LibTorchDevice::Cpu)
    }

    /// Within 1e-5 relative, or `absolute` for values near zero (see `cancelling`).
    fn close<const D: usize>(actual: Tensor<Torch, D>, expected: Tensor<Torch, D>, absolute: f32, what: &str) {
        let tolerance = Tolerance::<f32>::relative(1e-5).set_absolute(absolute);
        let (actual, expected) = (actual.into_data().convert::<f32>(), expected.into_data().convert::<f32>());
        println!("{what}: compared {} values", expected.num_elements());
        actual.assert_approx_eq::<f32>(&expected, tolerance);
    }

    /// Log-probabilities, logsumexp and statistics against burn's composed operations, whole
    /// and in runs of 1 and 3 positions (2 × 300 logits per position).
    #[test]
    fn the_forward_pass_and_statistics_equal_the_tensor_operations() {
        let (logits, targets) = setup();
        let lse_ref = logsumexp_vocab(logits.clone());
        let logp_ref = logits.clone().gather(2, targets.clone()) - lse_ref.clone();
        let extra = ExtraStats { log_sum_sq_probs: true };
        let stats_ref = position_stats_in_chunks(logits.clone(), lse_ref.clone(), extra, usize::MAX);
        // log p = z − lse and the statistics are differences of terms of the logsumexp's size
        // (up to ≈ 40 here): near zero (log p ≈ −0.01 at the near-certain token) their error is a
        // few f32 ulps of that size, which torch's vectorised kernels spend differently from one
        // CPU to another (≈ 1.3e-6 on an AMD EPYC: 11 ulps of 0.01, 1.4 of 10).
        let largest_lse = lse_ref.clone().abs().max().into_scalar();
        let cancelling = 8.0 * f32::EPSILON * largest_lse;
        for run_elements in [1, 1800, STATS_CHUNK_ELEMENTS] {
            let (logp, lse, stats) =
                forward(logits.clone(), targets.clone(), run_elements, Some(extra)).expect("libtorch takes these passes");
            close(logp, logp_ref.clone(), cancelling, "logp");
            close(lse, lse_ref.clone(), 1e-6, "lse");
            let stats = stats.expect("asked for");
            close(stats.mean_logit, stats_ref.mean_logit.clone(), cancelling, "mean logit");
            close(stats.entropy, stats_ref.entropy.clone(), cancelling, "entropy");
            close(stats.log_sum_sq_probs.expect("asked for"), stats_ref.log_sum_sq_probs.clone().unwrap(), cancelling, "log Σ p²");
            let argmax = stats.argmax.into_data().convert::<i64>().into_vec::<i64>().unwrap();
            assert_eq!(argmax, stats_ref.argmax.clone().into_data().convert::<i64>().into_vec::<i64>().unwrap());
            assert_eq!(argmax[1], 7, "of the two equal maxima at 7 and 200, the first");
            let alone = position_stats(&logits, ExtraStats::default(), run_elements).expect("libtorch");
            assert!(alone.log_sum_sq_probs.is_none(), "not asked for");
            close(alone.entropy, stats_ref.entropy.clone(), cancelling, "entropy, the statistics alone");
        }
    }

    /// `∂z` against the tensor operations' formula, in f32 and for bf16 logits (against that
    /// formula on the same logits cast to f32, rounded to bf16 once), where the near-certain
    /// token's `∂logp · (1 − p)` must survive; written over the logits' memory only when nothing
    /// else holds them.
    #[test]
    fn the_gradient_equals_the_tensor_operations_and_is_written_in_place_only_when_unshared() {
        let (logits, targets) = setup();
        let device = LibTorchDevice::Cpu;
        let grad = spread([2, 5, 2], 2.0);
        let grad = grad.slice_assign([1..2, 2..3, 0..2], Tensor::zeros([1, 1, 2], &device));
        let expected = |z: Tensor<Torch, 3>| {
            let lse = logsumexp_vocab(z.clone());
            let dz = (z - lse).exp() * grad.clone().sum_dim(2).neg();
            dz.scatter(2, targets.clone(), grad.clone(), IndexingUpdateOp::Add)
        };
        let address = |t: &Tensor<Torch, 3>| float_storage(t.clone()).unwrap().tensor.data_ptr() as usize;
        for half in [false, true] {
            // A tensor of its own (not sharing `logits`' storage), so that it can be the only handle.
            let z = if half { logits.clone().cast(FloatDType::BF16) } else { Tensor::from_data(logits.to_data(), &device) };
            let reference = expected(z.clone().cast(FloatDType::F32));
            let reference = if half { reference.cast(FloatDType::BF16).cast(FloatDType::F32) } else { reference };
            let kept = z.clone().into_data();
            // Shared: `z` is still held here.
            let dz = backward(z.clone(), &grad, &targets, 1200).expect("libtorch");
            assert_eq!(dz.dtype(), z.dtype(), "∂z in the logits' type");
            let dz = dz.cast(FloatDType::F32);
            if half {
                // One bf16 rounding apart at most.
                let tolerance = Tolerance::<f32>::relative(1.0 / 128.0).set_absolute(1e-6);
                dz.clone().into_data().assert_approx_eq::<f32>(&reference.clone().into_data(), tolerance);
            } else {
                // exp(z − lse) after a logsumexp near 10, whose f32 rounding (≈ 1e-6) the
                // reference carries: ∂z agrees to a few 1e-6 absolute.
                let tolerance = Tolerance::<f32>::relative(1e-5).set_absolute(1e-5);
                dz.clone().into_data().assert_approx_eq::<f32>(&reference.clone().into_data(), tolerance);
            }
            let certain = dz.clone().slice([1..2, 3..4, 9..10]).into_scalar();
            let certain_ref = reference.clone().slice([1..2, 3..4, 9..10]).into_scalar();
            assert!(
                (certain - certain_ref).abs() <= certain_ref.abs() / 64.0,
                "∂logp · (1 − p) of a near-certain token: {certain} vs {certain_ref}"
            );
            assert_eq!(z.clone().into_data(), kept, "the caller's logits are unchanged");
            // The same logits stored transposed ([vocab, seq] in memory), the only handle: the
            // same gradient, into a new tensor (the runs read contiguous rows of a copy).
            let stored = Tensor::<Torch, 3>::from_data(z.clone().swap_dims(1, 2).into_data(), &device);
            let transposed = if half { stored.cast(FloatDType::BF16) } else { stored }.swap_dims(1, 2);
            let before = address(&transposed);
            let dz_transposed = backward(transposed, &grad, &targets, 1200).expect("libtorch");
            assert_ne!(address(&dz_transposed), before, "not written over strided logits");
            assert_eq!(dz_transposed.cast(FloatDType::F32).into_data(), dz.clone().into_data());
            // Unshared and contiguous: written over the logits.
            let before = address(&z);
            let dz_in_place = backward(z, &grad, &targets, 1200).expect("libtorch");
            assert_eq!(address(&dz_in_place), before, "written in place");
            assert_eq!(dz_in_place.cast(FloatDType::F32).into_data(), dz.into_data());
        }
    }

    #[test]
    fn other_backends_and_the_switch_off_get_the_tensors_back() {
        let (logits, targets) = setup();
        let grad = Tensor::<Torch, 3>::ones([2, 5, 2], &LibTorchDevice::Cpu);
        crate::logprobs::with_tensor_ops(|| {
            assert!(forward(logits.clone(), targets.clone(), STATS_CHUNK_ELEMENTS, None).is_err(), "ALIGNMENT_LOGITS_KERNEL=0");
            assert!(position_stats(&logits, ExtraStats::default(), STATS_CHUNK_ELEMENTS).is_none());
            assert!(backward(logits.clone(), &grad, &targets, STATS_CHUNK_ELEMENTS).is_err());
        });
        let cpu = Tensor::<burn::backend::NdArray<f32>, 3>::zeros([1, 2, 3], &Default::default());
        assert!(position_stats(&cpu, ExtraStats::default(), STATS_CHUNK_ELEMENTS).is_none());
        // The autodiff backend's tensors are taken too (untracked).
        let tracked = Tensor::<TorchAutodiff, 3>::from_inner(logits);
        assert!(position_stats(&tracked, ExtraStats::default(), STATS_CHUNK_ELEMENTS).is_some());
    }
}
