//! Parity with Hugging Face PEFT 0.21: adapters made by PEFT load here and give PEFT's logits;
//! adapters saved here load in PEFT (`PeftModel.from_pretrained`) and give ours.

use crate::common;

use alignment_core::backend::Cpu;
use alignment_models::CausalLm;
use alignment_peft::{apply_lora, load_adapter, merge_lora, save_adapter, LoraConfig, TargetModules};
use burn::module::Param;
use burn::tensor::{Distribution, Tensor};
use common::*;

/// Loads a PEFT-made adapter onto its base, compares logits with PEFT's (adapted and merged).
fn golden(name: &str, expected_adapters: usize, expected_scaling: f64) {
    let reference = reference(name);
    let base = alignment_models::load_pretrained::<Cpu>(&repo_root().join(&reference.base), &Default::default()).unwrap();
    let (model, config) = load_adapter(base, &peft_fixture(name)).unwrap();
    let adapters: Vec<_> = alignment_peft::lora::linear_layers(&model).into_iter().filter(|(_, l)| l.lora.is_some()).collect();
    assert_eq!(adapters.len(), expected_adapters, "{name}: adapted modules");
    assert!(adapters.iter().all(|(_, l)| (l.lora.as_ref().unwrap().scaling - expected_scaling).abs() < 1e-12));
    assert!((config.scaling() - expected_scaling).abs() < 1e-12);

    let batch = reference_batch(&reference);
    let diff = max_diff(&logits(&model, &batch), &reference.logits, &reference.attention_mask);
    let merged = merge_lora(model);
    assert!(!alignment_peft::has_lora(&merged));
    let merged_diff = max_diff(&logits(&merged, &batch), &reference.merged_logits, &reference.attention_mask);
    println!("{name}: max |logit diff| vs PEFT = {diff:.3e}, merged vs PEFT merge_and_unload = {merged_diff:.3e}");
    assert!(diff <= 1e-4, "{name}: {diff}");
    assert!(merged_diff <= 1e-4, "{name}: merged {merged_diff}");
}

/// `dir/adapter_config.json`, parsed.
fn adapter_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
}

/// Every adapter's `B` of `model` drawn from N(0, 0.05²), so that the adapters matter.
fn randomize_b(model: &mut CausalLm<Cpu>) {
    for (_, lin) in alignment_peft::lora::linear_layers_mut(model) {
        if let Some(lora) = lin.lora.as_mut() {
            let b = lora.b.val();
            lora.b = Param::from_tensor(Tensor::random(b.shape(), Distribution::Normal(0.0, 0.05), &b.device()));
        }
    }
}

/// What saving `model`'s adapters (described by `config`) here must give: PEFT loading the
/// directory gives `model`'s logits (≤ 1e-4), it loads back here to the same logits (≤ 1e-6),
/// and `model` merged computes the same function (≤ 1e-4). Returns the directory (in `tmp`),
/// its tensor names and the config read back, for each case's own checks.
fn saved_adapter_gives_our_logits(
    model: CausalLm<Cpu>,
    config: &LoraConfig,
    tmp: &tempfile::TempDir,
    what: &str,
) -> (std::path::PathBuf, std::collections::BTreeSet<String>, LoraConfig) {
    let reference = reference("tiny-llama-lora");
    let base_dir = base_fixture("tiny-llama");
    let batch = reference_batch(&reference);
    let ours = logits(&model, &batch);
    let dir = tmp.path().join("adapter");
    save_adapter(&model, &dir, config, base_dir.to_str().unwrap()).unwrap();
    let names = alignment_peft::adapter::adapter_tensor_names(&dir).unwrap();

    let theirs = peft_logits(&base_dir, &dir, &reference);
    let diff = max_diff(&ours, &theirs, &reference.attention_mask);
    println!("{what} in PEFT: max |logit diff| = {diff:.3e}");
    assert!(diff <= 1e-4, "{what}: {diff}");

    let (reloaded, reloaded_config) = load_adapter(load_base("tiny-llama"), &dir).unwrap();
    let diff = max_diff(&logits(&reloaded, &batch), &ours, &reference.attention_mask);
    assert!(diff <= 1e-6, "{what}: round trip {diff}");

    let diff = max_diff(&logits(&merge_lora(model), &batch), &ours, &reference.attention_mask);
    println!("{what}, merged against unmerged: max |logit diff| = {diff:.3e}");
    assert!(diff <= 1e-4, "{what}: merged {diff}");
    (dir, names, reloaded_config)
}

#[test]
fn peft_adapter_on_llama_matches_peft() {
    // q_proj, v_proj in 2 layers; alpha / r = 8 / 4.
    golden("tiny-llama-lora", 4, 2.0);
}

#[test]
fn peft_rslora_all_linear_matches_peft() {
    // 7 modules x 2 layers, lm_head excluded; alpha / sqrt(r) = 16 / sqrt(8).
    golden("tiny-llama-rslora-all-linear", 14, 16.0 / 8f64.sqrt());
}

