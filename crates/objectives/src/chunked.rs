//! Log-probabilities from the final hidden states and the head weight, a chunk of tokens at a
//! time, so the `[rows, seq, vocab]` logits never exist at once — in the forward pass or kept
//! for the backward pass (Liger's fused linear cross-entropy, torchtune's chunked CE). With a
//! 128k vocabulary a 4 × 2048-token micro-batch has 2 GB of bf16 logits; a chunk of 261 tokens
//! has 64 MiB (2048, a trained head's: 512 MiB).
//!
//! Every objective here differentiates only through the per-row sums `Σ_t log p(label_t)` of
//! one or more label sets ([`SequenceLogps::sum`]), so the work splits into two passes:
//!
//! ```text
//! pass 1 (no graph)   for each chunk c:  z_c = h_c Wᵀ  →  log p(label), entropy, argmax, mean logit
//!                     → SequenceLogps per label set, identical to sequence_logps(full logits)
//! loss                the objective on those sums (made leaves by the caller) → ∂L/∂sum per row
//! pass 2 (per chunk)  z_c = h_c Wᵀ again;  g_t = Σ_sets ∂L/∂sum[row(t)]  (0 where unscored);
//!                     ∂z_c = Σ_sets g_t · onehot(label_t) − (Σ_sets g_t) · softmax(z_c)   over z_c
//!                     ∂h_c = ∂z_c W            ∂W += ∂z_cᵀ h_c       (the chunk's logits then dropped)
//! ```
//!
//! When `∂L/∂sum` is known before the loss (SFT's loss is `−Σ sum`, so it is the same constant
//! for every row), both passes run in one walk ([`chunked_logps_and_backward`]): each chunk's
//! logits give their log-probabilities and then their gradient, and the head product runs once.
//!
//! Pass 2 recomputes one head product per chunk (the price of never storing logits) and writes
//! the logits' gradient straight from them: the softmax's own backward pass
//! (`token_logps::logits_gradient_in_runs`), with no graph. On libtorch that reads the logits
//! alone; the other backends' backward passes take the logsumexp, which is recomputed from the
//! chunk (pass 1's is not kept). The
//! projection is the model's own arrangement (`layers::project`: `(W hᵀ)ᵀ` on the CPU backend),
//! so chunked and full logits are the same products.
//!
//! Mixed precision: the products run in the head weight's type. A caller that computes in bf16
//! passes the weight cast once (not once per chunk); each chunk of hidden states is cast to it,
//! and the logits stay in that type, as the full head gives them
//! (`CausalLm::project_in_product_type`): the loss's passes read them in runs cast to f32, and
//! the logits' gradient is written in their type. `∂h` comes back in the hidden states' type,
//! `∂W` accumulated over the chunks in it too (f32): each chunk's product, `[vocab, hidden]`,
//! added to the sum as it comes (on libtorch read in its own type by one in-place add).
//!
//! The weight's gradient is what makes small chunks dear: each chunk adds a `[vocab, hidden]`
//! product to the sum (≈ 12 B a weight moved), where its logits cost ≈ 42 B a logit over both
//! passes. [`chunk_tokens_for_head`] therefore gives a trained head chunks of at least `hidden`
//! tokens (the sums then cost at most ≈ 30 % of the logits' own traffic).

use crate::logprobs::{position_stats, ExtraStats, PositionStats, SequenceLogps, ShiftedTargets, TokenStats, STATS_CHUNK_ELEMENTS};
use crate::token_logps::{logits_gradient_in_runs, token_logps_and_stats};
use alignment_core::backend::transposes_activations_in_products;
use alignment_core::gemm::matmul;
use alignment_core::precision::cast_to;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor};

/// Tokens per chunk that keep one chunk's logits near `budget_values` values (at least 64):
/// e.g. 2²⁵ values (64 MiB in bf16) is 261 tokens of a 128k vocabulary.
pub fn chunk_tokens_for(vocab: usize, budget_values: usize) -> usize {
    (budget_values / vocab.max(1)).max(64)
}

