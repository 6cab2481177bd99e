//! The labelled tokens' log-probabilities, `log p(y_t) = z[t, y_t] − logsumexp(z[t, :])`, for
//! one or more label sets `y¹ … yᴷ` over the same logits, as one recorded step of burn's
//! autodiff, whose backward pass is the softmax's own:
//!
//! ```text
//! forward:   lse = logsumexp(z)        logpᵏ = z[yᵏ] − lse                     keeps z, lse, y
//! backward:  ∂z  = Σₖ ∂logpᵏ · onehot(yᵏ) − (Σₖ ∂logpᵏ) · exp(z − lse)
//! ```
//!
//! One label set is SFT's and DPO's; ORPO scores two (the completion for its odds ratio, prompt
//! and completion for its NLL term), which share the logsumexp and the one backward pass.
//!
//! Composed from burn's operations, the same quantity kept `exp(z − max)` for the backward pass,
//! and that pass built the logits' gradient from four logits-sized tensors (the broadcast
//! gradient of the sum, its product with the kept `exp`, the gather's scattered gradient, and
//! their sum) while every layer's activations were still alive: the step's peak. Here the
//! backward pass computes `exp(z − lse)`, scales it and adds the one-hot part in place where the
//! backend can (burn-tch and CubeCL update a tensor whose handle is unique), so the head's
//! gradient needs the logits and about one tensor like them. The forward values are the composed
//! ones, operation for operation.
//!
//! Logits in the half type (mixed precision: the head's product left in bf16, as autocast
//! returns it) are read in runs of positions cast to the backend's own type (f32), both ways:
//! the logsumexp per run, and the backward pass writes each run's `∂z`, rounded to the half
//! type, over the logits' own rows. The kept logits are the half-type ones, the f32 logits never
//! exist whole, and the values are those of casting the logits to f32 first: each row's
//! arithmetic is the same.
//!
//! Where a backend has passes of its own they replace the tensor operations on both sides of
//! the step: CubeCL kernels (`logits_kernel.rs`), threaded CPU passes (`cpu_logits.rs`), torch's
//! `log_softmax`/`softmax` on libtorch (`tch_logits.rs`, which also returns the statistics from
//! the forward pass's own log-probabilities: [`token_logps_and_stats`]).

use crate::logprobs::{logsumexp_vocab, position_runs, ExtraStats, PositionStats, STATS_CHUNK_ELEMENTS};
use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::precision::{cast_to, float_type};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{backend::Backend, DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

/// `([batch, seq, sets]` log-probabilities of `targets` `[batch, seq, sets]` (a label set per
/// last index) under `logits` `[batch, seq, vocab]`, differentiable; `[batch, seq, 1]`
/// logsumexp of the logits, without gradient)`, both in the backend's own float type whatever
/// the logits' type. `targets` must lie in `0..vocab` (ignored positions gathered at a safe id
/// and masked by the caller).
pub(crate) fn token_logps<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 3, Int>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let (logp, lse, _) = token_logps_in_runs(logits, targets, STATS_CHUNK_ELEMENTS, None);
    (logp, lse)
}

/// [`token_logps`] and, where the backend's route computes them in the same pass over the
/// logits (libtorch's, `tch_logits.rs`), the per-position statistics `stats` asks for: `None`
/// where the caller computes them with `logprobs::position_stats`.
pub(crate) fn token_logps_and_stats<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 3, Int>, stats: ExtraStats) -> Forward<B> {
    token_logps_in_runs(logits, targets, STATS_CHUNK_ELEMENTS, Some(stats))
}

/// `(logp, lse, statistics)`: what the forward pass returns.
type Forward<B> = (Tensor<B, 3>, Tensor<B, 3>, Option<PositionStats<B>>);

/// [`token_logps_and_stats`] reading half-type logits in runs of positions of at most
/// `run_elements` elements each.
fn token_logps_in_runs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
    run_elements: usize,
    stats: Option<ExtraStats>,
) -> Forward<B> {
    match visit_autodiff::<B, _>(Recorded { logits, targets, run_elements, stats }) {
        Ok(out) => out,
        Err(Recorded { logits, targets, run_elements, stats }) => {
            let (logp, lse, stats) = forward(logits, targets, run_elements, stats);
            (logp, lse.detach(), stats)
        }
    }
}

