//! The 8-bit AdamW update of [`crate::adam8bit`] as tensor operations, so that on a GPU a
//! parameter, its gradient and its moments stay on the device (the host pass would read each
//! parameter and gradient back and upload the result, a round trip per parameter and step). On
//! libtorch with a GPU, bitsandbytes' own kernels take its place when found (`tch_adam8bit`);
//! where the device is the host, the host pass runs instead (76× faster on the CPU backend:
//! `benches/adam8bit.rs`).
//!
//! The same f32 operations in the same order as the host pass (`update_blockwise`,
//! `update_32bit`), so on the CPU backend the two give the same bits (`tests/adam8bit.rs` runs
//! this form over the kernel goldens too). What the host pass does element by element becomes:
//!
//! - the padding of a partial last block (gradient 0, codes 128 and 0, as the kernel's padded
//!   loads) is concatenated, so every block is a row of a `[blocks, 256]` tensor;
//! - the block maxima are `max_dim` over the rows;
//! - the nearest-code search counts the map's odd codes below each value by seven rounds of a
//!   branchless binary search (a gather and a comparison each), then takes the neighbour past the
//!   midpoint, as `CodeSearch::nearest` does;
//! - m's sign bit (−0 included: `1/m < 0`) decides the kernel's one-code sign fix, and codes wrap
//!   as its `unsigned char` does (an all-zero block's 0/0 codes).
//!
//! The codes are kept as `u8` tensors (2 bytes an element for both moments, as bitsandbytes;
//! on a backend without 8-bit integers, WGSL's, as its default integers: 8 bytes an element);
//! the update runs over chunks of [`CHUNK_BLOCKS`] blocks, so its temporaries (a few f32 and
//! integer tensors the size of the chunk) stay bounded for the largest weights.

use crate::adam8bit::{BlockwiseMoments, Scalars, BLOCK, PAD_CODE1};
use alignment_peft::nf4::{create_dynamic_map, create_unsigned_dynamic_map};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element, Int, IntDType, Tensor, TensorData};
use std::borrow::Cow;

/// Blocks updated by one pass of tensor operations (4 Mi elements).
pub const CHUNK_BLOCKS: usize = 1 << 14;

/// One parameter's 8-bit moments as device tensors: `u8` codes and f32 block maxima.
#[derive(Debug, Clone)]
pub struct TensorMoments<B: Backend> {
    pub state1: Tensor<B, 1, Int>,
    pub state2: Tensor<B, 1, Int>,
    pub absmax1: Tensor<B, 1>,
    pub absmax2: Tensor<B, 1>,
}

impl<B: Backend> TensorMoments<B> {
    /// `moments` on `device`.
    pub fn upload(moments: &BlockwiseMoments, device: &B::Device) -> Self {
        let codes = |c: &[u8]| {
            let wide: Vec<i32> = c.iter().map(|&c| i32::from(c)).collect();
            stored(Tensor::<B, 1, Int>::from_data(TensorData::new(wide, [c.len()]), device), device)
        };
        let floats = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
        Self {
            state1: codes(&moments.state1),
            state2: codes(&moments.state2),
            absmax1: floats(&moments.absmax1),
            absmax2: floats(&moments.absmax2),
        }
    }

    /// The moments on the host (a checkpoint's form).
    pub fn download(&self) -> BlockwiseMoments {
        let codes = |t: &Tensor<B, 1, Int>| -> Vec<u8> {
            t.clone().into_data().convert::<i32>().iter::<i32>().map(|c| u8::try_from(c).expect("a code is a byte")).collect()
        };
        let floats = |t: &Tensor<B, 1>| t.clone().into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
        BlockwiseMoments {
            state1: codes(&self.state1),
            state2: codes(&self.state2),
            absmax1: floats(&self.absmax1),
            absmax2: floats(&self.absmax2),
        }
    }
}

