//! Building a [`CausalLm`] from a Hugging Face model directory and saving it back in the same
//! layout (config.json + model.safetensors), loadable by `transformers.AutoModelForCausalLM`.

use crate::attention::Attention;
use crate::config::ModelConfig;
use crate::error::{io_err, ModelError};
use crate::family::FamilySpec;
use crate::layers::{Linear, RmsNorm};
use crate::model::{CausalLm, DecoderLayer, Mlp};
use crate::quantized::{QuantizedParts, QuantizedWeight};
use crate::rope;
use crate::weights::{write_safetensors, Checkpoint, NamedTensor, SaveDtype};
use alignment_core::AtomicDir;
use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files next to the weights that describe the tokenizer and generation defaults; copied along
/// when a model is saved so the output directory is complete.
pub const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"];

/// Reads `dir/config.json` and the weights next to it.
pub fn load_pretrained<B: Backend>(dir: &Path, device: &B::Device) -> Result<CausalLm<B>, ModelError> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    from_checkpoint(config, &checkpoint, device)
}

/// Turns a decoder layer's linear weight (`[out, in]` values) into a frozen quantized one while
/// loading (QLoRA's 4-bit base), so the dense weights are never all resident at once.
pub type Quantizer<'a> = &'a dyn Fn(&[f32], [usize; 2]) -> QuantizedParts;

/// [`load_pretrained`] with every decoder-layer linear weight quantized by `quantize` as it is
/// read and put on the device in that form (embeddings, norms and an untied `lm_head` stay
/// dense, as bitsandbytes leaves them).
pub fn load_pretrained_quantized<B: Backend>(dir: &Path, device: &B::Device, quantize: Quantizer) -> Result<CausalLm<B>, ModelError> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    from_checkpoint_with(config, &checkpoint, device, Some(quantize))
}

/// Builds the model described by `config` from `checkpoint`, verifying every shape and that no
/// tensor is left unused.
pub fn from_checkpoint<B: Backend>(config: ModelConfig, checkpoint: &Checkpoint, device: &B::Device) -> Result<CausalLm<B>, ModelError> {
    from_checkpoint_with(config, checkpoint, device, None)
}

/// [`from_checkpoint`], quantizing decoder-layer linear weights with `quantize` when given.
pub fn from_checkpoint_with<B: Backend>(
    config: ModelConfig,
    checkpoint: &Checkpoint,
    device: &B::Device,
    quantize: Option<Quantizer>,
) -> Result<CausalLm<B>, ModelError> {
    let used = RefCell::new(BTreeSet::new());
    let read = |name: &str, shape: &[usize]| -> Result<TensorData, ModelError> {
        let values = checkpoint.read_f32(name, shape)?;
        used.borrow_mut().insert(name.to_string());
        Ok(TensorData::new(values, shape.to_vec()))
    };
    let tie = config.tie_word_embeddings;
    let model = assemble(config, device, |name, shape, role| {
        let data = read(name, shape)?;
        Ok(match (role, quantize) {
            (WeightRole::DecoderLinear, Some(quantize)) => {
                let parts = quantize(data.as_slice::<f32>().expect("read as f32"), [shape[0], shape[1]]);
                Weight::Quantized(QuantizedWeight::from_parts(&parts, device))
            }
            _ => Weight::Dense(data),
        })
    })?;
    let used = used.into_inner();
    // Tied checkpoints sometimes still carry lm_head.weight; rotary caches of old exports are derived.
    let unexpected: Vec<String> = checkpoint
        .names()
        .into_iter()
        .filter(|n| !used.contains(n))
        .filter(|n| !(tie && n == "lm_head.weight"))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    if !unexpected.is_empty() {
        return Err(ModelError::UnexpectedTensors { path: checkpoint.path(), names: unexpected });
    }
    Ok(model)
}

/// What a weight is for, so a weight source can treat them differently (QLoRA compresses only
/// the decoder layers' linear weights; random initialisation sets norms to one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRole {
    /// The token embedding `[vocab, hidden]`.
    Embedding,
    /// A q/k/v/o/gate/up/down projection `[out, in]` of a decoder layer.
    DecoderLinear,
    /// An untied `lm_head` `[vocab, hidden]`.
    Head,
    /// An RMSNorm scale `[hidden]`.
    Norm,
}

/// A weight as a source hands it to [`assemble`].
#[allow(clippy::large_enum_variant)] // one per tensor, moved once: boxing buys nothing
pub enum Weight<B: Backend> {
    /// Host values, uploaded to the device.
    Dense(TensorData),
    /// A tensor already on the device.
    Tensor(Tensor<B, 2>),
    /// A block-quantized frozen linear weight (decoder linears only).
    Quantized(QuantizedWeight<B>),
}

