//! PEFT's `modules_to_save` (TRL's `lora_modules_to_save`): modules trained whole beside the
//! adapters, and saved whole in the adapter file.
//!
//! PEFT wraps each such module in a `ModulesToSaveWrapper` holding a trainable copy next to the
//! frozen original, and `save_pretrained` writes the copy as `base_model.model.<path>.weight`.
//! Here the module's own parameter is made trainable instead: nothing reads the original values
//! once training starts (DPO's reference log-probs are computed from the starting model before
//! the first step), and a loaded adapter replaces them, as PEFT's wrapper does in the forward pass.
//!
//! Names match as PEFT matches them, by a plain suffix of the module's path (`norm` names
//! `model.norm` and every layer's `input_layernorm` and `post_attention_layernorm`). What PEFT
//! would do differently from a trainable module, or what this crate cannot hold, is an error
//! naming the entry: a name matching no module with weights, or a module holding other modules
//! (`mlp`), a projection that also carries an adapter or is held in 4 bits, and the embedding or
//! the head of a model whose head is tied to its embedding (PEFT would train one of the two apart
//! from the other).

use crate::config::LoraConfig;
use crate::error::PeftError;
use crate::lora::linear_layers;
use alignment_models::layers::Linear;
use alignment_models::weights::NamedTensor;
use alignment_models::CausalLm;
use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// A module's weight, whatever its rank: the embedding and the projections are matrices, the
/// norms vectors.
enum Weight<'a, B: Backend> {
    Matrix(&'a mut Param<Tensor<B, 2>>),
    Vector(&'a mut Param<Tensor<B, 1>>),
}

impl<B: Backend> Weight<'_, B> {
    fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Matrix(p) => p.dims().to_vec(),
            Weight::Vector(p) => p.dims().to_vec(),
        }
    }

    /// Makes the parameter trainable, keeping its id (the optimizer's state follows the path).
    fn unfreeze(&mut self) {
        match self {
            Weight::Matrix(p) => **p = (*p).clone().set_require_grad(true),
            Weight::Vector(p) => **p = (*p).clone().set_require_grad(true),
        }
    }

    /// Replaces the values (f32, row-major, `self.dims()`), trainable.
    fn set(&mut self, values: Vec<f32>) {
        match self {
            Weight::Matrix(p) => {
                let [rows, cols] = p.dims();
                let value = Tensor::from_data(TensorData::new(values, [rows, cols]), &p.device()).require_grad();
                **p = Param::initialized(p.id, value);
            }
            Weight::Vector(p) => {
                let [len] = p.dims();
                let value = Tensor::from_data(TensorData::new(values, [len]), &p.device()).require_grad();
                **p = Param::initialized(p.id, value);
            }
        }
    }
}

/// Whether a projection's weight is held dense (not a 4-bit or sharded placeholder).
fn is_dense<B: Backend>(linear: &Linear<B>) -> bool {
    linear.quantized.is_none() && linear.compressed.is_none()
}

/// The dense weight of the module at PEFT's `path` inside the `*ForCausalLM`, if there is one.
fn weight_mut<'a, B: Backend>(model: &'a mut CausalLm<B>, path: &str) -> Option<Weight<'a, B>> {
    match path {
        "model.embed_tokens" => return model.embed_compressed.is_none().then_some(Weight::Matrix(&mut model.embed_tokens)),
        "model.norm" => return Some(Weight::Vector(&mut model.norm.weight)),
        "lm_head" => return model.lm_head.as_mut().filter(|h| is_dense(h)).map(|h| Weight::Matrix(&mut h.weight)),
        _ => {}
    }
    let (index, name) = path.strip_prefix("model.layers.")?.split_once('.')?;
    let layer = model.layers.get_mut(index.parse::<usize>().ok()?)?;
    match name {
        "input_layernorm" => Some(Weight::Vector(&mut layer.input_layernorm.weight)),
        "post_attention_layernorm" => Some(Weight::Vector(&mut layer.post_attention_layernorm.weight)),
        _ => layer.linears_mut().into_iter().find(|(n, l)| *n == name && is_dense(l)).map(|(_, l)| Weight::Matrix(&mut l.weight)),
    }
}

/// Every module of `model` that holds a weight, under PEFT's path inside the `*ForCausalLM`, in
/// checkpoint order, each with whether its weight is held dense.
fn weight_paths<B: Backend>(model: &CausalLm<B>) -> Vec<(String, bool)> {
    let mut out = vec![("model.embed_tokens".to_string(), model.embed_compressed.is_none())];
    for (i, layer) in model.layers.iter().enumerate() {
        out.extend(layer.linears().into_iter().map(|(name, lin)| (format!("model.layers.{i}.{name}"), is_dense(lin))));
        out.extend(["input_layernorm", "post_attention_layernorm"].map(|name| (format!("model.layers.{i}.{name}"), true)));
    }
    out.push(("model.norm".to_string(), true));
    out.extend(model.lm_head.as_ref().map(|head| ("lm_head".to_string(), is_dense(head))));
    out
}

