//! Saving and loading adapters in Hugging Face PEFT's layout: a directory with
//! `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named as PEFT's
//! `get_peft_model_state_dict` names them (adapter name `default` removed):
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `....lora_B.weight` (`[out, r]`).

use crate::config::LoraConfig;
use crate::error::PeftError;
use crate::lora::{adapter, has_lora, linear_layers, linear_layers_mut, targeted_paths};
use crate::saved_modules::{saved_module_paths, saved_module_tensors, saved_tensor_name, set_saved_module};
use alignment_core::{AtomicDir, IoError};
use alignment_models::weights::{write_safetensors_with, NamedTensor, SaveDtype};
use alignment_models::CausalLm;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::tensor::Dtype;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// What PEFT's `PeftModelForCausalLM` puts before a module path of the wrapped `*ForCausalLM`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's names of the two tensors of the adapter on the module at `path`.
pub fn tensor_names(path: &str) -> [String; 2] {
    [format!("{PEFT_PREFIX}{path}.lora_A.weight"), format!("{PEFT_PREFIX}{path}.lora_B.weight")]
}

/// PEFT's name of DoRA's magnitude of the adapter on the module at `path` (`[out]`).
pub fn magnitude_name(path: &str) -> String {
    format!("{PEFT_PREFIX}{path}.lora_magnitude_vector")
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().expect("converted to f32 above")
}

/// The adapter tensors of `model` under PEFT's names, in module order, then the weights of the
/// modules `config` saves whole (`modules_to_save`).
pub fn adapter_tensors<B: Backend>(model: &CausalLm<B>, config: &LoraConfig) -> Result<Vec<NamedTensor>, PeftError> {
    let mut out = Vec::new();
    for (path, lin) in linear_layers(model) {
        let Some(lora) = &lin.lora else { continue };
        let [a_name, b_name] = tensor_names(&path);
        for (name, p) in [(a_name, &lora.a), (b_name, &lora.b)] {
            out.push(NamedTensor { name, shape: p.dims().to_vec(), values: values(p.val()) });
        }
        if let Some(m) = &lora.magnitude {
            out.push(NamedTensor { name: magnitude_name(&path), shape: m.dims().to_vec(), values: values(m.val()) });
        }
    }
    out.extend(saved_module_tensors(model, &saved_module_paths(model, config)?));
    Ok(out)
}

/// Saves the adapters of `model` to `dir` as PEFT's `save_pretrained` does
/// (`adapter_model.safetensors`, each tensor in its parameter's type, f32 or bf16, +
/// `adapter_config.json` built from `config`), atomically.
/// `config` must describe the adapters (same modules, rank and scaling): that is checked, since
/// PEFT recomputes the scaling from the saved config.
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    config: &LoraConfig,
    base_model_name_or_path: &str,
) -> Result<PathBuf, PeftError> {
    check_matches_config(model, config)?;
    let staging = AtomicDir::new(dir)?;
    write_adapter(model, staging.path(), config, base_model_name_or_path)?;
    Ok(staging.commit()?)
}

/// Writes the files of [`save_adapter`] into an existing directory, without atomicity: for
/// callers assembling a larger directory (a training checkpoint) in their own staging area.
pub fn write_adapter<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    config: &LoraConfig,
    base_model_name_or_path: &str,
) -> Result<(), PeftError> {
    check_matches_config(model, config)?;
    let factors_in_bf16 = adapter_factors_in_bf16(model);
    write_safetensors_with(&dir.join(ADAPTER_WEIGHTS), &adapter_tensors(model, config)?, |t| save_dtype(factors_in_bf16, t))?;
    let json = serde_json::to_string_pretty(&config.to_adapter_json(base_model_name_or_path)).expect("JSON serializes");
    let config_path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&config_path, json + "\n").map_err(|e| IoError::new("writing", &config_path, e))?;
    Ok(())
}

/// Whether every adapter factor of `model` is held in bf16 (QLoRA's adapters under TRL's cast,
/// [`crate::hold_trainable_in`]).
pub fn adapter_factors_in_bf16<B: Backend>(model: &CausalLm<B>) -> bool {
    let adapters: Vec<_> = linear_layers(model).into_iter().filter_map(|(_, lin)| lin.lora.as_ref()).collect();
    !adapters.is_empty()
        && adapters.iter().all(|lora| [lora.a.val().dtype(), lora.b.val().dtype()].iter().all(|&d| d == burn::tensor::DType::BF16))
}