/// Where one parameter's 8-bit moments are: on the host for the host pass (a CPU device), on the
/// parameter's device for the tensor form or bitsandbytes' kernels (a GPU). A checkpoint reads
/// either.
#[derive(Debug, Clone)]
pub enum BlockwiseState<B: Backend> {
    Host(BlockwiseMoments),
    Device(TensorMoments<B>),
}

impl<B: Backend> BlockwiseState<B> {
    /// The moments on the host (copied from the device when they are there).
    pub fn to_host(&self) -> Cow<'_, BlockwiseMoments> {
        match self {
            Self::Host(moments) => Cow::Borrowed(moments),
            Self::Device(moments) => Cow::Owned(moments.download()),
        }
    }

    /// Bytes of the state in bitsandbytes' format: two 8-bit codes a value and two f32 maxima
    /// a block (however the device stores the codes).
    pub fn format_bytes(&self) -> usize {
        let (values, blocks) = match self {
            Self::Host(m) => (m.state1.len(), m.absmax1.len()),
            Self::Device(m) => (m.state1.dims()[0], m.absmax1.dims()[0]),
        };
        2 * values + 2 * 4 * blocks
    }

    /// The moments on the host, moved there when on the device.
    pub fn into_host(self) -> BlockwiseMoments {
        match self {
            Self::Host(moments) => moments,
            Self::Device(moments) => moments.download(),
        }
    }

    /// The moments on `device`, uploaded when on the host.
    pub fn into_device(self, device: &B::Device) -> TensorMoments<B> {
        match self {
            Self::Host(moments) => TensorMoments::upload(&moments, device),
            Self::Device(moments) => moments,
        }
    }
}

/// One quantization map on the device, in the forms the search reads.
#[derive(Debug, Clone)]
pub struct MapTensors<B: Backend> {
    /// The 256 values, ascending.
    code: Tensor<B, 1>,
    /// The 127 odd-index values the search compares with (`code[1], code[3], …, code[253]`).
    odd: Tensor<B, 1>,
    /// 1 where a value's sign bit is set, else 0.
    negative: Tensor<B, 1, Int>,
}

impl<B: Backend> MapTensors<B> {
    /// The 256 values, ascending.
    pub fn code(&self) -> &Tensor<B, 1> {
        &self.code
    }

    /// `code` (ascending) on `device`.
    pub fn new(code: &[f32; 256], device: &B::Device) -> Self {
        let odd: Vec<f32> = code.iter().skip(1).step_by(2).take(127).copied().collect();
        let negative: Vec<i32> = code.iter().map(|c| i32::from(c.is_sign_negative())).collect();
        Self {
            code: Tensor::from_data(TensorData::new(code.to_vec(), [256]), device),
            odd: Tensor::from_data(TensorData::new(odd, [127]), device),
            negative: Tensor::from_data(TensorData::new(negative, [256]), device),
        }
    }
}

/// bitsandbytes' two maps on one device, uploaded once per optimizer.
#[derive(Debug, Clone)]
pub struct CodeTables<B: Backend> {
    /// m's map (signed dynamic).
    pub signed: MapTensors<B>,
    /// v's map (unsigned dynamic).
    pub unsigned: MapTensors<B>,
}

impl<B: Backend> CodeTables<B> {
    /// The maps on `device`.
    pub fn new(device: &B::Device) -> Self {
        Self { signed: MapTensors::new(&create_dynamic_map(), device), unsigned: MapTensors::new(&create_unsigned_dynamic_map(), device) }
    }
}

