//! NF4 quantization, single and double, and FP4, against a Python transcription of bitsandbytes'
//! algorithms (scripts/make_nf4_goldens.py; bitsandbytes itself is not installable without a GPU
//! build).

use alignment_peft::nf4::{
    create_dynamic_map, dequantize, nearest_code, nearest_dynamic_code, quantize, quantize_as, quantize_blockwise, quantize_with, Absmax,
    FourBit, Nf4Tensor, BLOCK_SIZE, FP4_CODE, NESTED_BLOCK_SIZE, NF4_CODE,
};
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Deserialize;

fn fixture<T: DeserializeOwned>(name: &str) -> T {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// nf4/reference.json: `compress_statistics=False`.
#[derive(Deserialize)]
struct Reference {
    blocksize: usize,
    values: Vec<f32>,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dequantized: Vec<f32>,
}

/// nf4/double_quant.json: `compress_statistics=True`.
#[derive(Deserialize)]
struct DoubleQuantReference {
    blocksize: usize,
    nested_blocksize: usize,
    dynamic_map: Vec<f32>,
    blockwise: Blockwise,
    cases: Vec<DoubleQuantCase>,
}

#[derive(Deserialize)]
struct Blockwise {
    values: Vec<f32>,
    codes: Vec<u8>,
    absmax: Vec<f32>,
}

#[derive(Deserialize)]
struct DoubleQuantCase {
    name: String,
    values: Vec<f32>,
    packed: Vec<u8>,
    offset: f32,
    codes: Vec<u8>,
    state2_absmax: Vec<f32>,
    dequantized: Vec<f32>,
}

/// Largest `|a - b| / |b|` (0 where both are 0).
fn max_relative_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / b.abs() }).fold(0.0, f32::max)
}

#[test]
fn nf4_matches_bitsandbytes_formula() {
    let r: Reference = fixture("reference.json");
    assert_eq!(r.blocksize, BLOCK_SIZE);
    let q = quantize(&r.values);
    assert_eq!(q.len, r.values.len());
    assert_eq!(q.absmax, Absmax::F32(r.absmax));
    assert_eq!(q.packed, r.packed);
    assert_eq!(dequantize(&q), r.dequantized);
}

/// nf4/fp4.json: `quant_type="fp4"`.
#[derive(Deserialize)]
struct Fp4Reference {
    blocksize: usize,
    code: Vec<f32>,
    values: Vec<f32>,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dequantized: Vec<f32>,
}

#[test]
fn fp4_matches_bitsandbytes_formula() {
    let r: Fp4Reference = fixture("fp4.json");
    assert_eq!(r.blocksize, BLOCK_SIZE);
    // The code book bit for bit, signed zero included.
    assert_eq!(r.code.iter().map(|c| c.to_bits()).collect::<Vec<_>>(), FP4_CODE.map(f32::to_bits).to_vec());
    let q = quantize_as(&r.values, FourBit::Fp4, false);
    assert_eq!(q.absmax, Absmax::F32(r.absmax));
    assert_eq!(q.packed, r.packed, "indices: every pivot, just above it, negated, and random values");
    let ours = dequantize(&q);
    assert_eq!(ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), r.dequantized.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    // Each code point (times an absmax of 1) goes to its own index, -0 to +0's.
    for (i, &c) in FP4_CODE.iter().enumerate() {
        assert_eq!(FourBit::Fp4.nearest(c), if i == 8 { 0 } else { i as u8 }, "{c}");
    }
    assert_eq!(FourBit::of_code(&FP4_CODE), Some(FourBit::Fp4));
    assert_eq!(FourBit::of_code(&NF4_CODE), Some(FourBit::Nf4));
}

#[test]
fn nf4_round_trips_code_points_and_bounds_error() {
    // Every code point scaled by an absmax that is itself a value quantizes to itself.
    let values: Vec<f32> = NF4_CODE.iter().map(|c| c * 0.25).collect();
    let q = quantize(&values);
    assert_eq!(dequantize(&q), values);
    for (i, &c) in NF4_CODE.iter().enumerate() {
        assert_eq!(nearest_code(c) as usize, i);
    }
    // Error is at most half the widest gap between code points (times absmax).
    let values: Vec<f32> = (0..1000).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.03).collect();
    let q = quantize(&values);
    let back = dequantize(&q);
    let absmax = q.absmax.values();
    let half_gap = NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
    for (i, (a, b)) in values.iter().zip(&back).enumerate() {
        assert!((a - b).abs() <= half_gap * absmax[i / BLOCK_SIZE] + 1e-7, "{i}: {a} vs {b}");
    }
    assert_eq!(q.packed.len(), 500);
    assert_eq!(absmax.len(), 1000usize.div_ceil(64));
}