/// Builds the model `config` describes, asking `weight(name, shape, role)` for every parameter
/// under its Hugging Face name, in checkpoint order: the one place that knows the model's
/// parameter layout, shared by checkpoint loading and random initialisation ([`crate::init`]).
pub fn assemble<B: Backend>(
    config: ModelConfig,
    device: &B::Device,
    mut weight: impl FnMut(&str, &[usize], WeightRole) -> Result<Weight<B>, ModelError>,
) -> Result<CausalLm<B>, ModelError> {
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q_out, kv_out) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
    let family = FamilySpec::for_config(&config);
    let dense = |w: Weight<B>| -> Tensor<B, 2> {
        match w {
            Weight::Dense(data) => Tensor::from_data(data, device),
            Weight::Tensor(t) => t,
            Weight::Quantized(q) => q.dequantize(),
        }
    };
    let mut linear = |name: String, out: usize, inp: usize, role: WeightRole| -> Result<Linear<B>, ModelError> {
        Ok(match weight(&name, &[out, inp], role)? {
            Weight::Quantized(q) => Linear::from_quantized(q),
            other => Linear::new(dense(other)),
        })
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        let d = WeightRole::DecoderLinear;
        let self_attn = Attention {
            q_proj: linear(format!("{p}.self_attn.q_proj.weight"), q_out, h, d)?,
            k_proj: linear(format!("{p}.self_attn.k_proj.weight"), kv_out, h, d)?,
            v_proj: linear(format!("{p}.self_attn.v_proj.weight"), kv_out, h, d)?,
            o_proj: linear(format!("{p}.self_attn.o_proj.weight"), h, q_out, d)?,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            matmul_dtype: None,
        };
        let mlp = Mlp {
            gate_proj: linear(format!("{p}.mlp.gate_proj.weight"), i, h, d)?,
            up_proj: linear(format!("{p}.mlp.up_proj.weight"), i, h, d)?,
            down_proj: linear(format!("{p}.mlp.down_proj.weight"), h, i, d)?,
            activation: config.activation,
        };
        layers.push((p, self_attn, mlp));
    }
    let lm_head = if config.tie_word_embeddings { None } else { Some(linear("lm_head.weight".into(), v, h, WeightRole::Head)?) };

    let mut norm = |name: String| -> Result<RmsNorm<B>, ModelError> {
        let scale = match weight(&name, &[h], WeightRole::Norm)? {
            Weight::Dense(data) => Tensor::from_data(data, device),
            other => dense(other).reshape([h]),
        };
        Ok(RmsNorm { weight: Param::from_tensor(scale), eps: config.rms_norm_eps, unit_offset: family.norm_unit_offset })
    };
    let layers = layers
        .into_iter()
        .map(|(p, self_attn, mlp)| {
            Ok(DecoderLayer {
                input_layernorm: norm(format!("{p}.input_layernorm.weight"))?,
                self_attn,
                post_attention_layernorm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                mlp,
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let final_norm = norm("model.norm.weight".into())?;
    let embed = dense(weight("model.embed_tokens.weight", &[v, h], WeightRole::Embedding)?);
    let inv_freq = rope::inverse_frequencies(config.head_dim, config.rope_theta, &config.rope_scaling);
    Ok(CausalLm {
        embed_tokens: Param::from_tensor(embed),
        layers,
        norm: final_norm,
        lm_head,
        config,
        family,
        inv_freq,
        embed_compressed: None,
        matmul_dtype: None,
    })
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().expect("converted to f32 above")
}

/// Every parameter of `model` under its Hugging Face name, in checkpoint order.
pub fn named_tensors<B: Backend>(model: &CausalLm<B>) -> Vec<NamedTensor> {
    let mut out = Vec::new();
    for_each_named_tensor(model, |t| out.push(t));
    out
}

/// Calls `f` with each parameter of `model` under its Hugging Face name, in checkpoint order,
/// one tensor at a time (a 4-bit layer is expanded only while `f` holds it).
pub fn for_each_named_tensor<B: Backend>(model: &CausalLm<B>, mut f: impl FnMut(NamedTensor)) {
    let mut push = |name: String, shape: Vec<usize>, v: Vec<f32>| f(NamedTensor { name, shape, values: v });
    let w2 = |l: &Linear<B>| (l.dims().to_vec(), values(l.dense_weight()));
    push("model.embed_tokens.weight".into(), model.embedding_dims().to_vec(), values(model.embedding_weight()));
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        for (name, lin) in layer.linears() {
            let (shape, v) = w2(lin);
            push(format!("{p}.{name}.weight"), shape, v);
        }
        for (name, norm) in [("input_layernorm", &layer.input_layernorm), ("post_attention_layernorm", &layer.post_attention_layernorm)] {
            push(format!("{p}.{name}.weight"), norm.weight.dims().to_vec(), values(norm.weight.val()));
        }
    }
    push("model.norm.weight".into(), model.norm.weight.dims().to_vec(), values(model.norm.weight.val()));
    if let Some(head) = &model.lm_head {
        let (shape, v) = w2(head);
        push("lm_head.weight".into(), shape, v);
    }
}

/// Saves `model` to `dir` (config.json + model.safetensors), atomically: the directory appears
/// complete or not at all. Tokenizer files found in `tokenizer_from` are copied along.
pub fn save_pretrained<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    dtype: SaveDtype,
    tokenizer_from: Option<&Path>,
) -> Result<PathBuf, ModelError> {
    let staging = AtomicDir::new(dir)?;
    write_pretrained(model, staging.path(), dtype, tokenizer_from)?;
    Ok(staging.commit()?)
}

/// Writes the files of [`save_pretrained`] into an existing directory, without atomicity: for
/// callers assembling a larger directory (a training checkpoint) inside their own staging area.
pub fn write_pretrained<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    dtype: SaveDtype,
    tokenizer_from: Option<&Path>,
) -> Result<(), ModelError> {
    let mut config = model.config.raw.clone();
    config.insert("torch_dtype".into(), dtype.torch_name().into());
    if config.contains_key("dtype") {
        config.insert("dtype".into(), dtype.torch_name().into());
    }
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).expect("JSON map serializes");
    std::fs::write(&config_path, text + "\n").map_err(|e| io_err("writing", &config_path, e))?;
    write_safetensors(&dir.join("model.safetensors"), &named_tensors(model), dtype)?;
    if let Some(src) = tokenizer_from {
        copy_tokenizer_files(src, dir)?;
    }
    Ok(())
}

/// Copies the [`TOKENIZER_FILES`] present in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<(), ModelError> {
    for name in TOKENIZER_FILES {
        let source = from.join(name);
        if source.exists() {
            std::fs::copy(&source, to.join(name)).map_err(|e| io_err("copying", &source, e))?;
        }
    }
    Ok(())
}