/// `(z[y] − lse, lse, statistics where computed)` in the backend's own type: the forward pass
/// of both paths. Through burn's operations, logits of another type are cast per run of
/// positions for the logsumexp, and no statistics are computed.
fn forward<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 3, Int>, run_elements: usize, stats: Option<ExtraStats>) -> Forward<B> {
    #[cfg(feature = "tch")]
    let (logits, targets) = match crate::tch_logits::forward(logits, targets, run_elements, stats) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    #[cfg(not(feature = "tch"))]
    let _ = stats;
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let (logits, targets) = match crate::logits_kernel::forward(logits, targets) {
        Ok((logp, lse)) => return (logp, lse, None),
        Err(inputs) => inputs,
    };
    #[cfg(feature = "ndarray")]
    let (logits, targets) = match crate::cpu_logits::forward(logits, targets) {
        Ok((logp, lse)) => return (logp, lse, None),
        Err(inputs) => inputs,
    };
    let wide = float_type::<B>();
    let lse = if logits.dtype() == DType::from(wide) {
        logsumexp_vocab(logits.clone())
    } else {
        let runs = position_runs(logits.dims(), run_elements);
        let parts = runs.into_iter().map(|run| logsumexp_vocab(cast_to(logits.clone().narrow(1, run.start, run.len()), wide))).collect();
        Tensor::cat(parts, 1)
    };
    let picked = cast_to(logits.gather(2, targets), wide);
    (picked - lse.clone(), lse, None)
}

/// The recorded step, run on the autodiff backend's inner backend.
struct Recorded<B: Backend> {
    logits: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
    run_elements: usize,
    stats: Option<ExtraStats>,
}

impl<B: Backend> AutodiffVisitor for Recorded<B> {
    type Output = Forward<B>;

    fn visit<I: Backend>(self) -> Self::Output {
        let logits: Tensor<Autodiff<I>, 3> = retype(self.logits);
        let targets: Tensor<Autodiff<I>, 3, Int> = retype(self.targets);
        let z = logits.into_primitive().tensor();
        let targets = Tensor::<I, 3, Int>::from_primitive(targets.into_primitive());
        let inner = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(z.primitive.clone()));
        let (logp, lse, stats) = forward(inner, targets.clone(), self.run_elements, self.stats);
        let logp = logp.into_primitive().tensor();
        let backward = TokenLogpsBackward { run_elements: self.run_elements };
        let prepared = <TokenLogpsBackward as Backward<I, 1>>::prepare::<NoCheckpointing>(backward, [z.node.clone()]);
        let logp = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                TokenLogpsState::<I> { logits: z.primitive, lse: lse.clone().into_primitive().tensor(), targets: targets.into_primitive() },
                logp,
            ),
            OpsKind::UnTracked(prep) => prep.finish(logp),
        };
        let logp = Tensor::<Autodiff<I>, 3>::from_primitive(TensorPrimitive::Float(logp));
        let stats = stats.map(|s| {
            s.map_tensors(|t| retype(Tensor::<Autodiff<I>, 2>::from_inner(t)), |t| retype(Tensor::<Autodiff<I>, 2, Int>::from_inner(t)))
        });
        (retype(logp), retype(Tensor::<Autodiff<I>, 3>::from_inner(lse)), stats)
    }
}

/// What the backward pass needs: the logits, their logsumexp and the gathered ids.
#[derive(Clone, Debug)]
struct TokenLogpsState<I: Backend> {
    logits: FloatTensor<I>,
    lse: FloatTensor<I>,
    targets: IntTensor<I>,
}

/// The backward pass, reading half-type logits in runs of at most `run_elements` elements.
#[derive(Debug)]
struct TokenLogpsBackward {
    run_elements: usize,
}

impl<I: Backend> Backward<I, 1> for TokenLogpsBackward {
    type State = TokenLogpsState<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let Some(node) = node else { return };
        let TokenLogpsState { logits, lse, targets } = ops.state;
        let (logits, lse) =
            (Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(logits)), Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(lse)));
        let grad = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(grad));
        let targets = Tensor::<I, 3, Int>::from_primitive(targets);
        let dz = logits_gradient_in_runs(logits, Some(lse), grad, targets, self.run_elements);
        grads.register::<I>(node.id, dz.into_primitive().tensor());
    }
}

