//! QLoRA's adapters held in bf16, as TRL 1.16's SFT and DPO trainers hold a quantized model's
//! trainable parameters (`param.data = param.data.to(torch.bfloat16)` for every trainable
//! parameter but DoRA's magnitudes): checked on torch's CPU kernels, whose bf16 arithmetic is a
//! GPU's (scripts/test_backends.sh runs it with the other `tch` tests; burn's CPU backend has no
//! bf16, and there the adapters train in f32, as the run says).
//!
//! A test binary of its own, as `offload_bf16.rs` (one libtorch float type per process).

#![cfg(feature = "tch")]

/// The trainer's loop-test helpers (`examples`: the same sequences its own tests train on).
#[path = "../crates/trainer/tests/common/mod.rs"]
mod trainer_common;

use alignment_handbook::core::backend::{Torch, TorchAutodiff};
use alignment_handbook::models::{load_pretrained, CausalLm};
use alignment_handbook::objectives::Reduction;
use alignment_handbook::peft::{apply_lora, hold_trainable_in, load_pretrained_4bit, LoraConfig, QuantConfig, TargetModules};
use alignment_handbook::trainer::optimizer::{AdamW, AdamWConfig, UpdateRule};
use alignment_handbook::trainer::tasks::SftTask;
use alignment_handbook::trainer::{train, AdapterOutput, Collation, Recipe, TrainerConfig};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trainer_common::examples;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/models/tests/fixtures/tiny-llama")
}

fn lora() -> LoraConfig {
    LoraConfig::new(4, 8.0, TargetModules::AllLinear)
}

/// The tiny Llama with an NF4 base (or, not `quantized`, its f32 weights) and f32 adapters of
/// `config` on every linear layer, on torch's CPU.
fn lora_model(quantized: bool, config: &LoraConfig) -> CausalLm<TorchAutodiff> {
    let device = Default::default();
    let base = if quantized {
        load_pretrained_4bit::<TorchAutodiff>(&fixture(), &device, QuantConfig::default()).unwrap()
    } else {
        load_pretrained::<TorchAutodiff>(&fixture(), &device).unwrap()
    };
    apply_lora(base, config, 0).unwrap()
}

/// [`lora_model`]: quantized, plain LoRA.
fn qlora_model() -> CausalLm<TorchAutodiff> {
    lora_model(true, &lora())
}

/// Every trainable parameter's type and values, in module order.
fn trainable(model: &CausalLm<TorchAutodiff>) -> Vec<(DType, Vec<f32>)> {
    struct Collect(Vec<(DType, Vec<f32>)>);
    impl ModuleVisitor<TorchAutodiff> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TorchAutodiff, D>>) {
            let t = param.val();
            if t.is_require_grad() {
                self.0.push((t.dtype(), t.into_data().convert::<f32>().to_vec::<f32>().unwrap()));
            }
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// One gradient per trainable parameter, in that parameter's type, with the same values for
/// either type (bf16's: values of ≈ 1e-3, some large enough to be clipped at 1.0 together).
fn gradients(model: &CausalLm<TorchAutodiff>) -> GradientsParams {
    struct Random {
        grads: GradientsParams,
        seed: u32,
    }
    impl ModuleVisitor<TorchAutodiff> for Random {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TorchAutodiff, D>>) {
            if !param.is_require_grad() {
                return;
            }
            let shape = param.shape();
            let values: Vec<f32> = (0..shape.num_elements() as u32)
                .map(|i| {
                    self.seed = self.seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223 ^ i);
                    burn::tensor::bf16::from_f32((self.seed >> 8) as f32 / (1u32 << 24) as f32 * 0.02 - 0.01).to_f32()
                })
                .collect();
            let grad = Tensor::<Torch, D>::from_data(TensorData::new(values, shape), &Default::default()).cast(param.val().dtype());
            self.grads.register::<Torch, D>(param.id, grad);
        }
    }
    let mut random = Random { grads: GradientsParams::new(), seed: 7 };
    model.visit(&mut random);
    random.grads
}

/// `values` rounded to bf16 (round to nearest even, as torch casts).
fn rounded(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| burn::tensor::bf16::from_f32(v).to_f32()).collect()
}