#[test]
fn peft_adapter_on_gemma_matches_peft() {
    golden("tiny-gemma-lora", 6, 4.0);
}

#[test]
fn peft_loads_our_adapter() {
    let reference = reference("tiny-llama-lora");
    // Explicit names, a full path and lm_head, with rsLoRA; B randomised so the adapter matters.
    let mut config = LoraConfig::new(
        8,
        12.0,
        TargetModules::Names(vec!["k_proj".into(), "model.layers.1.mlp.up_proj".into(), "o_proj".into(), "lm_head".into()]),
    );
    config.use_rslora = true;
    let mut model = apply_lora(load_base("tiny-llama"), &config, 7).unwrap();
    randomize_b(&mut model);
    let batch = reference_batch(&reference);
    let plain = logits(&load_base("tiny-llama"), &batch);
    assert!(max_diff(&logits(&model, &batch), &plain, &reference.attention_mask) > 1e-2, "the adapter should change the logits");

    let tmp = tempfile::tempdir().unwrap();
    let (_, names, reloaded_config) = saved_adapter_gives_our_logits(model, &config, &tmp, "our adapter");
    assert_eq!(names.len(), 2 * (2 + 1 + 2 + 1));
    assert!(names.contains("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"));
    assert!(names.contains("base_model.model.lm_head.lora_B.weight"));
    assert_eq!(reloaded_config.r, 8);
    assert!((reloaded_config.scaling() - config.scaling()).abs() < 1e-12);
}

#[test]
fn peft_adapter_with_saved_modules_matches_peft() {
    // q_proj, v_proj adapters, and trained copies of the embedding, the head and every norm.
    golden("tiny-llama-modules-to-save", 4, 2.0);
}

