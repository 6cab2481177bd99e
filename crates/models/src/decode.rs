//! Batched generation: many prompts decoded together, left-padded, with a key/value cache
//! allocated once for the whole generation — what evaluation runs (transformers' `generate` on a
//! padded batch, `padding_side="left"`).
//!
//! ```text
//! prompts ─► left-padded [rows, width] ─► prefill: every layer once over the prompts, keys/values
//!            written to cache[.., 0..width]; logits of the last position only
//!         ─► per step: one token per row, its keys/values written at cache[.., len], attention
//!            over cache[.., 0..len+1]; rows that finished are dropped from the batch
//! ```
//!
//! Where the time of the step-by-step path ([`crate::model::CausalLm::forward`] with a
//! [`crate::KvCache`]) went and what replaces it (measured in `docs/evaluation.md`):
//! - logits of every prompt position (`[rows, width, vocab]`): here only the last position is
//!   projected onto the vocabulary;
//! - the cache grown by concatenation (each step copies every layer's cache): here written in
//!   place into a buffer sized for prompt + `max_new_tokens`;
//! - grouped-query attention through `repeat_kv` (a copy of keys and values per query head):
//!   here query heads sharing a key/value head are stacked as rows of one matmul;
//! - finished rows kept in the batch: here removed, so a long answer does not make short ones pay.
//!
//! The attention is written here rather than through [`crate::attention::Attention::forward`]
//! because the cache layout differs; the projections, norms, MLP and rotary embedding are the
//! model's own modules, so LoRA adapters, compressed weights and family switches apply unchanged.

use crate::attention::Attention;
use crate::compressed;
#[cfg(feature = "ndarray")]
use crate::cpu_decode;
use crate::error::ModelError;
use crate::generate::{choose_token, GenerationConfig};
use crate::layers::Linear;
use crate::model::CausalLm;
use crate::rope;
use burn::tensor::{activation::softmax, backend::Backend, Bool, Int, Tensor, TensorData};
use rand::{rngs::StdRng, SeedableRng};

/// Score of masked keys (finite, as in [`crate::attention`], so a row with every key masked — a
/// padding query — stays free of NaNs).
const MASKED_SCORE: f32 = -1e30;

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced one of [`GenerationConfig::stop_tokens`] (kept as its last token).
    StopToken,
    /// The caller's `stop` callback returned true (a stop string, say).
    Stopped,
    /// It reached `max_new_tokens`.
    Length,
}

/// The continuation of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// New tokens, including a final stop token when [`FinishReason::StopToken`].
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// Keys and values of every layer, `[rows, kv_heads, capacity, head_dim]` each, written in place.
struct Cache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> Cache<B> {
    fn new(model: &CausalLm<B>, rows: usize, capacity: usize, device: &B::Device) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let shape = [rows, l.self_attn.num_kv_heads, capacity, l.self_attn.head_dim];
                Some((Tensor::zeros(shape, device), Tensor::zeros(shape, device)))
            })
            .collect();
        Self { layers }
    }

    /// Keeps only the rows `keep` (indices into the current rows).
    fn retain(&mut self, keep: &[usize], device: &B::Device) {
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(keep.iter().map(|&i| i as i64).collect(), [keep.len()]), device);
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.take() {
                *layer = Some((k.select(0, index.clone()), v.select(0, index.clone())));
            }
        }
    }
}

