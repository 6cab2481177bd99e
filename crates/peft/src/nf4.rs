//! 4-bit NormalFloat (NF4) block-wise quantization as bitsandbytes' `quantize_4bit(quant_type="nf4")`
//! (QLoRA's storage format for frozen base weights), on the host. Not yet used by the model:
//! this is the storage half of QLoRA; see docs/peft.md.
//!
//! Values are split into blocks of [`BLOCK_SIZE`] (the last may be shorter); each block stores
//! its absolute maximum (f32) and, per value, the 4-bit index of the [`NF4_CODE`] entry nearest
//! to `value · (1 / absmax)`, two per byte, the first value in the high nibble. The nearest entry
//! is found as bitsandbytes' `dQuantizeNF4` does: comparisons against its midpoint thresholds
//! ([`NF4_THRESHOLDS`]), a value exactly on one going to the lower entry. Dequantization
//! is `NF4_CODE[index] · absmax`. Double quantization of the absmax values
//! (`compress_statistics=True`) is not implemented.

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to
/// [-1, 1], with an exact zero.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' default block size for 4-bit quantization.
pub const BLOCK_SIZE: usize = 64;

/// A quantized tensor: packed 4-bit indices and one absmax per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// `ceil(len / 2)` bytes, first value of each pair in the high nibble.
    pub packed: Vec<u8>,
    /// One per block of [`BLOCK_SIZE`] values.
    pub absmax: Vec<f32>,
    /// Number of values.
    pub len: usize,
}

/// The decision thresholds of bitsandbytes' `dQuantizeNF4` (csrc/kernels.cu), ascending: the
/// midpoints between neighbouring code book entries, as its f32 literals.
#[allow(clippy::excessive_precision)]
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// Index of the code book entry nearest to `x` (in [-1, 1]): the number of thresholds `x`
/// exceeds (a value exactly on a threshold goes to the lower entry, as `x > t` in bitsandbytes).
pub fn nearest_code(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8
}

/// Quantizes `values` block-wise. A block of zeros stores absmax 0 and the zero code.
pub fn quantize(values: &[f32]) -> Nf4Tensor {
    let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK_SIZE));
    let mut codes = Vec::with_capacity(values.len());
    for block in values.chunks(BLOCK_SIZE) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let inv = if max > 0.0 { 1.0 / max } else { 0.0 };
        codes.extend(block.iter().map(|&v| nearest_code(v * inv)));
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0)).collect();
    Nf4Tensor { packed, absmax, len: values.len() }
}

/// The values `t` stands for: `NF4_CODE[index] · absmax` of the value's block.
pub fn dequantize(t: &Nf4Tensor) -> Vec<f32> {
    (0..t.len)
        .map(|i| {
            let byte = t.packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            NF4_CODE[code as usize] * t.absmax[i / BLOCK_SIZE]
        })
        .collect()
}