/// `∂z` of `Σ grad · logp` for the log-probabilities [`token_logps`] gives of `targets` under
/// `logits` (all `[batch, seq, ·]`, no graph): the recorded step's backward pass, and the chunked
/// head's second pass, which needs no forward values. In the logits' type, written over the
/// logits where the backend can (their handle unique); half-type logits are read in runs of at
/// most `run_elements` elements. `lse` is the logits' logsumexp `[batch, seq, 1]` where known;
/// the routes that need it compute it when not.
pub(crate) fn logits_gradient_in_runs<I: Backend>(
    logits: Tensor<I, 3>,
    lse: Option<Tensor<I, 3>>,
    grad: Tensor<I, 3>,
    targets: Tensor<I, 3, Int>,
    run_elements: usize,
) -> Tensor<I, 3> {
    #[cfg(feature = "tch")]
    let logits = match crate::tch_logits::backward(logits, &grad, &targets, run_elements) {
        Ok(dz) => return dz,
        Err(logits) => logits,
    };
    let lse = lse.unwrap_or_else(|| forward(logits.clone(), targets.clone(), run_elements, None).1);
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let logits = match crate::logits_kernel::backward(logits, &lse, &grad, &targets) {
        Ok(dz) => return dz,
        Err(logits) => logits,
    };
    #[cfg(feature = "ndarray")]
    let logits = match crate::cpu_logits::backward(logits, &lse, &grad, &targets) {
        Ok(dz) => return dz,
        Err(logits) => logits,
    };
    let wide = float_type::<I>();
    if logits.dtype() == DType::from(wide) {
        return logits_gradient(logits, lse, grad, targets);
    }
    // Half-type logits: each run's gradient computed in the wide type and written, rounded
    // to the logits' type, over the run's own rows (in place where this holds the only handle).
    let half = logits.dtype().into();
    let [batch, _, vocab] = logits.dims();
    let mut dz = logits;
    for run in position_runs(dz.dims(), run_elements) {
        let rows = |t: Tensor<I, 3>| t.narrow(1, run.start, run.len());
        let part = logits_gradient(
            cast_to(rows(dz.clone()), wide),
            rows(lse.clone()),
            rows(grad.clone()),
            targets.clone().narrow(1, run.start, run.len()),
        );
        dz = dz.slice_assign([0..batch, run.clone(), 0..vocab], cast_to(part, half));
    }
    dz
}

