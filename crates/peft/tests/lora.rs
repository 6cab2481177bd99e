//! LoRA mechanics: initialisation, frozen base (gradients and AdamW state only for adapters),
//! dropout, base checkpoint unaffected, and the errors of save/load.

mod common;

use alignment_core::backend::{Cpu, CpuAutodiff};
use alignment_models::{load_pretrained, Batch, CausalLm};
use alignment_peft::lora::{linear_layers, linear_layers_mut};
use alignment_peft::{apply_lora, load_adapter, merge_lora, save_adapter, LoraConfig, PeftError, TargetModules};
use alignment_trainer::optimizer::{AdamW, AdamWConfig};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Tensor};
use common::*;
use std::collections::BTreeSet;

fn all_linear(r: usize, alpha: f64) -> LoraConfig {
    LoraConfig::new(r, alpha, TargetModules::AllLinear)
}

fn names(list: &[&str]) -> TargetModules {
    TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
}

fn batch() -> Batch {
    Batch::from_ids(vec![vec![1, 5, 9, 13, 17, 21], vec![2, 4, 6, 8, 10, 12]])
}

/// Ids of every float parameter of a module.
#[derive(Default)]
struct Ids(Vec<ParamId>);
impl<B: Backend> ModuleVisitor<B> for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
    }
}

fn adapter_ids<B: Backend>(model: &CausalLm<B>) -> BTreeSet<ParamId> {
    linear_layers(model).iter().filter_map(|(_, l)| l.lora.as_ref()).flat_map(|a| [a.a.id, a.b.id]).collect()
}

#[test]
fn init_follows_peft_and_leaves_the_function_unchanged() {
    let base = load_base("tiny-llama");
    let batch = batch();
    let before = logits(&base, &batch);
    let model = apply_lora(base, &all_linear(4, 8.0), 0).unwrap();
    let adapted: Vec<_> = linear_layers(&model).into_iter().filter(|(_, l)| l.lora.is_some()).collect();
    assert_eq!(adapted.len(), 14, "all-linear: 7 per layer, never lm_head");
    assert!(model.lm_head.as_ref().unwrap().lora.is_none());
    for (path, lin) in &adapted {
        let lora = lin.lora.as_ref().unwrap();
        let [out, inp] = lin.weight.dims();
        assert_eq!(lora.a.dims(), [4, inp], "{path}");
        assert_eq!(lora.b.dims(), [out, 4], "{path}");
        assert_eq!(lora.scaling, 2.0);
        // kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
        let a: Vec<f32> = lora.a.val().into_data().into_vec().unwrap();
        let bound = 1.0 / (inp as f32).sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound), "{path}");
        let max = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max > 0.8 * bound, "{path}: values should fill the range, max {max} of {bound}");
        let b: Vec<f32> = lora.b.val().into_data().into_vec().unwrap();
        assert!(b.iter().all(|&x| x == 0.0), "{path}: B starts at zero");
    }
    let mask = vec![vec![1u8; 6]; 2];
    assert_eq!(max_diff(&logits(&model, &batch), &before, &mask), 0.0);
    // Same seed, same adapters; other seed, other adapters.
    let again = apply_lora(load_base("tiny-llama"), &all_linear(4, 8.0), 0).unwrap();
    let other = apply_lora(load_base("tiny-llama"), &all_linear(4, 8.0), 1).unwrap();
    let a0 =
        |m: &CausalLm<Cpu>| -> Vec<f32> { m.layers[0].self_attn.q_proj.lora.as_ref().unwrap().a.val().into_data().into_vec().unwrap() };
    assert_eq!(a0(&model), a0(&again));
    assert_ne!(a0(&model), a0(&other));
    // rsLoRA scaling.
    let mut rs = all_linear(16, 8.0);
    rs.use_rslora = true;
    let model = apply_lora(load_base("tiny-llama"), &rs, 0).unwrap();
    assert_eq!(model.layers[1].mlp.down_proj.lora.as_ref().unwrap().scaling, 2.0);
    // Per layer, r·(in + out): q, o 64→64; k, v 64→32 (2 kv heads of 16); gate, up, down 64↔128.
    let per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3);
    assert_eq!(alignment_peft::num_lora_params(&model), 2 * per_layer);
}

