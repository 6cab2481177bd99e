//! Models from llama.cpp's GGUF files: read, dequantised to f32, and turned back into the Hugging
//! Face layout the rest of the workspace uses.
//!
//! llama.cpp's `convert_hf_to_gguf.py` renames every tensor (`model.layers.0.self_attn.q_proj` →
//! `blk.0.attn_q`), stores the hyper-parameters as `llama.*` metadata and the tokenizer as
//! `tokenizer.*` metadata, and permutes the rows of the Q and K projections so each head's two
//! rotary halves are interleaved (its `LlamaModel.permute`). [`GgufModel`] undoes all of it, as
//! transformers' GGUF loader does: the config it derives is the `config.json` transformers
//! writes, the weights are transformers' tensors, the tokenizer gives transformers' ids
//! (tests/gguf.rs and the SmolLM2 tests check each against transformers).
//!
//! - [`load_gguf`]: a [`CausalLm`] straight from a `.gguf` file;
//! - [`convert_gguf`]: a complete model directory (config.json, model.safetensors in f32,
//!   tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json), written
//!   atomically and one tensor at a time, which loads here and in transformers.
//!
//! Supported: the `llama` architecture (Llama 1-3, Mistral, SmolLM, TinyLlama... as llama.cpp
//! stores them) with plain or linear RoPE, weights in the formats of [`GgmlType::SUPPORTED`], and
//! GPT-2 style byte-level BPE tokenizers. A file outside that is an error naming the metadata
//! key or tensor at fault. No crate on crates.io reads GGUF and dequantises the k-quants without
//! pulling in a whole tensor library (candle), so the reader is here, small, and tested against
//! gguf-py (docs/gguf.md).

mod file;
mod quants;
mod tokenizer;

pub use file::{GgufFile, TensorInfo, Value};
pub use quants::GgmlType;
pub use tokenizer::{chat_template, tokenizer, tokenizer_config, tokenizer_json};

use crate::config::ModelConfig;
use crate::error::{io_err, ModelError};
use crate::model::CausalLm;
use crate::pretrained::{assemble, Weight};
use alignment_core::AtomicDir;
use burn::tensor::{backend::Backend, TensorData};
use safetensors::tensor::{Dtype, View};
use serde_json::{json, Map, Value as Json};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A GGUF model file seen in Hugging Face terms: its config, and its tensors under their
/// Hugging Face names, dequantised and un-permuted on demand.
pub struct GgufModel {
    file: GgufFile,
    config: ModelConfig,
    /// Hugging Face name → index into `file.tensors`.
    tensor_of: BTreeMap<String, usize>,
}

impl GgufModel {
    /// Opens `path` and maps its metadata and tensors onto a Hugging Face Llama; every tensor
    /// must find a place.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let config_json = config_json(&file)?;
        let text = serde_json::to_string(&config_json).expect("JSON map serializes");
        let config = ModelConfig::from_json_str(&text).map_err(|e| file.error(format!("the derived config.json is not usable: {e}")))?;
        let mut tensor_of = BTreeMap::new();
        for (index, tensor) in file.tensors.iter().enumerate() {
            let hf = hf_name(&tensor.name).ok_or_else(|| {
                let why = if tensor.name == "rope_freqs.weight" {
                    "Llama 3.1-style rope scaling factors are not supported"
                } else {
                    "no Hugging Face Llama parameter corresponds to it (biases and other architectures are not supported)"
                };
                file.error(format!("tensor `{}`: {why}", tensor.name))
            })?;
            tensor_of.insert(hf, index);
        }
        Ok(Self { file, config, tensor_of })
    }

    /// The model's configuration; its `raw` map is the `config.json` [`convert_gguf`] writes.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The underlying file (metadata, tokenizer).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Every tensor as `(Hugging Face name, shape)`, sorted by name.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.tensor_of.iter().map(|(name, &i)| (name.clone(), self.file.tensors[i].shape())).collect()
    }

    /// The tensor Hugging Face calls `name`, as f32 in row-major order, checked to have shape
    /// `expected`; Q and K rows put back in Hugging Face's order.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        let &index =
            self.tensor_of.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.into(), path: self.file.path().into() })?;
        let tensor = &self.file.tensors[index];
        let shape = tensor.shape();
        if shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: format!("{name} (GGUF `{}`)", tensor.name),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        let values = self.file.read_f32(tensor)?;
        let heads = if name.ends_with("self_attn.q_proj.weight") {
            Some(self.config.num_heads)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(self.config.num_kv_heads)
        } else {
            None
        };
        Ok(match heads {
            Some(heads) => {
                unpermute_rows(&values, shape[0], shape[1], heads).map_err(|m| self.file.error(format!("tensor `{}`: {m}", tensor.name)))?
            }
            None => values,
        })
    }

    /// The tensor names the model uses, so a caller can tell what it left unread.
    fn names(&self) -> impl Iterator<Item = &String> {
        self.tensor_of.keys()
    }

    /// `generation_config.json`: the special token ids, as transformers derives it from the config.
    pub fn generation_config(&self) -> Map<String, Json> {
        let mut out = Map::new();
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = self.config.raw.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        out
    }
}

