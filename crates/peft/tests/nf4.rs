//! NF4 quantization against a Python transcription of bitsandbytes' algorithm
//! (scripts/make_peft_goldens.py; bitsandbytes itself is not installable without a GPU build).

use alignment_peft::nf4::{dequantize, nearest_code, quantize, BLOCK_SIZE, NF4_CODE};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    blocksize: usize,
    values: Vec<f32>,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dequantized: Vec<f32>,
}

#[test]
fn nf4_matches_bitsandbytes_formula() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4/reference.json");
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(r.blocksize, BLOCK_SIZE);
    let q = quantize(&r.values);
    assert_eq!(q.len, r.values.len());
    assert_eq!(q.absmax, r.absmax);
    assert_eq!(q.packed, r.packed);
    assert_eq!(dequantize(&q), r.dequantized);
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
    let half_gap = NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
    for (i, (a, b)) in values.iter().zip(&back).enumerate() {
        assert!((a - b).abs() <= half_gap * q.absmax[i / BLOCK_SIZE] + 1e-7, "{i}: {a} vs {b}");
    }
    assert_eq!(q.packed.len(), 500);
    assert_eq!(q.absmax.len(), 1000usize.div_ceil(64));
}
