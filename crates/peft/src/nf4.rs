//! 4-bit NormalFloat (NF4) block-wise quantization as bitsandbytes' `quantize_4bit(quant_type="nf4")`
//! (QLoRA's storage format for frozen base weights), on the host, with optional double
//! quantization of the block scales (`compress_statistics=True`); and the same with
//! bitsandbytes' other 4-bit code book, FP4 (`quant_type="fp4"`, [`FourBit::Fp4`]). The model
//! holds the result on its device (`alignment_models::quantized`); see docs/peft.md.
//!
//! Values are split into blocks of [`BLOCK_SIZE`] (the last may be shorter); each block stores
//! its absolute maximum and, per value, the 4-bit index of the [`NF4_CODE`] entry nearest to
//! `value · (1 / absmax)`, two per byte, the first value in the high nibble. The nearest entry
//! is found as bitsandbytes' `dQuantizeNF4` does: comparisons against its midpoint thresholds
//! ([`NF4_THRESHOLDS`]), a value exactly on one going to the lower entry. An all-zero block
//! scales by `1 / 0 = inf`, `0 · inf` is NaN, which passes no threshold: index 0, as in
//! bitsandbytes. Dequantization is `NF4_CODE[index] · absmax`. FP4 differs only in the code book
//! ([`FP4_CODE`]) and its decision tree ([`nearest_fp4`]).
//!
//! The absmax values are kept as f32 ([`Absmax::F32`], 4 bytes per block) or double-quantized
//! ([`Absmax::DoubleQuantized`], about 1 byte per block): `offset = mean(absmax)`, and
//! `absmax - offset` is quantized block-wise ([`NESTED_BLOCK_SIZE`] per block) to 8-bit indices into
//! bitsandbytes' dynamic map ([`create_dynamic_map`]) by [`quantize_blockwise`]; the scale used
//! is then `dequantize_blockwise(..) + offset`. Both follow the CUDA kernels QLoRA runs
//! (`kQuantizeBlockwise`, `dQuantize`), computed with IEEE f32 (bitsandbytes builds them with
//! `--use_fast_math`, whose reciprocal may differ by an ulp).

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

/// bitsandbytes' FP4 code book (`get_4bit_type("fp4")`): a sign bit and three bits of a float with
/// a 2-bit exponent (0, 0.0625, 8, 12, 4, 6, 2, 3 by index) divided by their maximum, 12, in f32.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// Which of bitsandbytes' 4-bit code books (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FourBit {
    /// NormalFloat: [`NF4_CODE`], QLoRA's default.
    #[default]
    Nf4,
    /// [`FP4_CODE`].
    Fp4,
}

impl FourBit {
    /// `nf4` or `fp4`, as bitsandbytes names them.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(FourBit::Nf4),
            "fp4" => Some(FourBit::Fp4),
            _ => None,
        }
    }

    /// The 16 values the indices stand for (times the block's absmax).
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBit::Nf4 => &NF4_CODE,
            FourBit::Fp4 => &FP4_CODE,
        }
    }

    /// The index bitsandbytes' kernel gives `x` (a value scaled into [-1, 1]).
    pub fn nearest(self, x: f32) -> u8 {
        match self {
            FourBit::Nf4 => nearest_code(x),
            FourBit::Fp4 => nearest_fp4(x),
        }
    }

    /// The code book `code` is, if it is one of these two.
    pub fn of_code(code: &[f32]) -> Option<Self> {
        [FourBit::Nf4, FourBit::Fp4].into_iter().find(|kind| kind.code().as_slice() == code)
    }
}

/// bitsandbytes' default block size for 4-bit quantization.
pub const BLOCK_SIZE: usize = 64;

/// Block size of the double quantization of the absmax values (fixed in bitsandbytes'
/// `quantize_4bit`).
pub const NESTED_BLOCK_SIZE: usize = 256;

/// A quantized tensor: packed 4-bit indices and one absmax per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// `ceil(len / 2)` bytes, first value of each pair in the high nibble.
    pub packed: Vec<u8>,
    /// One per block of [`BLOCK_SIZE`] values.
    pub absmax: Absmax,
    /// Number of values.
    pub len: usize,
    /// The code book the indices point into.
    pub code: FourBit,
}

impl Nf4Tensor {
    /// The same values in `alignment_models::quantized`'s layout, for a `[out, in]` weight: what
    /// the model puts on its device and dequantizes there.
    pub fn into_parts(self, dims: [usize; 2]) -> alignment_models::QuantizedParts {
        use alignment_models::ScaleParts;
        let scales = match self.absmax {
            Absmax::F32(values) => ScaleParts::Plain(values),
            Absmax::DoubleQuantized { codes, state2_absmax, offset } => ScaleParts::Nested {
                indices: codes,
                code_book: create_dynamic_map().to_vec(),
                scales: state2_absmax,
                offset,
                block_size: NESTED_BLOCK_SIZE,
            },
        };
        alignment_models::QuantizedParts {
            dims,
            packed_bytes: self.packed,
            code_book: self.code.code().to_vec(),
            block_size: BLOCK_SIZE,
            scales,
        }
    }

