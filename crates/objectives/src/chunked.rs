//! Log-probabilities from the final hidden states and the head weight, a chunk of tokens at a
//! time, so the `[rows, seq, vocab]` logits never exist at once — in the forward pass or kept
//! for the backward pass (Liger's fused linear cross-entropy, torchtune's chunked CE). With a
//! 128k vocabulary a 4 × 2048-token micro-batch has 4 GB of f32 logits; a chunk of 256 tokens
//! has 128 MB.
//!
//! Every objective here differentiates only through the per-row sums `Σ_t log p(label_t)` of
//! one or more label sets ([`SequenceLogps::sum`]), so the work splits into two passes:
//!
//! ```text
//! pass 1 (no graph)   for each chunk c:  z_c = h_c Wᵀ  →  log p(label), entropy, argmax, mean logit
//!                     → SequenceLogps per label set, identical to sequence_logps(full logits)
//! loss                the objective on those sums (made leaves by the caller) → ∂L/∂sum per row
//! pass 2 (per chunk)  z_c = h_c Wᵀ again; s = Σ_sets Σ_t ∂L/∂sum[row(t)] · log p(label_t);
//!                     backward of s alone → ∂h_c, ∂W_c   (the chunk's logits are then dropped)
//! ```
//!
//! Pass 2 recomputes one head matmul per chunk (the price of never storing logits). The
//! projection is computed as `(W hᵀ)ᵀ`, the model's own `layers::project`, so chunked and full
//! logits are the same products.
//!
//! Mixed precision: the products run in the head weight's type. A caller that computes in bf16
//! passes the weight cast once (not once per chunk); each chunk of hidden states is cast to it,
//! and the logits come back in the hidden states' type (f32), in which everything else runs.

use crate::logprobs::{position_stats, ExtraStats, PositionStats, SequenceLogps, ShiftedTargets, TokenStats};
use crate::token_logps::{token_logps, token_logps_and_stats};
use alignment_core::backend::transposes_activations_in_products;
use alignment_core::gemm::matmul;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Int, Tensor};

/// Tokens per chunk that keep one chunk's logits near `budget_values` values (at least 64):
/// e.g. 2²⁵ values (128 MiB in f32) is 256 tokens of a 128k vocabulary.
pub fn chunk_tokens_for(vocab: usize, budget_values: usize) -> usize {
    (budget_values / vocab.max(1)).max(64)
}

/// `h Wᵀ` for `h: [n, hidden]`, `W: [vocab, hidden]`, arranged like the model's head
/// (`(W hᵀ)ᵀ` on the CPU backend, row-major logits elsewhere:
/// [`transposes_activations_in_products`]), in `W`'s type; the logits in `h`'s.
fn project<B: Backend>(h: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let out = h.dtype();
    let h = h.cast(FloatDType::from(weight.dtype()));
    let logits =
        if transposes_activations_in_products::<B>() { matmul(weight, h.transpose()).transpose() } else { matmul(h, weight.transpose()) };
    logits.cast(FloatDType::from(out))
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
    let [rows, seq, width] = hidden.dims();
    let n = rows * seq;
    let flat = hidden.reshape([n, width]);
    let targets: Vec<ShiftedTargets<B>> = label_sets
        .into_iter()
        .map(|labels| {
            assert_eq!(labels.dims(), [rows, seq], "labels must be [rows, seq] = [{rows}, {seq}] like the hidden states");
            ShiftedTargets::new(labels)
        })
        .collect();
    let flat_targets = flat_targets(&targets, n);
    let mut stats = Vec::new();
    let mut picked: Vec<Vec<Tensor<B, 1>>> = vec![Vec::new(); targets.len()];
    let chunk = chunk_tokens.max(1);
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        // [1, c, vocab]
        let logits = project(flat.clone().slice([start..end, 0..width]), weight.clone()).unsqueeze_dim::<3>(0);
        // Every label set's ids as `[1, c, sets]`: one logsumexp and one pass for all of them
        // (the kernels of `token_logps` where the backend has them).
        let ids = flat_targets.iter().map(|(safe, _)| safe.clone().narrow(0, start, end - start).reshape([1, end - start])).collect();
        let (logp, lse, chunk_stats) = token_logps_and_stats(logits.clone(), Tensor::stack::<3>(ids, 2), extra);
        for (set, picked) in picked.iter_mut().enumerate() {
            picked.push(logp.clone().narrow(2, set, 1).reshape([end - start]));
        }
        // [1, c] each; from the forward pass's own reading of the logits where it computes them.
        stats.push(chunk_stats.unwrap_or_else(|| position_stats(logits, lse, extra)));
    }
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
}

/// Gradients from pass 2: of the hidden states, and of the head weight when asked for.
#[derive(Debug, Clone)]
pub struct HeadGradients<B: Backend> {
    /// `[rows, seq, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// `[vocab, hidden]`, `None` unless requested.
    pub weight: Option<Tensor<B, 2>>,
}

/// Per flattened token: its (safe) target id and its row's upstream gradient where scored.
type TokenWeights<B> = (Tensor<B, 1, Int>, Tensor<B, 1>);

