//! The training step on a GPU code path equals the CPU's (`alignment_handbook::step_check`).
//!
//! With `--features wgpu` (scripts/test.sh runs it on Mesa's software Vulkan, lavapipe), every
//! case — SFT, DPO, LoRA, QLoRA, and the lean step with checkpointing and the chunked head —
//! runs on burn's `wgpu` backend, whose CubeCL kernels are the ones `cuda` runs, and on the
//! ndarray backend, in one process; losses, metrics and gradients must agree within 1e-4 (seen:
//! ≤ 5e-6). Each case runs again under mixed precision, its products in f16 (lavapipe has no
//! bf16; the device runs the same path in bf16), within 2e-2 of the f32 values. On the CPU the
//! mixed path runs with f64 products, which must not move anything beyond f32 rounding. With
//! `--features tch` (scripts/test.sh, against the reference venv's torch) every case runs on
//! libtorch's CPU kernels too, in f32 and with bf16 products. On each backend ZeRO-3's first
//! step (`step_check::run_zero3_case`: shards on the device, gathered and reduced inside the
//! passes) must equal the dense model's on the CPU. The other tests check the comparison itself
//! and the reference files the GPU machine reads.

use alignment_handbook::core::backend::CpuAutodiff;
use alignment_handbook::step_check::{self, CaseValues, CASES};
use burn::tensor::FloatDType;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/models/tests/fixtures/tiny-llama")
}

