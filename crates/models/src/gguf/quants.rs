//! ggml's tensor storage formats and their dequantisation to f32.
//!
//! Each block format stores `block` values in `type_size` bytes: one or two f16 scales and packed
//! small integers. The arithmetic follows ggml's reference dequantisers (`ggml-quants.c`,
//! `dequantize_row_*`) and their numpy port in gguf-py (`gguf/quants.py`), operation for operation
//! in f32, so the values agree bit for bit (tests/gguf.rs checks every format against gguf-py).

use half::{bf16, f16};

/// A ggml tensor type (`enum ggml_type`), by its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// A type this reader knows by id but cannot dequantise (the IQ*, TQ*, MXFP4 families...).
    Other(u32),
}

const QK_K: usize = 256;

impl GgmlType {
    /// The formats [`GgmlType::dequantize`] reads, for error messages.
    pub const SUPPORTED: &'static str = "F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

    /// The type with ggml id `id`; `None` past the ids ggml has assigned.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            4 | 5 | 16..=23 | 29 | 31..=41 => Self::Other(id),
            _ => return None,
        })
    }

    /// The name llama.cpp gives the type.
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q8_1 => "Q8_1".into(),
            Self::Q2K => "Q2_K".into(),
            Self::Q3K => "Q3_K".into(),
            Self::Q4K => "Q4_K".into(),
            Self::Q5K => "Q5_K".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Q8K => "Q8_K".into(),
            Self::I8 => "I8".into(),
            Self::I16 => "I16".into(),
            Self::I32 => "I32".into(),
            Self::I64 => "I64".into(),
            Self::F64 => "F64".into(),
            Self::BF16 => "BF16".into(),
            Self::Other(id) => format!("ggml type {id}"),
        }
    }

    /// `(values per block, bytes per block)` of the formats this reader dequantises.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::F64 => (1, 8),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
            _ => return None,
        })
    }

    /// Dequantises `n` values stored in `bytes`; the error says what is wrong with the sizes or
    /// the type.
    pub fn dequantize(self, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
        let (block, type_size) =
            self.block().ok_or_else(|| format!("{} cannot be dequantised (supported: {})", self.name(), Self::SUPPORTED))?;
        if !n.is_multiple_of(block) || bytes.len() != n / block * type_size {
            return Err(format!("{} values of {} need {} bytes, found {}", n, self.name(), n.div_ceil(block) * type_size, bytes.len()));
        }
        let mut out = vec![0f32; n];
        let blocks = bytes.chunks_exact(type_size).zip(out.chunks_exact_mut(block));
        match self {
            Self::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Self::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
            Self::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::F64 => blocks.for_each(|(b, y)| y[0] = f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32),
            Self::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
            Self::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
            Self::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
            Self::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
            Self::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
            Self::Q2K => blocks.for_each(|(b, y)| q2_k(b, y)),
            Self::Q3K => blocks.for_each(|(b, y)| q3_k(b, y)),
            Self::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
            Self::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
            Self::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
            _ => unreachable!("block() is None for the other types"),
        }
        Ok(out)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// 32 values: f16 `d`, 16 bytes of 4-bit `q` (low nibbles first half, high nibbles second);
/// `y = d * (q - 8)`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_0 with an f16 offset `m` instead of the -8: `y = d * q + m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = d * (q & 0x0F) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// 32 values: f16 `d`, a u32 of fifth bits, 16 bytes of low nibbles; `y = d * (q - 16)`.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// Q5_0 with an f16 offset `m`: `y = d * q + m`.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * lo as f32 + m;
        y[j + 16] = d * hi as f32 + m;
    }
}

/// 32 values: f16 `d`, 32 signed bytes; `y = q * d`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