#[test]
fn only_adapters_get_gradients_and_optimizer_state() {
    let device = Default::default();
    let base = load_pretrained::<CpuAutodiff>(&base_fixture("tiny-llama"), &device).unwrap();
    let mut all = Ids::default();
    base.visit(&mut all);
    let config = LoraConfig::new(4, 8.0, names(&["q_proj", "v_proj", "down_proj"]));
    let mut model = apply_lora(base, &config, 3).unwrap();
    // Give B non-zero values so that A's gradient is non-zero too.
    for (_, lin) in linear_layers_mut(&mut model) {
        if let Some(lora) = lin.lora.as_mut() {
            let b = lora.b.val();
            lora.b = Param::from_tensor(Tensor::ones(b.shape(), &b.device()) * 0.01);
        }
    }
    let adapters = adapter_ids(&model);
    assert_eq!(adapters.len(), 2 * 3 * 2);
    let mut ids = Ids::default();
    model.visit(&mut ids);
    assert_eq!(ids.0.len(), all.0.len() + adapters.len(), "adapters are extra parameters; base ids are kept");

    let loss = model.forward(&batch(), None).square().mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    assert_eq!(grads.len(), adapters.len(), "gradients exist for the adapters only");
    for (path, lin) in linear_layers(&model) {
        assert!(grads.get::<Cpu, 2>(lin.weight.id).is_none(), "{path}: frozen base weight has a gradient");
        if let Some(lora) = &lin.lora {
            for p in [&lora.a, &lora.b] {
                let g: Vec<f32> = grads.get::<Cpu, 2>(p.id).expect("adapter gradient").into_data().into_vec().unwrap();
                assert!(g.iter().any(|&x| x != 0.0), "{path}: zero adapter gradient");
            }
        }
    }

    let weights_before: Vec<Vec<f32>> = linear_layers(&model).iter().map(|(_, l)| l.weight.val().into_data().into_vec().unwrap()).collect();
    let q_a_before: Vec<f32> = model.layers[0].self_attn.q_proj.lora.as_ref().unwrap().a.val().into_data().into_vec().unwrap();
    let mut optimizer = AdamW::<Cpu>::new(AdamWConfig { weight_decay: 0.1, ..Default::default() });
    let (model, _report) = optimizer.step::<CpuAutodiff, _>(1e-3, model, grads);
    println!("AdamW moments: {:?}", {
        let mut k: Vec<_> = optimizer.state.keys().collect();
        k.sort();
        k
    });
    assert_eq!(optimizer.state.len(), adapters.len(), "moments: {:?}", optimizer.state.keys().collect::<Vec<_>>());
    assert!(optimizer.state.keys().all(|k| k.contains("lora")), "{:?}", optimizer.state.keys().collect::<Vec<_>>());
    let weights_after: Vec<Vec<f32>> = linear_layers(&model).iter().map(|(_, l)| l.weight.val().into_data().into_vec().unwrap()).collect();
    assert_eq!(weights_before, weights_after, "base weights must not move");
    let q_a_after: Vec<f32> = model.layers[0].self_attn.q_proj.lora.as_ref().unwrap().a.val().into_data().into_vec().unwrap();
    assert_ne!(q_a_before, q_a_after, "adapters are updated");

    // The frozen/trainable split survives valid() -> from_inner (as the trainer's eval does),
    // and a second step still touches only adapters.
    let model = CausalLm::<CpuAutodiff>::from_inner(model.valid());
    let loss = model.forward(&batch(), None).square().mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    assert_eq!(grads.len(), adapters.len());
}