/// A bf16 parameter's update is the same update of its f32 widening, rounded to bf16, for every
/// rule — AdamW by torch's fused kernel (whose moments are kept in bf16 too, as torch keeps them
/// for bf16 parameters), bitsandbytes' 8-bit AdamW and RMSprop through the update's f32 path —
/// and the parameter stays bf16. The start: the same adapter values (bf16's) held in bf16 and in
/// f32, the same gradients, large enough to be clipped.
#[test]
fn tch_bf16_parameters_take_the_f32_update_rounded() {
    for rule in [UpdateRule::AdamW, UpdateRule::AdamW8bit, UpdateRule::RmsProp] {
        let (narrow, values) = hold_trainable_in(qlora_model(), FloatDType::BF16);
        assert!(values > 0);
        // The same values in f32: the bf16 model's parameters widened.
        let (wide, _) = hold_trainable_in(narrow.clone(), FloatDType::F32);
        assert!(trainable(&narrow).iter().all(|(dtype, _)| *dtype == DType::BF16));
        assert!(trainable(&wide).iter().all(|(dtype, _)| *dtype == DType::F32));
        assert_eq!(
            trainable(&narrow).into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
            trainable(&wide).into_iter().map(|(_, v)| v).collect::<Vec<_>>()
        );

        let config = AdamWConfig { weight_decay: 0.1, max_grad_norm: Some(0.05), rule, ..AdamWConfig::default() };
        let mut narrow_optimizer = AdamW::<Torch>::new(config);
        let mut wide_optimizer = AdamW::<Torch>::new(config);
        let narrow_grads = gradients(&narrow);
        let wide_grads = gradients(&wide);
        let (narrow, narrow_report) = narrow_optimizer.step(1e-2, narrow, narrow_grads);
        let (wide, wide_report) = wide_optimizer.step(1e-2, wide, wide_grads);
        let (narrow_report, wide_report) = (narrow_report.read(), wide_report.read());
        assert_eq!(narrow_report, wide_report, "{rule:?}: the same gradient norm and clipping, computed in f32");
        assert!(narrow_report.clip_coef < 1.0, "{rule:?}: the gradients are clipped");

        let after = trainable(&narrow);
        assert!(after.iter().all(|(dtype, _)| *dtype == DType::BF16), "{rule:?}: the parameters stay bf16");
        let got: Vec<f32> = after.into_iter().flat_map(|(_, v)| v).collect();
        let expected: Vec<f32> = trainable(&wide).into_iter().flat_map(|(_, v)| rounded(&v)).collect();
        assert_eq!(got.len(), expected.len());
        let differing = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{rule:?}: {differing} of {} values differ from the f32 update rounded", got.len());
        if rule == UpdateRule::AdamW {
            for (path, moments) in &narrow_optimizer.state {
                let wide_moments = &wide_optimizer.state[path];
                for (name, narrow_moment, wide_moment) in
                    [("exp_avg", &moments.exp_avg, &wide_moments.exp_avg), ("exp_avg_sq", &moments.exp_avg_sq, &wide_moments.exp_avg_sq)]
                {
                    assert_eq!(narrow_moment.dtype(), DType::BF16, "{path}.{name}: kept in the parameter's type");
                    let got = narrow_moment.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                    let expected = rounded(&wide_moment.clone().into_data().to_vec::<f32>().unwrap());
                    assert_eq!(got, expected, "{path}.{name}: the f32 moment rounded");
                }
            }
        }
    }
}

/// `bf16: true`, `max_steps` updates of 4 sequences, a checkpoint every 3, adapters of `lora`.
fn config(output_dir: &Path, resume_from: Option<&Path>, lora: LoraConfig, max_steps: usize) -> TrainerConfig {
    let recipe = Recipe::from_yaml_str(
        &format!(
            "learning_rate: 1.0e-2\nlr_scheduler_type: constant\nmax_steps: {max_steps}\nper_device_train_batch_size: 4\n\
             logging_steps: 1\nsave_strategy: steps\nsave_steps: 3\nseed: 3\nbf16: true\n"
        ),
        "test recipe",
        &[format!("--output_dir={}", output_dir.display())],
    )
    .unwrap();
    let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
    config.quiet = true;
    config.resume_from = resume_from.map(Path::to_path_buf);
    config.adapter = Some(AdapterOutput { lora, base_model_name_or_path: fixture().display().to_string() });
    config
}

fn sft() -> SftTask {
    SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" }
}

fn losses(history: &[serde_json::Map<String, serde_json::Value>]) -> Vec<(u64, f64)> {
    history.iter().filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?))).collect()
}

/// The kind of a trainable parameter or saved tensor, as the golden's script names them:
/// `lora_A`, `lora_B`, `lora_magnitude_vector`, else `modules_to_save` (a module saved whole).
fn kind(name: &str) -> &'static str {
    ["lora_magnitude_vector", "lora_A", "lora_B"].into_iter().find(|k| name.contains(k)).unwrap_or("modules_to_save")
}

/// A type as torch names it.
fn torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        other => panic!("unexpected type {other:?}"),
    }
}

/// {kind: type} over `(name, type)` pairs, each kind's types agreeing.
fn types_by_kind(named: impl IntoIterator<Item = (String, &'static str)>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, dtype) in named {
        if let Some(previous) = out.insert(kind(&name).to_string(), dtype.to_string()) {
            assert_eq!(previous, dtype, "{name}: {dtype} beside {previous}");
        }
    }
    out
}