fn values(scalars: &[(&str, f64)], grads: &[(&str, Vec<f32>)]) -> CaseValues {
    CaseValues {
        scalars: scalars.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        grads: grads.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

#[test]
fn compare_measures_relative_differences_and_names_the_worst() {
    let expected = values(&[("step0/loss", 2.0), ("step1/loss", 1.0)], &[("w", vec![3.0, 4.0]), ("v", vec![1.0])]);
    let same = step_check::compare(&expected, &expected);
    assert_eq!((same.max_rel_scalar, same.max_rel_grad), (0.0, 0.0));
    assert!(same.within(0.0));

    // One scalar off by 1e-3 relative; `w` off by ‖(0, 0.05)‖ / ‖(3, 4)‖ = 1e-2.
    let got = values(&[("step0/loss", 2.002), ("step1/loss", 1.0)], &[("w", vec![3.0, 4.05]), ("v", vec![1.0])]);
    let diff = step_check::compare(&got, &expected);
    assert!((diff.max_rel_scalar - 1e-3).abs() < 1e-9, "{diff:?}");
    assert!((diff.max_rel_grad - 1e-2).abs() < 1e-6, "{diff:?}");
    assert_eq!(diff.worst, "w");
    assert!(diff.within(2e-2) && !diff.within(5e-3));
    // A scalar near zero (a mean of logits) is compared relative to SCALAR_FLOOR, not to itself.
    let near_zero = values(&[("logits/chosen", -0.001)], &[]);
    let diff = step_check::compare(&values(&[("logits/chosen", -0.002)], &[]), &near_zero);
    assert!((diff.max_rel_scalar - 0.001 / step_check::SCALAR_FLOOR).abs() < 1e-12, "{diff:?}");
}

#[test]
fn compare_fails_on_missing_values_and_nan() {
    let expected = values(&[("step0/loss", 2.0), ("step0/grad_norm", 1.0)], &[("w", vec![1.0, 2.0]), ("v", vec![1.0])]);
    let got = values(&[("step0/loss", f64::NAN)], &[("w", vec![1.0]), ("v", vec![1.0])]);
    let diff = step_check::compare(&got, &expected);
    assert_eq!(diff.max_rel_scalar, f64::INFINITY);
    assert_eq!(diff.missing, vec!["step0/grad_norm".to_string(), "w".to_string()], "a gradient of another length counts as missing");
    assert!(!diff.within(f64::MAX));
}

#[test]
fn cpu_reference_round_trips_through_its_files() {
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let case = CASES[0];
    let written = step_check::run_case::<CpuAutodiff>(&fixture(), case, None, &device).unwrap();
    assert_eq!(written.scalars.len(), 4 * step_check::STEPS, "loss, entropy, token accuracy and grad norm per step: {written:?}");
    assert!(written.scalars.values().all(|v| v.is_finite()));
    assert!(written.grads.contains_key("layers.0.self_attn.q_proj.weight"), "{:?}", written.grads.keys());
    step_check::write_reference(dir.path(), case.name, &written).unwrap();
    let read = step_check::read_reference(dir.path(), case.name).unwrap();
    assert_eq!(read, written);
    let err = step_check::read_reference(dir.path(), "absent").unwrap_err().to_string();
    assert!(err.contains("absent.json"), "{err}");
}

/// The mixed-precision path (casts around every product, their backward steps, the head weight
/// cast once for the chunked head, gradients back in f32 for AdamW) on the CPU, with f64 standing
/// for the half type: every case's values equal the f32 run's to f32 rounding.
#[test]
fn mixed_precision_path_runs_every_case_on_the_cpu() {
    let device = Default::default();
    for case in CASES {
        let f32_run = step_check::run_case::<CpuAutodiff>(&fixture(), case, None, &device).unwrap();
        let mixed = step_check::run_case::<CpuAutodiff>(&fixture(), case, Some(FloatDType::F64), &device).unwrap();
        let diff = step_check::compare(&mixed, &f32_run);
        println!("{:<9} scalars {:.2e}  gradients {:.2e}  worst {}", case.name, diff.max_rel_scalar, diff.max_rel_grad, diff.worst);
        assert!(diff.max_rel_scalar > 0.0 || diff.max_rel_grad > 0.0, "{}: f64 products changed nothing: not run in f64?", case.name);
        assert!(diff.within(1e-5), "{}: {diff:?}", case.name);
    }
}

/// Runs every case on backend `AD` (on `device`, in f32 and with products in `half`) and on the
/// ndarray backend, prints each comparison, and returns the cases outside their tolerance.
#[cfg(any(feature = "wgpu", feature = "tch"))]
fn differences_from_the_cpu<AD: burn::tensor::backend::AutodiffBackend>(device: &AD::Device, half: FloatDType) -> Vec<String> {
    let cpu_device = Default::default();
    let half_name = format!("{half:?}").to_lowercase();
    let mut failures = Vec::new();
    for case in CASES {
        let cpu = step_check::run_case::<CpuAutodiff>(&fixture(), case, None, &cpu_device).unwrap();
        for matmul_dtype in [None, Some(half)] {
            let other = step_check::run_case::<AD>(&fixture(), case, matmul_dtype, device).unwrap();
            let diff = step_check::compare(&other, &cpu);
            let tolerance = step_check::tolerance(matmul_dtype);
            let name = format!("{}{}", case.name, if matmul_dtype.is_some() { format!(" ({half_name})") } else { String::new() });
            println!("{name:<15} scalars {:.2e}  gradients {:.2e}  worst {}", diff.max_rel_scalar, diff.max_rel_grad, diff.worst);
            assert_eq!(other.grads.len(), cpu.grads.len(), "{name}: the same parameters have gradients");
            if !diff.within(tolerance) {
                failures.push(format!("{name} (tolerance {tolerance:e}): {diff:?}"));
            }
        }
    }
    failures
}

/// ZeRO-3's first step on `AD` (shards on its device, gathered and reduced inside the passes)
/// against the dense model's on the CPU: the cases of `step_check::ZERO3_CASES` that differ
/// beyond `tolerance`.
fn zero3_differences_from_the_cpu<AD: burn::tensor::backend::AutodiffBackend>(device: &AD::Device, tolerance: f64) -> Vec<String> {
    let cpu_device = Default::default();
    let mut failures = Vec::new();
    for case in step_check::ZERO3_CASES {
        let dense = step_check::first_step(&step_check::run_case::<CpuAutodiff>(&fixture(), case, None, &cpu_device).unwrap());
        let zero3 = step_check::run_zero3_case::<AD>(&fixture(), case, device).unwrap();
        let diff = step_check::compare(&zero3, &dense);
        let name = format!("{} (ZeRO-3)", case.name);
        println!("{name:<15} scalars {:.2e}  gradients {:.2e}  worst {}", diff.max_rel_scalar, diff.max_rel_grad, diff.worst);
        assert_eq!(zero3.grads.len(), dense.grads.len(), "{name}: the same parameters have gradients");
        if !diff.within(tolerance) {
            failures.push(format!("{name} (tolerance {tolerance:e}): {diff:?}"));
        }
    }
    failures
}

/// ZeRO-3 on the CPU backend: the partitioned model's first step (its shards' gradients from the
/// recorded backward steps) equals the dense model's.
#[test]
fn zero3_steps_equal_the_dense_steps() {
    let failures = zero3_differences_from_the_cpu::<CpuAutodiff>(&Default::default(), 1e-6);
    assert!(failures.is_empty(), "ZeRO-3 differs from the dense step:\n{}", failures.join("\n"));
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_training_steps_equal_the_cpu() {
    use alignment_handbook::core::backend::WgpuAutodiff;
    let gpu_device = burn::backend::wgpu::WgpuDevice::default();
    let half = alignment_handbook::core::precision::half_type::<alignment_handbook::core::backend::Wgpu>(&gpu_device);
    assert_eq!(half, Some(FloatDType::F16), "lavapipe has f16 arithmetic (and no bf16)");
    let mut failures = differences_from_the_cpu::<WgpuAutodiff>(&gpu_device, FloatDType::F16);
    // ZeRO-3's shards on the device, with the recorded backward steps of `Autodiff<Wgpu>`.
    failures.extend(zero3_differences_from_the_cpu::<WgpuAutodiff>(&gpu_device, step_check::F32_TOLERANCE));
    assert!(failures.is_empty(), "wgpu differs from the CPU:\n{}", failures.join("\n"));
}

/// burn's operations one at a time (`op_check`) on `AD` against the CPU backend, in f32 and
/// with inputs in `half`: prints each comparison and returns those outside their tolerance.
#[cfg(any(feature = "wgpu", feature = "tch"))]
fn operations_differing_from_the_cpu<AD: burn::tensor::backend::AutodiffBackend>(device: &AD::Device, half: FloatDType) -> Vec<String> {
    use alignment_handbook::op_check::{compare_ops, passes, run_ops};
    let reference = run_ops::<CpuAutodiff>(&Default::default(), None);
    let mut failures = Vec::new();
    for (inputs, tolerance) in passes(Some(half)) {
        for diff in compare_ops(&run_ops::<AD>(device, inputs), &reference, tolerance) {
            println!("{:<66} {inputs:?} {:.2e} (tolerance {:.0e}) {:?}", diff.name, diff.relative, diff.tolerance, diff.error);
            if !diff.pass() {
                failures.push(format!("{} ({inputs:?}): {diff:?}", diff.name));
            }
        }
    }
    failures
}

/// Every operation of the op-by-op check runs on the CPU backend and gives finite values that
/// are not all zero (a check of the reference the GPU backends are compared with).
#[test]
fn every_operation_of_the_op_check_runs_on_the_cpu() {
    let runs = alignment_handbook::op_check::run_ops::<CpuAutodiff>(&Default::default(), None);
    assert!(runs.len() >= 40, "{} operations", runs.len());
    for run in &runs {
        let values = run.outcome.as_ref().unwrap_or_else(|e| panic!("{}: {e}", run.name));
        assert!(!values.is_empty() && values.iter().all(|v| v.is_finite()), "{}: {values:?}", run.name);
        assert!(values.iter().any(|&v| v != 0.0), "{}: all zero", run.name);
    }
    // The same inputs on every backend: a second run gives the same values.
    let again = alignment_handbook::op_check::run_ops::<CpuAutodiff>(&Default::default(), None);
    let diffs = alignment_handbook::op_check::compare_ops(&again, &runs, 0.0);
    assert!(diffs.iter().all(|d| d.pass()), "{diffs:?}");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_operations_equal_the_cpu() {
    let failures = operations_differing_from_the_cpu::<alignment_handbook::core::backend::WgpuAutodiff>(
        &burn::backend::wgpu::WgpuDevice::default(),
        FloatDType::F16,
    );
    assert!(failures.is_empty(), "wgpu's operations differ from the CPU's:\n{}", failures.join("\n"));
}

#[cfg(feature = "tch")]
#[test]
fn tch_operations_equal_the_cpu() {
    let failures = operations_differing_from_the_cpu::<alignment_handbook::core::backend::TorchAutodiff>(
        &burn::backend::libtorch::LibTorchDevice::Cpu,
        FloatDType::BF16,
    );
    assert!(failures.is_empty(), "libtorch's operations differ from the CPU's:\n{}", failures.join("\n"));
}

/// QLoRA's 4-bit base on a fused CubeCL backend: the dequantization kernel
/// (`models::nf4_kernel`), on the backend and on its autodiff, gives the bits of the tensor
/// operations every backend runs, in f32 and rounded to f16 (what a mixed-precision product
/// reads), for every 4-bit and 8-bit index pattern, double-quantized scales or not, partial last
/// words and blocks; and in f32 the CPU's values (its tensor operations and its threaded pass).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_nf4_kernel_gives_the_tensor_operations_bits() {
    use alignment_handbook::core::backend::{Cpu, Wgpu, WgpuAutodiff};
    use alignment_handbook::models::{QuantizedParts, QuantizedWeight, ScaleParts};
    use burn::tensor::backend::Backend;
    fn parts(dims: [usize; 2], nested: bool) -> QuantizedParts {
        let (len, block_size) = (dims[0] * dims[1], 64);
        let blocks = len.div_ceil(block_size);
        let packed_bytes = (0..len.div_ceil(2)).map(|i| (i * 37 + 11) as u8).collect();
        let code_book = (0..16).map(|i| (i as f32 - 7.5) / 7.3).collect();
        let scales = if nested {
            let indices = (0..blocks).map(|j| (j * 97 + 200) as u8).collect();
            let code_book = (0..256).map(|i| i as f32 / 301.0).collect();
            let scales = (0..blocks.div_ceil(256)).map(|j| 1.0 + j as f32 * 0.37).collect();
            ScaleParts::Nested { indices, code_book, scales, offset: 0.0123, block_size: 256 }
        } else {
            ScaleParts::Plain((0..blocks).map(|j| 0.5 + j as f32 / 7.0).collect())
        };
        QuantizedParts { dims, packed_bytes, code_book, block_size, scales }
    }
    fn bits<B: Backend>(t: burn::tensor::Tensor<B, 2>) -> Vec<u32> {
        let data = t.into_data();
        match data.dtype {
            burn::tensor::DType::F16 => data.into_vec::<burn::tensor::f16>().unwrap().iter().map(|v| v.to_bits() as u32).collect(),
            _ => data.into_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect(),
        }
    }
    fn check<B: Backend>(parts: &QuantizedParts, device: &B::Device, host: &[u32]) {
        let weight = QuantizedWeight::<B>::from_parts(parts, device);
        for dtype in [FloatDType::F32, FloatDType::F16] {
            let by_kernel = weight.dequantize_by_kernel(dtype).expect("wgpu is a fused CubeCL backend");
            assert_eq!(by_kernel.dims(), parts.dims);
            let by_ops = alignment_handbook::core::precision::cast_to(weight.dequantize_by_tensor_ops(), dtype);
            let (kernel, ops) = (bits(by_kernel), bits(by_ops));
            let differing = kernel.iter().zip(&ops).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{:?}, {dtype:?}: values differing from the tensor operations'", parts.dims);
            if dtype == FloatDType::F32 {
                assert_eq!(kernel, host, "{:?}: the kernel's values differ from the CPU's", parts.dims);
            }
        }
    }
    let device = burn::backend::wgpu::WgpuDevice::default();
    let cpu = Default::default();
    // 1536 × 4100: every byte pattern many times, at every position in a word and a block.
    for (dims, nested) in [([1, 64 * 7 + 37], true), ([3, 5], false), ([1536, 4100], true), ([1536, 4100], false)] {
        let parts = parts(dims, nested);
        // The CPU's tensor operations, and its threaded pass (`models::cpu_nf4`) giving their bits.
        let on_cpu = QuantizedWeight::<Cpu>::from_parts(&parts, &cpu);
        let host = bits(on_cpu.dequantize_by_tensor_ops());
        let cpu_pass = on_cpu.dequantize_by_kernel(FloatDType::F32).expect("the CPU backend has a threaded pass");
        assert_eq!(bits(cpu_pass), host, "{dims:?}: the CPU pass differs from the CPU's tensor operations");
        check::<Wgpu>(&parts, &device, &host);
        check::<WgpuAutodiff>(&parts, &device, &host);
    }
}

/// Blocked attention's softmax on a fused CubeCL backend: the two kernels
/// (`models::softmax_kernel`) give the tensor operations' probabilities and ∂S, for a block of
/// queries after others and cached keys that reads fewer keys than the mask holds, grouped
/// heads, padding rows that see no key, a mask broadcast over the batch (a stride of zero), rows
/// shorter than a cube and rows of more keys than its threads; with the products in f32 and
/// in f16.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_softmax_kernels_give_the_tensor_operations_values() {
    use alignment_handbook::core::backend::Wgpu;
    use alignment_handbook::models::block_softmax::BlockSoftmax;
    use burn::tensor::{Bool, Distribution, ElementConversion, Tensor, TensorData};
    let device = burn::backend::wgpu::WgpuDevice::default();
    let relative = |got: Tensor<Wgpu, 4>, want: Tensor<Wgpu, 4>| {
        let (got, want) = (got.cast(FloatDType::F32), want.cast(FloatDType::F32));
        let scale = want.clone().abs().max().into_scalar().elem::<f32>().max(1e-30);
        (got - want).abs().max().into_scalar().elem::<f32>() / scale
    };
    // (batch, kv heads, group, cached keys, queries, block start, block length, broadcast mask)
    for (batch, kv_heads, group, past, queries, start, len, broadcast) in
        [(2, 2, 2, 2, 7, 3, 3, false), (2, 1, 3, 300, 40, 16, 8, true), (1, 2, 1, 0, 5, 0, 5, false)]
    {
        let keys = past + queries;
        let read = past + start + len;
        // Causal, and in batch element 1 (when not broadcast) the last two positions padding:
        // their rows see no key at all.
        let mask_batch = if broadcast { 1 } else { batch };
        let masked: Vec<bool> = (0..mask_batch)
            .flat_map(|b| (past..keys).flat_map(move |i| (0..keys).map(move |j| j > i || (b == 1 && (i + 2 >= keys || j + 2 >= keys)))))
            .collect();
        let masked = Tensor::<Wgpu, 4, Bool>::from_data(TensorData::new(masked, [mask_batch, 1, queries, keys]), &device);
        let masked = if broadcast { masked.expand([batch, 1, queries, keys]) } else { masked };
        let heads = kv_heads * group;
        let softmax = BlockSoftmax { heads, start, scale: 0.35, float: FloatDType::F32 };
        for (dtype, tolerance) in [(FloatDType::F32, 1e-5), (FloatDType::F16, 2e-3)] {
            let random =
                || Tensor::<Wgpu, 4>::random([batch, kv_heads, group * len, read], Distribution::Normal(0.0, 3.0), &device).cast(dtype);
            let (scores, dp) = (random(), random());
            let case = format!("batch {batch}, {kv_heads} kv heads of {group}, keys {read} of {keys}, block {start}+{len}, {dtype:?}");
            let p = softmax.probabilities_by_kernel(&scores, &masked).expect("wgpu is a fused CubeCL backend");
            let (p_of_gradients, ds) = softmax.gradients_by_kernel(&scores, &dp, &masked).expect("wgpu is a fused CubeCL backend");
            let expected_p = softmax.probabilities_by_tensor_ops(scores.clone(), &masked);
            let (_, expected_ds) = softmax.gradients_by_tensor_ops(scores.clone(), dp.clone(), &masked);
            for (name, got, want) in
                [("P", p, expected_p.clone()), ("P of the backward", p_of_gradients, expected_p), ("∂S", ds, expected_ds)]
            {
                assert_eq!((got.dims(), got.dtype()), (want.dims(), want.dtype()), "{case}: {name}'s shape and type");
                let difference = relative(got, want);
                assert!(difference <= tolerance, "{case}: {name} differs from the tensor operations' by {difference:e} (relative)");
            }
        }
    }
}

/// The loss's passes over the logits on a fused CubeCL backend (`objectives::logits_kernel`:
/// the log-probabilities, the statistics and the logits' gradient, each one kernel) give the
/// CPU's values: the summed log-probabilities, mean logits, entropy, top-1 count and `log Σ p²`
/// of one label set, and the logits' gradient of a weighted sum, with ignored labels, rows of
/// fewer logits than a cube's threads and of more, labels that are the most likely token (so
/// the top-1 count tests the argmax), logits in f32 and in f16.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_logits_kernels_give_the_cpus_log_probabilities_statistics_and_gradient() {
    use alignment_handbook::core::backend::{CpuAutodiff, Wgpu, WgpuAutodiff};
    use alignment_handbook::objectives::logprobs::logits_route;
    use alignment_handbook::objectives::{sequence_logps_with, ExtraStats, IGNORE_INDEX};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};
    assert_eq!(logits_route::<Wgpu>(), "kernel", "wgpu takes the kernels");
    let wgpu = burn::backend::wgpu::WgpuDevice::default();
    let extra = ExtraStats { log_sum_sq_probs: true };
    /// Per label set `[sum, num_tokens, mean_logits, entropy_sum, num_correct, log_sum_sq_probs]`,
    /// then the logits' gradient of `Σ_set Σ_row weight · sum`, as f32 values.
    fn scored<B: AutodiffBackend>(
        logits: Tensor<B, 3>,
        label_sets: Vec<Tensor<B, 2, Int>>,
        weights: Tensor<B, 1>,
        extra: ExtraStats,
    ) -> Vec<Vec<f32>> {
        let logits = logits.require_grad();
        let sets = sequence_logps_with(logits.clone(), label_sets, extra);
        let objective =
            sets.iter().enumerate().map(|(k, s)| (s.sum.clone() * weights.clone()).sum() * (1.0 + k as f64)).reduce(|a, b| a + b);
        let grads = objective.expect("a label set").backward();
        let dz = logits.grad(&grads).expect("the logits are tracked");
        let values = |t: Tensor<B::InnerBackend, 1>| t.cast(FloatDType::F32).into_data().to_vec::<f32>().expect("f32 values");
        sets.into_iter()
            .flat_map(|scored| {
                let sum_sq = scored.log_sum_sq_probs.clone().expect("asked for");
                [scored.sum, scored.num_tokens, scored.mean_logits, scored.entropy_sum, scored.num_correct, sum_sq]
            })
            .map(|t| values(t.inner()))
            .chain([values(dz.cast(FloatDType::F32).flatten(0, 2))])
            .collect()
    }
    const NAMES: [&str; 6] = ["sum of log p", "scored tokens", "mean logits", "entropy", "top-1 count", "log Σ p²"];
    // One label set (SFT's, DPO's), and two that share some tokens (ORPO's: the completion, and
    // the prompt with the completion), whose gradients add where they meet.
    // A vocabulary of one logit gives a cube of one thread, fewer than the two sets.
    for (batch, seq, vocab, sets) in [(2, 5, 300, 1), (1, 4, 13, 1), (2, 5, 300, 2), (2, 6, 13, 2), (1, 4, 1, 2)] {
        for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 3e-3)] {
            // The logits as the half type holds them, so that both backends read the same values.
            let logits = Tensor::<Wgpu, 3>::random([batch, seq, vocab], Distribution::Normal(0.0, 3.0), &wgpu).cast(dtype);
            let values: Vec<f32> = logits.clone().cast(FloatDType::F32).into_data().to_vec().expect("f32 values");
            // Labels in the ids' layout (label t + 1 is scored at position t): every other one
            // the most likely token at its position, position 1 ignored.
            let labels: Vec<i64> = (0..batch * seq)
                .map(|i| {
                    let (row, t) = (i / seq, i % seq);
                    let at = |t: usize| &values[(row * seq + t) * vocab..(row * seq + t + 1) * vocab];
                    match t {
                        1 => IGNORE_INDEX,
                        0 => 0,
                        _ if t % 2 == 0 => {
                            at(t - 1).iter().enumerate().fold(0, |best, (j, &z)| if z > at(t - 1)[best] { j } else { best }) as i64
                        }
                        _ => ((7 * i + 3) % vocab) as i64,
                    }
                })
                .collect();
            // The second set scores position 1 too, and every third label differs.
            let second: Vec<i64> = labels
                .iter()
                .enumerate()
                .map(|(i, &label)| match i % seq {
                    1 => (5 * i % vocab) as i64,
                    t if t % 3 == 2 => ((11 * i + 5) % vocab) as i64,
                    _ => label,
                })
                .collect();
            let label_sets = [labels, second];
            let weights: Vec<f32> = (0..batch).map(|b| 0.5 + b as f32).collect();
            let got = scored(
                Tensor::<WgpuAutodiff, 3>::from_inner(logits.clone()),
                label_sets[..sets]
                    .iter()
                    .map(|l| Tensor::<WgpuAutodiff, 2, Int>::from_data(TensorData::new(l.clone(), [batch, seq]), &wgpu))
                    .collect(),
                Tensor::<WgpuAutodiff, 1>::from_data(TensorData::new(weights.clone(), [batch]), &wgpu),
                extra,
            );
            let cpu = Default::default();
            let want = scored(
                Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(values.clone(), [batch, seq, vocab]), &cpu),
                label_sets[..sets]
                    .iter()
                    .map(|l| Tensor::<CpuAutodiff, 2, Int>::from_data(TensorData::new(l.clone(), [batch, seq]), &cpu))
                    .collect(),
                Tensor::<CpuAutodiff, 1>::from_data(TensorData::new(weights.clone(), [batch]), &cpu),
                extra,
            );
            let case = format!("[{batch}, {seq}, {vocab}] logits in {dtype:?}, {sets} label set(s)");
            assert!(want[4].iter().sum::<f32>() >= batch as f32, "{case}: labels that are the top-1 token are counted");
            let names = (0..sets).flat_map(|k| NAMES.map(|name| format!("set {k}: {name}"))).chain(["∂z".to_string()]);
            assert_eq!(got.len(), 6 * sets + 1, "{case}: every value compared");
            for ((name, got), want) in names.zip(&got).zip(&want) {
                assert_eq!(got.len(), want.len(), "{case}: {name}");
                let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let (worst, difference) =
                    got.iter()
                        .zip(want)
                        .map(|(g, w)| (g - w).abs() / scale)
                        .enumerate()
                        .fold((0, 0f32), |m, d| if d.1 > m.1 { d } else { m });
                assert!(
                    difference <= tolerance,
                    "{case}: {name} differs from the CPU's by {difference:e} (relative) at {worst}: {} vs {}",
                    got[worst],
                    want[worst]
                );
            }
        }
    }
}

