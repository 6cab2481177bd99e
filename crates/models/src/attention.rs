//! Grouped-query self-attention with rotary positions, an explicit boolean mask and an optional
//! key/value cache for generation.

use crate::layers::Linear;
use crate::rope;
use alignment_core::precision::matmul_in;
use burn::module::Module;
use burn::tensor::{activation::softmax, backend::Backend, Bool, FloatDType, Int, Tensor, TensorData};

/// Score given to masked positions. Finite (not -inf) so that a fully masked row — a padding
/// query — yields a harmless uniform distribution instead of NaNs that would leak through `0 * NaN`.
pub(crate) const MASKED_SCORE: f32 = -1e30;

/// Cached keys and values of one layer: `[batch, kv_heads, cached_len, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
}

/// Which keys each query may see, as a `[batch, 1, queries, keys]` boolean tensor where `true`
/// means *masked*. Built once per forward pass, on the device, and shared by all layers.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    pub masked: Tensor<B, 4, Bool>,
    /// Whether `masked` is plain causal attention over as many keys as queries (no cache, no
    /// padding, one document per row, no window closer than the row's length): what fused
    /// attention kernels take as a flag instead of a mask.
    pub plain_causal: bool,
}

/// Inputs from which the mask is derived.
#[derive(Debug, Clone, Default)]
pub struct MaskSpec<'a> {
    /// `[batch][total_keys]`: `false` for padding keys. `None`: no padding.
    pub key_is_token: Option<&'a [Vec<bool>]>,
    /// `[batch][total_keys]`: document index of each key/query for packed sequences; attention
    /// never crosses documents. `None`: one document per row.
    pub document_ids: Option<&'a [Vec<u32>]>,
    /// Mistral's window (query sees keys `j` with `i - window < j <= i`).
    pub sliding_window: Option<usize>,
}

impl<B: Backend> AttentionMask<B> {
    /// Causal mask for `queries` new positions after `past` cached ones, plus padding, document
    /// boundaries and sliding window from `spec`.
    ///
    /// Computed with tensor operations on `device` from index ranges and the padding/document
    /// rows (uploaded once), so a GPU builds it without a host loop over `batch × queries × keys`.
    pub fn new(batch: usize, past: usize, queries: usize, spec: &MaskSpec, device: &B::Device) -> Self {
        let keys = past + queries;
        // Query i (absolute position past + qi) and key j.
        let query_pos = Tensor::<B, 1, Int>::arange(past as i64..keys as i64, device).reshape([1, 1, queries, 1]);
        let key_pos = Tensor::<B, 1, Int>::arange(0..keys as i64, device).reshape([1, 1, 1, keys]);
        let query_pos = query_pos.expand([1, 1, queries, keys]);
        let key_pos = key_pos.expand([1, 1, queries, keys]);
        let mut masked = key_pos.clone().greater(query_pos.clone()); // future keys
        if let Some(window) = spec.sliding_window {
            // Outside the window: j + window <= i.
            masked = masked.bool_or(key_pos.add_scalar(window as i64).lower_equal(query_pos));
        }
        let mut masked = masked.expand([batch, 1, queries, keys]);
        if let Some(rows) = spec.key_is_token {
            let flat: Vec<bool> = rows.iter().flat_map(|r| r.iter().map(|&is_token| !is_token)).collect();
            let padding = Tensor::<B, 2, Bool>::from_data(TensorData::new(flat, [batch, keys]), device);
            masked = masked.bool_or(padding.reshape([batch, 1, 1, keys]).expand([batch, 1, queries, keys]));
        }
        if let Some(rows) = spec.document_ids {
            let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&d| d as i64)).collect();
            let docs = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, keys]), device);
            let query_docs = docs.clone().slice([0..batch, past..keys]).reshape([batch, 1, queries, 1]).expand([batch, 1, queries, keys]);
            let key_docs = docs.reshape([batch, 1, 1, keys]).expand([batch, 1, queries, keys]);
            masked = masked.bool_or(query_docs.not_equal(key_docs));
        }
        let plain_causal = past == 0
            && spec.sliding_window.is_none_or(|window| window >= keys)
            && spec.key_is_token.is_none_or(|rows| rows.iter().flatten().all(|&is_token| is_token))
            && spec.document_ids.is_none_or(|rows| rows.iter().all(|row| row.iter().all(|&d| d == row[0])));
        Self { masked, plain_causal }
    }
}

/// Multi-head attention whose `num_kv_heads` key/value heads are shared by groups of query heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The type of the two attention products (scores, weighted values) under mixed precision;
    /// the softmax stays in the tensors' own type. `None`: no casts.
    #[module(skip)]
    pub matmul_dtype: Option<FloatDType>,
}