/// The type a tensor of the adapter file is written in, its parameter's own, as PEFT saves its
/// state dict: with the factors held in bf16, bf16 for every tensor whose values are all bf16's
/// (the factors, a matrix saved whole, which were narrowed with them) and f32 for the others
/// (DoRA's magnitudes, a norm saved whole); f32 for everything otherwise. Nothing is rounded by
/// saving.
fn save_dtype(factors_in_bf16: bool, tensor: &NamedTensor) -> SaveDtype {
    if factors_in_bf16 && tensor.values.iter().all(|&v| half::bf16::from_f32(v).to_f32() == v) {
        SaveDtype::BF16
    } else {
        SaveDtype::F32
    }
}

fn check_matches_config<B: Backend>(model: &CausalLm<B>, config: &LoraConfig) -> Result<(), PeftError> {
    config.validate()?;
    if !has_lora(model) {
        return Err(PeftError::State("the model has no LoRA adapters to save".into()));
    }
    let targets = targeted_paths(model, config)?;
    for (path, lin) in linear_layers(model) {
        match (&lin.lora, targets.contains(&path)) {
            (Some(lora), true) => {
                if lora.magnitude.is_some() != config.use_dora {
                    return Err(PeftError::State(format!(
                        "adapter on {path}: DoRA is {}, but the config's use_dora is {}",
                        lora.magnitude.is_some(),
                        config.use_dora
                    )));
                }
                let r = lora.a.dims()[0];
                if r != config.r || (lora.scaling - config.scaling()).abs() > 1e-12 * config.scaling().abs().max(1.0) {
                    return Err(PeftError::State(format!(
                        "adapter on {path} has rank {r} and scaling {} but the config says rank {} and scaling {}",
                        lora.scaling,
                        config.r,
                        config.scaling()
                    )));
                }
            }
            (None, false) => {}
            (Some(_), false) => return Err(PeftError::State(format!("{path} has an adapter but the config does not target it"))),
            (None, true) => return Err(PeftError::State(format!("the config targets {path} but it has no adapter"))),
        }
    }
    Ok(())
}

/// A tensor read from the adapter file, as f32.
struct RawTensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn read_safetensors(path: &Path) -> Result<BTreeMap<String, RawTensor>, PeftError> {
    let bytes = std::fs::read(path).map_err(|e| IoError::new("reading", path, e))?;
    let corrupted = |message: String| PeftError::CorruptedWeights { path: path.to_path_buf(), message };
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupted(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(corrupted(format!("tensor `{name}` has dtype {other:?} (supported: F32, BF16, F16)"))),
        };
        out.insert(name, RawTensor { shape: view.shape().to_vec(), values });
    }
    Ok(out)
}

/// `dir/adapter_config.json` parsed, with its path.
fn read_adapter_json(dir: &Path) -> Result<(serde_json::Value, PathBuf), PeftError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| IoError::new("reading", &path, e))?;
    let json = serde_json::from_str(&text).map_err(|e| PeftError::AdapterConfig {
        path: path.clone(),
        field: "<root>".into(),
        message: e.to_string(),
    })?;
    Ok((json, path))
}

/// Reads `dir/adapter_config.json` (see [`LoraConfig::from_adapter_json`]).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, PeftError> {
    let (json, path) = read_adapter_json(dir)?;
    LoraConfig::from_adapter_json(&json, &path)
}

/// `base_model_name_or_path` of the adapter in `dir`: the model it applies to.
pub fn read_adapter_base_model(dir: &Path) -> Result<String, PeftError> {
    let (json, path) = read_adapter_json(dir)?;
    json.get("base_model_name_or_path").and_then(|v| v.as_str()).map(String::from).ok_or(PeftError::AdapterConfig {
        path,
        field: "base_model_name_or_path".into(),
        message: "missing or not a string".into(),
    })
}

