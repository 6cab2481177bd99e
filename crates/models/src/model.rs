//! The decoder-only causal language model shared by Llama, Mistral and Gemma: token embedding,
//! `num_layers` pre-norm blocks (attention, gated MLP), final norm, vocabulary projection.
//! Family differences are the switches in [`crate::family::FamilySpec`].

use crate::attention::{Attention, AttentionMask, LayerCache, MaskSpec};
use crate::compressed::{self, CompressedWeight};
use crate::config::{Activation, ModelConfig};
use crate::family::FamilySpec;
use crate::layers::{Linear, RmsNorm};
use crate::rope;
use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, FloatDType, Int, Tensor, TensorData};
use std::sync::Arc;

/// Gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Backend> Mlp<B> {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    ///
    /// Under mixed precision the gate, the up projection, the activation and their product stay
    /// in the products' half type, as autocast leaves them (`alignment_core::precision`); the
    /// output is in the weights' type. There, under autodiff, a SiLU gate and a plain down
    /// projection are one recorded step that keeps no product of the gate (`gated_down`).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [gate, up] = match self.gate_proj.matmul_dtype {
            Some(_) => Linear::forward_many_in_product_type([&self.gate_proj, &self.up_proj], x),
            None => Linear::forward_many([&self.gate_proj, &self.up_proj], x),
        };
        let (gate, up) = match (self.activation, self.down_proj.dense_half_product()) {
            (Activation::Silu, Some(half)) => match crate::gated_down::silu_gate_down(gate, up, self.down_proj.weight.val(), half) {
                Ok(y) => return y,
                Err((gate, up, _)) => (gate, up),
            },
            _ => (gate, up),
        };
        let hidden = match self.activation {
            Activation::Silu => silu_times(gate, up),
            Activation::GeluTanh => gelu_approximate(gate) * up,
            Activation::Gelu => gelu(gate) * up,
        };
        self.down_proj.forward(hidden)
    }
}

/// `silu(gate) · up`, the gated MLP's product: one threaded pass on the CPU backend (a recorded
/// step under autodiff; `cpu_gate.rs`); under the autodiff of the other backends one recorded
/// step that keeps only `gate` and `up` (`gate.rs`); burn's operations elsewhere.
pub fn silu_times<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "ndarray")]
    let (gate, up) = match crate::cpu_gate::silu_gate(gate, up) {
        Ok(hidden) => return hidden,
        Err(inputs) => inputs,
    };
    let (gate, up) = match crate::gate::silu_gate(gate, up) {
        Ok(hidden) => return hidden,
        Err(inputs) => inputs,
    };
    silu(gate) * up
}

/// Rows `ids` of the embedding `weight`, `[batch, seq, hidden]`, in the model's float type (the
/// backend's own): a frozen embedding may be stored in the half type
/// ([`CausalLm::store_frozen_weights_in_product_type`]), and its rows are the residual stream's
/// first values.
pub(crate) fn embedding_rows<B: Backend>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    alignment_core::precision::cast_to(burn::tensor::module::embedding(weight, ids), alignment_core::precision::float_type::<B>())
}

/// Whether every value of `weight` is exactly representable in `narrow` (casting there and back
/// gives it unchanged; a NaN never is). Checked a run of ≤ 2²³ values (whole rows) at a time, so
/// that the check's temporaries (the run cast there and back, the comparison) stay ≈ 60 MB
/// beside a weight of any size, and stopping at the first run that differs.
fn exactly_representable<B: Backend>(weight: &Tensor<B, 2>, narrow: FloatDType) -> bool {
    let [rows, columns] = weight.dims();
    let wide = FloatDType::from(weight.dtype());
    let rows_per_run = ((1 << 23) / columns.max(1)).max(1);
    (0..rows).step_by(rows_per_run).all(|first| {
        let run = weight.clone().narrow(0, first, rows_per_run.min(rows - first));
        run.clone().cast(narrow).cast(wide).equal(run).all().into_scalar().elem::<bool>()
    })
}