/// [`chunk_tokens_for`], and when the head weight is trained at least `hidden` tokens: each
/// chunk adds its `[vocab, hidden]` weight gradient to the sum, ≈ 12 B a weight moved against
/// ≈ 42 B a logit for the chunk's logits over both passes, so chunks of `hidden` tokens keep
/// the sums under ≈ 30 % of the logits' traffic (Llama-3.2-1B: 2048 tokens a chunk, 512 MiB of
/// bf16 logits, where 256-token chunks would move 3.4× the logits' bytes in sums).
pub fn chunk_tokens_for_head(vocab: usize, hidden: usize, head_trained: bool, budget_values: usize) -> usize {
    let by_budget = chunk_tokens_for(vocab, budget_values);
    if head_trained {
        by_budget.max(hidden)
    } else {
        by_budget
    }
}

/// `h Wᵀ` for `h: [n, hidden]`, `W: [vocab, hidden]`, arranged like the model's head
/// (`(W hᵀ)ᵀ` on the CPU backend, row-major logits elsewhere:
/// [`transposes_activations_in_products`]), in `W`'s type, `h` cast to it.
fn project<B: Backend>(h: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let h = cast_to(h, FloatDType::from(weight.dtype()));
    if transposes_activations_in_products::<B>() {
        matmul(weight, h.transpose()).transpose()
    } else {
        matmul(h, weight.transpose())
    }
}

/// The flattened shifted targets of each label set: gatherable ids and the scored mask, `[n]`.
fn flat_targets<B: Backend>(targets: &[ShiftedTargets<B>], n: usize) -> Vec<(Tensor<B, 1, Int>, Tensor<B, 1>)> {
    targets.iter().map(|t| (t.safe.clone().reshape([n]), t.mask.clone().reshape([n]))).collect()
}

/// Pass 1: [`crate::sequence_logps_many`] of the logits `hidden Wᵀ`, computed `chunk_tokens`
/// positions at a time. `hidden` is `[rows, seq, hidden]` (after the final norm), `weight` the
/// head `[vocab, hidden]` in the type the products run in; each label set `[rows, seq]`. Pass tensors without a graph (the
/// inner backend, or detached): nothing here is meant to be differentiated.
pub fn chunked_sequence_logps<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    label_sets: Vec<Tensor<B, 2, Int>>,
    chunk_tokens: usize,
) -> Vec<SequenceLogps<B>> {
    chunked_sequence_logps_with(hidden, weight, label_sets, chunk_tokens, ExtraStats::default())
}

/// [`chunked_sequence_logps`] with the optional statistics `extra` asks for
/// ([`crate::sequence_logps_with`]).
pub fn chunked_sequence_logps_with<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    label_sets: Vec<Tensor<B, 2, Int>>,
    chunk_tokens: usize,
    extra: ExtraStats,
) -> Vec<SequenceLogps<B>> {
    walk_chunks(hidden, weight, label_sets, chunk_tokens, Some(extra), None).0.expect("asked for")
}

/// Gradients from pass 2: of the hidden states, and of the head weight when asked for.
#[derive(Debug, Clone)]
pub struct HeadGradients<B: Backend> {
    /// `[rows, seq, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// `[vocab, hidden]`, `None` unless requested.
    pub weight: Option<Tensor<B, 2>>,
}

/// Pass 2: the gradients of `Σ_sets Σ_rows upstream[set][row] · sum[set][row]` (the sums of
/// [`chunked_sequence_logps`]) with respect to `hidden` and, if `weight_grad`, the head
/// `weight`, recomputing each chunk's logits and writing their gradient directly (no graph).
/// `upstream` is `[rows]` per label set, typically `∂loss/∂sum`; the products run in `weight`'s
/// type and both gradients come back in `hidden`'s.
pub fn chunked_logps_backward<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    weight_grad: bool,
    label_sets: Vec<Tensor<B, 2, Int>>,
    upstream: Vec<Tensor<B, 1>>,
    chunk_tokens: usize,
) -> HeadGradients<B> {
    walk_chunks(hidden, weight, label_sets, chunk_tokens, None, Some(Upstream { per_set: upstream, weight_grad })).1.expect("asked for")
}

