//! Frozen weights stored block-quantized as backend tensors, dequantized by tensor operations
//! whenever a matmul needs them: QLoRA's 4-bit base, on whatever device the model lives.
//!
//! The layout is bitsandbytes' (filled by `alignment-peft`'s NF4 quantizer): the `[out, in]`
//! values in row-major order, split into blocks of `block_size`; per value a 4-bit index into a
//! 16-entry code book, per block one scale (its absolute maximum). The scales are kept as f32,
//! or themselves quantized ("double quantization"): 8-bit indices into a 256-entry code book,
//! one f32 scale per `nested.block_size` of them, plus an offset.
//!
//! ```text
//! value[i] = code_book[index[i]] · scale[i / block_size]
//! scale[j] = nested.code_book[nested.index[j]] · nested.scale[j / nested.block_size] + offset   (double quantized)
//! ```
//! Each product is one f32 multiplication, as on the host, so the device gives the same bits as
//! `alignment_peft::nf4::dequantize`. Indices are packed eight per integer (the first value in the
//! highest nibble), so they take half a byte per value on a backend with 32-bit integers.
//!
//! The dense weight exists only while the matmul that needs it runs. burn's matmul keeps its
//! operands for the backward pass, so under autodiff a layer's dense weight lives until that
//! layer's backward step: gradient checkpointing (which the trainer turns on for quantized
//! models) bounds that to one layer at a time.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

/// Values per packed integer (4-bit indices).
pub const INDICES_PER_INT: usize = 8;

/// A frozen `[out, in]` weight stored block-quantized (see the module documentation).
#[derive(Module, Debug)]
pub struct QuantizedWeight<B: Backend> {
    /// 4-bit indices, eight per integer, first value in the highest nibble: `[⌈n / 8⌉]`.
    pub packed: Param<Tensor<B, 1, Int>>,
    /// The values the indices stand for, `[16]`.
    pub code_book: Param<Tensor<B, 1>>,
    /// One scale per block, `[⌈n / block_size⌉]`; `[0]` when the scales are double-quantized.
    pub scales: Param<Tensor<B, 1>>,
    /// The double-quantized scales, when they are.
    pub nested: Option<NestedScales<B>>,
    /// `[out, in]`.
    #[module(skip)]
    pub dims: [usize; 2],
    /// Values per scale.
    #[module(skip)]
    pub block_size: usize,
}

/// Block scales quantized to 8 bits (bitsandbytes' `compress_statistics`).
#[derive(Module, Debug)]
pub struct NestedScales<B: Backend> {
    /// One 8-bit index per block scale, `[blocks]`.
    pub indices: Param<Tensor<B, 1, Int>>,
    /// The values the indices stand for, `[256]`.
    pub code_book: Param<Tensor<B, 1>>,
    /// One f32 scale per `block_size` indices.
    pub scales: Param<Tensor<B, 1>>,
    /// Added to every dequantized scale (the mean the scales were centred on).
    #[module(skip)]
    pub offset: f32,
    /// Indices per scale.
    #[module(skip)]
    pub block_size: usize,
}

/// Host values of a quantized weight, in the layout above, to be put on a device.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedParts {
    /// `[out, in]`.
    pub dims: [usize; 2],
    /// Two 4-bit indices per byte, the first in the high nibble (bitsandbytes' packing).
    pub packed_bytes: Vec<u8>,
    /// `[16]`.
    pub code_book: Vec<f32>,
    pub block_size: usize,
    /// The block scales: plain f32, or double-quantized.
    pub scales: ScaleParts,
}

/// Host values of the block scales.
#[derive(Debug, Clone, PartialEq)]
pub enum ScaleParts {
    Plain(Vec<f32>),
    Nested { indices: Vec<u8>, code_book: Vec<f32>, scales: Vec<f32>, offset: f32, block_size: usize },
}

fn frozen<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(false)
}

impl<B: Backend> QuantizedWeight<B> {
    /// Puts `parts` on `device`.
    pub fn from_parts(parts: &QuantizedParts, device: &B::Device) -> Self {
        let ints: Vec<i32> = parts
            .packed_bytes
            .chunks(INDICES_PER_INT / 2)
            .map(|bytes| {
                let mut word = [0u8; 4];
                word[..bytes.len()].copy_from_slice(bytes);
                i32::from_be_bytes(word)
            })
            .collect();
        let n = ints.len();
        let floats = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
        let (scales, nested) = match &parts.scales {
            ScaleParts::Plain(values) => (floats(values), None),
            ScaleParts::Nested { indices, code_book, scales, offset, block_size } => {
                let indices: Vec<i32> = indices.iter().map(|&i| i as i32).collect();
                let len = indices.len();
                let nested = NestedScales {
                    indices: Param::initialized(ParamId::new(), Tensor::from_data(TensorData::new(indices, [len]), device)),
                    code_book: frozen(floats(code_book)),
                    scales: frozen(floats(scales)),
                    offset: *offset,
                    block_size: *block_size,
                };
                (Tensor::zeros([0], device), Some(nested))
            }
        };
        Self {
            packed: Param::initialized(ParamId::new(), Tensor::from_data(TensorData::new(ints, [n]), device)),
            code_book: frozen(floats(&parts.code_book)),
            scales: frozen(scales),
            nested,
            dims: parts.dims,
            block_size: parts.block_size,
        }
    }

    /// The block scales, `[blocks]`.
    pub fn block_scales(&self) -> Tensor<B, 1> {
        match &self.nested {
            None => self.scales.val(),
            Some(nested) => {
                let blocks = nested.indices.dims()[0];
                let values = nested.code_book.val().select(0, nested.indices.val());
                scale_blocks(values, nested.scales.val(), nested.block_size, blocks).add_scalar(nested.offset)
            }
        }
    }

    /// The dense `[out, in]` weight, computed on the weight's device.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [out, inp] = self.dims;
        let n = out * inp;
        let packed = self.packed.val();
        let words = packed.dims()[0];
        let nibbles: Vec<Tensor<B, 1, Int>> = (0..INDICES_PER_INT)
            .map(|k| {
                let shift = (4 * (INDICES_PER_INT - 1 - k)) as i64;
                packed.clone().bitwise_right_shift_scalar(shift.elem()).bitwise_and_scalar(15i64.elem())
            })
            .collect();
        let indices = Tensor::stack::<2>(nibbles, 1).reshape([words * INDICES_PER_INT]).narrow(0, 0, n);
        let values = self.code_book.val().select(0, indices);
        scale_blocks(values, self.block_scales(), self.block_size, n).reshape([out, inp])
    }

    /// Bytes of the quantized format (indices at half a byte, scales as stored), whatever the
    /// backend's integer width.
    pub fn storage_bytes(&self) -> usize {
        let n = self.dims[0] * self.dims[1];
        let scales = match &self.nested {
            None => 4 * self.scales.dims()[0],
            Some(nested) => nested.indices.dims()[0] + 4 * nested.scales.dims()[0] + 4,
        };
        n.div_ceil(2) + scales
    }
}

/// `values[i] · scales[i / block]` for the first `len` values (the last block may be partial).
fn scale_blocks<B: Backend>(values: Tensor<B, 1>, scales: Tensor<B, 1>, block: usize, len: usize) -> Tensor<B, 1> {
    let blocks = len.div_ceil(block);
    let padded = blocks * block;
    let values = if padded > len { Tensor::cat(vec![values, Tensor::zeros([padded - len], &scales.device())], 0) } else { values };
    (values.reshape([blocks, block]) * scales.reshape([blocks, 1])).reshape([padded]).narrow(0, 0, len)
}
