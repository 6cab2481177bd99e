//! The loss's passes over the logits on the CPU backend (burn-ndarray, f32 logits) as threaded
//! passes, one row of the vocabulary at a time — the CPU's counterpart of `logits_kernel.rs`:
//!
//! ```text
//! forward     (token_logps)     lse = logsumexp(z),  logpᵏ = z[yᵏ] − lse           reads z twice per row
//! statistics  (position_stats)  mean z,  H = Σ p (lse − z),  argmax z,  Σ p²      reads z once
//! backward    (token_logps)     ∂z = Σₖ ∂logpᵏ · onehot(yᵏ) − (Σₖ ∂logpᵏ) · exp(z − lse),
//!                               written over z
//! ```
//!
//! burn-ndarray runs the same formulas as about a dozen single-threaded passes, each over a
//! fresh logits-sized array (`max_dim` copies its input, the one-hot `scatter` copies the
//! gradient even when no other handle holds it). Here each row is read while it is in cache,
//! rows are split across the cores, and the backward pass writes over the logits when nothing
//! else holds them, so the head's gradient needs no second logits-sized array. A row without
//! gradient (a prompt or padding position) is written without computing its softmax. The
//! arithmetic is the tensor operations' in f32, one element at a time; only the order of the
//! sums over the vocabulary differs (eight running partial sums), so values agree to rounding.
//!
//! Only for `NdArray<f32>` and its autodiff with f32 logits; every other backend and storage gets
//! its tensors back. `ALIGNMENT_LOGITS_KERNEL=0` keeps the tensor operations here too.

use crate::logprobs::PositionStats;
use alignment_core::backend::retype;
use alignment_core::cpu_storage::{f32_values, float_storage};
use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData, TensorPrimitive};
use ndarray::{ArcArray, CowArray, IxDyn};
use rayon::prelude::*;
use std::any::TypeId;

type Cpu = NdArray<f32>;

/// Partial sums per row: the loops keep eight independent running sums (one AVX register),
/// added in order at the end, which is both faster and closer to the exact sum than one.
const LANES: usize = 8;

/// `Σ f(z)` over a row in [`LANES`] running sums.
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &z) in lanes.iter_mut().zip(chunk) {
            *lane += f(z);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&z| f(z)).sum();
    lanes.iter().sum::<f32>() + rest
}

/// `logsumexp(row)`, stabilised by the row's maximum (NaN in, NaN out).
fn row_logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    lane_sum(row, |z| (z - max).exp()).ln() + max
}

/// Row statistics: the sum of the logits, `Σ p (lse − z)`, `Σ p²` and the first largest column.
fn row_statistics(row: &[f32], lse: f32) -> (f32, f32, f32, usize) {
    let sum = lane_sum(row, |z| z);
    // One `exp` per logit for both sums over the probabilities.
    let (mut entropy, mut sum_sq) = ([0f32; LANES], [0f32; LANES]);
    let mut add = |lane: usize, z: f32| {
        let neg_logp = lse - z;
        let p = (-neg_logp).exp();
        entropy[lane] += p * neg_logp;
        sum_sq[lane] += p * p;
    };
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &z) in chunk.iter().enumerate() {
            add(lane, z);
        }
    }
    // The remainder in lane 0, after the lanes' own values, in order.
    for &z in chunks.remainder() {
        add(0, z);
    }
    let (entropy, sum_sq) = (entropy.iter().sum(), sum_sq.iter().sum());
    // The first of equal maxima, as `argmax` (a NaN is never larger).
    let mut best = 0;
    for (column, &z) in row.iter().enumerate() {
        if z > row[best] {
            best = column;
        }
    }
    (sum, entropy, sum_sq, best)
}

/// Writes `∂z` over the row `z` for the gradients `grad` of its label sets `ids`.
fn row_gradient(z: &mut [f32], lse: f32, grad: &[f32], ids: &[i64]) {
    let neg_total = -grad.iter().sum::<f32>();
    if grad.iter().all(|&g| g == 0.0) {
        // exp(z − lse) · −0 for every finite logit: the softmax need not be computed.
        z.fill(neg_total * 0.0);
    } else {
        for v in z.iter_mut() {
            *v = (*v - lse).exp() * neg_total;
        }
    }
    for (&g, &id) in grad.iter().zip(ids) {
        if let Some(v) = usize::try_from(id).ok().and_then(|i| z.get_mut(i)) {
            *v += g;
        }
    }
}