/// The Hugging Face name of a llama.cpp Llama tensor.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let hf_leaf = match leaf {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_leaf}"))
}

/// Undoes llama.cpp's `permute(w, n_head)`: within each head, GGUF row `2 d + j` is Hugging Face
/// row `j * dim + d` (`dim` = half the head's rows).
fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!("{rows} rows do not split into {heads} heads of rotary pairs"));
    }
    let dim = rows / heads / 2;
    let mut out = vec![0f32; values.len()];
    for head in 0..heads {
        for d in 0..dim {
            for j in 0..2 {
                let from = (head * 2 * dim + 2 * d + j) * cols;
                let to = (head * 2 * dim + j * dim + d) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    Ok(out)
}

/// The `config.json` transformers derives from a Llama GGUF's metadata
/// (`GGUF_CONFIG_MAPPING["llama"]` plus its defaults), in transformers 5's layout, with
/// `rope_theta` also at the top level for older readers.
fn config_json(file: &GgufFile) -> Result<Map<String, Json>, ModelError> {
    let arch = file.get("general.architecture").and_then(Value::as_str).ok_or_else(|| file.error("no `general.architecture`".into()))?;
    if arch != "llama" {
        return Err(file.error(format!("general.architecture = `{arch}` is not supported (supported: llama)")));
    }
    let key = |name: &str| format!("{arch}.{name}");
    let uint = |name: &str| -> Result<Option<u64>, ModelError> {
        match file.get(&key(name)) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| file.error(format!("`{}` = {v:?} is not a non-negative integer", key(name)))),
        }
    };
    let required = |name: &str| uint(name)?.ok_or_else(|| file.error(format!("no `{}` (required)", key(name))));
    let float = |name: &str| -> Result<Option<f64>, ModelError> {
        match file.get(&key(name)) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| file.error(format!("`{}` = {v:?} is not a number", key(name)))),
        }
    };
    let hidden = required("embedding_length")?;
    let heads = required("attention.head_count")?;
    if heads == 0 {
        return Err(file.error(format!("`{}` is 0", key("attention.head_count"))));
    }
    let (layers, feed_forward) = (required("block_count")?, required("feed_forward_length")?);
    let vocab_size =
        match uint("vocab_size")? {
            Some(v) => v,
            None => file.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|t| t.len() as u64).ok_or_else(|| {
                file.error(format!("neither `{}` nor `tokenizer.ggml.tokens` gives the vocabulary size", key("vocab_size")))
            })?,
        };
    let rope_theta = float("rope.freq_base")?.unwrap_or(10000.0);
    let mut rope_parameters = json!({"rope_theta": rope_theta, "rope_type": "default"});
    match file.get(&key("rope.scaling.type")).map(|v| v.as_str()) {
        None | Some(Some("none")) => {}
        Some(Some("linear")) => {
            let factor = float("rope.scaling.factor")?
                .ok_or_else(|| file.error(format!("linear rope scaling without `{}`", key("rope.scaling.factor"))))?;
            rope_parameters = json!({"rope_theta": rope_theta, "rope_type": "linear", "factor": factor});
        }
        Some(other) => {
            return Err(file.error(format!(
                "`{}` = {:?} is not supported (supported: none, linear)",
                key("rope.scaling.type"),
                other.unwrap_or("?")
            )))
        }
    }
    let token_id = |name: &str| file.get(&format!("tokenizer.ggml.{name}")).and_then(Value::as_u64).map(|v| json!(v)).unwrap_or(Json::Null);
    let mut config = Map::new();
    config.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    config.insert("model_type".into(), json!("llama"));
    config.insert("attention_bias".into(), json!(false));
    config.insert("attention_dropout".into(), json!(0.0));
    config.insert("bos_token_id".into(), token_id("bos_token_id"));
    config.insert("eos_token_id".into(), token_id("eos_token_id"));
    config.insert("pad_token_id".into(), token_id("padding_token_id"));
    config.insert("head_dim".into(), json!(uint("rope.dimension_count")?.unwrap_or(hidden / heads)));
    config.insert("hidden_act".into(), json!("silu"));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert("initializer_range".into(), json!(0.02));
    config.insert("intermediate_size".into(), json!(feed_forward));
    config.insert("max_position_embeddings".into(), json!(uint("context_length")?.unwrap_or(2048)));
    config.insert("mlp_bias".into(), json!(false));
    config.insert("num_attention_heads".into(), json!(heads));
    config.insert("num_hidden_layers".into(), json!(layers));
    config.insert("num_key_value_heads".into(), json!(uint("attention.head_count_kv")?.unwrap_or(heads)));
    config.insert("pretraining_tp".into(), json!(1));
    config.insert("rms_norm_eps".into(), json!(float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6)));
    config.insert("rope_theta".into(), json!(rope_theta));
    config.insert("rope_parameters".into(), rope_parameters);
    // llama.cpp writes the output projection only when it is not the embedding.
    config.insert("tie_word_embeddings".into(), json!(file.tensor("output.weight").is_none()));
    config.insert("dtype".into(), json!("float32"));
    config.insert("use_cache".into(), json!(true));
    config.insert("vocab_size".into(), json!(vocab_size));
    Ok(config)
}

