//! [`LoraConfig`]: the subset of PEFT's `LoraConfig` this crate implements, and its
//! `adapter_config.json` form.

use crate::error::PeftError;
use serde_json::{json, Value};
use std::path::Path;

/// The linear layers PEFT's `"all-linear"` expands to on Llama, Mistral and Gemma: every linear
/// layer except the output head.
pub const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// PEFT's `"all-linear"`: [`ALL_LINEAR`] in every layer, never `lm_head`.
    AllLinear,
    /// Module names, matched as PEFT matches a list: a module whose path (e.g.
    /// `model.layers.0.self_attn.q_proj`) equals the name or ends with `.` + name. Short names
    /// (`q_proj`) and full paths both work; `lm_head` may be named explicitly.
    Names(Vec<String>),
}

impl TargetModules {
    /// Whether the module at `path` (PEFT's path inside the `*ForCausalLM`) is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetModules::AllLinear => path != "lm_head" && ALL_LINEAR.iter().any(|n| path.ends_with(&format!(".{n}"))),
            TargetModules::Names(names) => names.iter().any(|n| suffix_match(path, n)),
        }
    }
}

fn suffix_match(path: &str, name: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

/// A test that a config field holds its default value.
type IsDefault = dyn Fn(&Value) -> bool;

/// LoRA hyper-parameters (PEFT's `LoraConfig` field names in comments).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank (`r`).
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`, applied to the adapter input while training (autodiff backend only).
    pub dropout: f64,
    /// `target_modules`.
    pub target_modules: TargetModules,
    /// `use_rslora`: scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `use_dora`: weight-decomposed LoRA (DoRA), each adapted layer with a trained magnitude per
    /// output row (`alignment_models::layers::Linear::forward`).
    pub use_dora: bool,
    /// `modules_to_save`: names of modules trained whole beside the adapters and saved whole with
    /// them, matched by a plain suffix of the module's path as PEFT matches them
    /// (`crate::saved_modules`). Empty: none.
    pub modules_to_save: Vec<String>,
}

impl LoraConfig {
    /// `r` and `alpha` on `targets`, no dropout, plain LoRA scaling.
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        Self { r, alpha, dropout: 0.0, target_modules, use_rslora: false, use_dora: false, modules_to_save: Vec::new() }
    }

    /// The factor applied to `B A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the values PEFT would also reject.
    pub fn validate(&self) -> Result<(), PeftError> {
        if self.r == 0 {
            return Err(PeftError::InvalidConfig("`r` must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(PeftError::InvalidConfig(format!("`lora_dropout` must be in [0, 1), got {}", self.dropout)));
        }
        if let TargetModules::Names(names) = &self.target_modules {
            if names.is_empty() {
                return Err(PeftError::InvalidConfig("`target_modules` is empty".into()));
            }
        }
        if self.modules_to_save.iter().any(|n| n.is_empty()) {
            return Err(PeftError::InvalidConfig("`modules_to_save` has an empty name".into()));
        }
        Ok(())
    }

    /// PEFT's `adapter_config.json` for this config (peft 0.21's field set; fields for features
    /// this crate does not implement hold their defaults).
    pub fn to_adapter_json(&self, base_model_name_or_path: &str) -> Value {
        // PEFT keeps target_modules as a set; sorted here so the file is deterministic.
        let mut targets: Vec<String> = match &self.target_modules {
            TargetModules::AllLinear => ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            TargetModules::Names(names) => names.clone(),
        };
        targets.sort();
        targets.dedup();
        // PEFT types lora_alpha as int; keep integral values integral.
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 { json!(self.alpha as i64) } else { json!(self.alpha) };
        // PEFT keeps the list as given (null when there is none).
        let modules_to_save = if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) };
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }

    /// Reads PEFT's `adapter_config.json`. Fields selecting features this crate does not
    /// implement (biases, per-module ranks, ...) are errors naming the
    /// field when they hold anything but their default.
    pub fn from_adapter_json(json: &Value, path: &Path) -> Result<Self, PeftError> {
        let err = |field: &str, message: String| PeftError::AdapterConfig { path: path.to_path_buf(), field: field.into(), message };
        let obj = json.as_object().ok_or_else(|| err("<root>", "not a JSON object".into()))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => return Err(err("peft_type", format!("only \"LORA\" is supported, found {other:?}"))),
        }
        let r = get("r").and_then(Value::as_u64).ok_or_else(|| err("r", "missing or not a positive integer".into()))?;
        let alpha = get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| err("lora_alpha", "missing or not a number".into()))?;
        let dropout = get("lora_dropout").map_or(Some(0.0), Value::as_f64).ok_or_else(|| err("lora_dropout", "not a number".into()))?;
        let flag = |k: &str| get(k).map_or(Some(false), Value::as_bool).ok_or_else(|| err(k, "not a boolean".into()));
        let (use_rslora, use_dora) = (flag("use_rslora")?, flag("use_dora")?);
        let target_modules = match get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => {
                return Err(err("target_modules", format!("regular expressions are not supported ({s:?}); use a list of names")))
            }
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| v.as_str().map(String::from).ok_or_else(|| err("target_modules", "non-string entry".into())))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(err("target_modules", "missing (a list of module names or \"all-linear\")".into())),
        };
        let modules_to_save = match get("modules_to_save") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .ok_or_else(|| err("modules_to_save", format!("entry {v} is not a module name")))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(err("modules_to_save", format!("not a list of module names (found {other})"))),
        };
        // Features left at their defaults, or refused.
        let is_default = |k: &str, ok: &IsDefault| get(k).is_none_or(ok);
        let empty = |v: &Value| v.as_object().is_some_and(|o| o.is_empty()) || v.as_array().is_some_and(|a| a.is_empty());
        let checks: [(&str, &IsDefault, &str); 9] = [
            ("bias", &|v| v == "none", "only \"none\" is supported"),
            ("lora_bias", &|v| v == false, "LoRA biases are not supported"),
            ("fan_in_fan_out", &|v| v == false, "fan_in_fan_out (Conv1D layers) is not supported"),
            ("rank_pattern", &empty, "per-module ranks are not supported"),
            ("alpha_pattern", &empty, "per-module alphas are not supported"),
            ("layers_to_transform", &empty, "layers_to_transform is not supported"),
            ("exclude_modules", &empty, "exclude_modules is not supported"),
            ("target_parameters", &empty, "target_parameters is not supported"),
            ("trainable_token_indices", &empty, "trainable_token_indices is not supported"),
        ];
        for (field, ok, why) in checks {
            if !is_default(field, ok) {
                return Err(err(field, format!("{why} (found {})", obj[field])));
            }
        }
        for field in ["layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens"] {
            if get(field).is_some_and(|v| v != false) {
                return Err(err(field, format!("not supported (found {})", obj[field])));
            }
        }
        let config = LoraConfig { r: r as usize, alpha, dropout, target_modules, use_rslora, use_dora, modules_to_save };
        config.validate().map_err(|e| err("r", e.to_string()))?;
        Ok(config)
    }
}