/// The f32 storage of `t` when `B` is the CPU backend or its autodiff (for the latter, the
/// inner tensor: nothing here is tracked), `None` otherwise.
fn cpu_storage<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<NdArrayTensor> {
    float_storage(t).filter(|primitive| matches!(primitive, NdArrayTensor::F32(_)))
}

/// The values of an f32 storage in standard layout (a view when they already are).
fn standard_values(t: &NdArrayTensor) -> CowArray<'_, f32, IxDyn> {
    f32_values(t).unwrap_or_else(|| unreachable!("checked by cpu_storage"))
}

/// A small tensor's values as f32 (the logsumexp, the upstream gradients).
fn floats<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.clone().into_data().convert::<f32>().into_vec().expect("converted to f32")
}

/// A small int tensor's values as i64 (the label ids).
fn ints<B: Backend, const D: usize>(t: &Tensor<B, D, Int>) -> Vec<i64> {
    t.clone().into_data().convert::<i64>().into_vec().expect("converted to i64")
}

/// Whether `logits` `[.., vocab]` can take these passes: the switch on, a vocabulary.
fn applies<B: Backend>(logits: &Tensor<B, 3>) -> bool {
    crate::logprobs::logits_kernels_enabled() && logits.dims()[2] > 0
}

/// `(logp [batch, seq, sets], lse [batch, seq, 1])` of `targets` `[batch, seq, sets]` under f32
/// `logits` on the CPU backend; the inputs back otherwise. A label outside the vocabulary gives
/// NaN (callers pass safe ids).
#[allow(clippy::type_complexity)]
pub(crate) fn forward<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>), (Tensor<B, 3>, Tensor<B, 3, Int>)> {
    let ([batch, seq, vocab], sets, device) = (logits.dims(), targets.dims()[2], logits.device());
    if sets == 0 || !applies(&logits) {
        return Err((logits, targets));
    }
    let Some(storage) = cpu_storage(logits.clone()) else { return Err((logits, targets)) };
    let ids = ints(&targets);
    let values = standard_values(&storage);
    let z = values.as_slice().expect("standard layout");
    let mut lse = vec![0f32; batch * seq];
    let mut logp = vec![0f32; batch * seq * sets];
    lse.par_iter_mut().zip(logp.par_chunks_mut(sets)).zip(z.par_chunks(vocab)).zip(ids.par_chunks(sets)).for_each(
        |(((lse, logp), row), ids)| {
            *lse = row_logsumexp(row);
            for (out, &id) in logp.iter_mut().zip(ids) {
                *out = usize::try_from(id).ok().and_then(|i| row.get(i)).map_or(f32::NAN, |&z| z - *lse);
            }
        },
    );
    let tensor = |values: Vec<f32>, shape: [usize; 3]| Tensor::<B, 3>::from_data(TensorData::new(values, shape), &device);
    Ok((tensor(logp, [batch, seq, sets]), tensor(lse, [batch, seq, 1])))
}

/// The per-position statistics of f32 `logits` (detached) given their logsumexp `lse` on the
/// CPU backend or its autodiff (`log Σ p²` only where `log_sum_sq_probs`); `None` otherwise.
pub(crate) fn position_stats<B: Backend>(logits: &Tensor<B, 3>, lse: &Tensor<B, 3>, log_sum_sq_probs: bool) -> Option<PositionStats<B>> {
    if !applies(logits) {
        return None;
    }
    let ([batch, seq, vocab], device) = (logits.dims(), logits.device());
    let storage = cpu_storage(logits.clone())?;
    let lse = floats(lse);
    let values = standard_values(&storage);
    let z = values.as_slice().expect("standard layout");
    let rows: Vec<(f32, f32, f32, usize)> = z.par_chunks(vocab).zip(lse.par_iter()).map(|(row, &lse)| row_statistics(row, lse)).collect();
    let column = |f: fn(&(f32, f32, f32, usize)) -> f32| {
        let values: Vec<f32> = rows.iter().map(f).collect();
        Tensor::<B, 2>::from_data(TensorData::new(values, [batch, seq]), &device)
    };
    let argmax: Vec<i64> = rows.iter().map(|r| r.3 as i64).collect();
    let vocab = vocab as f32;
    Some(PositionStats {
        mean_logit: column(|r| r.0).div_scalar(vocab),
        entropy: column(|r| r.1),
        argmax: Tensor::<B, 2, Int>::from_data(TensorData::new(argmax, [batch, seq]), &device),
        log_sum_sq_probs: log_sum_sq_probs.then(|| column(|r| r.2).log()),
    })
}