/// The types `model`'s trainable parameters train in, by kind (PEFT's names: the adapters' `a`
/// and `b` are its `lora_A` and `lora_B`).
fn trained_types(model: &CausalLm<TorchAutodiff>) -> BTreeMap<String, String> {
    struct Collect(Vec<String>, Vec<(String, &'static str)>);
    impl ModuleVisitor<TorchAutodiff> for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TorchAutodiff, D>>) {
            let t = param.val();
            if t.is_require_grad() {
                let name = match self.0.last().map(String::as_str) {
                    Some("a") => "lora_A".to_string(),
                    Some("b") => "lora_B".to_string(),
                    Some("magnitude") => "lora_magnitude_vector".to_string(),
                    _ => self.0.join("."),
                };
                self.1.push((name, torch_name(t.dtype())));
            }
        }
    }
    let mut collect = Collect(Vec::new(), Vec::new());
    model.visit(&mut collect);
    types_by_kind(collect.1)
}

/// The types of the tensors of an adapter file, by kind.
fn saved_types(path: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    types_by_kind(tensors.tensors().into_iter().map(|(name, view)| {
        let dtype = match view.dtype() {
            safetensors::Dtype::BF16 => "bfloat16",
            safetensors::Dtype::F32 => "float32",
            other => panic!("{name}: unexpected type {other:?}"),
        };
        (name, dtype)
    }))
}

/// TRL 1.16's trainers on the same tiny Llama (tests/fixtures/trl_qlora_dtypes.json, from
/// scripts/make_trl_qlora_goldens.py): for each case, the types its trainable parameters train in
/// and its saved adapter holds, by kind.
fn trl_case(name: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_qlora_dtypes.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = &golden["cases"][name];
    let map = |v: &serde_json::Value| -> BTreeMap<String, String> {
        v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
    };
    (map(&case["trained"]), map(&case["saved"]))
}

/// Each of the golden's SFT cases trained here with `bf16: true` (two updates): its parameters
/// train in the types TRL's trainer gives them and its adapter file holds the types TRL's holds —
/// QLoRA's factors and a head saved whole in bf16, DoRA's magnitudes in f32, an unquantized
/// model's adapters in f32 — and the losses are finite. (TRL's DPO trainer casts as its SFT
/// trainer does, `dpo-qlora` in the golden; here the cast is the training loop's, whatever the
/// task.)
#[test]
fn tch_adapters_train_and_save_in_the_types_trls_trainers_give_them() {
    let (sft_trained, sft_saved) = trl_case("sft-qlora");
    assert_eq!(trl_case("dpo-qlora"), (sft_trained, sft_saved), "TRL's DPO trainer casts as its SFT trainer");
    let head = LoraConfig { modules_to_save: vec!["lm_head".into()], ..lora() };
    let dora = LoraConfig { use_dora: true, ..lora() };
    for (case, quantized, config) in
        [("sft-qlora", true, lora()), ("sft-qlora-dora", true, dora), ("sft-qlora-saved-head", true, head), ("sft-lora", false, lora())]
    {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(case);
        let (trained, outcome) =
            train(lora_model(quantized, &config), &sft(), &examples(16), &[], &self::config(&out, None, config, 2), &Default::default())
                .unwrap();
        let run_losses = losses(&outcome.history);
        assert!(run_losses.len() == 2 && run_losses.iter().all(|(_, l)| l.is_finite()), "{case}: {run_losses:?}");
        let (trl_trained, trl_saved) = trl_case(case);
        assert_eq!(trained_types(&trained), trl_trained, "{case}: the types the parameters train in");
        assert_eq!(saved_types(&out.join("adapter_model.safetensors")), trl_saved, "{case}: the types of the saved adapter");
    }
}

/// A QLoRA run with `bf16: true` (its adapters in bf16, and with them their gradients and AdamW
/// moments) whose loss falls, and a run resumed from its step-3 checkpoint logs the same losses
/// and saves the same adapter file, bit for bit.
#[test]
fn tch_qlora_adapters_in_bf16_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = examples(16);
    let full_dir = tmp.path().join("full");
    let (_, full) = train(qlora_model(), &sft(), &data, &[], &config(&full_dir, None, lora(), 6), &Default::default()).unwrap();
    let full_losses = losses(&full.history);
    println!("QLoRA, bf16 adapters, losses: {full_losses:?}");
    assert_eq!(full_losses.len(), 6);
    assert!(full_losses[5].1 < full_losses[0].1 - 0.05, "the loss falls: {full_losses:?}");

    let resumed_dir = tmp.path().join("resumed");
    let checkpoint = resumed_dir.join("checkpoint-3");
    std::fs::create_dir_all(&checkpoint).unwrap();
    for entry in std::fs::read_dir(full_dir.join("checkpoint-3")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), checkpoint.join(entry.file_name())).unwrap();
    }
    let (_, resumed) =
        train(qlora_model(), &sft(), &data, &[], &config(&resumed_dir, Some(&checkpoint), lora(), 6), &Default::default()).unwrap();
    let resumed_losses: Vec<(u64, f64)> = losses(&resumed.history).into_iter().filter(|(s, _)| *s > 3).collect();
    assert_eq!(resumed_losses, full_losses[3..].to_vec(), "bit-identical losses after resuming");
    let final_full = std::fs::read(full_dir.join("adapter_model.safetensors")).unwrap();
    let final_resumed = std::fs::read(resumed_dir.join("adapter_model.safetensors")).unwrap();
    assert!(final_full == final_resumed, "the same final adapter file");
}