/// AdamW on a fused CubeCL backend (`trainer::adamw_kernel`: one kernel per parameter, in
/// place): three steps with weight decay (a norm weight exempt from it) and global-norm
/// clipping, once clipping and once not, give the CPU's parameters and moments (whose update is
/// the tensor operations' bit for bit); a parameter value the caller still holds keeps its
/// values.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_adamw_kernel_gives_the_cpus_update() {
    use alignment_handbook::core::backend::{CpuAutodiff, WgpuAutodiff};
    use alignment_handbook::trainer::optimizer::{update_by_kernel, AdamW, AdamWConfig};
    use burn::module::{Module, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::backend::{AutodiffBackend, Backend};
    use burn::tensor::{ElementConversion, Tensor, TensorData};

    #[derive(Module, Debug)]
    struct Tiny<B: Backend> {
        proj: Param<Tensor<B, 2>>,
        input_layernorm: Param<Tensor<B, 1>>,
    }
    let values =
        |n: usize, seed: usize| (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.3).collect::<Vec<f32>>();
    /// The parameters and moments after three steps, the first value of `proj` as held from
    /// before them, and the first step's clipping factor.
    fn run<B: AutodiffBackend>(
        config: AdamWConfig,
        values: &dyn Fn(usize, usize) -> Vec<f32>,
        device: &B::Device,
    ) -> (Vec<Vec<f32>>, f32, f64) {
        let tensor2 = |seed| Tensor::<B, 2>::from_data(TensorData::new(values(48 * 33, seed), [48, 33]), device);
        let tensor1 = |seed| Tensor::<B, 1>::from_data(TensorData::new(values(33, seed), [33]), device);
        let mut model = Tiny { proj: Param::from_tensor(tensor2(1)), input_layernorm: Param::from_tensor(tensor1(2)) };
        let held = model.proj.val().inner();
        let mut optimizer = AdamW::<B::InnerBackend>::new(config);
        let mut first_clip = None;
        for step in 0..3 {
            let x = Tensor::<B, 2>::from_data(TensorData::new(values(5 * 48, 10 + step), [5, 48]), device);
            let y = x.matmul(model.proj.val()) * model.input_layernorm.val().unsqueeze_dim::<2>(0);
            let loss = (y.clone() * y).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let (updated, report) = optimizer.step::<B, _>(1e-2, model, grads);
            model = updated;
            first_clip.get_or_insert(report.read().clip_coef);
        }
        let flat = |t: Tensor<B::InnerBackend, 1>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let mut out = vec![flat(model.proj.val().inner().reshape([48 * 33])), flat(model.input_layernorm.val().inner())];
        let mut paths: Vec<_> = optimizer.state.keys().cloned().collect();
        paths.sort();
        for path in paths {
            let m = &optimizer.state[&path];
            out.push(flat(m.exp_avg.clone()));
            out.push(flat(m.exp_avg_sq.clone()));
        }
        let first_clip = first_clip.expect("three steps");
        (out, held.reshape([48 * 33]).narrow(0, 0, 1).into_scalar().elem::<f32>(), first_clip)
    }
    assert!(update_by_kernel::<alignment_handbook::core::backend::Wgpu>(), "wgpu takes the kernel");
    assert!(!update_by_kernel::<alignment_handbook::core::backend::Cpu>());
    let device = burn::backend::wgpu::WgpuDevice::default();
    // The first gradient's norm is ≈ 0.35: 0.05 clips it.
    for max_grad_norm in [Some(0.05), None] {
        let config = AdamWConfig { weight_decay: 0.1, max_grad_norm, ..AdamWConfig::default() };
        let (gpu, gpu_held, gpu_clip) = run::<WgpuAutodiff>(config, &values, &device);
        let (cpu, cpu_held, _) = run::<CpuAutodiff>(config, &values, &Default::default());
        assert_eq!(gpu_clip < 0.5, max_grad_norm.is_some(), "clipping {max_grad_norm:?}: factor {gpu_clip}");
        assert_eq!(gpu.len(), 6, "two parameters and their moments");
        assert_eq!((gpu_held, cpu_held), (values(1, 1)[0], values(1, 1)[0]), "a held parameter keeps its value");
        for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let scale = c.iter().fold(0f32, |a, v| a.max(v.abs()));
            let difference = g.iter().zip(c).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale;
            assert!(difference <= 1e-5, "clipping {max_grad_norm:?}: tensor {i} differs from the CPU's by {difference:e} (relative)");
        }
    }
}