/// One layer's adapter as read from the file: A, B, and DoRA's magnitude.
type ReadAdapter<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>);

/// Loads a PEFT LoRA adapter directory onto `model` (a plain base model), like
/// `PeftModel.from_pretrained(base, dir)`: the base is frozen as in [`crate::apply_lora`] and
/// each targeted linear layer gets the saved adapter (trainable, so training can continue).
/// The modules the config saves whole (`modules_to_save`) take the saved weights, trainable.
/// Every targeted module must have both tensors, every saved module its weight, every tensor must
/// belong to one of them, and shapes must be `[r, in]` / `[out, r]` / the module's; anything else
/// is an error naming the tensors.
pub fn load_adapter<B: Backend>(model: CausalLm<B>, dir: &Path) -> Result<(CausalLm<B>, LoraConfig), PeftError> {
    let config = read_adapter_config(dir)?;
    if has_lora(&model) {
        return Err(PeftError::State("the model already has LoRA adapters (one adapter per model is supported)".into()));
    }
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = read_safetensors(&weights_path)?;
    let targets = targeted_paths(&model, &config)?;
    let saved = saved_module_paths(&model, &config)?;
    let mut model = model.no_grad();
    let mut missing = Vec::new();
    let mut found: BTreeMap<String, ReadAdapter<B>> = BTreeMap::new();
    for (path, lin) in linear_layers(&model) {
        if !targets.contains(&path) {
            continue;
        }
        let [out, inp] = lin.dims();
        let device = lin.weight.device();
        let [a_name, b_name] = tensor_names(&path);
        let mut take = |name: &String, expected: [usize; 2]| -> Result<Option<Tensor<B, 2>>, PeftError> {
            let Some(t) = tensors.remove(name) else {
                missing.push(name.clone());
                return Ok(None);
            };
            if t.shape != expected {
                return Err(PeftError::ShapeMismatch { name: name.clone(), expected: expected.to_vec(), found: t.shape });
            }
            Ok(Some(Tensor::from_data(TensorData::new(t.values, expected), &device)))
        };
        let a = take(&a_name, [config.r, inp])?;
        let b = take(&b_name, [out, config.r])?;
        let magnitude = if config.use_dora {
            let name = magnitude_name(&path);
            match tensors.remove(&name) {
                None => {
                    missing.push(name);
                    None
                }
                Some(t) if t.shape != [out] => return Err(PeftError::ShapeMismatch { name, expected: vec![out], found: t.shape }),
                Some(t) => Some(Tensor::<B, 1>::from_data(TensorData::new(t.values, [out]), &device)),
            }
        } else {
            None
        };
        if let (Some(a), Some(b)) = (a, b) {
            found.insert(path, (a, b, magnitude));
        }
    }
    let saved_weights: Vec<(&String, String, Option<RawTensor>)> = saved
        .iter()
        .map(|path| {
            let name = saved_tensor_name(path);
            let tensor = tensors.remove(&name);
            (path, name, tensor)
        })
        .collect();
    missing.extend(saved_weights.iter().filter(|(_, _, t)| t.is_none()).map(|(_, name, _)| name.clone()));
    if !missing.is_empty() {
        return Err(PeftError::MissingTensors { path: weights_path, names: missing });
    }
    if !tensors.is_empty() {
        return Err(PeftError::UnexpectedTensors { path: weights_path, names: tensors.into_keys().collect() });
    }
    for (path, lin) in linear_layers_mut(&mut model) {
        if let Some((a, b, magnitude)) = found.remove(&path) {
            let mut lora = adapter(a, b, &config);
            lora.magnitude = magnitude.map(Param::from_tensor);
            lin.lora = Some(lora);
        }
    }
    for (path, name, tensor) in saved_weights {
        let tensor = tensor.expect("missing saved weights were refused above");
        set_saved_module(&mut model, path, &name, tensor.shape, tensor.values)?;
    }
    Ok((model, config))
}

/// The names of all tensors an adapter directory holds (sorted), for inspection.
pub fn adapter_tensor_names(dir: &Path) -> Result<BTreeSet<String>, PeftError> {
    Ok(read_safetensors(&dir.join(ADAPTER_WEIGHTS))?.into_keys().collect())
}
