//! Attaching LoRA adapters to a [`CausalLm`], freezing the base, and merging adapters back.

use crate::config::LoraConfig;
use crate::error::PeftError;
use crate::qlora::QuantConfig;
use alignment_models::layers::{Linear, LoraAdapter};
use alignment_models::{CausalLm, QuantizedWeight};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, DType, FloatDType, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every linear layer of `model` with its path inside the `*ForCausalLM` as PEFT names it
/// (`model.layers.0.self_attn.q_proj`, ..., `lm_head` when the head is not tied), in order.
pub fn linear_layers_mut<B: Backend>(model: &mut CausalLm<B>) -> Vec<(String, &mut Linear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, lin) in layer.linears_mut() {
            out.push((format!("model.layers.{i}.{name}"), lin));
        }
    }
    if let Some(head) = model.lm_head.as_mut() {
        out.push(("lm_head".into(), head));
    }
    out
}

/// Read-only [`linear_layers_mut`].
pub fn linear_layers<B: Backend>(model: &CausalLm<B>) -> Vec<(String, &Linear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, lin) in layer.linears() {
            out.push((format!("model.layers.{i}.{name}"), lin));
        }
    }
    if let Some(head) = &model.lm_head {
        out.push(("lm_head".into(), head));
    }
    out
}

/// Paths of the modules `config` targets in `model`; an error when a listed name matches nothing
/// (as PEFT's "Target modules ... not found in the base model").
pub fn targeted_paths<B: Backend>(model: &CausalLm<B>, config: &LoraConfig) -> Result<Vec<String>, PeftError> {
    let paths: Vec<String> = linear_layers(model).into_iter().map(|(p, _)| p).collect();
    if let crate::TargetModules::Names(names) = &config.target_modules {
        let unmatched: Vec<&String> =
            names.iter().filter(|n| !paths.iter().any(|p| crate::TargetModules::Names(vec![(*n).clone()]).matches(p))).collect();
        if !unmatched.is_empty() {
            return Err(PeftError::InvalidConfig(format!(
                "target modules {unmatched:?} not found in the model (linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj{})",
                if model.lm_head.is_some() { ", lm_head" } else { "" }
            )));
        }
    }
    Ok(paths.into_iter().filter(|p| config.target_modules.matches(p)).collect())
}

/// Makes `model` a LoRA model as PEFT's `get_peft_model`: every base parameter frozen
/// (`require_grad` off, so only adapters get gradients on an autodiff backend) and an adapter on
/// each targeted linear layer, initialised as PEFT's `init_lora_weights=True`: `A` from
/// `nn.init.kaiming_uniform_(a=√5)`, i.e. uniform in `±1/√in_features`, drawn from a ChaCha8
/// stream seeded by `seed` (so not torch's values), and `B` zero, so the model's output is
/// unchanged until `B` is trained.
pub fn apply_lora<B: Backend>(model: CausalLm<B>, config: &LoraConfig, seed: u64) -> Result<CausalLm<B>, PeftError> {
    config.validate()?;
    if has_lora(&model) {
        return Err(PeftError::State("the model already has LoRA adapters (one adapter per model is supported)".into()));
    }
    let targets = targeted_paths(&model, config)?;
    let saved = crate::saved_modules::saved_module_paths(&model, config)?;
    let mut model = model.no_grad();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (path, lin) in linear_layers_mut(&mut model) {
        if !targets.contains(&path) {
            continue;
        }
        let [out, inp] = lin.dims();
        let device = lin.weight.device();
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..config.r * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let a = Tensor::<B, 2>::from_data(TensorData::new(a, [config.r, inp]), &device);
        let b = Tensor::<B, 2>::zeros([out, config.r], &device);
        let mut lora = adapter(a, b, config);
        if config.use_dora {
            // PEFT's initial magnitude: ‖W + s·B A‖ per output row, with B = 0 the base's norms.
            lora.magnitude = Some(Param::from_tensor(lin.dora_weight_norm(&lora).detach().require_grad()));
        }
        lin.lora = Some(lora);
    }
    Ok(crate::saved_modules::unfreeze_saved_modules(model, &saved))
}

/// An adapter from its two factors (trainable parameters) and `config`'s scaling and dropout.
pub fn adapter<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, config: &LoraConfig) -> LoraAdapter<B> {
    LoraAdapter {
        a: Param::from_tensor(a),
        b: Param::from_tensor(b),
        scaling: config.scaling(),
        dropout: config.dropout,
        force_dropout: false,
        magnitude: None,
    }
}