/// Builds the model in `path` on `device` (dense f32 weights).
pub fn load_gguf<B: Backend>(path: &Path, device: &B::Device) -> Result<CausalLm<B>, ModelError> {
    let gguf = GgufModel::open(path)?;
    let used = RefCell::new(Vec::new());
    let model = assemble(gguf.config.clone(), device, |name, shape, _role| {
        let values = gguf.read(name, shape)?;
        used.borrow_mut().push(name.to_string());
        Ok(Weight::Dense(TensorData::new(values, shape.to_vec())))
    })?;
    let used = used.into_inner();
    let unused: Vec<String> = gguf.names().filter(|n| !used.contains(n)).cloned().collect();
    if !unused.is_empty() {
        return Err(ModelError::UnexpectedTensors { path: path.into(), names: unused });
    }
    Ok(model)
}

/// A tensor dequantised only when the safetensors writer asks for its bytes, so a conversion holds
/// one tensor at a time; a failure or a non-finite value is kept for [`convert_gguf`] to report.
struct LazyTensor<'a> {
    model: &'a GgufModel,
    name: String,
    shape: Vec<usize>,
    failure: &'a RefCell<Option<ModelError>>,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = match self.model.read(&self.name, &self.shape) {
            Ok(values) => values,
            Err(e) => {
                self.failure.borrow_mut().get_or_insert(e);
                vec![0.0; self.shape.iter().product()]
            }
        };
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            let message = format!("tensor `{}` dequantises to a non-finite value ({bad}): the file is corrupted", self.name);
            self.failure.borrow_mut().get_or_insert(self.model.file.error(message));
        }
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Writes the model in `gguf_path` to `out` in Hugging Face layout (see the module docs),
/// atomically: `out` appears complete or not at all. Returns `out`.
pub fn convert_gguf(gguf_path: &Path, out: &Path) -> Result<PathBuf, ModelError> {
    let model = GgufModel::open(gguf_path)?;
    // Everything that can fail on the metadata fails before anything is written.
    let tokenizer_json = tokenizer_json(&model.file)?;
    let tokenizer_config = tokenizer_config(&model.file)?;
    tokenizer_json
        .to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| model.file.error(format!("the rebuilt tokenizer does not load: {e}")))?;

    let staging = AtomicDir::new(out)?;
    let dir = staging.path();
    let write_json = |name: &str, value: &Json| -> Result<(), ModelError> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON serializes") + "\n";
        std::fs::write(&path, text).map_err(|e| io_err("writing", &path, e))
    };
    write_json("config.json", &Json::Object(model.config.raw.clone()))?;
    write_json("generation_config.json", &Json::Object(model.generation_config()))?;
    write_json("tokenizer.json", &tokenizer_json)?;
    write_json("tokenizer_config.json", &Json::Object(tokenizer_config))?;
    if let Some(template) = chat_template(&model.file) {
        let path = dir.join("chat_template.jinja");
        std::fs::write(&path, template).map_err(|e| io_err("writing", &path, e))?;
    }

    let failure = RefCell::new(None);
    let tensors: Vec<(String, LazyTensor)> = model
        .tensors()
        .into_iter()
        .map(|(name, shape)| (name.clone(), LazyTensor { model: &model, name, shape, failure: &failure }))
        .collect();
    let path = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), &path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => io_err("writing", &path, io),
        other => ModelError::CorruptedWeights { path: path.clone(), message: other.to_string() },
    })?;
    if let Some(e) = failure.into_inner() {
        return Err(e); // the staging directory is removed, nothing is left behind
    }
    Ok(staging.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    /// llama.cpp's permute, restated: rows (head, half, d) → (head, d, half).
    fn permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let dim = rows / heads / 2;
        let mut out = vec![0f32; values.len()];
        for h in 0..heads {
            for j in 0..2 {
                for d in 0..dim {
                    let from = (h * 2 * dim + j * dim + d) * cols;
                    let to = (h * 2 * dim + 2 * d + j) * cols;
                    out[to..to + cols].copy_from_slice(&values[from..from + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 2);
        let w: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let back = unpermute_rows(&permute(&w, rows, cols, heads), rows, cols, heads).unwrap();
        assert_eq!(back, w);
        // Row 1 of head 0 (first half, d = 1) sits at GGUF row 2.
        assert_eq!(permute(&w, rows, cols, heads)[2 * cols], w[cols]);
        assert!(unpermute_rows(&w, 10, 3, 3).unwrap_err().contains("10 rows"));
    }
}