/// The code of each value of `x` in `map`, as bitsandbytes' search (`quantize_2D`) and
/// `CodeSearch::nearest` give it (NaN: 0).
pub fn nearest_codes<B: Backend>(map: &MapTensors<B>, x: Tensor<B, 1>) -> Tensor<B, 1, Int> {
    // The number of odd codes below x: 127 sorted values, seven halving steps.
    let mut below = x.zeros_like().int();
    for half in [64, 32, 16, 8, 4, 2, 1] {
        let pivot = map.odd.clone().select(0, below.clone().add_scalar(half - 1));
        below = below + pivot.lower(x.clone()).int().mul_scalar(half);
    }
    let even = below.mul_scalar(2);
    let value = map.code.clone().select(0, even.clone());
    let next = map.code.clone().select(0, even.clone().add_scalar(1));
    let previous = map.code.clone().select(0, even.clone().sub_scalar(1).clamp_min(0));
    let above = x.clone().greater(value.clone());
    let up = above.clone().bool_and(x.clone().greater((next + value.clone()).mul_scalar(0.5)));
    let down = above.bool_not().bool_and(even.clone().greater_elem(0)).bool_and(x.lower((previous + value).mul_scalar(0.5)));
    even + up.int() - down.int()
}

/// The backend's default integer type (what `int()` and `from_data` give).
fn default_int<B: Backend>() -> IntDType {
    B::IntElem::dtype().into()
}

/// The type codes are kept in on `device`: `u8` where the backend has it, else its default
/// integers.
fn code_type<B: Backend>(device: &B::Device) -> IntDType {
    if B::supports_dtype(device, DType::U8) {
        IntDType::U8
    } else {
        default_int::<B>()
    }
}

/// Codes (the backend's default integers) in the type they are kept in. Through f32, exact for
/// 0–255: burn's router backend has no integer-to-integer cast.
fn stored<B: Backend>(codes: Tensor<B, 1, Int>, device: &B::Device) -> Tensor<B, 1, Int> {
    codes.float().cast(code_type::<B>(device))
}

/// Kept codes as the backend's default integers, what `select` takes (through f32, as [`stored`]).
fn widened<B: Backend>(codes: Tensor<B, 1, Int>) -> Tensor<B, 1, Int> {
    codes.float().cast(default_int::<B>())
}

/// One 8-bit AdamW update of the flat parameter `p` from its (clipped) gradient `g`: the tensor
/// form of `crate::adam8bit::update_blockwise`. Returns the parameter and its moments.
pub fn update_blockwise<B: Backend>(
    s: &Scalars,
    maps: &CodeTables<B>,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    moments: TensorMoments<B>,
) -> (Tensor<B, 1>, TensorMoments<B>) {
    update_blockwise_in_chunks(s, maps, p, g, moments, CHUNK_BLOCKS)
}