/// Which keys each query sees, `[rows, 1, 1, queries, keys]` with `true` = masked: keys that are
/// left padding, in the future of the query, or outside a sliding window. Query `qi` sits at cache
/// index `start + qi`.
fn mask<B: Backend>(visible: &[Vec<bool>], start: usize, queries: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 5, Bool> {
    let keys = start + queries;
    let mut masked = Vec::with_capacity(visible.len() * queries * keys);
    for row in visible {
        for qi in 0..queries {
            let i = start + qi;
            masked.extend((0..keys).map(|j| !row[j] || j > i || window.is_some_and(|w| j + w <= i)));
        }
    }
    Tensor::from_data(TensorData::new(masked, [visible.len(), 1, 1, queries, keys]), device)
}

/// What a layer's attention needs besides its input: the rotary tables and the mask as tensors
/// (any number of new tokens, any backend), or, for one new token per row on the CPU backend,
/// what [`cpu_decode::attend_one`] reads.
enum Context<B: Backend> {
    Tensors {
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        masked: Tensor<B, 5, Bool>,
    },
    #[cfg(feature = "ndarray")]
    CpuStep(cpu_decode::Step),
}

/// The [`Context::CpuStep`] of a step of one new token per row on the CPU backend; `None`
/// elsewhere.
#[cfg(feature = "ndarray")]
fn cpu_step<B: Backend>(model: &CausalLm<B>, positions: &[Vec<i64>], visible: &[Vec<bool>], start: usize) -> Option<Context<B>> {
    if positions.first().map(Vec::len) != Some(1) || !cpu_decode::applies::<B>() {
        return None;
    }
    let new_positions: Vec<i64> = positions.iter().map(|p| p[0]).collect();
    let (cos, sin) = cpu_decode::cos_sin_rows(&model.inv_freq, &new_positions);
    let attn = &model.layers.first()?.self_attn;
    Some(Context::CpuStep(cpu_decode::Step {
        num_heads: attn.num_heads,
        num_kv_heads: attn.num_kv_heads,
        head_dim: attn.head_dim,
        index: start,
        visible: visible.to_vec(),
        window: model.config.sliding_window,
        cos,
        sin,
    }))
}

#[cfg(not(feature = "ndarray"))]
fn cpu_step<B: Backend>(_: &CausalLm<B>, _: &[Vec<i64>], _: &[Vec<bool>], _: usize) -> Option<Context<B>> {
    None
}

/// Self-attention of `x` (`[rows, t, hidden]`, at cache indices `start..start + t`) over the cached
/// keys before it and its own; writes its keys and values into `slot`.
fn attend<B: Backend>(
    attn: &Attention<B>,
    x: Tensor<B, 3>,
    context: &Context<B>,
    slot: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    start: usize,
) -> Tensor<B, 3> {
    let (cos, sin, masked) = match context {
        Context::Tensors { cos, sin, masked } => (cos, sin, masked),
        #[cfg(feature = "ndarray")]
        Context::CpuStep(step) => {
            let [q, k, v] = Linear::forward_many([&attn.q_proj, &attn.k_proj, &attn.v_proj], x);
            let (keys, values) = slot.take().expect("the cache holds every layer");
            let (out, keys, values) = cpu_decode::attend_one(q, k, v, keys, values, step);
            *slot = Some((keys, values));
            return attn.o_proj.forward(out);
        }
    };
    let [rows, t, _] = x.dims();
    let (h, kvh, d) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
    let groups = h / kvh;
    let heads = |y: Tensor<B, 3>, n: usize| y.reshape([rows, t, n, d]).swap_dims(1, 2);
    let [q, k, v] = Linear::forward_many([&attn.q_proj, &attn.k_proj, &attn.v_proj], x);
    let q = rope::apply(heads(q, h), cos, sin);
    let k = rope::apply(heads(k, kvh), cos, sin);
    let v = heads(v, kvh);

    let end = start + t;
    // Taken out of the slot so the buffers are uniquely owned and written in place.
    let (keys, values) = slot.take().expect("the cache holds every layer");
    let keys = keys.slice_assign([0..rows, 0..kvh, start..end, 0..d], k);
    let values = values.slice_assign([0..rows, 0..kvh, start..end, 0..d], v);
    let (k, v) = (keys.clone().slice([0..rows, 0..kvh, 0..end, 0..d]), values.clone().slice([0..rows, 0..kvh, 0..end, 0..d]));
    *slot = Some((keys, values));

    // Query heads sharing a key/value head (transformers' repeat_kv groups: head i uses kv head
    // i / groups) become rows of one matmul: [rows, kvh, groups * t, d].
    let q = q.reshape([rows, kvh, groups * t, d]);
    let scores = alignment_core::gemm::matmul(q, k.swap_dims(2, 3)) * (d as f64).powf(-0.5);
    let scores = scores.reshape([rows, kvh, groups, t, end]).mask_fill(masked.clone().expand([rows, kvh, groups, t, end]), MASKED_SCORE);
    let probs = softmax(scores, 4).reshape([rows, kvh, groups * t, end]);
    let out = alignment_core::gemm::matmul(probs, v).reshape([rows, h, t, d]).swap_dims(1, 2).reshape([rows, t, h * d]);
    attn.o_proj.forward(out)
}

/// Hidden states before the final norm for `ids` (`[rows][t]`, at cache indices `start..`, RoPE
/// positions `positions`), updating `cache`. `fused`: one new token per row on the CPU backend
/// takes [`cpu_decode`]'s one-pass attention (`false` only to compare the two paths in tests).
fn forward<B: Backend>(
    model: &CausalLm<B>,
    ids: &[Vec<u32>],
    positions: &[Vec<i64>],
    visible: &[Vec<bool>],
    cache: &mut Cache<B>,
    start: usize,
    fused: bool,
) -> Tensor<B, 3> {
    let device = model.embed_tokens.device();
    let (rows, t) = (ids.len(), ids[0].len());
    let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows, t]), &device);
    let mut x = match &model.embed_compressed {
        Some(weight) => compressed::embed_compressed(ids, weight),
        None => crate::model::embedding_rows(model.embed_tokens.val(), ids),
    };
    if let Some(scale) = model.family.embedding_scale {
        x = x * scale;
    }
    let context = fused.then(|| cpu_step(model, positions, visible, start)).flatten().unwrap_or_else(|| {
        let masked = mask::<B>(visible, start, t, model.config.sliding_window, &device);
        let (cos, sin) = rope::cos_sin::<B>(&model.inv_freq, positions, &device);
        Context::Tensors { cos, sin, masked }
    });
    for (layer, slot) in model.layers.iter().zip(cache.layers.iter_mut()) {
        let attn = attend(&layer.self_attn, layer.input_layernorm.forward(x.clone()), &context, slot, start);
        x = x + attn;
        x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x));
    }
    x
}