/// burn's random generator is one for the process, and the tests run on threads side by side:
/// the tests drawing dropout masks from it hold this (the DoRA test seeds it and must see its
/// own draws, not the other's).
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn dropout_applies_only_when_training() {
    let _drawing = GLOBAL_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Default::default();
    let mut config = LoraConfig::new(4, 8.0, names(&["q_proj", "v_proj", "up_proj"]));
    config.dropout = 0.5;
    let base = load_pretrained::<CpuAutodiff>(&base_fixture("tiny-llama"), &device).unwrap();
    let mut model = apply_lora(base, &config, 0).unwrap();
    for (_, lin) in linear_layers_mut(&mut model) {
        if let Some(lora) = lin.lora.as_mut() {
            let b = lora.b.val();
            lora.b = Param::from_tensor(Tensor::ones(b.shape(), &b.device()) * 0.05);
        }
    }
    let batch = batch();
    let mask = vec![vec![1u8; 6]; 2];
    // Inference (inner backend): deterministic, no dropout.
    let inner = model.valid();
    assert_eq!(max_diff(&logits(&inner, &batch), &logits(&inner, &batch), &mask), 0.0);
    // Training (autodiff backend): masks differ between calls.
    let (t1, t2) = (logits(&model, &batch), logits(&model, &batch));
    assert!(max_diff(&t1, &t2, &mask) > 0.0, "dropout should make training forwards differ");
    assert!(max_diff(&t1, &logits(&inner, &batch), &mask) > 0.0);
}

#[test]
fn base_checkpoint_holds_base_weights_only() {
    let model = apply_lora(load_base("tiny-llama"), &all_linear(4, 8.0), 0).unwrap();
    let base_names: Vec<String> =
        alignment_models::pretrained::named_tensors(&load_base("tiny-llama")).into_iter().map(|t| t.name).collect();
    let names: Vec<String> = alignment_models::pretrained::named_tensors(&model).into_iter().map(|t| t.name).collect();
    assert_eq!(names, base_names);
    // ... and a merged model saves as a plain HF model that loads back to the same logits.
    let mut model = model;
    for (_, lin) in linear_layers_mut(&mut model) {
        if let Some(lora) = lin.lora.as_mut() {
            let b = lora.b.val();
            lora.b = Param::from_tensor(Tensor::ones(b.shape(), &b.device()) * 0.02);
        }
    }
    let batch = batch();
    let mask = vec![vec![1u8; 6]; 2];
    let expected = logits(&model, &batch);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("merged");
    alignment_models::save_pretrained(&merge_lora(model), &dir, alignment_models::SaveDtype::F32, None).unwrap();
    let reloaded = load_pretrained::<Cpu>(&dir, &Default::default()).unwrap();
    assert!(max_diff(&logits(&reloaded, &batch), &expected, &mask) <= 1e-5);
}

fn copy_fixture(name: &str, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(peft_fixture(name).join(f), to.join(f)).unwrap();
    }
}

fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