/// [`update_blockwise`] by passes over `chunk_blocks` blocks at a time (the same values for any
/// number: blocks are independent).
pub fn update_blockwise_in_chunks<B: Backend>(
    s: &Scalars,
    maps: &CodeTables<B>,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    moments: TensorMoments<B>,
    chunk_blocks: usize,
) -> (Tensor<B, 1>, TensorMoments<B>) {
    let n = p.dims()[0];
    let chunk = chunk_blocks.max(1) * BLOCK;
    if n <= chunk {
        return update_chunk(s, maps, p, g, moments);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let (first_block, blocks) = (start / BLOCK, len.div_ceil(BLOCK));
        let part = TensorMoments {
            state1: moments.state1.clone().narrow(0, start, len),
            state2: moments.state2.clone().narrow(0, start, len),
            absmax1: moments.absmax1.clone().narrow(0, first_block, blocks),
            absmax2: moments.absmax2.clone().narrow(0, first_block, blocks),
        };
        parts.push(update_chunk(s, maps, p.clone().narrow(0, start, len), g.clone().narrow(0, start, len), part));
    }
    let mut values = Vec::with_capacity(parts.len());
    let (mut state1, mut state2, mut absmax1, mut absmax2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (p, m) in parts {
        values.push(p);
        state1.push(m.state1);
        state2.push(m.state2);
        absmax1.push(m.absmax1);
        absmax2.push(m.absmax2);
    }
    let moments = TensorMoments {
        state1: Tensor::cat(state1, 0),
        state2: Tensor::cat(state2, 0),
        absmax1: Tensor::cat(absmax1, 0),
        absmax2: Tensor::cat(absmax2, 0),
    };
    (Tensor::cat(values, 0), moments)
}

/// [`update_blockwise`] of one run of whole blocks (the last may be partial).
fn update_chunk<B: Backend>(
    s: &Scalars,
    maps: &CodeTables<B>,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    moments: TensorMoments<B>,
) -> (Tensor<B, 1>, TensorMoments<B>) {
    let n = p.dims()[0];
    let blocks = n.div_ceil(BLOCK);
    let (padded, device) = (blocks * BLOCK, p.device());
    let (codes1, codes2) = (widened(moments.state1), widened(moments.state2));
    // The partial last block's padding: gradient 0, codes 128 and 0.
    let (g, codes1, codes2) = match padded - n {
        0 => (g, codes1, codes2),
        pad => (
            Tensor::cat(vec![g, Tensor::zeros([pad], &device)], 0),
            Tensor::cat(vec![codes1, Tensor::<B, 1, Int>::full([pad], PAD_CODE1 as i64, &device)], 0),
            Tensor::cat(vec![codes2, Tensor::<B, 1, Int>::zeros([pad], &device)], 0),
        ),
    };
    let finite = g.clone().is_finite();
    let skipped = finite.clone().bool_not().reshape([blocks, BLOCK]);
    let g = g.mask_fill(finite.clone().bool_not(), 0.0).reshape([blocks, BLOCK]);

    // Dequantize, update the moments (a non-finite gradient's are zeroed), new block maxima.
    let m_old = maps.signed.code.clone().select(0, codes1).reshape([blocks, BLOCK]) * moments.absmax1.reshape([blocks, 1]);
    let v_old = maps.unsigned.code.clone().select(0, codes2).reshape([blocks, BLOCK]) * moments.absmax2.reshape([blocks, 1]);
    let v = (v_old.mul_scalar(s.beta2) + g.clone().mul_scalar(1.0 - s.beta2).mul(g.clone())).mask_fill(skipped.clone(), 0.0);
    let m = (m_old.mul_scalar(s.beta1) + g.mul_scalar(1.0 - s.beta1)).mask_fill(skipped, 0.0);
    let max1 = m.clone().abs().max_dim(1);
    let max2 = v.clone().abs().max_dim(1);

    // The parameter moves by the unquantized moments, then decays; a non-finite gradient's stays.
    let flat = |t: Tensor<B, 2>| t.reshape([padded]).narrow(0, 0, n);
    let (m_flat, v_flat) = (flat(m.clone()), flat(v.clone()));
    let step = (m_flat.clone() / v_flat.sqrt().add_scalar(s.correction2 * s.epsilon)).mul_scalar(s.step_size);
    let moved = p.clone() + step;
    let moved = if s.weight_decay > 0.0 { moved.mul_scalar(1.0 - s.lr * s.weight_decay) } else { moved };
    let p = p.mask_where(finite.narrow(0, 0, n), moved);

    // Quantize: m's code keeps m's sign (one code further when the nearest has the other).
    let code1 = nearest_codes(&maps.signed, flat(m / max1.clone()));
    let code_negative = maps.signed.negative.clone().select(0, code1.clone()).equal_elem(1);
    let m_negative = m_flat.clone().recip().lower_elem(0.0);
    let direction = m_flat.greater_elem(0.0).int().mul_scalar(2).sub_scalar(1);
    let code1 = code1 + code_negative.not_equal(m_negative).int() * direction;
    // As the kernel's `unsigned char`: −1 is 255, 256 is 0.
    let code1 = code1.clone() + code1.clone().lower_elem(0).int().mul_scalar(256) - code1.greater_elem(255).int().mul_scalar(256);
    let code2 = nearest_codes(&maps.unsigned, flat(v / max2.clone()));
    let moments = TensorMoments {
        state1: stored(code1, &device),
        state2: stored(code2, &device),
        absmax1: max1.reshape([blocks]),
        absmax2: max2.reshape([blocks]),
    };
    (p, moments)
}

/// One AdamW update on f32 moments as bitsandbytes applies it to small parameters and the
/// embedding: the tensor form of `crate::adam8bit::update_32bit`. Returns the parameter and its
/// moments.
pub fn update_32bit<B: Backend>(
    s: &Scalars,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let m = exp_avg.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = exp_avg_sq.mul_scalar(s.beta2) + g.clone().mul(g).mul_scalar(1.0 - s.beta2);
    let moved = p + (m.clone() / v.clone().sqrt().add_scalar(s.epsilon * s.correction2)).mul_scalar(s.step_size);
    let p = if s.weight_decay > 0.0 { moved.mul_scalar(1.0 - s.lr * s.weight_decay) } else { moved };
    (p, m, v)
}

/// On libtorch's CPU kernels (scripts/test_backends.sh), the operations a GPU runs: torch's
/// CPU `sqrt` (MKL's vector library) is not correctly rounded, one value in ~150 an ulp off, so
/// the form is held to the bounds bitsandbytes' own kernels are (`scripts/gpu/check_adam8bit.py`)
/// against the host pass: parameters within 5 % of the learning rate, block maxima within 1e-3
/// relative, at most 1 % of the codes different and none by more than one code.
#[cfg(all(test, feature = "tch"))]
mod tests {
    use super::*;
    use crate::adam8bit::update_blockwise as host_update;

    #[test]
    fn tch_tensor_form_follows_the_host_pass() {
        type Torch = burn::backend::LibTorch<f32>;
        let device = Default::default();
        let maps = CodeTables::<Torch>::new(&device);
        // Three chunks of 3 blocks, the last with a partial block.
        let (chunk_blocks, lr) = (3, 1e-3f32);
        let n = 2 * chunk_blocks * BLOCK + 100;
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut p_host: Vec<f32> = (0..n).map(|_| random()).collect();
        let mut p = Tensor::<Torch, 1>::from_data(TensorData::new(p_host.clone(), [n]), &device);
        let mut host_moments = BlockwiseMoments::zeros(n);
        let mut moments = TensorMoments::<Torch>::upload(&host_moments, &device);
        for t in 1..=4u64 {
            let mut g: Vec<f32> = (0..n).map(|_| random() * 1e-2).collect();
            g[BLOCK..2 * BLOCK].fill(0.0);
            g[7] = f32::NAN;
            g[n - 3] = f32::INFINITY;
            let s = Scalars::new(0.9, 0.999, 1e-8, f64::from(lr), 0.01, t);
            host_update(&s, &mut p_host, &g, &mut host_moments);
            let g = Tensor::from_data(TensorData::new(g, [n]), &device);
            (p, moments) = update_blockwise_in_chunks(&s, &maps, p, g, moments, chunk_blocks);
            let values = p.clone().into_data().convert::<f32>().into_vec::<f32>().unwrap();
            let worst = values.iter().zip(&p_host).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 0.05 * lr, "step {t}: parameters {worst:e} apart");
            let got = moments.download();
            for (name, got, want) in [("m", &got.state1, &host_moments.state1), ("v", &got.state2, &host_moments.state2)] {
                let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
                let far = got.iter().zip(want).filter(|(a, b)| a.abs_diff(**b) > 1).count();
                assert!(differing * 100 <= n && far == 0, "step {t}: {name}'s codes: {differing} of {n} differ, {far} by more than one");
            }
            for (name, got, want) in [("m", &got.absmax1, &host_moments.absmax1), ("v", &got.absmax2, &host_moments.absmax2)] {
                let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs() / b.abs().max(f32::MIN_POSITIVE)).fold(0f32, f32::max);
                assert!(worst <= 1e-3, "step {t}: {name}'s maxima {worst:e} relative");
            }
        }
    }
}