/// One transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
    /// With a cache slot, this step's keys and values are appended to it.
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &LayerInputs<B>, cache: Option<&mut Option<LayerCache<B>>>) -> Tensor<B, 3> {
        let attn = self.self_attn.forward(self.input_layernorm.forward(x.clone()), &inputs.cos, &inputs.sin, &inputs.mask, cache);
        let x = x + attn;
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }

    /// The layer's linear projections under their Hugging Face names (relative to the layer),
    /// in checkpoint order: what saving, loading and adapters iterate over.
    pub fn linears(&self) -> [(&'static str, &Linear<B>); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }

    /// [`Self::linears`], mutably.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear<B>); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }
}

/// Per-layer key/value caches for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.keys.dims()[2])
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-forward-pass inputs shared by every decoder layer.
#[derive(Debug, Clone)]
pub struct LayerInputs<B: Backend> {
    /// Which keys each query sees.
    pub mask: AttentionMask<B>,
    /// RoPE tables `[batch, 1, seq, head_dim]`.
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
}

/// A batch on the device: its token ids and what every layer shares, uploaded together before a
/// forward pass reads them ([`CausalLm::batch_inputs`]). A training step that takes its inputs
/// this way copies nothing from the host while it runs, which a step replayed as a CUDA graph
/// requires (the replays read these same tensors).
#[derive(Debug, Clone)]
pub struct BatchInputs<B: Backend> {
    /// `[batch, seq]` token ids.
    pub ids: Tensor<B, 2, Int>,
    pub layers: LayerInputs<B>,
}

impl<B: AutodiffBackend> BatchInputs<B> {
    /// The same tensors on the inner backend (no graph).
    pub fn inner(self) -> BatchInputs<B::InnerBackend> {
        let LayerInputs { mask, cos, sin } = self.layers;
        let mask = AttentionMask { masked: mask.masked.inner(), plain_causal: mask.plain_causal };
        BatchInputs { ids: self.ids.inner(), layers: LayerInputs { mask, cos: cos.inner(), sin: sin.inner() } }
    }
}

/// A batch of token sequences with their positions and visibility.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch][seq]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch][seq]` RoPE positions (restarting at 0 per packed document, shifted under left padding).
    pub position_ids: Vec<Vec<i64>>,
    /// `[batch][seq]`: `false` for padding. `None`: no padding.
    pub attention_mask: Option<Vec<Vec<bool>>>,
    /// `[batch][seq]` document index for packed rows. `None`: one document per row.
    pub document_ids: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Unpadded rows of equal length with positions `0..seq`.
    pub fn from_ids(input_ids: Vec<Vec<u32>>) -> Self {
        let position_ids = input_ids.iter().map(|r| (0..r.len() as i64).collect()).collect();
        Self { input_ids, position_ids, attention_mask: None, document_ids: None }
    }
    /// `[batch, seq]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.input_ids.len(), self.input_ids.first().map_or(0, Vec::len)]
    }
}

/// A causal language model of any supported family.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`; `[0, 0]` when the embedding is held in `embed_compressed`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub family: FamilySpec,
    #[module(skip)]
    pub inv_freq: Vec<f32>,
    /// The embedding in compact form (a ZeRO-3 shard), `None` when `embed_tokens` holds it.
    #[module(skip)]
    pub embed_compressed: Option<Arc<dyn CompressedWeight>>,
    /// The type the matrix products run in under mixed precision (`bf16: true`), `None`: the
    /// parameters' own. Set with [`Self::set_matmul_dtype`], which tells every layer.
    #[module(skip)]
    pub matmul_dtype: Option<FloatDType>,
}