#[test]
fn load_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    // The error of loading the q/v fixture with one field of its config set to `value`.
    let cases = std::cell::Cell::new(0);
    let load_with = |field: &str, value: serde_json::Value| -> PeftError {
        cases.set(cases.get() + 1);
        let dir = tmp.path().join(format!("case-{}", cases.get()));
        copy_fixture("tiny-llama-lora", &dir);
        edit_config(&dir, |j| j[field] = value);
        load_adapter(load_base("tiny-llama"), &dir).unwrap_err()
    };

    // A target without tensors: missing, named.
    let err = load_with("target_modules", serde_json::json!(["q_proj", "v_proj", "k_proj"]));
    assert!(
        matches!(&err, PeftError::MissingTensors { names, .. }
        if names.contains(&"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight".to_string())),
        "{err}"
    );

    // Tensors of an untargeted module: unexpected, named.
    let err = load_with("target_modules", serde_json::json!(["q_proj"]));
    assert!(
        matches!(&err, PeftError::UnexpectedTensors { names, .. }
        if names.len() == 4 && names[0].contains("v_proj")),
        "{err}"
    );

    // Wrong rank: shape mismatch, named.
    let err = load_with("r", serde_json::json!(8));
    assert!(
        matches!(&err, PeftError::ShapeMismatch { name, expected, found }
        if name.ends_with("q_proj.lora_A.weight") && expected == &vec![8, 64] && found == &vec![4, 64]),
        "{err}"
    );

    // Unsupported PEFT features are refused by field name.
    for (field, value) in [
        ("bias", serde_json::json!("all")),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("target_modules", serde_json::json!(".*proj")),
        ("peft_type", serde_json::json!("IA3")),
    ] {
        let err = load_with(field, value);
        assert!(matches!(&err, PeftError::AdapterConfig { field: f, .. } if f == field), "{field}: {err}");
    }

    // A DoRA config over a plain adapter file: the magnitudes are missing, named.
    let err = load_with("use_dora", serde_json::json!(true));
    assert!(
        matches!(&err, PeftError::MissingTensors { names, .. }
        if names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".to_string())),
        "{err}"
    );

    // A module saved whole (modules_to_save) without its weight in the file: missing, named.
    let err = load_with("modules_to_save", serde_json::json!(["lm_head"]));
    assert!(
        matches!(&err, PeftError::MissingTensors { names, .. } if names == &vec!["base_model.model.lm_head.weight".to_string()]),
        "{err}"
    );
    let err = load_with("modules_to_save", serde_json::json!("lm_head"));
    assert!(matches!(&err, PeftError::AdapterConfig { field, .. } if field == "modules_to_save"), "{err}");

    // Unknown target names are an error at apply time, as in PEFT.
    let err = apply_lora(load_base("tiny-llama"), &LoraConfig::new(4, 8.0, names(&["qproj"])), 0).unwrap_err();
    assert!(err.to_string().contains("qproj"), "{err}");
    let err = apply_lora(load_base("tiny-llama"), &LoraConfig::new(0, 8.0, TargetModules::AllLinear), 0).unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig(_)));

    // Saving with a config that does not describe the adapters.
    let model = apply_lora(load_base("tiny-llama"), &LoraConfig::new(4, 8.0, names(&["q_proj"])), 0).unwrap();
    let err = save_adapter(&model, &tmp.path().join("bad-save"), &LoraConfig::new(4, 8.0, names(&["v_proj"])), "x").unwrap_err();
    assert!(matches!(err, PeftError::State(_)), "{err}");
    assert!(!tmp.path().join("bad-save").exists());
    let err =
        save_adapter(&load_base("tiny-llama"), &tmp.path().join("none"), &LoraConfig::new(4, 8.0, names(&["q_proj"])), "x").unwrap_err();
    assert!(matches!(err, PeftError::State(_)), "{err}");
}