#[test]
fn dynamic_map_and_blockwise_match_bitsandbytes() {
    let r: DoubleQuantReference = fixture("double_quant.json");
    assert_eq!((r.blocksize, r.nested_blocksize), (BLOCK_SIZE, NESTED_BLOCK_SIZE));
    let map = create_dynamic_map();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&map), bits(&r.dynamic_map));

    let (codes, absmax) = quantize_blockwise(&r.blockwise.values);
    assert_eq!(codes, r.blockwise.codes);
    assert_eq!(absmax, r.blockwise.absmax);
    // The first block holds 1 and every midpoint of the map: ties go to the even index.
    for k in 0..255 {
        assert_eq!(codes[1 + k] as usize, (k + 1) & !1, "midpoint {k}");
    }
    // Code points map to themselves.
    for (i, &c) in map.iter().enumerate() {
        assert_eq!(nearest_dynamic_code(&map, c) as usize, i);
    }
}

#[test]
fn double_quant_matches_bitsandbytes() {
    let r: DoubleQuantReference = fixture("double_quant.json");
    for case in &r.cases {
        // The 4-bit indices and block absmax are those of single quantization.
        let single = quantize(&case.values);
        assert_eq!(single.packed, case.packed, "{}", case.name);
        // Nested quantization from the reference's offset (torch's f32 mean, summed in torch's order).
        let centered: Vec<f32> = single.absmax.values().iter().map(|a| a - case.offset).collect();
        let (codes, state2_absmax) = quantize_blockwise(&centered);
        assert_eq!(codes, case.codes, "{}", case.name);
        assert_eq!(state2_absmax, case.state2_absmax, "{}", case.name);
        let absmax = Absmax::DoubleQuantized { codes, state2_absmax, offset: case.offset };
        let from_reference_offset = Nf4Tensor { absmax, ..single };
        assert_eq!(dequantize(&from_reference_offset), case.dequantized, "{}", case.name);

        // quantize_with takes the mean in f64: within an ulp of torch's, the same codes, and values
        // within two ulps of the offset (relative differences are large only where the scale
        // nearly cancels: an all-zero block dequantizes to -(its absmax residual), ~1e-5 here).
        let q = quantize_with(&case.values, true);
        let Absmax::DoubleQuantized { codes, offset, .. } = &q.absmax else { panic!("{}: not double-quantized", case.name) };
        assert!(max_relative_diff(&[*offset], &[case.offset]) <= f32::EPSILON, "{}: {offset}", case.name);
        assert_eq!(codes, &case.codes, "{}", case.name);
        let diff = dequantize(&q).iter().zip(&case.dequantized).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        println!("{}: offset {offset} vs reference {}, dequantized max |diff| {diff:e}", case.name, case.offset);
        assert!(diff <= 2.0 * f32::EPSILON * case.offset, "{}: {diff}", case.name);
    }
}

/// N(0, 0.02²) values (Box–Muller on a seeded ChaCha stream), like a weight matrix.
fn gaussian_weights(n: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random(), rng.random());
            ((-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.02) as f32
        })
        .collect()
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    (a.iter().zip(b).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
}

#[test]
fn double_quant_costs_little_accuracy_and_saves_memory() {
    // 4096 x 64: 4096 blocks, 16 nested blocks.
    let n = 4096 * 64;
    let values = gaussian_weights(n);
    let single = quantize_with(&values, false);
    let double = quantize_with(&values, true);
    assert_eq!(single.packed, double.packed);

    let exact = single.absmax.values();
    let approx = double.absmax.values();
    let absmax_err = max_relative_diff(&approx, &exact);
    let (err_single, err_double) = (rms(&dequantize(&single), &values), rms(&dequantize(&double), &values));
    let between = rms(&dequantize(&double), &dequantize(&single));
    let per_param = |t: &Nf4Tensor| t.storage_bytes() as f64 / n as f64;
    println!(
        "absmax max relative error {absmax_err:e}; RMS error single {err_single:e}, double {err_double:e} \
         (+{:.3}%), double vs single {between:e}; bytes/param single {}, double {}",
        100.0 * (err_double / err_single - 1.0),
        per_param(&single),
        per_param(&double)
    );
    assert!(absmax_err < 1e-2, "{absmax_err}");
    assert!(err_double < err_single * 1.01, "{err_double} vs {err_single}");
    assert!(between < err_single * 0.1, "{between} vs {err_single}");

    assert_eq!(single.storage_bytes(), n / 2 + 4 * (n / 64));
    assert_eq!(double.storage_bytes(), n / 2 + n / 64 + 4 * (n / 64 / 256) + 4);
    assert!((per_param(&single) - (0.5 + 4.0 / 64.0)).abs() < 1e-12);
    assert!((per_param(&double) - (0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0))).abs() < 1e-4);
}