impl<B: Backend> CausalLm<B> {
    /// Hidden states after the final norm, `[batch, seq, hidden]`. With a cache, `batch` holds only
    /// the new tokens (positions and masks for the full cached length are the caller's business:
    /// `attention_mask`, when given, covers cached + new keys).
    ///
    /// The same computation as [`Self::embed`], then every [`DecoderLayer::forward`] with
    /// [`Self::layer_inputs`], then the final norm: callers that need the layers one at a time
    /// (gradient checkpointing) use those pieces.
    pub fn hidden_states(&self, batch: &Batch, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let Some(cache) = cache else {
            return self.hidden_states_of(&self.batch_inputs(batch));
        };
        assert_eq!(cache.layers.len(), self.layers.len(), "a KvCache made for another model");
        let inputs = self.layer_inputs(batch, cache.len());
        let mut x = self.embed(batch);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &inputs, Some(slot));
        }
        self.norm.forward(x)
    }

    /// [`Self::hidden_states`] without a cache, from inputs already on the device.
    pub fn hidden_states_of(&self, inputs: &BatchInputs<B>) -> Tensor<B, 3> {
        let mut x = self.embed_ids(inputs.ids.clone());
        for layer in &self.layers {
            x = layer.forward(x, &inputs.layers, None);
        }
        self.norm.forward(x)
    }

    /// `batch` uploaded for a forward pass without a cache: its token ids and
    /// [`Self::layer_inputs`].
    pub fn batch_inputs(&self, batch: &Batch) -> BatchInputs<B> {
        BatchInputs { ids: self.token_ids(batch), layers: self.layer_inputs(batch, 0) }
    }

    /// `batch`'s token ids as a `[batch, seq]` tensor on the model's device.
    fn token_ids(&self, batch: &Batch) -> Tensor<B, 2, Int> {
        let [b, t] = batch.dims();
        let ids: Vec<i64> = batch.input_ids.iter().flatten().map(|&i| i as i64).collect();
        Tensor::from_data(TensorData::new(ids, [b, t]), &self.embed_tokens.device())
    }

    /// Token embeddings of `batch` (scaled for Gemma), `[batch, seq, hidden]`: the first layer's input.
    pub fn embed(&self, batch: &Batch) -> Tensor<B, 3> {
        self.embed_ids(self.token_ids(batch))
    }

    /// [`Self::embed`] of token ids already on the device.
    pub fn embed_ids(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = match &self.embed_compressed {
            Some(weight) => compressed::embed_compressed(ids, weight),
            None => embedding_rows(self.embed_tokens.val(), ids),
        };
        match self.family.embedding_scale {
            Some(scale) => x * scale,
            None => x,
        }
    }

    /// What every layer of one forward pass shares: the attention mask (causal, padding, packed
    /// documents, sliding window) and the RoPE tables for `batch`'s positions, after `past`
    /// cached positions. Built on the device.
    pub fn layer_inputs(&self, batch: &Batch, past: usize) -> LayerInputs<B> {
        let device = self.embed_tokens.device();
        let [b, t] = batch.dims();
        let spec = MaskSpec {
            key_is_token: batch.attention_mask.as_deref(),
            document_ids: batch.document_ids.as_deref(),
            sliding_window: self.config.sliding_window,
        };
        let mask = AttentionMask::new(b, past, t, &spec, &device);
        let (cos, sin) = rope::cos_sin::<B>(&self.inv_freq, &batch.position_ids, &device);
        LayerInputs { mask, cos, sin }
    }

    /// Projects hidden states `[batch, seq, hidden]` to vocabulary logits `[batch, seq, vocab]`.
    pub fn project(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => match &self.embed_compressed {
                Some(weight) => compressed::project_compressed(hidden, weight),
                None => crate::layers::project_param_in(hidden, self.embed_tokens.val(), self.matmul_dtype),
            },
        }
    }

    /// [`Self::project`] with the logits left in the products' type under mixed precision, as
    /// autocast returns them: for a loss that casts runs of positions to f32 as it reads them
    /// (`alignment_objectives`' log-probabilities and statistics), so that the f32 logits never
    /// exist whole. The values are those of [`Self::project`] before its last cast. Without mixed
    /// precision, or for a ZeRO-3 shard's head, [`Self::project`] itself.
    pub fn project_in_product_type(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let Some(dtype) = self.matmul_dtype else { return self.project(hidden) };
        match (&self.lm_head, &self.embed_compressed) {
            (Some(head), _) => head.forward_in_product_type(hidden),
            (None, Some(_)) => self.project(hidden),
            (None, None) => crate::layers::project_param_as(hidden, self.embed_tokens.val(), dtype),
        }
    }

    /// Runs every matrix product of the model (projections, adapters, attention, head) in
    /// `dtype` from now on, the parameters staying in their own type: mixed precision
    /// ([`alignment_core::precision`]). `None` turns it off, and gives the weights
    /// [`Self::store_frozen_weights_in_product_type`] narrowed the model's float type back (a
    /// lossless cast: they were stored narrower only where that lost nothing).
    pub fn set_matmul_dtype(&mut self, dtype: Option<FloatDType>) {
        if dtype.is_none() {
            let float_type = alignment_core::precision::float_type::<B>();
            for param in self.dense_weights_mut() {
                if param.val().dtype() != DType::from(float_type) {
                    *param = Param::initialized(param.id, param.val().cast(float_type));
                }
            }
        }
        self.matmul_dtype = dtype;
        for layer in &mut self.layers {
            layer.self_attn.matmul_dtype = dtype;
            for (_, linear) in layer.linears_mut() {
                linear.matmul_dtype = dtype;
            }
        }
        if let Some(head) = self.lm_head.as_mut() {
            head.matmul_dtype = dtype;
        }
    }

    /// Under mixed precision, stores each frozen weight held dense (a LoRA or QLoRA base's
    /// projections, the embedding, the head) in the products' type ([`Self::matmul_dtype`]) where
    /// that loses nothing: every value exactly representable in it, as a bf16 checkpoint's are.
    /// Returns the bytes saved. The products cast these weights to that type anyway, so their
    /// values are unchanged and the cast is skipped; the embedding's rows are cast back to the
    /// model's float type as they are looked up, which gives the values they had. The handbook's
    /// LoRA recipes hold the base so too (`torch_dtype: bfloat16`): half the bytes of f32, 2.3 GiB
    /// less for Llama-3.2-1B's. Trainable weights, the norms, weights held
    /// compressed or quantized, a weight not exactly representable (an f32 checkpoint's), and
    /// every weight when the products' type is not narrower than the weights' are left as they
    /// are. `set_matmul_dtype(None)` undoes it.
    /// `ALIGNMENT_FROZEN_IN_PRODUCT_TYPE=0` turns it off, to measure what it saves.
    pub fn store_frozen_weights_in_product_type(&mut self) -> u64 {
        static STORE: alignment_core::env_switch::EnvSwitch =
            alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_FROZEN_IN_PRODUCT_TYPE");
        let Some(half) = self.matmul_dtype.filter(|_| STORE.is_on()) else { return 0 };
        let narrow = DType::from(half);
        let mut saved = 0;
        for param in self.dense_weights_mut() {
            let weight = param.val();
            let wide = weight.dtype();
            if param.is_require_grad() || narrow.size() >= wide.size() || weight.shape().num_elements() == 0 {
                continue;
            }
            if exactly_representable(&weight, half) {
                saved += (weight.shape().num_elements() * (wide.size() - narrow.size())) as u64;
                *param = Param::initialized(param.id, weight.cast(half));
            }
        }
        saved
    }

    /// Every weight matrix held dense: the embedding (unless compressed), each projection and the
    /// head (unless compressed or quantized, whose `weight` is an empty placeholder).
    fn dense_weights_mut(&mut self) -> Vec<&mut Param<Tensor<B, 2>>> {
        let mut weights = Vec::new();
        if self.embed_compressed.is_none() {
            weights.push(&mut self.embed_tokens);
        }
        let linears = self.layers.iter_mut().flat_map(|layer| layer.linears_mut().map(|(_, linear)| linear)).chain(self.lm_head.as_mut());
        for linear in linears {
            if linear.compressed.is_none() && linear.quantized.is_none() {
                weights.push(&mut linear.weight);
            }
        }
        weights
    }

    /// `[vocab, hidden]` of the embedding, whatever the storage.
    pub fn embedding_dims(&self) -> [usize; 2] {
        match &self.embed_compressed {
            Some(weight) => weight.dims(),
            None => self.embed_tokens.dims(),
        }
    }

    /// The head as a dense `[vocab, hidden]` tensor: `lm_head`, or the embedding when tied
    /// (expanded when compressed).
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.dense_weight(),
            None => self.embedding_weight(),
        }
    }

    /// [`Self::head_weight`] in the type the products run in ([`Self::matmul_dtype`]), cast
    /// once: what a chunked head multiplies every chunk of hidden states by.
    pub fn head_weight_for_products(&self) -> Tensor<B, 2> {
        let weight = self.head_weight();
        match self.matmul_dtype {
            // Nothing to cast when the frozen head is stored in that type already.
            Some(dtype) => alignment_core::precision::cast_to(weight, dtype),
            None => weight,
        }
    }

    /// Whether any decoder weight is block-quantized (QLoRA's 4-bit base).
    pub fn has_quantized_layers(&self) -> bool {
        self.layers.iter().any(|l| l.linears().iter().any(|(_, lin)| lin.quantized.is_some()))
    }

    /// Whether any LoRA adapter applies dropout (its masks then come from the backend's RNG).
    pub fn has_lora_dropout(&self) -> bool {
        self.layers.iter().any(|l| l.linears().iter().any(|(_, lin)| lin.lora.as_ref().is_some_and(|a| a.dropout > 0.0)))
    }

    /// The embedding as a dense tensor (expanded when compressed).
    pub fn embedding_weight(&self) -> Tensor<B, 2> {
        match &self.embed_compressed {
            Some(weight) => compressed::expand::<B, _>(weight.as_ref(), &self.embed_tokens.device()),
            None => self.embed_tokens.val(),
        }
    }

    /// Logits `[batch, seq, vocab]` for every position of `batch`.
    pub fn forward(&self, batch: &Batch, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.project(self.hidden_states(batch, cache))
    }
}