/// Runs `f` on a thread of rayon's pool. On the CPU backend every layer of a decoding step is a
/// few threaded passes; started from a thread outside the pool, each pass would hand its work to
/// the pool and sleep until done (two context switches, tens of microseconds, some 200 times a
/// step); from a thread of the pool, the caller takes part and the pass costs a join.
fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "ndarray")]
    return rayon::scope(|_| f());
    #[cfg(not(feature = "ndarray"))]
    f()
}

/// Generates a continuation for each prompt, decoding them together (greedy when
/// `config.temperature` is 0, else sampled with temperature and top-p; row `i` samples from its
/// own generator seeded with `config.seed + i`, so its output does not depend on the other rows).
///
/// `stop(i, tokens)` is called after each token of prompt `i` with its continuation so far; true
/// ends that row (stop strings, streaming output). A row also ends at a stop token or after
/// `max_new_tokens`. Returns one [`Generation`] per prompt, in order.
pub fn generate_batch<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Generation>, ModelError> {
    let seeds: Vec<u64> = (0..prompts.len()).map(|i| config.seed.wrapping_add(i as u64)).collect();
    generate_batch_seeded(model, prompts, &seeds, config, stop)
}

/// [`generate_batch`] with the sampling seed of each row given (`config.seed` unused): a caller
/// that reorders prompts into batches keeps each prompt's draws.
pub fn generate_batch_seeded<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    config: &GenerationConfig,
    mut stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Generation>, ModelError> {
    if seeds.len() != prompts.len() {
        return Err(ModelError::Generation(format!("{} seeds for {} prompts", seeds.len(), prompts.len())));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::Generation(format!("prompt {i} has no tokens")));
    }
    let vocab = model.embedding_dims()[0] as u32;
    if let Some((i, &id)) = prompts.iter().enumerate().find_map(|(i, p)| p.iter().find(|&&id| id >= vocab).map(|id| (i, id))) {
        return Err(ModelError::Generation(format!("prompt {i} has token id {id}, outside the vocabulary of {vocab}")));
    }
    let mut results: Vec<Generation> = prompts.iter().map(|_| Generation { tokens: Vec::new(), finish: FinishReason::Length }).collect();
    if prompts.is_empty() || config.max_new_tokens == 0 {
        return Ok(results);
    }
    let device = model.embed_tokens.device();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = width + config.max_new_tokens;
    let mut rngs: Vec<StdRng> = seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect();

    // Per active row: its prompt index, which cache slots hold tokens, its next RoPE position.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut visible: Vec<Vec<bool>> = prompts.iter().map(|p| (0..capacity).map(|j| j >= width - p.len()).collect()).collect();
    let mut next_position: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();

    let padded: Vec<Vec<u32>> =
        prompts.iter().map(|p| std::iter::repeat_n(0, width - p.len()).chain(p.iter().copied()).collect()).collect();
    // Positions count real tokens only; padding gets 1, as transformers' `cumsum(mask) - 1` then
    // `masked_fill(mask == 0, 1)` (never seen: padding keys are masked).
    let positions: Vec<Vec<i64>> =
        prompts.iter().map(|p| std::iter::repeat_n(1, width - p.len()).chain(0..p.len() as i64).collect()).collect();
    let mut cache = Cache::new(model, prompts.len(), capacity, &device);
    // Runs `ids` through the layers (on the pool's threads) and gives the logits of each row's
    // last position, `[rows, 1, vocab]`.
    let step = |ids: &[Vec<u32>], positions: &[Vec<i64>], visible: &[Vec<bool>], cache: &mut Cache<B>, start: usize| {
        on_workers(|| {
            let hidden = forward(model, ids, positions, visible, cache, start, true);
            let [rows, t, dim] = hidden.dims();
            let last = hidden.slice([0..rows, t - 1..t, 0..dim]);
            model.project(model.norm.forward(last)).into_data()
        })
    };
    let mut logits = step(&padded, &positions, &visible, &mut cache, 0);
    let mut len = width;

    loop {
        let rows = active.len();
        let vocab = logits.shape[2];
        let values: Vec<f32> = logits.convert::<f32>().into_vec().map_err(|e| ModelError::Generation(format!("{e:?}")))?;
        let mut keep = Vec::with_capacity(rows);
        let mut next = Vec::with_capacity(rows);
        for (r, &prompt) in active.iter().enumerate() {
            let token = choose_token(&values[r * vocab..(r + 1) * vocab], config, &mut rngs[prompt]);
            let result = &mut results[prompt];
            result.tokens.push(token);
            let finish = if config.stop_tokens.contains(&token) {
                Some(FinishReason::StopToken)
            } else if stop(prompt, &result.tokens) {
                Some(FinishReason::Stopped)
            } else if result.tokens.len() >= config.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(reason) => result.finish = reason,
                None => {
                    keep.push(r);
                    next.push(token);
                }
            }
        }
        if keep.is_empty() {
            return Ok(results);
        }
        if keep.len() < rows {
            cache.retain(&keep, &device);
            active = keep.iter().map(|&r| active[r]).collect();
            visible = keep.iter().map(|&r| std::mem::take(&mut visible[r])).collect();
            next_position = keep.iter().map(|&r| next_position[r]).collect();
        }
        let ids: Vec<Vec<u32>> = next.into_iter().map(|t| vec![t]).collect();
        let positions: Vec<Vec<i64>> = next_position.iter().map(|&p| vec![p]).collect();
        next_position.iter_mut().for_each(|p| *p += 1);
        logits = step(&ids, &positions, &visible, &mut cache, len);
        len += 1;
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use alignment_core::backend::Cpu;

    /// Max |a - b| over two tensors of the same shape.
    fn max_diff<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Decoding steps through `cpu_decode` against the same steps through burn's operations:
    /// three left-padded rows, grouped-query heads, with and without a sliding window.
    #[test]
    fn fused_cpu_step_equals_the_tensor_path() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (fixture, window) in [("tiny-llama", None), ("tiny-llama", Some(4)), ("tiny-mistral", Some(4))] {
            let device = Default::default();
            let mut model: CausalLm<Cpu> = crate::load_pretrained(&fixtures.join(fixture), &device).unwrap();
            model.config.sliding_window = window;
            let prompts: [&[u32]; 3] = [&[5, 9, 2, 7, 11, 3], &[4, 8], &[1, 2, 3, 4]];
            let width = 6;
            let capacity = width + 3;
            let padded: Vec<Vec<u32>> =
                prompts.iter().map(|p| std::iter::repeat_n(0, width - p.len()).chain(p.iter().copied()).collect()).collect();
            let positions: Vec<Vec<i64>> =
                prompts.iter().map(|p| std::iter::repeat_n(1, width - p.len()).chain(0..p.len() as i64).collect()).collect();
            let visible: Vec<Vec<bool>> = prompts.iter().map(|p| (0..capacity).map(|j| j >= width - p.len()).collect()).collect();
            let mut fused_cache = Cache::new(&model, 3, capacity, &device);
            let mut plain_cache = Cache::new(&model, 3, capacity, &device);
            forward(&model, &padded, &positions, &visible, &mut fused_cache, 0, true);
            forward(&model, &padded, &positions, &visible, &mut plain_cache, 0, true);
            // Two steps, so that the second attends to a key the fused path wrote.
            for step in 0..2u32 {
                let ids: Vec<Vec<u32>> = vec![vec![17 + step], vec![23], vec![42]];
                let positions: Vec<Vec<i64>> = prompts.iter().map(|p| vec![(p.len() + step as usize) as i64]).collect();
                let start = width + step as usize;
                let fused = forward(&model, &ids, &positions, &visible, &mut fused_cache, start, true);
                let plain = forward(&model, &ids, &positions, &visible, &mut plain_cache, start, false);
                let diff = max_diff(fused, plain);
                assert!(diff < 1e-5, "{fixture} window {window:?} step {step}: hidden states differ by {diff}");
                for (layer, (f, p)) in fused_cache.layers.iter().zip(&plain_cache.layers).enumerate() {
                    let ((fk, fv), (pk, pv)) = (f.clone().unwrap(), p.clone().unwrap());
                    let (dk, dv) = (max_diff(fk, pk), max_diff(fv, pv));
                    if layer == 0 && step == 0 {
                        // Keys and values of equal inputs, rotated by rope::apply's f32
                        // operations: the same bits (later layers see the attention's rounding).
                        assert_eq!((dk, dv), (0.0, 0.0), "{fixture}: layer 0's cached keys and values");
                    }
                    assert!(dk < 1e-5 && dv < 1e-5, "{fixture} layer {layer} step {step}: cache differs by {dk}, {dv}");
                }
            }
        }
    }
}