/// 256 values in 16 groups of 16: 4-bit scale and min per group, 2-bit `q`, f16 `d` and `dmin`
/// at the end; `y = d * scale * q - dmin * min`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (i, y) in y.iter_mut().enumerate() {
        let (half, shift, l) = (i / 128, (i % 128) / 32, i % 32);
        let q = (qs[half * 32 + l] >> (2 * shift)) & 3;
        let sc = scales[i / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *y = dl * q as f32 - ml;
    }
}

/// 256 values in 16 groups: a high-bit mask, 2-bit low parts, 6-bit signed scales packed in 12
/// bytes, f16 `d`; `q = low - 4 * (1 - high bit)`, `y = d * (scale - 32) * q`.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut scales = [0f32; 16];
    for (g, scale) in scales.iter_mut().enumerate() {
        let low = if g < 8 { packed[g] & 0x0F } else { packed[g - 8] >> 4 };
        let high = (packed[8 + g % 4] >> (2 * (g / 4))) & 3;
        *scale = ((low | high << 4) as i8 - 32) as f32;
    }
    for (i, y) in y.iter_mut().enumerate() {
        let (half, shift, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = ((qs[half * 32 + l] >> (2 * shift)) & 3) as i8;
        let high = ((hmask[i % 32] >> (i / 32)) & 1) ^ 1;
        let q = low - ((high << 2) as i8);
        *y = d * scales[i / 16] * q as f32;
    }
}

/// The 6-bit scales and mins of Q4_K/Q5_K's 8 groups, packed in 12 bytes.
fn k_scale_min(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = packed[j] & 0x3F;
        m[j] = packed[j + 4] & 0x3F;
        sc[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 2) & 0x30);
        m[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 2) & 0x30);
    }
    (sc, m)
}

/// 256 values in 8 groups of 32: f16 `d`, `dmin`, 6-bit scales/mins, 4-bit `q` (each 32 bytes
/// holds two groups, low nibbles first); `y = d * scale * q - dmin * min`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let qs = &b[16..144];
    for (i, y) in y.iter_mut().enumerate() {
        let (g, l) = (i / 32, i % 32);
        let q = (qs[(g / 2) * 32 + l] >> (4 * (g % 2))) & 0x0F;
        *y = d * sc[g] as f32 * q as f32 - dmin * m[g] as f32;
    }
}

/// Q4_K plus a fifth bit per value from 32 bytes of high bits (bit `g` for group `g`).
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = k_scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (i, y) in y.iter_mut().enumerate() {
        let (g, l) = (i / 32, i % 32);
        let low = (qs[(g / 2) * 32 + l] >> (4 * (g % 2))) & 0x0F;
        let high = (qh[l] >> g) & 1;
        *y = d * sc[g] as f32 * (low | high << 4) as f32 - dmin * m[g] as f32;
    }
}

/// 256 values in 16 groups of 16: 4-bit low parts, 2-bit high parts, signed 8-bit scales, f16
/// `d` at the end; `y = d * scale * (q - 32)`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (i, y) in y.iter_mut().enumerate() {
        let (half, within) = (i / 128, i % 128);
        let low = (ql[half * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
        let high = (qh[half * 32 + within % 32] >> (2 * (within / 32))) & 3;
        let q = (low | high << 4) as i8 - 32;
        *y = d * scales[i / 16] as i8 as f32 * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        let err = GgmlType::Q8_0.dequantize(&[0; 33], 32).unwrap_err();
        assert!(err.contains("34 bytes"), "{err}");
        assert!(GgmlType::Q8_0.dequantize(&[0; 34], 31).is_err());
        let err = GgmlType::from_id(20).unwrap().dequantize(&[], 0).unwrap_err();
        assert!(err.contains("ggml type 20") && err.contains("Q4_K"), "{err}");
        assert_eq!(GgmlType::from_id(99), None);
    }

    #[test]
    fn q8_0_by_hand() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 4;
        block[3] = (-6i8) as u8;
        let y = GgmlType::Q8_0.dequantize(&block, 32).unwrap();
        assert_eq!(&y[..3], &[2.0, -3.0, 0.0]);
    }
}
