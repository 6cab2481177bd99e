//! bitsandbytes' AdamW with 8-bit block-wise moments (`optim: adamw_bnb_8bit`, `adamw_8bit`,
//! `paged_adamw_8bit`), as transformers' Trainer builds it: `bnb.optim.AdamW(optim_bits=8)` with
//! its defaults (`min_8bit_size=4096`, `percentile_clipping=100`, `block_wise=True`) and every
//! `nn.Embedding` overridden to 32-bit moments.
//!
//! A parameter of at least [`MIN_8BIT_SIZE`] elements that is not the embedding keeps each moment
//! as one byte per element, a code into a 256-value map (bitsandbytes' signed dynamic map for `m`,
//! its unsigned one for `v`: `alignment_peft::nf4`), scaled by one f32 per block of [`BLOCK`] elements: 2 bytes
//! an element instead of 8. One update ([`update_blockwise`], bitsandbytes'
//! `kOptimizerStatic8bit2StateBlockwise`, csrc/kernels.cu), per block:
//!
//! ```text
//! m ← map₁[code₁]·absmax₁ ;  v ← map₂[code₂]·absmax₂              (dequantize)
//! m ← β₁m + (1−β₁)g ;  v ← β₂v + (1−β₂)g²
//! absmax ← max |m|, max |v| over the block
//! p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + √(1−β₂ᵗ)·ε) ;  p ← p·(1 − lr·wd)
//! code ← the map's code nearest m/absmax (bitsandbytes' binary search, `quantize_2D`), keeping m's sign
//! ```
//!
//! The parameter moves by the unquantized moments; only what is kept is quantized. Smaller
//! parameters and the embedding take [`update_32bit`] (`kOptimizer32bit2State`): the same
//! update on f32 moments. Both differ from `torch.optim.AdamW` only in decaying after the update.
//!
//! bitsandbytes runs this only as CUDA kernels; the golden values
//! (`scripts/make_adam8bit_goldens.py`) transcribe them in exact f32 arithmetic, as this module
//! does, and check the transcription against bitsandbytes' own pure-torch reference. This
//! module's update runs on the host, over the parameter's and gradient's values: the CPU
//! backend's step. Every other backend runs the same operations as tensor operations on the
//! parameter's device (`crate::adam8bit_tensors`).

/// Elements per block of one absolute maximum (bitsandbytes' `BLOCKSIZE_2STATE`).
pub const BLOCK: usize = 256;

/// Parameters with fewer elements keep 32-bit moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// The code a partial last block's padding reads for `m` (the kernel loads it as 128).
pub(crate) const PAD_CODE1: usize = 128;

/// Whether the parameter at `path` with `len` elements keeps 8-bit moments: large enough, and
/// not the embedding (transformers' Trainer overrides `nn.Embedding` to 32-bit).
pub fn quantizes(path: &str, len: usize) -> bool {
    let embedding = path == "embed_tokens" || path.ends_with(".embed_tokens");
    len >= MIN_8BIT_SIZE && !embedding
}

/// One parameter's 8-bit moments: a code per element for `m` and `v`, an absolute maximum per
/// block of [`BLOCK`] elements (bitsandbytes' `state1`, `state2`, `absmax1`, `absmax2`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseMoments {
    pub state1: Vec<u8>,
    pub state2: Vec<u8>,
    pub absmax1: Vec<f32>,
    pub absmax2: Vec<f32>,
}

impl BlockwiseMoments {
    /// The moments before the first update: every code 0 and every maximum 0 (zero moments).
    pub fn zeros(len: usize) -> Self {
        let blocks = len.div_ceil(BLOCK);
        Self { state1: vec![0; len], state2: vec![0; len], absmax1: vec![0.0; blocks], absmax2: vec![0.0; blocks] }
    }

    /// Elements of the parameter.
    pub fn len(&self) -> usize {
        self.state1.len()
    }

    /// Whether the parameter has no element.
    pub fn is_empty(&self) -> bool {
        self.state1.is_empty()
    }

    /// Whether the sizes agree with one another and with a parameter of `len` elements.
    pub fn fits(&self, len: usize) -> bool {
        let blocks = len.div_ceil(BLOCK);
        self.state1.len() == len && self.state2.len() == len && self.absmax1.len() == blocks && self.absmax2.len() == blocks
    }
}

/// One update's scalars in f32, as bitsandbytes' kernels receive and derive them.
#[derive(Debug, Clone, Copy)]
pub struct Scalars {
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub lr: f32,
    /// 0 for a parameter without decay.
    pub weight_decay: f32,
    /// `√(1 − β₂ᵗ)`.
    pub correction2: f32,
    /// `−lr·√(1 − β₂ᵗ) / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// The update's count (from 1), from which bitsandbytes' kernels derive the corrections.
    pub step: u64,
}

