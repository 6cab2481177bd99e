//! QLoRA: a base model whose decoder linear weights stay NF4 computes exactly what the dense
//! model with those dequantized weights computes — logits and adapter gradients. The 4-bit
//! weights live on the device as tensors and are dequantized there, bit for bit as on the host.

use crate::common;

use alignment_core::backend::{Cpu, CpuAutodiff};
use alignment_models::{load_pretrained, CausalLm};
use alignment_peft::lora::{linear_layers, linear_layers_mut};
use alignment_peft::nf4::{self, FourBit};
use alignment_peft::qlora::{base_weight_bytes, load_pretrained_4bit, QuantConfig};
use alignment_peft::{load_adapter, merge_lora};
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use common::*;

fn values<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// The dense model whose decoder linear weights are the NF4 round trip of the originals.
fn dequantized_dense<B: Backend>(name: &str) -> CausalLm<B> {
    dequantized_dense_with::<B>(name, false)
}

fn dequantized_dense_with<B: Backend>(name: &str, double_quant: bool) -> CausalLm<B> {
    let mut model = load_pretrained::<B>(&base_fixture(name), &Default::default()).unwrap();
    for (path, lin) in linear_layers_mut(&mut model) {
        if path == "lm_head" {
            continue;
        }
        let dims = lin.dims();
        let roundtrip = nf4::dequantize(&nf4::quantize_with(&values(lin.weight.val()), double_quant));
        lin.weight = Param::from_tensor(Tensor::from_data(TensorData::new(roundtrip, dims), &lin.weight.device()));
    }
    model
}

#[test]
fn four_bit_base_computes_what_its_dequantized_dense_model_computes() {
    let quantized = load_pretrained_4bit::<Cpu>(&base_fixture("tiny-llama"), &Default::default(), QuantConfig::default()).unwrap();
    for (path, lin) in linear_layers(&quantized) {
        let expect_quantized = path != "lm_head";
        assert_eq!(lin.quantized.is_some(), expect_quantized, "{path}");
        if expect_quantized {
            assert_eq!(lin.weight.dims(), [0, 0], "{path}: no dense copy is kept");
        }
    }
    let dense = dequantized_dense::<Cpu>("tiny-llama");
    let r = reference("tiny-llama-lora");
    let batch = reference_batch(&r);
    let diff = max_diff(&logits(&quantized, &batch), &logits(&dense, &batch), &r.attention_mask);
    assert!(diff <= 1e-5, "logits differ by {diff}");

    // 4 bits per value + one f32 absmax per 64 values: 4.5 bits, 0.28× of bf16.
    let linear_params: usize =
        linear_layers(&quantized).iter().filter(|(p, _)| p != "lm_head").map(|(_, l)| l.dims().iter().product::<usize>()).sum();
    let linear_bytes: usize = linear_layers(&quantized).iter().filter_map(|(_, l)| l.quantized.as_ref()).map(|q| q.storage_bytes()).sum();
    let ratio = linear_bytes as f64 / (2 * linear_params) as f64;
    assert!((0.28..=0.29).contains(&ratio), "NF4 bytes / bf16 bytes = {ratio}");
    assert!(base_weight_bytes(&quantized) < base_weight_bytes(&dense));
}

fn linear_bytes_per_bf16_byte<B: Backend>(model: &CausalLm<B>) -> f64 {
    let layers: Vec<_> = linear_layers(model).into_iter().filter(|(p, _)| p != "lm_head").collect();
    let params: usize = layers.iter().map(|(_, l)| l.dims().iter().product::<usize>()).sum();
    let bytes: usize = layers.iter().map(|(_, l)| l.quantized.as_ref().unwrap().storage_bytes()).sum();
    bytes as f64 / (2 * params) as f64
}

#[test]
fn double_quantization_shrinks_the_statistics_and_stays_exact_to_its_dequantization() {
    let load = |double_quant| {
        load_pretrained_4bit::<Cpu>(&base_fixture("tiny-llama"), &Default::default(), QuantConfig::nf4(double_quant)).unwrap()
    };
    let (single, double) = (load(false), load(true));
    let (rs, rd) = (linear_bytes_per_bf16_byte(&single), linear_bytes_per_bf16_byte(&double));
    println!("NF4 bytes per bf16 byte: single {rs:.4}, double {rd:.4}");
    assert!(rd < rs && rd < 0.27, "single {rs}, double {rd}");
    let r = reference("tiny-llama-lora");
    let batch = reference_batch(&r);
    let dense = dequantized_dense_with::<Cpu>("tiny-llama", true);
    let diff = max_diff(&logits(&double, &batch), &logits(&dense, &batch), &r.attention_mask);
    assert!(diff <= 1e-5, "logits differ by {diff}");
}