#[test]
fn saved_config_has_peft_fields() {
    let mut config = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
    config.dropout = 0.05;
    let model = apply_lora(load_base("tiny-llama"), &config, 0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_adapter(&model, &tmp.path().join("a"), &config, "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 16);
    assert_eq!(json["lora_alpha"], 32);
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["use_rslora"], false);
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert!(json["modules_to_save"].is_null());
    let targets: BTreeSet<&str> = json["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(targets, alignment_peft::ALL_LINEAR.into_iter().collect());
    // Reads back to the same config.
    assert_eq!(
        alignment_peft::read_adapter_config(&dir).unwrap(),
        LoraConfig { target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()), ..config }
    );
}

#[test]
fn modules_to_save_trains_the_named_modules_and_refuses_what_peft_would_not_train_alone() {
    let base = || alignment_models::load_pretrained::<CpuAutodiff>(&base_fixture("tiny-llama"), &Default::default()).unwrap();
    let with_saved = |targets: &[&str], saved: &[&str]| {
        let mut config = LoraConfig::new(4, 8.0, names(targets));
        config.modules_to_save = saved.iter().map(|s| s.to_string()).collect();
        config
    };

    // PEFT's plain suffix match: `norm` names the final norm and both norms of every layer.
    let model = apply_lora(base(), &with_saved(&["q_proj"], &["embed_tokens", "norm", "down_proj"]), 0).unwrap();
    assert!(model.embed_tokens.val().is_require_grad());
    assert!(model.norm.weight.val().is_require_grad());
    for layer in &model.layers {
        assert!(layer.input_layernorm.weight.val().is_require_grad() && layer.post_attention_layernorm.weight.val().is_require_grad());
        assert!(layer.mlp.down_proj.weight.val().is_require_grad(), "down_proj is saved whole");
        assert!(!layer.mlp.up_proj.weight.val().is_require_grad() && !layer.self_attn.q_proj.weight.val().is_require_grad());
    }
    assert!(!model.lm_head.as_ref().unwrap().weight.val().is_require_grad(), "the head is not named");

    // What PEFT would not train as one module, or this crate cannot hold, is refused by name.
    let tied = alignment_models::load_pretrained::<CpuAutodiff>(&base_fixture("tiny-gemma"), &Default::default()).unwrap();
    let quantized = alignment_peft::load_pretrained_4bit::<CpuAutodiff>(
        &base_fixture("tiny-llama"),
        &Default::default(),
        alignment_peft::QuantConfig::default(),
    )
    .unwrap();
    for (model, targets, saved, says) in [
        (base(), &["q_proj"][..], "mlp", "holds other modules"),
        (base(), &["q_proj"], "q_proj", "also carries a LoRA adapter"),
        (base(), &["q_proj"], "rotary", "no module with weights"),
        (tied, &["q_proj"], "embed_tokens", "tied to its embedding"),
        (quantized, &["q_proj"], "o_proj", "held in 4 bits"),
    ] {
        let err = apply_lora(model, &with_saved(targets, &[saved]), 0).unwrap_err();
        assert!(matches!(&err, PeftError::SavedModule { name, message } if name == saved && message.contains(says)), "{saved}: {err}");
        assert!(err.to_string().starts_with(&format!("modules_to_save `{saved}`: ")), "{err}");
    }
}

/// DoRA with its dropout active, as PEFT's `DoraLinearVariant.forward` in training: the base
/// result of the input, plus `(m/n − 1)` times the base result of the dropped input, plus `m/n`
/// times the adapter's result on the dropped input (`n = ‖W + s·B A‖` per output row).
#[test]
fn dora_with_dropout_follows_peft_s_training_formula() {
    use alignment_models::layers::{project, Linear, LoraAdapter};
    use burn::tensor::{Distribution, TensorData};
    let _drawing = GLOBAL_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = Default::default();
    let (out, inp, r, scaling) = (6, 5, 2, 1.5);
    let random = |shape: [usize; 2], seed: u64| {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape[0] * shape[1]).map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0)).collect();
        Tensor::<Cpu, 2>::from_data(TensorData::new(values, shape), &device)
    };
    let (w, a, b) = (random([out, inp], 1), random([r, inp], 2), random([out, r], 3));
    let magnitude = random([1, out], 4).abs().add_scalar(0.5).reshape([out]);
    let mut linear = Linear::new(w.clone());
    linear.lora = Some(LoraAdapter {
        a: Param::from_tensor(a.clone()),
        b: Param::from_tensor(b.clone()),
        scaling,
        dropout: 0.5,
        force_dropout: true,
        magnitude: Some(Param::from_tensor(magnitude.clone())),
    });
    let x = random([4, inp], 5).reshape([2, 2, inp]);
    Cpu::seed(&device, 11);
    let got = linear.forward(x.clone());
    Cpu::seed(&device, 11);
    let dropped = x.clone() * x.random_like(Distribution::Bernoulli(0.5)) * 2.0;
    let norm = (w.clone() + b.clone().matmul(a.clone()) * scaling).powi_scalar(2).sum_dim(1).sqrt().reshape([1, 1, out]);
    let ratio = magnitude.reshape([1, 1, out]) / norm;
    let update = project(project(dropped.clone(), a), b) * scaling;
    let expected = project(x.clone(), w.clone()) + project(dropped.clone(), w.clone()) * (ratio.clone() - 1.0) + update * ratio;
    let diff = (got.clone() - expected).abs().max().into_scalar();
    assert!(diff <= 1e-5, "{diff}");
    // The mask matters: without dropout the map is another.
    linear.lora.as_mut().unwrap().force_dropout = false;
    assert!((got - linear.forward(x)).abs().max().into_scalar() > 1e-3);
}