/// `∂z` for `token_logps`' backward pass (`lse` `[batch, seq, 1]`, `grad` and `targets` `[batch,
/// seq, sets]`) written over f32 `logits` of the CPU backend (over a copy where another handle
/// holds them); the logits back otherwise.
pub(crate) fn backward<B: Backend>(
    logits: Tensor<B, 3>,
    lse: &Tensor<B, 3>,
    grad: &Tensor<B, 3>,
    targets: &Tensor<B, 3, Int>,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let ([_, _, vocab], sets) = (logits.dims(), targets.dims()[2]);
    if TypeId::of::<B>() != TypeId::of::<Cpu>() || logits.dtype() != DType::F32 || sets == 0 || !applies(&logits) {
        return Err(logits);
    }
    // Moved, not cloned: this step's handle may be the logits' only one.
    let Some(NdArrayTensor::F32(storage)) = cpu_storage(logits) else { unreachable!("an f32 tensor of the CPU backend") };
    let (lse, grad, ids) = (floats(lse), floats(grad), ints(targets));
    let mut z: ArcArray<f32, IxDyn> = storage.into_shared();
    if !z.is_standard_layout() {
        z = z.as_standard_layout().into_owned().into_shared();
    }
    // Copies first only where another handle still holds the logits.
    let values = z.as_slice_mut().expect("standard layout");
    values
        .par_chunks_mut(vocab)
        .zip(lse.par_iter())
        .zip(grad.par_chunks(sets))
        .zip(ids.par_chunks(sets))
        .for_each(|(((row, &lse), grad), ids)| row_gradient(row, lse, grad, ids));
    let dz = Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(z)));
    Ok(retype(dz))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::{logsumexp_vocab, position_stats_in_chunks, ExtraStats};
    use burn::tensor::{Distribution, IndexingUpdateOp, Tolerance};

    /// `[2, 5, 300]` logits (more than [`LANES`], not a multiple of it) with a tie for the
    /// largest logit in one row, and label sets that share a token.
    fn setup() -> (Tensor<Cpu, 3>, Tensor<Cpu, 3, Int>) {
        let device = Default::default();
        let logits = Tensor::<Cpu, 3>::random([2, 5, 300], Distribution::Normal(0.0, 3.0), &device);
        let logits = logits.slice_assign([0..1, 1..2, 7..8], Tensor::full([1, 1, 1], 40.0, &device));
        let logits = logits.slice_assign([0..1, 1..2, 200..201], Tensor::full([1, 1, 1], 40.0, &device));
        let first = Tensor::<Cpu, 2, Int>::from_data([[0, 7, 3, 299, 7], [1, 1, 0, 9, 12]], &device);
        let second = Tensor::<Cpu, 2, Int>::from_data([[0, 200, 4, 299, 8], [2, 1, 0, 9, 11]], &device);
        (logits, Tensor::stack(vec![first, second], 2))
    }

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    #[test]
    fn the_forward_pass_equals_the_tensor_operations_for_any_layout() {
        let (logits, targets) = setup();
        let lse_ref = logsumexp_vocab(logits.clone());
        let logp_ref = logits.clone().gather(2, targets.clone()) - lse_ref.clone();
        // The same logits stored transposed ([vocab, seq] in memory), as a product computed as
        // `(W hᵀ)ᵀ` leaves them.
        let transposed = logits.clone().swap_dims(1, 2).into_data();
        let transposed = Tensor::<Cpu, 3>::from_data(transposed, &Default::default()).swap_dims(1, 2);
        for z in [logits, transposed] {
            let (logp, lse) = forward(z, targets.clone()).expect("the CPU backend takes its passes");
            let tolerance = Tolerance::<f32>::relative(1e-6);
            logp.into_data().assert_approx_eq::<f32>(&logp_ref.clone().into_data(), tolerance);
            lse.into_data().assert_approx_eq::<f32>(&lse_ref.clone().into_data(), tolerance);
        }
    }

    #[test]
    fn the_statistics_equal_the_tensor_operations_and_ties_go_to_the_first_column() {
        let (logits, _) = setup();
        let lse = logsumexp_vocab(logits.clone());
        let expected = position_stats_in_chunks(logits.clone(), lse.clone(), ExtraStats { log_sum_sq_probs: true }, usize::MAX);
        let stats = position_stats(&logits, &lse, true).expect("the CPU backend takes its passes");
        let tolerance = Tolerance::<f32>::relative(1e-5).set_absolute(1e-6);
        stats.mean_logit.into_data().assert_approx_eq::<f32>(&expected.mean_logit.into_data(), tolerance);
        stats.entropy.into_data().assert_approx_eq::<f32>(&expected.entropy.into_data(), tolerance);
        let sum_sq = stats.log_sum_sq_probs.expect("asked for");
        sum_sq.into_data().assert_approx_eq::<f32>(&expected.log_sum_sq_probs.unwrap().into_data(), tolerance);
        let argmax = stats.argmax.into_data().convert::<i64>().into_vec::<i64>().unwrap();
        assert_eq!(argmax, expected.argmax.into_data().convert::<i64>().into_vec::<i64>().unwrap());
        assert_eq!(argmax[1], 7, "of the two equal maxima at 7 and 200, the first");
        assert!(position_stats(&logits, &lse, false).expect("taken").log_sum_sq_probs.is_none());
    }

    /// `∂z` equal to the tensor operations' formula (`token_logps::logits_gradient`), rows
    /// without gradient included; written over the logits' own memory when nothing else holds
    /// them, and leaving them alone when something does.
    #[test]
    fn the_gradient_equals_the_tensor_operations_and_is_written_in_place_only_when_unshared() {
        let (logits, targets) = setup();
        let lse = logsumexp_vocab(logits.clone());
        let device = Default::default();
        let grad = Tensor::<Cpu, 3>::random([2, 5, 2], Distribution::Normal(0.0, 1.0), &device);
        // Position (1, 2) has no gradient in either set: a prompt or padding position.
        let grad = grad.slice_assign([1..2, 2..3, 0..2], Tensor::zeros([1, 1, 2], &device));
        let expected = {
            let dz = (logits.clone() - lse.clone()).exp() * grad.clone().sum_dim(2).neg();
            values(dz.scatter(2, targets.clone(), grad.clone(), IndexingUpdateOp::Add))
        };
        let kept = values(logits.clone());
        // Shared: `logits` is still held here, so the pass writes over a copy.
        let dz = backward(logits.clone(), &lse, &grad, &targets).expect("taken");
        assert_eq!(values(dz), expected, "the same f32 arithmetic, element by element");
        assert_eq!(values(logits.clone()), kept, "the caller's logits are unchanged");
        // Unshared: the gradient is the logits' own memory.
        let address = |t: &Tensor<Cpu, 3>| match t.clone().into_primitive().tensor() {
            NdArrayTensor::F32(storage) => storage.view().as_ptr() as usize,
            _ => unreachable!(),
        };
        let before = address(&logits);
        let dz = backward(logits, &lse, &grad, &targets).expect("taken");
        assert_eq!(address(&dz), before, "written in place");
        let dz = values(dz);
        assert_eq!(dz, expected);
        assert!(dz[(5 + 2) * 300..(5 + 3) * 300].iter().all(|&v| v == 0.0), "no gradient at a position without one");
    }

    #[test]
    fn other_types_and_the_switch_off_get_the_tensors_back() {
        let (logits, targets) = setup();
        let as_f64 = logits.clone().cast(burn::tensor::FloatDType::F64);
        let lse = logsumexp_vocab(logits.clone());
        let grad = Tensor::<Cpu, 3>::ones([2, 5, 2], &Default::default());
        assert!(forward(as_f64.clone(), targets.clone()).is_err());
        assert!(position_stats(&as_f64, &lse, false).is_none());
        assert!(backward(as_f64, &lse, &grad, &targets).is_err());
        crate::logprobs::with_tensor_ops(|| {
            assert!(forward(logits.clone(), targets.clone()).is_err(), "ALIGNMENT_LOGITS_KERNEL=0");
            assert!(position_stats(&logits, &lse, false).is_none());
        });
    }
}