#[test]
fn adapter_gradients_through_a_four_bit_base_match_the_dense_graph() {
    let adapter = peft_fixture("tiny-llama-rslora-all-linear");
    let quantized = load_pretrained_4bit::<CpuAutodiff>(&base_fixture("tiny-llama"), &Default::default(), QuantConfig::default()).unwrap();
    let (quantized, _) = load_adapter(quantized, &adapter).unwrap();
    let (dense, _) = load_adapter(dequantized_dense::<CpuAutodiff>("tiny-llama"), &adapter).unwrap();
    let r = reference("tiny-llama-rslora-all-linear");
    let batch = reference_batch(&r);
    let grads_of = |model: &CausalLm<CpuAutodiff>| {
        let loss = model.forward(&batch, None).powf_scalar(2.0).mean();
        GradientsParams::from_grads(loss.backward(), model)
    };
    let (gq, gd) = (grads_of(&quantized), grads_of(&dense));
    let mut compared = 0;
    for ((path, lq), (_, ld)) in linear_layers(&quantized).into_iter().zip(linear_layers(&dense)) {
        let (Some(aq), Some(ad)) = (&lq.lora, &ld.lora) else { continue };
        for (name, pq, pd) in [("A", &aq.a, &ad.a), ("B", &aq.b, &ad.b)] {
            let q = values(gq.get::<Cpu, 2>(pq.id).unwrap_or_else(|| panic!("{path}.{name}: no gradient")));
            let d = values(gd.get::<Cpu, 2>(pd.id).unwrap());
            let scale = d.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            let diff = q.iter().zip(&d).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-4 * scale, "{path}.lora_{name}: gradient differs by {diff} (scale {scale})");
            compared += 1;
        }
        assert!(gq.get::<Cpu, 2>(lq.weight.id).is_none(), "{path}: the frozen base has no gradient");
    }
    assert_eq!(compared, 28, "A and B of 14 adapters");
}

#[test]
fn device_dequantization_gives_the_host_bits() {
    // Sizes that are not multiples of the block (64), of the packing (8 per integer) or of the
    // nested block (256 scales), and an all-zero block (its index 0 and absmax 0).
    for (len, double_quant) in [(64 * 300 + 37, true), (64 * 300 + 37, false), (8 * 5 + 3, true), (64 * 257, true)] {
        let mut values: Vec<f32> = (0..len).map(|i| ((i as f32 * 0.7311).sin() * (1.0 + (i % 97) as f32 * 0.03)).powi(3)).collect();
        if len >= 128 {
            values[64..128].iter_mut().for_each(|v| *v = 0.0);
        }
        let host = nf4::quantize_with(&values, double_quant);
        let expected = nf4::dequantize(&host);
        let weight = alignment_models::QuantizedWeight::<Cpu>::from_parts(&host.clone().into_parts([1, len]), &Default::default());
        let device: Vec<f32> = values_1d(weight.dequantize().reshape([len]));
        assert!(
            device.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
            "len {len}, double quant {double_quant}: the device's dequantization differs from the host's"
        );
        assert_eq!(weight.storage_bytes(), host.storage_bytes(), "len {len}");
    }
}

fn values_1d(t: Tensor<Cpu, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn merging_into_a_four_bit_base_quantizes_the_merged_weight_again() {
    let adapter = peft_fixture("tiny-llama-rslora-all-linear");
    let quantized = load_pretrained_4bit::<Cpu>(&base_fixture("tiny-llama"), &Default::default(), QuantConfig::default()).unwrap();
    let (model, _) = load_adapter(quantized, &adapter).unwrap();
    let expected: Vec<Vec<f32>> = linear_layers(&model)
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref().map(|a| values(l.dense_weight() + a.delta_weight())))
        .map(|merged| nf4::dequantize(&nf4::quantize(&merged)))
        .collect();
    let merged = merge_lora(model);
    let found: Vec<Vec<f32>> = linear_layers(&merged)
        .iter()
        .filter(|(p, _)| p != "lm_head")
        .map(|(_, l)| values(l.quantized.as_ref().expect("still 4-bit").dequantize()))
        .collect();
    assert_eq!(found, expected);
}

#[test]
fn unsupported_quant_types_are_named() {
    let err = QuantConfig::from_recipe("int4", false).unwrap_err().to_string();
    assert!(err.contains("int4") && err.contains("nf4") && err.contains("fp4"), "{err}");
    assert_eq!(QuantConfig::from_recipe("fp4", true).unwrap(), QuantConfig { double_quant: true, code: FourBit::Fp4 });
}

/// `bnb_4bit_quant_type: fp4`: the base held in FP4 gives the logits of the dense model holding
/// FP4's round trip of its weights, and merging an adapter quantizes again in FP4.
#[test]
fn fp4_base_matches_its_round_trip_and_merges_in_fp4() {
    let fp4 = QuantConfig::from_recipe("fp4", true).unwrap();
    let quantized = load_pretrained_4bit::<Cpu>(&base_fixture("tiny-llama"), &Default::default(), fp4).unwrap();
    let mut dense = load_base("tiny-llama");
    for (path, lin) in linear_layers_mut(&mut dense) {
        if path == "lm_head" {
            continue;
        }
        let roundtrip = nf4::dequantize(&nf4::quantize_as(&values(lin.weight.val()), FourBit::Fp4, true));
        lin.weight = Param::from_tensor(Tensor::from_data(TensorData::new(roundtrip, lin.dims()), &Default::default()));
    }
    let r = reference("tiny-llama-lora");
    let batch = reference_batch(&r);
    let diff = max_diff(&logits(&quantized, &batch), &logits(&dense, &batch), &r.attention_mask);
    assert!(diff <= 1e-5, "FP4 base vs its dense round trip: {diff}");
    let nf4_model = load_pretrained_4bit::<Cpu>(&base_fixture("tiny-llama"), &Default::default(), QuantConfig::nf4(true)).unwrap();
    assert!(max_diff(&logits(&quantized, &batch), &logits(&nf4_model, &batch), &r.attention_mask) > 1e-3, "FP4 is not NF4");

    let (model, _) = load_adapter(quantized, &peft_fixture("tiny-llama-lora")).unwrap();
    let merged = merge_lora(model);
    for (path, lin) in linear_layers(&merged) {
        if let Some(q) = &lin.quantized {
            assert_eq!(QuantConfig::of(q), fp4, "{path} merged and quantized again in FP4");
        }
    }
}