/// Pass 2: the gradients of `Σ_sets Σ_rows upstream[set][row] · sum[set][row]` (the sums of
/// [`chunked_sequence_logps`]) with respect to `hidden` and, if `weight_grad`, the head
/// `weight`, recomputing each chunk's logits on the autodiff backend `B` and differentiating
/// the chunk alone. `hidden`, `weight` and `upstream` (`[rows]` per label set, typically
/// `∂loss/∂sum`) are values of `B`'s inner backend; the products run in `weight`'s type and both
/// gradients come back in `hidden`'s.
pub fn chunked_logps_backward<B: AutodiffBackend>(
    hidden: Tensor<B::InnerBackend, 3>,
    weight: Tensor<B::InnerBackend, 2>,
    weight_grad: bool,
    label_sets: Vec<Tensor<B::InnerBackend, 2, Int>>,
    upstream: Vec<Tensor<B::InnerBackend, 1>>,
    chunk_tokens: usize,
) -> HeadGradients<B::InnerBackend> {
    assert_eq!(label_sets.len(), upstream.len(), "one upstream gradient per label set");
    let [rows, seq, width] = hidden.dims();
    let n = rows * seq;
    let flat = hidden.reshape([n, width]);
    let targets: Vec<ShiftedTargets<B::InnerBackend>> = label_sets.into_iter().map(ShiftedTargets::new).collect();
    // Per token: its row's upstream gradient where scored, 0 elsewhere.
    let token_weights: Vec<TokenWeights<B::InnerBackend>> = targets
        .iter()
        .zip(upstream)
        .map(|(t, up)| {
            let per_token = up.reshape([rows, 1]).expand([rows, seq]) * t.mask.clone();
            (t.safe.clone().reshape([n]), per_token.reshape([n]))
        })
        .collect();
    let w = Tensor::<B, 2>::from_inner(weight);
    let w = if weight_grad { w.require_grad() } else { w };
    let mut hidden_grads = Vec::new();
    let mut weight_total: Option<Tensor<B::InnerBackend, 2>> = None;
    let chunk = chunk_tokens.max(1);
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let h = Tensor::<B, 2>::from_inner(flat.clone().slice([start..end, 0..width])).require_grad();
        let logits = project(h.clone(), w.clone()).unsqueeze_dim::<3>(0);
        if token_weights.is_empty() {
            break;
        }
        // The chunk's ids and weights of every label set as `[1, c, sets]`: one recorded step.
        let shape = [1, end - start];
        let ids = token_weights
            .iter()
            .map(|(safe, _)| Tensor::<B, 2, Int>::from_inner(safe.clone().narrow(0, start, end - start).reshape(shape)));
        let weights = token_weights.iter().map(|(_, w)| Tensor::<B, 2>::from_inner(w.clone().narrow(0, start, end - start).reshape(shape)));
        let (ids, weights) = (ids.collect(), weights.collect());
        let (logp, _) = token_logps(logits, Tensor::stack::<3>(ids, 2));
        let grads = (logp * Tensor::stack::<3>(weights, 2)).sum().backward();
        hidden_grads.push(h.grad(&grads).expect("the chunk's hidden states are a leaf that requires grad"));
        if weight_grad {
            let g = w.grad(&grads).expect("the head weight is a leaf that requires grad").cast(FloatDType::from(flat.dtype()));
            weight_total = Some(match weight_total {
                Some(acc) => acc + g,
                None => g,
            });
        }
    }
    let hidden = if hidden_grads.is_empty() { flat.zeros_like() } else { Tensor::cat(hidden_grads, 0) };
    HeadGradients { hidden: hidden.reshape([rows, seq, width]), weight: weight_total }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::sequence_logps_with;
    use crate::IGNORE_INDEX;
    use alignment_core::backend::{Cpu, CpuAutodiff};
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

    #[test]
    fn chunked_gradients_equal_autodiff_through_the_full_logits() {
        let (hidden, weight, sets) = setup();
        let [rows, seq, width] = hidden.dims();
        let vocab = weight.dims()[0];
        let upstream: Vec<Tensor<Cpu, 1>> =
            vec![Tensor::from_floats([0.5, -1.0, 2.0], &Default::default()), Tensor::from_floats([-0.25, 0.75, 1.5], &Default::default())];
        // Reference: autodiff through the full logits.
        let h = Tensor::<CpuAutodiff, 3>::from_inner(hidden.clone()).require_grad();
        let w = Tensor::<CpuAutodiff, 2>::from_inner(weight.clone()).require_grad();
        let logits = project(h.clone().reshape([rows * seq, width]), w.clone()).reshape([rows, seq, vocab]);
        let ad_sets = sets.iter().map(|s| Tensor::<CpuAutodiff, 2, Int>::from_inner(s.clone())).collect();
        let full = crate::logprobs::sequence_logps_many(logits, ad_sets);
        let objective =
            full.iter().zip(&upstream).map(|(s, u)| (s.sum.clone() * Tensor::from_inner(u.clone())).sum()).reduce(|a, b| a + b).unwrap();
        let grads = objective.backward();
        let (dh, dw) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap());
        for chunk in [1, 5, 64] {
            let got = chunked_logps_backward::<CpuAutodiff>(hidden.clone(), weight.clone(), true, sets.clone(), upstream.clone(), chunk);
            let eh = relative(&values(got.hidden), &values(dh.clone()));
            let ew = relative(&values(got.weight.unwrap()), &values(dw.clone()));
            assert!(eh <= 1e-6 && ew <= 1e-6, "chunk {chunk}: ∂h {eh}, ∂W {ew}");
        }
    }
}