/// The seam burn-cuda's cuBLAS products go through (`core::fused_product`), on lavapipe with a
/// kernel of cuBLAS's column-major semantics in place of cuBLAS: for each layout a training step
/// hands a product (burn's own views: transposed weights, transposed gradients, attention's
/// heads, narrowed rows and columns), the plan made from the view's strides gives the product,
/// reading in place where one call can, copying where it cannot, and leaving broadcast batches
/// to burn; in f32 and f16. The reference is the CPU backend's matmul in f32 of the same
/// operands' values: burn 0.21's own f16 matmul on wgpu gave a wrong product here for one of
/// these shapes (0.6 relative, after the f32 cases had run), which this kernel did not, and CubeCL's
/// matmul kernels take seconds each to compile on lavapipe. Then the route every
/// product of a step takes on `wgpu` (`core::gemm`) is this one.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_products_by_plan_equal_the_cpus_matmul() {
    use alignment_handbook::core::backend::{Cpu, Wgpu};
    use alignment_handbook::core::fused_product::{matmul_by_plan_on_wgpu, Operands};
    use burn::tensor::{Distribution, ElementConversion, Tensor};
    let device = burn::backend::wgpu::WgpuDevice::default();
    assert!(alignment_handbook::core::gemm::has_own_gemm::<Wgpu>(), "the step's products on wgpu take the kernel");
    assert_eq!(alignment_handbook::core::gemm::products_route::<Wgpu>(), "column-major kernel");
    fn compare<const D: usize>(name: &str, lhs: Tensor<Wgpu, D>, rhs: Tensor<Wgpu, D>, expected: Operands, tolerance: f32) {
        let on_cpu = |t: &Tensor<Wgpu, D>| Tensor::<Cpu, D>::from_data(t.clone().cast(FloatDType::F32).into_data(), &Default::default());
        let reference = on_cpu(&lhs).matmul(on_cpu(&rhs));
        let (product, operands) = matmul_by_plan_on_wgpu(lhs.clone(), rhs.clone());
        assert_eq!(product.dtype(), lhs.dtype(), "{name}: the product's type");
        assert_eq!(operands, expected, "{name}: how the operands were read");
        assert_eq!(product.dims(), reference.dims(), "{name}: the product's shape");
        let product = on_cpu(&product);
        let scale = reference.clone().abs().max().into_scalar().elem::<f32>();
        let difference = (product - reference).abs().max().into_scalar().elem::<f32>() / scale;
        assert!(difference <= tolerance, "{name}: differs from the CPU's matmul by {difference:e} (relative)");
    }
    // f16: the products are rounded to f16 (2⁻¹¹ relative), the sums are f32 in both.
    for (dtype, tolerance) in [(FloatDType::F32, 1e-5), (FloatDType::F16, 1e-3)] {
        let random2 = |dims: [usize; 2]| Tensor::<Wgpu, 2>::random(dims, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
        let random4 = |dims: [usize; 4]| Tensor::<Wgpu, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
        compare("x Wᵀ", random2([37, 24]), random2([40, 24]).transpose(), Operands::InPlace, tolerance);
        compare("∂y W", random2([37, 40]), random2([40, 24]), Operands::InPlace, tolerance);
        compare("∂yᵀ x", random2([37, 40]).transpose(), random2([37, 24]), Operands::InPlace, tolerance);
        compare("columns of a wider tensor", random2([20, 16]).narrow(1, 3, 9), random2([9, 5]), Operands::InPlace, tolerance);
        compare("q kᵀ", random4([2, 3, 17, 8]), random4([2, 3, 17, 8]).swap_dims(2, 3), Operands::InPlace, tolerance);
        compare("a block of query rows", random4([2, 3, 30, 8]).narrow(2, 5, 11), random4([2, 3, 8, 6]), Operands::InPlace, tolerance);
        compare("heads swapped with positions", random4([2, 17, 3, 8]).swap_dims(1, 2), random4([2, 3, 8, 5]), Operands::Copied, tolerance);
        compare("a broadcast batch", random4([1, 3, 5, 4]), random4([2, 3, 4, 6]), Operands::BackendMatmul, tolerance);
    }
}