    /// Bytes of the quantized form: packed indices plus block statistics (the constant code
    /// books, which bitsandbytes also keeps per tensor, are not counted).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes()
    }
}

/// The per-block absmax of an [`Nf4Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`compress_statistics=False`).
    F32(Vec<f32>),
    /// Double quantization (`compress_statistics=True`): `absmax - offset` as 8-bit indices into
    /// [`create_dynamic_map`], with one f32 absmax per [`NESTED_BLOCK_SIZE`] indices.
    DoubleQuantized {
        /// One per block of the tensor.
        codes: Vec<u8>,
        /// bitsandbytes' `state2.absmax`: one per [`NESTED_BLOCK_SIZE`] codes.
        state2_absmax: Vec<f32>,
        /// The mean of the original absmax values.
        offset: f32,
    },
}

impl Absmax {
    /// Double-quantizes `absmax` as bitsandbytes' `quantize_4bit(compress_statistics=True)`:
    /// `offset = mean(absmax)` (taken in f64 and rounded; torch's f32 sum, in its own order, may
    /// differ in the last bit), then [`quantize_blockwise`] of `absmax - offset`.
    pub fn double_quantize(absmax: &[f32]) -> Absmax {
        let sum: f64 = absmax.iter().map(|&a| f64::from(a)).sum();
        let offset = (sum / absmax.len() as f64) as f32;
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (codes, state2_absmax) = quantize_blockwise(&centered);
        Absmax::DoubleQuantized { codes, state2_absmax, offset }
    }

    /// The absmax of every block: stored, or `dequantize_blockwise(codes, state2_absmax) + offset`.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::F32(values) => values.clone(),
            Absmax::DoubleQuantized { codes, state2_absmax, offset } => {
                dequantize_blockwise(codes, state2_absmax).iter().map(|&a| a + offset).collect()
            }
        }
    }

    /// Bytes these statistics occupy: 4 per block, or 1 per block plus 4 per nested block plus
    /// 4 for the offset.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::F32(values) => 4 * values.len(),
            Absmax::DoubleQuantized { codes, state2_absmax, .. } => codes.len() + 4 * state2_absmax.len() + 4,
        }
    }
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

/// FP4's index of `x` (in [-1, 1]) as bitsandbytes' `dQuantizeFP4`: the sign bit, then a
/// binary search of `|x|` against the midpoints of the positive entries, as its f32 literals (a
/// value exactly on one goes to the lower entry; NaN to index 0).
pub fn nearest_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let x = x.abs();
    let index = if x > 0.291_666_67 {
        if x > 0.583_333 {
            if x > 0.833_333_3 {
                0b0011
            } else {
                0b0010
            }
        } else if x > 0.416_666_7 {
            0b0101
        } else {
            0b0100
        }
    } else if x > 0.085_937_5 {
        if x > 0.208_333_33 {
            0b0111
        } else {
            0b0110
        }
    } else if x > 0.002_604_17 {
        0b0001
    } else {
        0b0000
    };
    index + sign
}

/// Quantizes `values` block-wise with f32 absmax values (`compress_statistics=False`).
pub fn quantize(values: &[f32]) -> Nf4Tensor {
    quantize_with(values, false)
}

/// Quantizes `values` block-wise; with `double_quant` the absmax values are double-quantized
/// ([`Absmax::double_quantize`]). The packed indices do not depend on it.
/// Blocks are independent, so they are quantized on every core (rayon); the result does not
/// depend on the thread count.
pub fn quantize_with(values: &[f32], double_quant: bool) -> Nf4Tensor {
    quantize_as(values, FourBit::Nf4, double_quant)
}

/// [`quantize_with`] into the code book `code`.
pub fn quantize_as(values: &[f32], code: FourBit, double_quant: bool) -> Nf4Tensor {
    use rayon::prelude::*;
    let nearest = |x: f32| code.nearest(x);
    let (absmax, packed): (Vec<f32>, Vec<Vec<u8>>) = values
        .par_chunks(BLOCK_SIZE)
        .map(|block| {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = 1.0 / max;
            // BLOCK_SIZE is even, so only the last block can end in half a byte.
            let packed = block.chunks(2).map(|p| (nearest(p[0] * inv) << 4) | p.get(1).map_or(0, |&v| nearest(v * inv))).collect();
            (max, packed)
        })
        .unzip();
    let packed = packed.concat();
    let absmax = if double_quant { Absmax::double_quantize(&absmax) } else { Absmax::F32(absmax) };
    Nf4Tensor { packed, absmax, len: values.len(), code }
}