/// Passes 1 and 2 in one walk over the chunks, for a loss whose `∂loss/∂sum` is known before
/// the loss is computed (SFT's `−Σ sum`: `upstream` is the same constant for every row): each
/// chunk's logits give the log-probabilities, the statistics and the logits' gradient while they
/// exist, so the head product runs once per chunk instead of twice. Returns what
/// [`chunked_sequence_logps_with`] and [`chunked_logps_backward`] return for the same arguments,
/// bit for bit (the logits' gradient reads pass 1's logsumexp, which pass 2 recomputes with the
/// same operations).
pub fn chunked_logps_and_backward<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    weight_grad: bool,
    label_sets: Vec<Tensor<B, 2, Int>>,
    upstream: Vec<Tensor<B, 1>>,
    chunk_tokens: usize,
    extra: ExtraStats,
) -> (Vec<SequenceLogps<B>>, HeadGradients<B>) {
    let upstream = Upstream { per_set: upstream, weight_grad };
    let (logps, gradients) = walk_chunks(hidden, weight, label_sets, chunk_tokens, Some(extra), Some(upstream));
    (logps.expect("asked for"), gradients.expect("asked for"))
}

/// What pass 2 differentiates: `∂loss/∂sum` per label set (`[rows]` each), and whether the head
/// weight's gradient is wanted.
struct Upstream<B: Backend> {
    per_set: Vec<Tensor<B, 1>>,
    weight_grad: bool,
}