/// The libtorch route (`--features tch`, scripts/test.sh builds it against the reference venv's
/// torch): every case on torch's CPU kernels — burn-tch's operations, the fused attention of
/// `models::tch_attention` and its autograd island — equals the ndarray backend's, and again with
/// its products in bf16 (torch's CPU has bf16 arithmetic; what `bf16: true` runs there and on a GPU).
#[cfg(feature = "tch")]
#[test]
fn tch_training_steps_equal_the_cpu() {
    use alignment_handbook::core::backend::{Torch, TorchAutodiff};
    let torch_device = burn::backend::libtorch::LibTorchDevice::Cpu;
    let half = alignment_handbook::core::precision::half_type::<Torch>(&torch_device);
    assert_eq!(half, Some(FloatDType::BF16), "torch's CPU kernels have bf16 arithmetic");
    let mut failures = differences_from_the_cpu::<TorchAutodiff>(&torch_device, FloatDType::BF16);
    failures.extend(zero3_differences_from_the_cpu::<TorchAutodiff>(&torch_device, step_check::F32_TOLERANCE));
    assert!(failures.is_empty(), "libtorch differs from the CPU:\n{}", failures.join("\n"));
}

/// Frozen weights stored in bf16 (`CausalLm::store_frozen_weights_in_product_type`, which the
/// trainer calls under `bf16: true`) change no value of a step: a LoRA base, a QLoRA model's
/// embedding and head, the tied embedding that is also the head, with and without
/// checkpointing and the chunked head, in SFT and DPO, give the steps' losses, metrics, grad
/// norms and gradients bit for bit, on torch's CPU kernels with bf16 products. The tiny
/// checkpoint is saved in bf16 first (untied, and tied), as real checkpoints come; its f32 values
/// would not be stored narrower.
#[cfg(feature = "tch")]
#[test]
fn tch_frozen_weights_stored_in_bf16_give_the_steps_bits() {
    use alignment_handbook::core::backend::{Cpu, TorchAutodiff};
    use alignment_handbook::models::{load_pretrained, save_pretrained, CausalLm, SaveDtype};
    use alignment_handbook::step_check::Case;
    use burn::tensor::DType;
    let device = burn::backend::libtorch::LibTorchDevice::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let untied = dir.path().join("untied");
    let tied = dir.path().join("tied");
    let model: CausalLm<Cpu> = load_pretrained(&fixture(), &Default::default()).unwrap();
    save_pretrained(&model, &untied, SaveDtype::BF16, None).unwrap();
    let mut model = model;
    model.lm_head = None;
    model.config.tie_word_embeddings = true;
    model.config.raw.insert("tie_word_embeddings".into(), true.into());
    save_pretrained(&model, &tied, SaveDtype::BF16, None).unwrap();

    let lora_lean = Case { name: "lora-lean", lean: true, ..CASES[2] };
    let dpo_lora = Case { name: "dpo-lora", preference: true, ..CASES[2] };
    let (lora, qlora) = (CASES[2], CASES[3]);
    for (checkpoint, case) in
        [(&untied, lora), (&untied, qlora), (&untied, lora_lean), (&untied, dpo_lora), (&tied, lora), (&tied, lora_lean)]
    {
        let name = format!("{} ({})", case.name, checkpoint.file_name().unwrap().to_string_lossy());
        let (stored, _) =
            step_check::prepare_case_storing::<TorchAutodiff>(checkpoint, case, Some(FloatDType::BF16), true, &device).unwrap();
        assert_eq!(stored.embed_tokens.val().dtype(), DType::BF16, "{name}: the embedding is stored in bf16");
        if let Some(head) = &stored.lm_head {
            assert_eq!(head.weight.val().dtype(), DType::BF16, "{name}: the head is stored in bf16");
        }
        let q = &stored.layers[0].self_attn.q_proj;
        let adapter = q.lora.as_ref().expect("every linear layer has an adapter");
        assert_eq!(adapter.a.val().dtype(), DType::F32, "{name}: the adapters stay f32");
        assert_eq!(stored.norm.weight.val().dtype(), DType::F32, "{name}: the norms stay f32");
        if !case.nf4 {
            assert_eq!(q.weight.val().dtype(), DType::BF16, "{name}: the base is stored in bf16");
        }
        let with = step_check::run_case_storing::<TorchAutodiff>(checkpoint, case, Some(FloatDType::BF16), true, &device).unwrap();
        let without = step_check::run_case_storing::<TorchAutodiff>(checkpoint, case, Some(FloatDType::BF16), false, &device).unwrap();
        assert!(!with.grads.is_empty() && with.scalars.contains_key("step1/loss"), "{name}: the steps ran");
        assert_eq!(with, without, "{name}: storing the frozen weights in bf16 changed a value");
    }
}