impl Scalars {
    /// The scalars of update `step` (from 1); the bias corrections are the f32 roundings of
    /// exact powers (the kernels' `powf`).
    pub fn new(beta1: f64, beta2: f64, epsilon: f64, lr: f64, weight_decay: f64, step: u64) -> Self {
        let (beta1, beta2, lr) = (beta1 as f32, beta2 as f32, lr as f32);
        let t = step as f64;
        let correction1 = (1.0 - f64::from(beta1).powf(t)) as f32;
        let correction2 = (1.0 - f64::from(beta2).powf(t)).sqrt() as f32;
        Self {
            beta1,
            beta2,
            epsilon: epsilon as f32,
            lr,
            weight_decay: weight_decay as f32,
            correction2,
            step_size: (-lr * correction2) / correction1,
            step,
        }
    }

    fn decayed(&self, p: f32) -> f32 {
        if self.weight_decay > 0.0 {
            p * (1.0 - self.lr * self.weight_decay)
        } else {
            p
        }
    }
}

use alignment_peft::nf4::{create_dynamic_map, create_unsigned_dynamic_map};
use std::sync::LazyLock;

/// The first moment's codes: bitsandbytes' signed dynamic map.
static SIGNED: LazyLock<CodeSearch> = LazyLock::new(|| CodeSearch::new(create_dynamic_map()));
/// The second moment's codes: bitsandbytes' unsigned dynamic map.
static UNSIGNED: LazyLock<CodeSearch> = LazyLock::new(|| CodeSearch::new(create_unsigned_dynamic_map()));

/// Bits of an f32's order key that pick a bucket of [`CodeSearch`] (sign, exponent, 7 bits of
/// mantissa: 65536 buckets, one byte each, 64 KiB a map).
const BUCKET_SHIFT: u32 = 16;

/// bitsandbytes' nearest-code search (`quantize_2D`, the same codes as
/// `alignment_peft::nf4::nearest_dynamic_code`) without its chain of seven dependent loads.
///
/// That search ends on the even index `2c`, `c` the number of odd-index codes below `x` (at most
/// 127), then takes the neighbour past their midpoint. Here `c` starts from a table: for each
/// bucket of f32 values (by the top bits of an order-preserving key), the number of odd codes
/// below the bucket; the few odd codes inside the bucket are then compared one by one. The
/// benchmark `benches/adam8bit.rs` measures the difference; the test below checks the codes
/// against the binary search.
pub struct CodeSearch {
    code: [f32; 256],
    below_bucket: Vec<u8>,
    /// The most odd codes any bucket holds: the comparisons after the table, made for every
    /// value (without branches) rather than until one fails.
    most_in_a_bucket: usize,
}

impl CodeSearch {
    /// The search over `code`, ascending.
    pub fn new(code: [f32; 256]) -> Self {
        let odd: Vec<u32> = code.iter().skip(1).step_by(2).map(|&c| order_key(c)).collect();
        let below = |key: u64| odd.iter().filter(|&&k| u64::from(k) < key).count();
        let buckets = 1u64 << (32 - BUCKET_SHIFT);
        let below_bucket: Vec<u8> = (0..buckets).map(|b| below(b << BUCKET_SHIFT).min(127) as u8).collect();
        let most_in_a_bucket = (0..buckets).map(|b| below((b + 1) << BUCKET_SHIFT) - below(b << BUCKET_SHIFT)).max().unwrap_or(0);
        Self { code, below_bucket, most_in_a_bucket }
    }

    /// The map's values.
    pub fn code(&self) -> &[f32; 256] {
        &self.code
    }

    /// The code of `x` (NaN: 0), as bitsandbytes' search gives it.
    #[inline]
    pub fn nearest(&self, x: f32) -> u8 {
        if x.is_nan() {
            return 0;
        }
        let mut below = self.below_bucket[(order_key(x) >> BUCKET_SHIFT) as usize] as usize;
        for _ in 0..self.most_in_a_bucket {
            // Past the bucket's codes the comparison fails (they are above every x in it).
            below += usize::from(below < 127 && self.code[2 * below + 1] < x);
        }
        // Then the neighbour past the midpoint, both sides computed and one chosen by arithmetic.
        let p = 2 * below;
        let val = self.code[p];
        let above = x > val;
        let up = above & (x > (self.code[p + 1] + val) * 0.5);
        let down = !above & (p > 0) & (x < (self.code[p.saturating_sub(1)] + val) * 0.5);
        (p + usize::from(up) - usize::from(down)) as u8
    }
}

/// An integer in the order of the f32 values (−0 just below +0).
fn order_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

/// One 8-bit AdamW update of `p` from its (clipped) gradient `g`, in place, moments included
/// (`kOptimizerStatic8bit2StateBlockwise<float, ADAM, 256, 1>`). A non-finite gradient element
/// leaves its parameter as it was and zeroes its moments, as the kernel does.
pub fn update_blockwise(s: &Scalars, p: &mut [f32], g: &[f32], moments: &mut BlockwiseMoments) {
    use rayon::prelude::*;
    assert!(p.len() == g.len() && moments.fits(p.len()), "8-bit AdamW: parameter, gradient and moments differ in size");
    let BlockwiseMoments { state1, state2, absmax1, absmax2 } = moments;
    let maps: (&CodeSearch, &CodeSearch) = (&SIGNED, &UNSIGNED);
    p.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(state1.par_chunks_mut(BLOCK))
        .zip(state2.par_chunks_mut(BLOCK))
        .zip(absmax1.par_iter_mut())
        .zip(absmax2.par_iter_mut())
        .for_each(|(((((p, g), codes1), codes2), absmax1), absmax2)| update_block(s, maps, p, g, codes1, codes2, absmax1, absmax2));
}