/// One walk over the chunks of `hidden`: the log-probabilities and statistics when `extra` is
/// given (pass 1), the head's gradients when `upstream` is (pass 2), or both from each chunk's
/// one product.
fn walk_chunks<B: Backend>(
    hidden: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    label_sets: Vec<Tensor<B, 2, Int>>,
    chunk_tokens: usize,
    extra: Option<ExtraStats>,
    upstream: Option<Upstream<B>>,
) -> (Option<Vec<SequenceLogps<B>>>, Option<HeadGradients<B>>) {
    let [rows, seq, width] = hidden.dims();
    let n = rows * seq;
    let wide = FloatDType::from(hidden.dtype());
    let flat = hidden.reshape([n, width]);
    let targets: Vec<ShiftedTargets<B>> = label_sets
        .into_iter()
        .map(|labels| {
            assert_eq!(labels.dims(), [rows, seq], "labels must be [rows, seq] = [{rows}, {seq}] like the hidden states");
            ShiftedTargets::new(labels)
        })
        .collect();
    let flat_targets = flat_targets(&targets, n);
    // Pass 2's per-token weights, `[n]` per label set: each row's upstream gradient where
    // scored, 0 elsewhere. With no label set there is nothing to differentiate.
    let asked_gradients = upstream.is_some();
    let weight_grad = upstream.as_ref().is_some_and(|u| u.weight_grad);
    let token_weights: Option<Vec<Tensor<B, 1>>> = upstream.filter(|_| !targets.is_empty()).map(|upstream| {
        assert_eq!(targets.len(), upstream.per_set.len(), "one upstream gradient per label set");
        targets
            .iter()
            .zip(upstream.per_set)
            .map(|(t, up)| (up.reshape([rows, 1]).expand([rows, seq]) * t.mask.clone()).reshape([n]))
            .collect()
    });
    // Neither pass has anything to compute (pass 2 alone, without label sets): no chunk runs.
    let chunks = if extra.is_some() || token_weights.is_some() { n } else { 0 };
    let mut stats = Vec::new();
    let mut picked: Vec<Vec<Tensor<B, 1>>> = vec![Vec::new(); targets.len()];
    let mut hidden_grads = Vec::new();
    let mut weight_total: Option<Tensor<B, 2>> = None;
    let chunk = chunk_tokens.max(1);
    for start in (0..chunks).step_by(chunk) {
        let end = (start + chunk).min(n);
        let shape = [1, end - start];
        let h = cast_to(flat.clone().slice([start..end, 0..width]), FloatDType::from(weight.dtype()));
        // [1, c, vocab]
        let logits = project(h.clone(), weight.clone()).unsqueeze_dim::<3>(0);
        // Every label set's ids as `[1, c, sets]`: one logsumexp and one pass for all of them
        // (the kernels of `token_logps` where the backend has them).
        let ids =
            Tensor::stack::<3>(flat_targets.iter().map(|(safe, _)| safe.clone().narrow(0, start, end - start).reshape(shape)).collect(), 2);
        let lse = extra.map(|extra| {
            let (logp, lse, chunk_stats) = token_logps_and_stats(logits.clone(), ids.clone(), extra);
            for (set, picked) in picked.iter_mut().enumerate() {
                picked.push(logp.clone().narrow(2, set, 1).reshape([end - start]));
            }
            // [1, c] each; from the forward pass's own reading of the logits where it computes
            // them. The clones are dropped here, so the logits' gradient below may write over them.
            stats.push(chunk_stats.unwrap_or_else(|| position_stats(logits.clone(), lse.clone(), extra)));
            lse
        });
        let Some(token_weights) = &token_weights else { continue };
        let weights = Tensor::stack::<3>(token_weights.iter().map(|w| w.clone().narrow(0, start, end - start).reshape(shape)).collect(), 2);
        let dz = logits_gradient_in_runs(logits, lse, weights, ids, STATS_CHUNK_ELEMENTS).squeeze_dim::<2>(0);
        // Both products with a row-major right operand, which every backend reads in place.
        hidden_grads.push(cast_to(matmul(dz.clone(), weight.clone()), wide));
        if weight_grad {
            let part = matmul(dz.transpose(), h);
            weight_total = Some(match weight_total {
                Some(sum) => add_widened(sum, part),
                None => cast_to(part, wide),
            });
        }
    }
    let logps = extra.map(|_| {
        let joined = |parts: Vec<Tensor<B, 1>>| Tensor::cat(parts, 0).reshape([rows, seq]);
        let stats = TokenStats::from_positions(PositionStats::cat(stats).reshape([rows, seq]));
        targets
            .iter()
            .zip(picked)
            .map(|(t, parts)| {
                let token_logps = joined(parts) * t.mask.clone();
                stats.reduce(token_logps.sum_dim(1).squeeze_dim(1), t)
            })
            .collect()
    });
    let gradients = asked_gradients.then(|| {
        let hidden = if hidden_grads.is_empty() { flat.zeros_like() } else { Tensor::cat(hidden_grads, 0) };
        HeadGradients { hidden: hidden.reshape([rows, seq, width]), weight: weight_total }
    });
    (logps, gradients)
}