/// The values `t` stands for: `code[index] · absmax` of the value's block.
/// Blocks are expanded on every core (rayon).
pub fn dequantize(t: &Nf4Tensor) -> Vec<f32> {
    use rayon::prelude::*;
    let absmax = t.absmax.values();
    let code_book = t.code.code();
    let mut values = vec![0f32; t.len];
    values.par_chunks_mut(BLOCK_SIZE).zip(t.packed.par_chunks(BLOCK_SIZE / 2)).zip(absmax.par_iter()).for_each(|((out, bytes), &scale)| {
        for (i, v) in out.iter_mut().enumerate() {
            let byte = bytes[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            *v = code_book[code as usize] * scale;
        }
    });
    values
}

/// `torch.linspace(start, end, steps)` in f32 as torch's AVX2/AVX-512 CPU kernels compute it:
/// the first half `start + step·i`, the rest `end - step·(steps - 1 - i)`, each one fused
/// multiply-add.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    let up = (0..half).map(|i| step.mul_add(i as f32, start));
    let down = (half..steps).map(|i| (-step).mul_add((steps - 1 - i) as f32, end));
    up.chain(down).collect()
}

/// bitsandbytes' 8-bit dynamic map, `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`, ascending: for `i` in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)`
/// times `10^(i-6)`, with both signs, plus 0 and 1 (range [-0.99297, 1]).
pub fn create_dynamic_map() -> [f32; 256] {
    dynamic_map(true)
}

/// The same map unsigned, `create_dynamic_map(signed=False)`: the midpoints of
/// `linspace(0.1, 1, 2^(i+1) + 1)` instead, positive only, plus 0 and 1 (range [0, 1]); the
/// codes of 8-bit AdamW's second moment.
pub fn create_unsigned_dynamic_map() -> [f32; 256] {
    dynamic_map(false)
}

fn dynamic_map(signed: bool) -> [f32; 256] {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = vec![0.0, 1.0];
    for (i, &scale) in SCALES.iter().enumerate() {
        let items = if signed { 1 << i } else { 2 << i };
        let bounds = linspace(0.1, 1.0, items + 1);
        for pair in bounds.windows(2) {
            let value = (pair[0] + pair[1]) / 2.0 * scale as f32;
            data.push(value);
            if signed {
                data.push(-value);
            }
        }
    }
    data.sort_by(f32::total_cmp);
    data.try_into().expect("2 + 2·(2⁷ - 1) = 256 entries")
}

/// Index of the `code` entry (ascending) nearest to `x`, as bitsandbytes' `dQuantize<0>`: a
/// seven-step binary search from index 127 ends on an even index `p` with `x` in
/// `(code[p-1], code[p+1]]`, then `x` goes to the neighbour past their f32 midpoint. A value
/// exactly on a midpoint stays at `p` (ties go to the even index); NaN ends at index 0.
pub fn nearest_dynamic_code(code: &[f32; 256], x: f32) -> u8 {
    let mut p = 127;
    for step in [64, 32, 16, 8, 4, 2, 1] {
        p = if x > code[p] { p + step } else { p - step };
    }
    let val = code[p];
    let above = x > val;
    let other = if above { p + 1 } else { p.saturating_sub(1) };
    let midpoint = (code[other] + val) * 0.5;
    let past_midpoint = if above { x > midpoint } else { x < midpoint };
    (if past_midpoint { other } else { p }) as u8
}

/// 8-bit block-wise quantization as bitsandbytes' `quantize_blockwise(values,
/// blocksize=NESTED_BLOCK_SIZE)` with the [`create_dynamic_map`] code: per block its absmax and,
/// per value, [`nearest_dynamic_code`] of `value · (1 / absmax)` (an all-zero block gives NaN
/// and index 0). Returns `(codes, absmax)`.
pub fn quantize_blockwise(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let code = create_dynamic_map();
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(NESTED_BLOCK_SIZE));
    for block in values.chunks(NESTED_BLOCK_SIZE) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let inv = 1.0 / max;
        codes.extend(block.iter().map(|&v| nearest_dynamic_code(&code, v * inv)));
    }
    (codes, absmax)
}

/// Inverse of [`quantize_blockwise`]: `code[index] · absmax` of the value's block.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32]) -> Vec<f32> {
    let code = create_dynamic_map();
    codes.iter().enumerate().map(|(i, &c)| code[c as usize] * absmax[i / NESTED_BLOCK_SIZE]).collect()
}
