//! `config.json` of a Hugging Face causal LM, read into one architecture-neutral description.
//!
//! Fields that change the forward pass are parsed and validated; values we do not implement
//! (attention biases, unknown RoPE scalings, other activations) are errors naming the field.
//! Everything else (`torch_dtype`, `initializer_range`, `use_cache`, token ids we do not need,
//! `transformers_version`, ...) is kept verbatim so that saving writes it back unchanged.

use crate::error::ModelError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// The decoder families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3 and models sharing its layout (SmolLM2, TinyLlama, ...).
    Llama,
    /// Mistral: Llama plus an optional sliding attention window.
    Mistral,
    /// Gemma (1): (1 + w) RMSNorm, scaled embeddings, tanh-GELU MLP, tied head.
    Gemma,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (Llama, Mistral).
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
    /// Exact erf GELU (`gelu`).
    Gelu,
}

/// How rotary frequencies are rescaled for long context (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling (`rope_type: llama3`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// Everything the forward pass needs, plus the original JSON to write back on save.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    /// Mistral's window: a query attends to at most this many most recent keys (itself included).
    pub sliding_window: Option<usize>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The JSON as read, written back by `save`.
    pub raw: Map<String, Value>,
}

/// The subset of config.json fields we interpret. Unknown fields are kept in `raw`.
#[derive(Deserialize)]
struct RawFields {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

fn unsupported(field: &str, value: impl ToString, reason: &str) -> ModelError {
    ModelError::Unsupported { field: field.into(), value: value.to_string(), reason: reason.into() }
}

fn token_ids(value: &Option<Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::error::io_err("reading", path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::InvalidConfig { message, .. } => ModelError::InvalidConfig { path: path.into(), message },
            other => other,
        })
    }

    /// Parses and validates a config.json document.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let invalid = |message: String| ModelError::InvalidConfig { path: "config.json".into(), message };
        let raw: Map<String, Value> = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let f: RawFields = serde_json::from_value(Value::Object(raw.clone())).map_err(|e| invalid(e.to_string()))?;

        let architecture = match f.model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "gemma" => Architecture::Gemma,
            other => return Err(unsupported("model_type", other, "supported: llama, mistral, gemma")),
        };
        if f.attention_bias {
            return Err(unsupported("attention_bias", true, "q/k/v/o projections with bias are not implemented"));
        }
        if f.mlp_bias {
            return Err(unsupported("mlp_bias", true, "MLP projections with bias are not implemented"));
        }
        let act_name = match architecture {
            // transformers' Gemma uses `hidden_activation`, defaulting to tanh-GELU.
            Architecture::Gemma => f.hidden_activation.clone().unwrap_or_else(|| "gelu_pytorch_tanh".into()),
            _ => f.hidden_act.clone().unwrap_or_else(|| "silu".into()),
        };
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => return Err(unsupported("hidden_act", other, "supported: silu, gelu, gelu_pytorch_tanh")),
        };
        if f.num_attention_heads == 0 || !f.hidden_size.is_multiple_of(f.num_attention_heads) && f.head_dim.is_none() {
            return Err(unsupported("num_attention_heads", f.num_attention_heads, "must divide hidden_size"));
        }
        let num_kv_heads = f.num_key_value_heads.unwrap_or(f.num_attention_heads);
        if num_kv_heads == 0 || !f.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(unsupported("num_key_value_heads", num_kv_heads, "must divide num_attention_heads"));
        }
        let head_dim = f.head_dim.unwrap_or(f.hidden_size / f.num_attention_heads);

        // RoPE: transformers <5 writes rope_theta + rope_scaling; 5.x writes rope_parameters.
        let rope_params = f.rope_parameters.clone().or(f.rope_scaling.clone()).filter(|v| !v.is_null());
        let rope_theta =
            f.rope_theta.or_else(|| rope_params.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64)).unwrap_or(10000.0);
        let rope_scaling = parse_rope_scaling(rope_params.as_ref())?;

        let sliding_window = match (architecture, &f.sliding_window, f.use_sliding_window) {
            (_, _, Some(false)) => None,
            (Architecture::Mistral, Some(Value::Number(n)), _) => n.as_u64().map(|w| w as usize),
            (Architecture::Mistral, Some(Value::Null) | None, _) => None,
            (_, Some(Value::Null) | None, _) => None,
            (_, Some(v), _) => return Err(unsupported("sliding_window", v, "only Mistral models use a sliding window here")),
        };
        let tie_word_embeddings = f.tie_word_embeddings.unwrap_or(architecture == Architecture::Gemma);
        let bos = token_ids(&f.bos_token_id).first().copied();
        Ok(Self {
            architecture,
            vocab_size: f.vocab_size,
            hidden_size: f.hidden_size,
            intermediate_size: f.intermediate_size,
            num_layers: f.num_hidden_layers,
            num_heads: f.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.max_position_embeddings,
            activation,
            tie_word_embeddings,
            sliding_window,
            eos_token_ids: token_ids(&f.eos_token_id),
            bos_token_id: bos,
            raw,
        })
    }

    /// Number of parameters, counting tied embeddings once.
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * per_layer + h + head
    }
}

fn parse_rope_scaling(params: Option<&Value>) -> Result<RopeScaling, ModelError> {
    let Some(p) = params else { return Ok(RopeScaling::None) };
    let rope_type = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64, ModelError> {
        p.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| unsupported(&format!("rope_scaling.{key}"), "missing", &format!("required by rope_type {rope_type}")))
    };
    Ok(match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => return Err(unsupported("rope_scaling.rope_type", other, "supported: default, linear, llama3")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":32,"hidden_size":16,"intermediate_size":32,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
        "torch_dtype":"float32","eos_token_id":[2,3]}"#;

    #[test]
    fn parses_llama_and_keeps_unknown_fields() {
        let c = ModelConfig::from_json_str(LLAMA).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.raw["torch_dtype"], "float32");
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rejects_unsupported_features_naming_the_field() {
        let with_bias = LLAMA.replace("\"torch_dtype\"", "\"attention_bias\":true,\"torch_dtype\"");
        let err = ModelConfig::from_json_str(&with_bias).unwrap_err().to_string();
        assert!(err.contains("attention_bias"), "{err}");
        let yarn = LLAMA.replace("\"torch_dtype\"", "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2.0},\"torch_dtype\"");
        let err = ModelConfig::from_json_str(&yarn).unwrap_err().to_string();
        assert!(err.contains("rope_scaling.rope_type") && err.contains("yarn"), "{err}");
        let qwen = LLAMA.replace("\"llama\"", "\"qwen2\"");
        assert!(ModelConfig::from_json_str(&qwen).unwrap_err().to_string().contains("model_type"));
        let missing = LLAMA.replace("\"hidden_size\":16,", "");
        assert!(ModelConfig::from_json_str(&missing).unwrap_err().to_string().contains("hidden_size"));
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let v5 = LLAMA.replace(
            "\"torch_dtype\"",
            "\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":64},\"torch_dtype\"",
        );
        let c = ModelConfig::from_json_str(&v5).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }
}