/// Sets every adapter's dropout probability to `p`. TRL's DPO and ORPO trainers call
/// `disable_dropout_in_model` after wrapping the model in PEFT, which zeroes PEFT's
/// `lora_dropout` modules too (`p = 0`) while the saved adapter config keeps the recipe's value.
pub fn set_lora_dropout<B: Backend>(mut model: CausalLm<B>, p: f64) -> CausalLm<B> {
    for (_, lin) in linear_layers_mut(&mut model) {
        if let Some(lora) = lin.lora.as_mut() {
            lora.dropout = p;
        }
    }
    model
}

/// Whether any linear layer of `model` carries an adapter.
pub fn has_lora<B: Backend>(model: &CausalLm<B>) -> bool {
    linear_layers(model).iter().any(|(_, l)| l.lora.is_some())
}

/// Folds every adapter into its base weight, `W ← W + s·B·A` (PEFT's `merge_and_unload`), and
/// drops the adapters: the result is a plain model that `save_pretrained` writes in full HF
/// layout. Merged weights keep their base parameter's id and `require_grad` flag (frozen after
/// [`apply_lora`]). A quantized (4-bit) base is dequantized, merged and quantized again in its
/// format, as PEFT merges into bitsandbytes' `Linear4bit`.
pub fn merge_lora<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for (_, lin) in linear_layers_mut(&mut model) {
        let Some(lora) = lin.lora.take() else { continue };
        // DoRA: `(m / ‖W + ΔW‖) ⊙ (W + ΔW)` by output row, as PEFT's `merge_and_unload`.
        let dora_scale = lora.magnitude.as_ref().map(|m| (m.val() / lin.dora_weight_norm(&lora)).reshape([-1, 1]).detach());
        let rescale = |w: Tensor<B, 2>| match &dora_scale {
            Some(scale) => w * scale.clone(),
            None => w,
        };
        if let Some(quantized) = &lin.quantized {
            let merged = rescale(quantized.dequantize() + lora.delta_weight()).into_data().convert::<f32>();
            let parts = QuantConfig::of(quantized).quantize(&merged.into_vec::<f32>().expect("f32 after convert"), quantized.dims);
            lin.quantized = Some(QuantizedWeight::from_parts(&parts, &quantized.code_book.device()));
            continue;
        }
        let weight = lin.weight.val();
        let require_grad = weight.is_require_grad();
        // In the model's float type: a frozen base may be stored in the products' half type
        // (`CausalLm::store_frozen_weights_in_product_type`), which the sum would not fit.
        let weight = alignment_core::precision::cast_to(weight, alignment_core::precision::float_type::<B>());
        let merged = rescale(weight + lora.delta_weight()).detach();
        let merged = if require_grad { merged.require_grad() } else { merged };
        lin.weight = Param::initialized(lin.weight.id, merged);
    }
    model
}

/// Drops every adapter without merging (the base model as it was before [`apply_lora`], still
/// frozen): used to swap in adapters read from a checkpoint.
pub fn remove_lora<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for (_, lin) in linear_layers_mut(&mut model) {
        lin.lora = None;
    }
    model
}

/// Holds the trainable weight matrices of `model` in `dtype`, as TRL 1.16's SFT and DPO trainers
/// do for a quantized (QLoRA) model: they cast its trainable parameters — the adapters' `A` and
/// `B`, and any `modules_to_save` — to bf16 (the QLoRA paper's advice), leaving DoRA's magnitude
/// vector in f32, whose updates bf16 could not represent. Here the one-dimensional parameters all
/// stay as they are: DoRA's magnitudes, as TRL, and a norm saved whole (TRL: bf16), since this
/// model's norms compute in the residual stream's f32. The values are rounded to `dtype`; their
/// gradients and torch's AdamW moments then follow the parameters' type. Returns the model and
/// how many values changed type.
pub fn hold_trainable_in<B: Backend>(model: CausalLm<B>, dtype: FloatDType) -> (CausalLm<B>, usize) {
    struct Narrow {
        dtype: FloatDType,
        values: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Narrow {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            if !tensor.is_require_grad() || D != 2 || tensor.dtype() == DType::from(self.dtype) {
                return Param::from_mapped_value(id, tensor, mapper);
            }
            self.values += tensor.shape().num_elements();
            Param::from_mapped_value(id, tensor.cast(self.dtype).detach().require_grad(), mapper)
        }
    }
    let mut narrow = Narrow { dtype, values: 0 };
    let model = model.map(&mut narrow);
    (model, narrow.values)
}

/// Number of adapter parameters (scalars) in `model`.
pub fn num_lora_params<B: Backend>(model: &CausalLm<B>) -> usize {
    linear_layers(model)
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .map(|a| a.a.val().shape().num_elements() + a.b.val().shape().num_elements())
        .sum()
}