/// The paths of the modules holding other modules, as `named_modules` lists them.
fn container_paths(num_layers: usize) -> Vec<String> {
    let mut out = vec!["model".to_string(), "model.layers".to_string()];
    for i in 0..num_layers {
        out.extend([format!("model.layers.{i}"), format!("model.layers.{i}.self_attn"), format!("model.layers.{i}.mlp")]);
    }
    out
}

/// The paths of the modules `config.modules_to_save` names in `model` (checkpoint order), or an
/// error naming the entry that PEFT would train differently, or that matches no weight.
pub fn saved_module_paths<B: Backend>(model: &CausalLm<B>, config: &LoraConfig) -> Result<Vec<String>, PeftError> {
    let names = &config.modules_to_save;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |name: &str, message: String| PeftError::SavedModule { name: name.to_string(), message };
    let tied = model.lm_head.is_none();
    let adapted: Vec<String> = linear_layers(model).into_iter().filter(|(p, _)| config.target_modules.matches(p)).map(|(p, _)| p).collect();
    let containers = container_paths(model.layers.len());
    let weights = weight_paths(model);
    let mut paths = Vec::new();
    for name in names {
        if let Some(container) = containers.iter().find(|p| p.ends_with(name.as_str())) {
            return Err(bad(
                name,
                format!(
                    "names `{container}`, which holds other modules: name a weight's module (embed_tokens, a norm, a projection, lm_head)"
                ),
            ));
        }
        if tied && ["model.embed_tokens", "lm_head"].iter().any(|p| p.ends_with(name.as_str())) {
            return Err(bad(
                name,
                "this model's head is tied to its embedding (tie_word_embeddings): training one apart from the other is not implemented"
                    .into(),
            ));
        }
        let matched: Vec<&(String, bool)> = weights.iter().filter(|(p, _)| p.ends_with(name.as_str())).collect();
        if matched.is_empty() {
            return Err(bad(name, "no module with weights has a path ending so (e.g. model.embed_tokens, model.layers.0.input_layernorm, model.norm, lm_head)".into()));
        }
        for (path, dense) in matched {
            if adapted.contains(path) {
                return Err(bad(name, format!("names `{path}`, which also carries a LoRA adapter (target_modules)")));
            }
            if !dense {
                return Err(bad(name, format!("names `{path}`, whose weight is held in 4 bits or sharded: it cannot be trained whole")));
            }
            if !paths.contains(path) {
                paths.push(path.clone());
            }
        }
    }
    let order: Vec<&String> = weights.iter().map(|(p, _)| p).collect();
    paths.sort_by_key(|p| order.iter().position(|o| *o == p));
    Ok(paths)
}

/// Makes the weights of the modules at `paths` ([`saved_module_paths`]) trainable.
pub fn unfreeze_saved_modules<B: Backend>(mut model: CausalLm<B>, paths: &[String]) -> CausalLm<B> {
    for path in paths {
        if let Some(mut weight) = weight_mut(&mut model, path) {
            weight.unfreeze();
        }
    }
    model
}

/// PEFT's name of the saved weight of the module at `path`.
pub fn saved_tensor_name(path: &str) -> String {
    format!("{}{path}.weight", crate::adapter::PEFT_PREFIX)
}

/// The weights of the modules at `paths` under PEFT's names, as f32.
pub fn saved_module_tensors<B: Backend>(model: &CausalLm<B>, paths: &[String]) -> Vec<NamedTensor> {
    let mut out = Vec::new();
    if paths.is_empty() {
        return out;
    }
    alignment_models::pretrained::for_each_named_tensor(model, |t| {
        if let Some(path) = t.name.strip_suffix(".weight").filter(|p| paths.iter().any(|q| q == p)) {
            out.push(NamedTensor { name: saved_tensor_name(path), ..t });
        }
    });
    out
}

/// Sets the weight of the module at `path` to `values` (f32, the weight's shape `shape`),
/// trainable; an error naming `tensor` when the shape differs.
pub fn set_saved_module<B: Backend>(
    model: &mut CausalLm<B>,
    path: &str,
    tensor: &str,
    shape: Vec<usize>,
    values: Vec<f32>,
) -> Result<(), PeftError> {
    let Some(mut weight) = weight_mut(model, path) else {
        return Err(PeftError::State(format!("the model has no dense weight at {path} for `{tensor}`")));
    };
    if weight.dims() != shape {
        return Err(PeftError::ShapeMismatch { name: tensor.to_string(), expected: weight.dims(), found: shape });
    }
    weight.set(values);
    Ok(())
}