/// `sum + part`, `part` (the products' type) widened to `sum`'s: on libtorch one in-place add
/// that reads `part` in its own type (CUDA's kernels convert as they read), elsewhere a cast and
/// an add.
fn add_widened<B: Backend>(sum: Tensor<B, 2>, part: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "tch")]
    if alignment_core::torch_storage::is_libtorch::<B>() && sum.dtype() != part.dtype() {
        use alignment_core::torch_storage::{float_storage, from_float_storage};
        use burn::backend::libtorch::TchTensor;
        let (Some(total), Some(part)) = (float_storage(sum), float_storage(part)) else { unreachable!("a libtorch backend") };
        let total = tch::no_grad(|| {
            if total.can_mut() {
                let _ = total.tensor.shallow_clone().f_add_(&part.tensor).expect("a sum and a part of one shape");
                total
            } else {
                TchTensor::new(&total.tensor + &part.tensor)
            }
        });
        return from_float_storage(total);
    }
    let wide = FloatDType::from(sum.dtype());
    sum + cast_to(part, wide)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::sequence_logps_with;
    use crate::IGNORE_INDEX;
    use alignment_core::backend::Cpu;
    use burn::tensor::{Distribution, TensorData};

    fn relative(a: &[f32], b: &[f32]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
        diff / norm.max(1e-30)
    }

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    fn setup() -> (Tensor<Cpu, 3>, Tensor<Cpu, 2>, Vec<Tensor<Cpu, 2, Int>>) {
        let device = Default::default();
        <Cpu as Backend>::seed(&device, 11);
        let (rows, seq, width, vocab) = (3, 7, 8, 37);
        let hidden = Tensor::<Cpu, 3>::random([rows, seq, width], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<Cpu, 2>::random([vocab, width], Distribution::Normal(0.0, 0.5), &device);
        let labels: Vec<i64> = (0..rows * seq).map(|i| if i % 5 == 0 { IGNORE_INDEX } else { (i * 7 % vocab) as i64 }).collect();
        let all: Vec<i64> = (0..rows * seq).map(|i| (i * 3 % vocab) as i64).collect();
        let sets = vec![
            Tensor::from_data(TensorData::new(labels, [rows, seq]), &device),
            Tensor::from_data(TensorData::new(all, [rows, seq]), &device),
        ];
        (hidden, weight, sets)
    }

    #[test]
    fn chunked_statistics_equal_the_full_logits_for_any_chunk_size() {
        let (hidden, weight, sets) = setup();
        let [rows, seq, width] = hidden.dims();
        let logits = project(hidden.clone().reshape([rows * seq, width]), weight.clone()).reshape([rows, seq, weight.dims()[0]]);
        let extra = ExtraStats { log_sum_sq_probs: true };
        let full = sequence_logps_with(logits, sets.clone(), extra);
        for chunk in [1, 4, 7, 64] {
            let chunked = chunked_sequence_logps_with(hidden.clone(), weight.clone(), sets.clone(), chunk, extra);
            for (a, b) in chunked.iter().zip(&full) {
                let (a_sq, b_sq) = (a.log_sum_sq_probs.clone().unwrap(), b.log_sum_sq_probs.clone().unwrap());
                for (x, y) in [
                    (&a.sum, &b.sum),
                    (&a.num_tokens, &b.num_tokens),
                    (&a.mean_logits, &b.mean_logits),
                    (&a.mean_logits_all, &b.mean_logits_all),
                    (&a.entropy_sum, &b.entropy_sum),
                    (&a.num_correct, &b.num_correct),
                    (&a_sq, &b_sq),
                ] {
                    let err = relative(&values(x.clone()), &values(y.clone()));
                    assert!(err <= 1e-6, "chunk {chunk}: relative difference {err}");
                }
            }
        }
    }

    /// The chunked gradients for chunks of each of `chunks` tokens equal autodiff through the
    /// full logits computed in the weight's type `product` (f32, or a half type as
    /// `CausalLm::project_in_product_type` gives them: bf16 under mixed precision, f64 standing
    /// for it on the CPU backend), within `tolerance`; both come back in the hidden states' type.
    /// Returns the comparisons.
    fn chunked_gradients_equal_the_full_logits<I: Backend>(
        device: &I::Device,
        product: FloatDType,
        chunks: &[usize],
        tolerance: f64,
    ) -> usize {
        type A<I> = burn::backend::Autodiff<I>;
        let (hidden, weight, sets) = setup();
        let to = |t: Tensor<Cpu, 2>| Tensor::<I, 2>::from_data(t.into_data(), device);
        let [rows, seq, width] = hidden.dims();
        let vocab = weight.dims()[0];
        let hidden = to(hidden.reshape([rows * seq, width])).reshape([rows, seq, width]);
        let weight = to(weight).cast(product);
        let sets: Vec<Tensor<I, 2, Int>> = sets.into_iter().map(|s| Tensor::from_data(s.into_data(), device)).collect();
        let upstream: Vec<Tensor<I, 1>> =
            vec![Tensor::from_floats([0.5, -1.0, 2.0], device), Tensor::from_floats([-0.25, 0.75, 1.5], device)];
        let h = Tensor::<A<I>, 3>::from_inner(hidden.clone()).require_grad();
        let w = Tensor::<A<I>, 2>::from_inner(weight.clone()).require_grad();
        let logits = project(h.clone().reshape([rows * seq, width]), w.clone()).reshape([rows, seq, vocab]);
        let ad_sets = sets.iter().map(|s| Tensor::<A<I>, 2, Int>::from_inner(s.clone())).collect();
        let full = crate::logprobs::sequence_logps_many(logits, ad_sets);
        let objective =
            full.iter().zip(&upstream).map(|(s, u)| (s.sum.clone() * Tensor::from_inner(u.clone())).sum()).reduce(|a, b| a + b).unwrap();
        let grads = objective.backward();
        let wide = |t: Tensor<I, 2>| t.cast(FloatDType::F32).into_data().into_vec::<f32>().unwrap();
        let dh = wide(h.grad(&grads).unwrap().reshape([rows * seq, width]));
        let dw = wide(w.grad(&grads).unwrap());
        let mut compared = 0;
        for &chunk in chunks {
            let got = chunked_logps_backward::<I>(hidden.clone(), weight.clone(), true, sets.clone(), upstream.clone(), chunk);
            let dw_got = got.weight.unwrap();
            assert_eq!(got.hidden.dtype(), hidden.dtype(), "∂h in the hidden states' type");
            assert_eq!(dw_got.dtype(), hidden.dtype(), "∂W summed in the hidden states' type");
            let eh = relative(&wide(got.hidden.reshape([rows * seq, width])), &dh);
            let ew = relative(&wide(dw_got), &dw);
            assert!(eh <= tolerance && ew <= tolerance, "chunk {chunk}: ∂h {eh:e}, ∂W {ew:e}");
            compared += 2;
        }
        compared
    }

    #[test]
    fn chunked_gradients_equal_autodiff_through_the_full_logits() {
        assert_eq!(chunked_gradients_equal_the_full_logits::<Cpu>(&Default::default(), FloatDType::F32, &[1, 5, 64], 1e-6), 6);
    }

    #[test]
    fn a_weight_of_another_type_gives_the_full_logits_gradients() {
        assert_eq!(chunked_gradients_equal_the_full_logits::<Cpu>(&Default::default(), FloatDType::F64, &[4, 64], 1e-6), 4);
    }

    /// On libtorch in bf16: the logits' gradient by torch's kernels, each chunk's weight gradient
    /// added to the f32 sum in place; the products are rounded to bf16 per chunk, not once.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_bf16_chunks_give_the_full_logits_gradients() {
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let compared = chunked_gradients_equal_the_full_logits::<alignment_core::backend::Torch>(&device, FloatDType::BF16, &[4, 64], 5e-3);
        assert_eq!(compared, 4);
    }

    /// [`chunked_logps_and_backward`] against the two passes it replaces, for chunks of each of
    /// `chunks` tokens and products in `product`: every statistic of both label sets and both
    /// gradients bit for bit, and no weight gradient unless asked for. Returns the comparisons.
    fn one_walk_equals_the_two_passes<I: Backend>(device: &I::Device, product: FloatDType, chunks: &[usize]) -> usize {
        let (hidden, weight, sets) = setup();
        let [rows, seq, width] = hidden.dims();
        let hidden = Tensor::<I, 2>::from_data(hidden.reshape([rows * seq, width]).into_data(), device).reshape([rows, seq, width]);
        let weight = Tensor::<I, 2>::from_data(weight.into_data(), device).cast(product);
        let sets: Vec<Tensor<I, 2, Int>> = sets.into_iter().map(|s| Tensor::from_data(s.into_data(), device)).collect();
        let upstream: Vec<Tensor<I, 1>> =
            vec![Tensor::from_floats([0.5, -1.0, 2.0], device), Tensor::from_floats([-0.25, 0.75, 1.5], device)];
        let extra = ExtraStats { log_sum_sq_probs: true };
        let bits = |t: Tensor<I, 1>| {
            t.cast(FloatDType::F64).into_data().into_vec::<f64>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let flat = |t: Tensor<I, 3>| bits(t.reshape([rows * seq * width]));
        let mut compared = 0;
        for &chunk in chunks {
            let logps = chunked_sequence_logps_with(hidden.clone(), weight.clone(), sets.clone(), chunk, extra);
            let grads = chunked_logps_backward(hidden.clone(), weight.clone(), true, sets.clone(), upstream.clone(), chunk);
            let (one_logps, one_grads) =
                chunked_logps_and_backward(hidden.clone(), weight.clone(), true, sets.clone(), upstream.clone(), chunk, extra);
            for (a, b) in one_logps.into_iter().zip(logps) {
                for (x, y) in [
                    (a.sum, b.sum),
                    (a.num_tokens, b.num_tokens),
                    (a.mean_logits, b.mean_logits),
                    (a.mean_logits_all, b.mean_logits_all),
                    (a.entropy_sum, b.entropy_sum),
                    (a.num_correct, b.num_correct),
                    (a.log_sum_sq_probs.unwrap(), b.log_sum_sq_probs.unwrap()),
                ] {
                    assert_eq!(bits(x), bits(y), "chunk {chunk}: a statistic");
                    compared += 1;
                }
            }
            let dh = flat(grads.hidden);
            assert_eq!(flat(one_grads.hidden), dh, "chunk {chunk}: ∂h");
            let [vocab, _] = weight.dims();
            let weight_bits = |t: Tensor<I, 2>| bits(t.reshape([vocab * width]));
            assert_eq!(weight_bits(one_grads.weight.unwrap()), weight_bits(grads.weight.unwrap()), "chunk {chunk}: ∂W");
            compared += 2;
            let (_, frozen) =
                chunked_logps_and_backward(hidden.clone(), weight.clone(), false, sets.clone(), upstream.clone(), chunk, extra);
            assert!(frozen.weight.is_none(), "no weight gradient unless asked for");
            assert_eq!(flat(frozen.hidden), dh, "chunk {chunk}: ∂h, frozen head");
        }
        compared
    }

    #[test]
    fn one_walk_gives_the_two_passes_bits() {
        let device = Default::default();
        assert_eq!(one_walk_equals_the_two_passes::<Cpu>(&device, FloatDType::F32, &[1, 5, 64]), 3 * 16);
        assert_eq!(one_walk_equals_the_two_passes::<Cpu>(&device, FloatDType::F64, &[4, 64]), 2 * 16);
    }

    /// On libtorch in bf16: torch's kernels for the logits' passes, the weight gradient summed in place.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_bf16_one_walk_gives_the_two_passes_bits() {
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert_eq!(one_walk_equals_the_two_passes::<alignment_core::backend::Torch>(&device, FloatDType::BF16, &[4, 64]), 2 * 16);
    }

    #[test]
    fn a_trained_head_gets_chunks_of_at_least_its_hidden_size() {
        // Llama-3.2-1B: 2²⁵ values are 261 tokens of its 128256-token vocabulary.
        assert_eq!(chunk_tokens_for_head(128_256, 2048, false, 1 << 25), 261);
        assert_eq!(chunk_tokens_for_head(128_256, 2048, true, 1 << 25), 2048);
        // SmolLM2-135M: 682 tokens by the budget, more than its 576 hidden.
        assert_eq!(chunk_tokens_for_head(49_152, 576, true, 1 << 25), 682);
        assert_eq!(chunk_tokens_for_head(1 << 30, 8, false, 1 << 25), 64, "at least 64 tokens");
    }
}