/// `∂z = Σₖ ∂logpᵏ · onehot(yᵏ) − (Σₖ ∂logpᵏ) · softmax(z)` for logits `z` and their
/// logsumexp, `∂logp` and `y` as `[batch, seq, sets]` (the scatter adds a token's gradients
/// where label sets share it).
fn logits_gradient<I: Backend>(logits: Tensor<I, 3>, lse: Tensor<I, 3>, grad: Tensor<I, 3>, targets: Tensor<I, 3, Int>) -> Tensor<I, 3> {
    let dz = (logits - lse).exp() * grad.clone().sum_dim(2).neg();
    dz.scatter(2, targets, grad, IndexingUpdateOp::Add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, FloatDType};

    type T = Autodiff<burn::backend::NdArray<f32>>;

    /// The recorded step against burn's composed operations (a gather per label set, one
    /// `logsumexp`), for one label set and for two that share some tokens (ORPO's), whose
    /// one-hot parts must add: the gradient within rounding, and the values equal (`exact`: the
    /// tensor operations' path) or within rounding (the CPU backend's passes, whose sums over the
    /// vocabulary run in another order). Returns the comparisons made.
    fn recorded_equals_composed(exact: bool) -> usize {
        let device = Default::default();
        let logits = Tensor::<T, 3>::random([2, 5, 13], Distribution::Normal(0.0, 3.0), &device);
        let first = Tensor::<T, 2, Int>::from_data([[0, 12, 3, 3, 7], [1, 1, 0, 9, 12]], &device);
        let second = Tensor::<T, 2, Int>::from_data([[0, 12, 4, 3, 8], [2, 1, 0, 9, 11]], &device);
        let mut compared = 0;
        for sets in [vec![first.clone()], vec![first, second]] {
            let targets = Tensor::stack::<3>(sets.clone(), 2);
            let weights = Tensor::<T, 3>::random([2, 5, sets.len()], Distribution::Normal(0.0, 1.0), &device);
            let run = |recorded: bool| {
                let z = logits.clone().require_grad();
                let (logp, lse) = if recorded {
                    token_logps(z.clone(), targets.clone())
                } else {
                    let lse = logsumexp_vocab(z.clone());
                    let per_set = sets.iter().map(|y| z.clone().gather(2, y.clone().unsqueeze_dim::<3>(2)) - lse.clone()).collect();
                    (Tensor::cat(per_set, 2), lse)
                };
                let grads = (logp.clone() * weights.clone()).sum().backward();
                (logp.inner(), lse.inner(), z.grad(&grads).expect("the logits are tracked"))
            };
            let ((logp, lse, dz), (logp_ref, lse_ref, dz_ref)) = (run(true), run(false));
            if exact {
                assert_eq!(logp.into_data(), logp_ref.into_data(), "the forward values are the composed ones ({} sets)", sets.len());
                assert_eq!(lse.into_data(), lse_ref.into_data());
            } else {
                let tolerance = burn::tensor::Tolerance::<f32>::relative(1e-6);
                logp.into_data().assert_approx_eq::<f32>(&logp_ref.into_data(), tolerance);
                lse.into_data().assert_approx_eq::<f32>(&lse_ref.into_data(), tolerance);
            }
            dz.into_data().assert_approx_eq::<f32>(&dz_ref.into_data(), burn::tensor::Tolerance::absolute(1e-6));
            compared += 3;
        }
        compared
    }

    /// On the CPU backend, its own passes (`cpu_logits.rs`).
    #[test]
    fn the_recorded_log_probabilities_equal_burns_operations_with_their_gradient() {
        assert_eq!(recorded_equals_composed(false), 6);
    }

    /// Through burn's tensor operations: the path of every backend without passes of its own,
    /// and of all with `ALIGNMENT_LOGITS_KERNEL=0`.
    #[test]
    fn through_tensor_operations_the_recorded_values_are_the_composed_ones() {
        assert_eq!(crate::logprobs::with_tensor_ops(|| recorded_equals_composed(true)), 6);
    }

    /// Logits in another type than the backend's (the half type under mixed precision; f64
    /// stands for it on the CPU backend, bf16 on torch's CPU) read in runs of positions: values
    /// and gradient equal bit for bit to casting the whole logits to the backend's type first,
    /// for runs of 1, 2 and 3 positions and all at once. Returns the comparisons made.
    fn half_type_logits_in_runs_equal_casting_them_first<I: Backend>(device: &I::Device, half: FloatDType) -> usize {
        type A<I> = Autodiff<I>;
        let logits = Tensor::<A<I>, 3>::random([2, 5, 13], Distribution::Normal(0.0, 3.0), device).cast(half);
        let targets = Tensor::<A<I>, 3, Int>::from_data(
            [[[0, 12], [12, 12], [3, 4], [3, 3], [7, 8]], [[1, 2], [1, 1], [0, 0], [9, 9], [12, 11]]],
            device,
        );
        let weights = Tensor::<A<I>, 3>::random([2, 5, 2], Distribution::Normal(0.0, 1.0), device);
        let run = |run_elements: Option<usize>| {
            let z = logits.clone().require_grad();
            let (logp, lse) = match run_elements {
                Some(n) => {
                    let (logp, lse, _) = token_logps_in_runs(z.clone(), targets.clone(), n, None);
                    (logp, lse)
                }
                None => token_logps(z.clone().cast(float_type::<I>()), targets.clone()),
            };
            let grads = (logp.clone() * weights.clone()).sum().backward();
            (logp.inner(), lse.inner(), z.grad(&grads).expect("the logits are tracked"))
        };
        let (logp_ref, lse_ref, dz_ref) = run(None);
        assert_eq!(dz_ref.dtype(), DType::from(half), "the reference's gradient comes back in the logits' type");
        let mut compared = 0;
        // 2 × 13 = 26 elements per position.
        for run_elements in [1, 52, 78, 1 << 20] {
            let (logp, lse, dz) = run(Some(run_elements));
            assert_eq!(logp.dtype(), DType::from(float_type::<I>()), "log-probabilities in the backend's type");
            assert_eq!(logp.into_data(), logp_ref.clone().into_data(), "log-probabilities, runs of {run_elements}");
            assert_eq!(lse.into_data(), lse_ref.clone().into_data(), "logsumexp, runs of {run_elements}");
            assert_eq!(dz.dtype(), DType::from(half), "∂z in the logits' type");
            assert_eq!(dz.into_data(), dz_ref.clone().into_data(), "∂z, runs of {run_elements}");
            compared += 3;
        }
        compared
    }

    #[test]
    fn half_type_logits_read_in_runs_equal_casting_them_first() {
        type I = burn::backend::NdArray<f32>;
        // Through the tensor operations: the reference's f32 logits would take the CPU backend's
        // own passes, which read the logits whole and have no runs.
        let compared = crate::logprobs::with_tensor_ops(|| {
            half_type_logits_in_runs_equal_casting_them_first::<I>(&Default::default(), FloatDType::F64)
        });
        assert_eq!(compared, 12);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn tch_bf16_logits_read_in_runs_equal_casting_them_first() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert_eq!(half_type_logits_in_runs_equal_casting_them_first::<I>(&device, FloatDType::BF16), 12);
    }

    #[test]
    fn without_autodiff_the_same_values() {
        let device = Default::default();
        let logits = Tensor::<T, 3>::random([1, 3, 7], Distribution::Normal(0.0, 1.0), &device);
        let targets = Tensor::<T, 3, Int>::from_data([[[6], [0], [2]]], &device);
        let (tracked, _) = token_logps(logits.clone(), targets.clone());
        let (plain, _) = token_logps(logits.inner(), targets.inner());
        assert_eq!(tracked.inner().into_data(), plain.into_data());
    }
}