// Storing frozen weights narrower needs a half type the backend has: torch's CPU kernels.
#[cfg(all(test, feature = "tch"))]
mod tests {
    use super::*;
    use crate::layers::LoraAdapter;
    use burn::backend::libtorch::LibTorchDevice;
    use burn::backend::{Autodiff, LibTorch};
    use burn::tensor::Distribution;

    type T = Autodiff<LibTorch<f32>>;

    fn tiny(dtype: &str, tied: bool) -> CausalLm<T> {
        let json = format!(
            r#"{{"model_type": "llama", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": {tied}, "torch_dtype": "{dtype}"}}"#
        );
        crate::random_model::<T>(ModelConfig::from_json_str(&json).unwrap(), 3, &LibTorchDevice::Cpu, None).unwrap().no_grad()
    }

    /// Every dense weight's values and type, by position.
    fn weights(model: &mut CausalLm<T>) -> Vec<(DType, Vec<f32>)> {
        model.dense_weights_mut().into_iter().map(|p| (p.val().dtype(), p.val().into_data().convert::<f32>().to_vec().unwrap())).collect()
    }

    /// Logits and the adapter's gradients of a model with one trainable adapter (on q of layer
    /// 0) and mixed-precision products, on a fixed batch.
    fn step(model: &CausalLm<T>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let batch = Batch::from_ids(vec![vec![1, 5, 9, 2, 7], vec![3, 3, 8, 40, 1]]);
        let logits = model.forward(&batch, None);
        // Fixed weights of the logits in the loss (the backend's generator is shared by tests).
        let n = logits.shape().num_elements();
        let r: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let r = Tensor::<T, 3>::from_data(TensorData::new(r, logits.dims()), &LibTorchDevice::Cpu);
        let grads = (logits.clone().cast(FloatDType::F32) * r.clone()).sum().backward();
        let adapter = model.layers[0].self_attn.q_proj.lora.as_ref().unwrap();
        let values = |t: Tensor<LibTorch<f32>, 2>| t.into_data().convert::<f32>().to_vec().unwrap();
        let logits = logits.inner().into_data().convert::<f32>().to_vec().unwrap();
        (logits, values(adapter.a.grad(&grads).unwrap()), values(adapter.b.grad(&grads).unwrap()))
    }