#[test]
fn peft_loads_our_adapter_with_saved_modules() {
    let mut config = LoraConfig::new(4, 8.0, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
    config.modules_to_save =
        vec!["lm_head".into(), "embed_tokens".into(), "post_attention_layernorm".into(), "layers.1.mlp.up_proj".into()];
    let mut model = apply_lora(load_base("tiny-llama"), &config, 7).unwrap();
    // The saved modules moved away from the base (as training would), the adapters left as made.
    let noise = |p: &mut Param<Tensor<Cpu, 2>>| {
        let w = p.val();
        *p = Param::initialized(p.id, w.clone() + Tensor::random(w.shape(), Distribution::Normal(0.0, 0.05), &w.device()));
    };
    noise(&mut model.embed_tokens);
    noise(&mut model.lm_head.as_mut().unwrap().weight);
    noise(&mut model.layers[1].mlp.up_proj.weight);
    for layer in &mut model.layers {
        let w = layer.post_attention_layernorm.weight.val();
        layer.post_attention_layernorm.weight = Param::initialized(layer.post_attention_layernorm.weight.id, w + 0.25);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (dir, names, reloaded_config) = saved_adapter_gives_our_logits(model, &config, &tmp, "our adapter with saved modules");
    for saved in [
        "base_model.model.lm_head.weight",
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.model.layers.0.post_attention_layernorm.weight",
        "base_model.model.model.layers.1.post_attention_layernorm.weight",
        "base_model.model.model.layers.1.mlp.up_proj.weight",
    ] {
        assert!(names.contains(saved), "{saved} in {names:?}");
    }
    assert_eq!(names.len(), 8 + 5, "4 adapters' A and B, and the 5 saved modules");
    assert_eq!(adapter_json(&dir)["modules_to_save"], serde_json::json!(config.modules_to_save));
    assert_eq!(reloaded_config.modules_to_save, config.modules_to_save);
}

#[test]
fn peft_dora_adapter_matches_peft() {
    // DoRA on q, v and down: trained magnitudes, random B; adapted and merged.
    golden("tiny-llama-dora", 6, 2.0);
    let (model, config) = load_adapter(load_base("tiny-llama"), &peft_fixture("tiny-llama-dora")).unwrap();
    assert!(config.use_dora);
    let with_magnitude =
        alignment_peft::lora::linear_layers(&model).iter().filter(|(_, l)| l.lora.as_ref().is_some_and(|a| a.magnitude.is_some())).count();
    assert_eq!(with_magnitude, 6);
}

#[test]
fn peft_loads_our_dora_adapter() {
    let reference = reference("tiny-llama-lora");
    let mut config = LoraConfig::new(4, 8.0, TargetModules::Names(vec!["k_proj".into(), "gate_proj".into(), "lm_head".into()]));
    config.use_dora = true;
    let mut model = apply_lora(load_base("tiny-llama"), &config, 7).unwrap();
    let batch = reference_batch(&reference);
    let plain = logits(&load_base("tiny-llama"), &batch);
    let diff = max_diff(&logits(&model, &batch), &plain, &reference.attention_mask);
    assert!(diff <= 1e-5, "a fresh DoRA adapter (B = 0, m = ‖W‖) leaves the function unchanged: {diff}");
    // B and the magnitudes moved away from their initial values, as training would.
    randomize_b(&mut model);
    for (_, lin) in alignment_peft::lora::linear_layers_mut(&mut model) {
        if let Some(lora) = lin.lora.as_mut() {
            let m = lora.magnitude.as_ref().unwrap().val();
            lora.magnitude = Some(Param::from_tensor(m.clone() * Tensor::random(m.shape(), Distribution::Uniform(0.9, 1.1), &m.device())));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (dir, names, reloaded_config) = saved_adapter_gives_our_logits(model, &config, &tmp, "our DoRA adapter");
    assert!(names.contains("base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"), "{names:?}");
    assert_eq!(names.len(), (2 * 2 + 1) * 3, "A, B and the magnitude of 2 layers' k and gate, and of the head");
    assert_eq!(adapter_json(&dir)["use_dora"], true);
    assert!(reloaded_config.use_dora);
}

/// PEFT's gradients of `Σ mask · logits · r` (fixed weights `r`) with respect to every trainable
/// tensor of `base` + the adapter in `adapter`, by PEFT's parameter name (`default` dropped).
const PEFT_GRADIENTS: &str = r#"
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, batch = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter, is_trainable=True)
model.train()
logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits
n = logits.numel()
r = ((torch.arange(n) * 37 % 101).float() - 50.0).div(50.0).reshape(logits.shape)
mask = torch.tensor(batch["attention_mask"]).float()[:, :, None]
(logits * r * mask).sum().backward()
print(json.dumps({name.replace(".default", ""): p.grad.flatten().tolist() for name, p in model.named_parameters() if p.requires_grad}))
"#;

#[test]
fn dora_gradients_match_peft() {
    use alignment_core::backend::CpuAutodiff;
    use burn::tensor::TensorData;
    // The weight norm is a constant to the backward pass (PEFT's `weight_norm.detach()`).
    let reference = reference("tiny-llama-lora");
    let base_dir = base_fixture("tiny-llama");
    let adapter_dir = peft_fixture("tiny-llama-dora");
    let tmp = tempfile::tempdir().unwrap();
    let batch_json = tmp.path().join("batch.json");
    let json = serde_json::json!({"input_ids": reference.input_ids, "attention_mask": reference.attention_mask, "position_ids": reference.position_ids});
    std::fs::write(&batch_json, json.to_string()).unwrap();
    let theirs: std::collections::BTreeMap<String, Vec<f32>> =
        serde_json::from_str(run_python(PEFT_GRADIENTS, &[&base_dir, &adapter_dir, &batch_json]).lines().last().unwrap()).unwrap();

    let base = alignment_models::load_pretrained::<CpuAutodiff>(&base_dir, &Default::default()).unwrap();
    let (model, _) = load_adapter(base, &adapter_dir).unwrap();
    let logits = model.forward(&reference_batch(&reference), None);
    let dims = logits.dims();
    let n = dims.iter().product::<usize>();
    let r: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let mask: Vec<f32> = reference.attention_mask.iter().flatten().map(|&m| m as f32).collect();
    let r = Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(r, dims), &Default::default());
    let mask =
        Tensor::<CpuAutodiff, 1>::from_data(TensorData::new(mask, [dims[0] * dims[1]]), &Default::default()).reshape([dims[0], dims[1], 1]);
    let grads = (logits * r * mask).sum().backward();
    let flat = |t: Tensor<alignment_core::backend::Cpu, 2>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let mut compared = 0;
    let mut worst = 0f32;
    for (path, lin) in alignment_peft::lora::linear_layers(&model) {
        let Some(lora) = &lin.lora else { continue };
        let magnitude =
            lora.magnitude.as_ref().expect("DoRA").grad(&grads).unwrap().into_data().convert::<f32>().into_vec::<f32>().unwrap();
        for (name, ours) in [
            (format!("base_model.model.{path}.lora_A.weight"), flat(lora.a.grad(&grads).unwrap())),
            (format!("base_model.model.{path}.lora_B.weight"), flat(lora.b.grad(&grads).unwrap())),
            (format!("base_model.model.{path}.lora_magnitude_vector.weight"), magnitude),
        ] {
            let expected = theirs.get(&name).unwrap_or_else(|| panic!("{name} not among PEFT's trainable tensors"));
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = ours.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
            worst = worst.max(diff);
            assert!(diff <= 1e-4, "{name}: {diff}");
            compared += 1;
        }
    }
    println!("DoRA gradients against PEFT's: {compared} tensors, max |Δ| / max |g| = {worst:.3e}");
    assert_eq!(compared, theirs.len(), "every trainable tensor of PEFT's compared");
}