/// [`update_blockwise`] of one block (the last may be partial: its padding, gradient 0 and
/// codes 128 and 0, takes part in the new maxima, as the kernel's padded loads do).
#[allow(clippy::too_many_arguments)]
fn update_block(
    s: &Scalars,
    (signed, unsigned): (&CodeSearch, &CodeSearch),
    p: &mut [f32],
    g: &[f32],
    codes1: &mut [u8],
    codes2: &mut [u8],
    absmax1: &mut f32,
    absmax2: &mut f32,
) {
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    let (mut max1, mut max2) = (f32::MIN, f32::MIN);
    for j in 0..BLOCK {
        let (grad, code1, code2) = if j < p.len() { (g[j], codes1[j] as usize, codes2[j] as usize) } else { (0.0, PAD_CODE1, 0) };
        if grad.is_finite() {
            let v_old = unsigned.code[code2] * *absmax2;
            v[j] = v_old * s.beta2 + (1.0 - s.beta2) * grad * grad;
            let m_old = signed.code[code1] * *absmax1;
            m[j] = m_old * s.beta1 + (1.0 - s.beta1) * grad;
        }
        max1 = max1.max(m[j].abs());
        max2 = max2.max(v[j].abs());
    }
    (*absmax1, *absmax2) = (max1, max2);
    for j in 0..p.len() {
        if g[j].is_finite() {
            p[j] = s.decayed(p[j] + s.step_size * (m[j] / (v[j].sqrt() + s.correction2 * s.epsilon)));
        }
        let mut code1 = signed.nearest(m[j] / max1);
        // m keeps its sign: one code further when the nearest has the other.
        if signed.code[code1 as usize].is_sign_negative() != m[j].is_sign_negative() {
            code1 = if m[j] > 0.0 { code1.wrapping_add(1) } else { code1.wrapping_sub(1) };
        }
        codes1[j] = code1;
        codes2[j] = unsigned.nearest(v[j] / max2);
    }
}

/// One AdamW update on f32 moments as bitsandbytes applies it to small parameters and the
/// embedding (`kOptimizer32bit2State<float, ADAM>`), in place.
pub fn update_32bit(s: &Scalars, p: &mut [f32], g: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32]) {
    use rayon::prelude::*;
    assert!(
        p.len() == g.len() && p.len() == exp_avg.len() && p.len() == exp_avg_sq.len(),
        "AdamW: parameter, gradient and moments differ in size"
    );
    p.par_chunks_mut(crate::optimizer::HOST_CHUNK)
        .zip(g.par_chunks(crate::optimizer::HOST_CHUNK))
        .zip(exp_avg.par_chunks_mut(crate::optimizer::HOST_CHUNK))
        .zip(exp_avg_sq.par_chunks_mut(crate::optimizer::HOST_CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                m[i] = m[i] * s.beta1 + ((1.0 - s.beta1) * g[i]);
                v[i] = v[i] * s.beta2 + ((1.0 - s.beta2) * (g[i] * g[i]));
                p[i] = s.decayed(p[i] + (s.step_size * (m[i] / (v[i].sqrt() + (s.epsilon * s.correction2)))));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use alignment_peft::nf4::nearest_dynamic_code;

    /// bitsandbytes' `quantize_2D` (its bracket's ends are the last pivot's neighbours, or the
    /// map's ends, so it finds the code `dQuantize` does: `nearest_dynamic_code`), and
    /// [`CodeSearch`], agree on every code, the values either side of it and of every midpoint,
    /// ±0, ±∞, NaN, values past ±1, and a million values spread over the map's decades.
    #[test]
    fn the_bucketed_search_finds_the_binary_searchs_codes() {
        for (name, code) in [("signed", create_dynamic_map()), ("unsigned", create_unsigned_dynamic_map())] {
            let search = CodeSearch::new(code);
            let mut xs = vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.5, -1.5, f32::MIN_POSITIVE, 1e-30];
            for i in 0..256 {
                let c = code[i];
                xs.extend([c, c.next_up(), c.next_down()]);
                if i > 0 {
                    let mid = (code[i - 1] + c) * 0.5;
                    xs.extend([mid, mid.next_up(), mid.next_down()]);
                }
            }
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..1_000_000 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
                let sign = if state & 1 == 1 { -1.0 } else { 1.0 };
                xs.push(sign * 10f32.powf(-8.0 * unit));
            }
            for x in xs {
                assert_eq!(search.nearest(x), nearest_dynamic_code(&code, x), "{name}: {x:e}");
            }
        }
    }
}