    #[test]
    fn tch_frozen_weights_are_stored_narrower_only_where_nothing_is_lost() {
        for tied in [false, true] {
            let mut model = tiny("bfloat16", tied);
            let device = LibTorchDevice::Cpu;
            let a = Tensor::<T, 2>::random([2, 16], Distribution::Default, &device);
            let b = Tensor::<T, 2>::random([16, 2], Distribution::Default, &device);
            let adapter = LoraAdapter {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                scaling: 0.5,
                dropout: 0.0,
                force_dropout: false,
                magnitude: None,
            };
            model.layers[0].self_attn.q_proj.lora = Some(adapter);
            model.set_matmul_dtype(Some(FloatDType::BF16));
            let before = weights(&mut model);
            let expected = step(&model);

            let frozen: usize = before.iter().map(|(_, v)| v.len()).sum();
            assert_eq!(model.store_frozen_weights_in_product_type(), 2 * frozen as u64, "tied {tied}: two bytes saved per value");
            assert!(weights(&mut model).iter().all(|(dtype, _)| *dtype == DType::BF16), "tied {tied}: every frozen weight in bf16");
            let adapter = model.layers[0].self_attn.q_proj.lora.as_ref().unwrap();
            assert_eq!(adapter.a.val().dtype(), DType::F32, "the trainable adapter is left alone");
            assert_eq!(model.norm.weight.val().dtype(), DType::F32, "the norms are left alone");
            assert!(step(&model) == expected, "tied {tied}: logits and gradients bit for bit");
            assert_eq!(model.store_frozen_weights_in_product_type(), 0, "nothing left to store");

            model.set_matmul_dtype(None);
            assert_eq!(weights(&mut model), before, "tied {tied}: turning mixed precision off gives the f32 weights back");
        }
    }

    #[test]
    fn tch_trainable_or_inexact_weights_are_not_stored_narrower() {
        // f32 values (not bf16's): nothing is stored narrower.
        let mut model = tiny("float32", false);
        model.set_matmul_dtype(Some(FloatDType::BF16));
        assert_eq!(model.store_frozen_weights_in_product_type(), 0);
        assert!(weights(&mut model).iter().all(|(dtype, _)| *dtype == DType::F32));
        // A trainable model: nothing either.
        let device = LibTorchDevice::Cpu;
        let json = r#"{"model_type": "llama", "vocab_size": 48, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#;
        let mut trainable = crate::random_model::<T>(ModelConfig::from_json_str(json).unwrap(), 3, &device, None).unwrap();
        trainable.set_matmul_dtype(Some(FloatDType::BF16));
        assert_eq!(trainable.store_frozen_weights_in_product_type(), 0);
        // Without mixed precision: nothing.
        let mut model = tiny("bfloat16", false);
        assert_eq!(model.store_frozen_weights_in_product_type(), 0);
    }
}