impl<B: Backend> Attention<B> {
    /// `x`: `[batch, seq, hidden]`; `cos`/`sin` from [`rope::cos_sin`] for these positions.
    /// Appends this step's keys and values to `cache` when one is given.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &AttentionMask<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, d]).swap_dims(1, 2);
        // Under mixed precision on libtorch, v stays in the products' type, as autocast's v_proj
        // returns it and the fused attention reads it (q and k are rotated in the wide type
        // first): two casts of v fewer each way, the same values.
        #[cfg(feature = "tch")]
        let keep_v_half = self.matmul_dtype.is_some() && crate::tch_attention::applies::<B>();
        #[cfg(not(feature = "tch"))]
        let keep_v_half = false;
        let [q, k, v] = Linear::forward_many_keeping([&self.q_proj, &self.k_proj, &self.v_proj], x, [false, false, keep_v_half]);
        let q = rope::apply(heads(q, h), cos, sin);
        let mut k = rope::apply(heads(k, kvh), cos, sin);
        let mut v = heads(v, kvh);

        if let Some(slot) = cache {
            if let Some(past) = slot.take() {
                k = Tensor::cat(vec![past.keys, k], 2);
                v = Tensor::cat(vec![past.values, v], 2);
            }
            *slot = Some(LayerCache { keys: k.clone(), values: v.clone() });
        }
        let keys = k.dims()[2];
        #[cfg(feature = "tch")]
        let (q, k, v) = match crate::tch_attention::attention((q, k, v), mask, (d as f64).powf(-0.5), self.matmul_dtype) {
            Ok(out) => return self.o_proj.forward(out.swap_dims(1, 2).reshape([batch, seq, h * d])),
            Err(qkv) => qkv,
        };
        // Under autodiff on the GPU backends, one recorded step that keeps no probabilities and
        // reads each kv head once for its group of query heads.
        let (q, k, v) = if crate::gpu_steps::applies::<B>() {
            let rows = crate::blocked_attention::rows_per_block(batch, h, keys);
            match crate::blocked_attention::attention(q, k, v, mask.masked.clone(), true, (d as f64).powf(-0.5), self.matmul_dtype, rows) {
                Ok(out) => return self.o_proj.forward(out.swap_dims(1, 2).reshape([batch, seq, h * d])),
                Err(qkv) => qkv,
            }
        } else {
            (q, k, v)
        };
        let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));

        let scores = matmul_in(q, k.swap_dims(2, 3), self.matmul_dtype) * (d as f64).powf(-0.5);
        let scores = scores.mask_fill(mask.masked.clone().expand([batch, h, seq, keys]), MASKED_SCORE);
        let probs = softmax(scores, 3);
        let out = matmul_in(probs, v, self.matmul_dtype).swap_dims(1, 2).reshape([batch, seq, h * d]);
        self.o_proj.forward(out)
    }
}

/// Repeats each key/value head `times` times so that query head `i` meets kv head `i / times`
/// (transformers' `repeat_kv`).
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, times: usize) -> Tensor<B, 4> {
    if times == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kvh, times, s, d]).reshape([b, kvh * times, s, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use alignment_core::backend::Cpu;

    /// The mask's definition, one key at a time.
    fn reference(batch: usize, past: usize, queries: usize, spec: &MaskSpec) -> Vec<bool> {
        let keys = past + queries;
        let mut masked = Vec::new();
        for b in 0..batch {
            for qi in 0..queries {
                let i = past + qi;
                for j in 0..keys {
                    let future = j > i;
                    let outside_window = spec.sliding_window.is_some_and(|w| j + w <= i);
                    let padding = spec.key_is_token.is_some_and(|k| !k[b][j]);
                    let other_doc = spec.document_ids.is_some_and(|d| d[b][j] != d[b][i]);
                    masked.push(future || outside_window || padding || other_doc);
                }
            }
        }
        masked
    }

    #[test]
    fn device_mask_equals_the_definition() {
        let padding = [vec![true; 7], vec![true, true, true, true, true, false, false]];
        let documents = [vec![0, 0, 0, 1, 1, 2, 2], vec![0, 1, 1, 1, 1, 2, 2]];
        for past in [0, 3] {
            let queries = 7 - past;
            for window in [None, Some(2), Some(5)] {
                for (pad, docs) in [(false, false), (true, false), (false, true), (true, true)] {
                    let spec = MaskSpec {
                        key_is_token: pad.then_some(&padding[..]),
                        document_ids: docs.then_some(&documents[..]),
                        sliding_window: window,
                    };
                    let mask = AttentionMask::<Cpu>::new(2, past, queries, &spec, &Default::default());
                    assert_eq!(mask.masked.dims(), [2, 1, queries, 7]);
                    let got = mask.masked.into_data().into_vec::<bool>().unwrap();
                    assert_eq!(got, reference(2, past, queries, &spec), "past {past} window {window:?} pad {pad} docs {docs}");
                }
            }
        }
    }
}
