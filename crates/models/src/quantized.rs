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
//! `alignment_peft::nf4::dequantize`. Indices are packed into 32-bit integer tensors whatever the
//! backend's default integer width (64 bits on libtorch and ndarray): eight 4-bit indices per
//! word, the first in the highest nibble, so they take half a byte per value on every backend;
//! the 8-bit scale indices four per word, so they take one byte each. The dequantization reads
//! the packed indices a byte at a time: one look-up in a 256-row table of the two values a byte
//! stands for gives both (half the unpacking passes of a look-up per index).
//!
//! The dense weight exists only while the matmul that needs it runs. Under mixed precision the
//! product is one recorded step that dequantizes again in its backward pass
//! ([`crate::quantized_product`], as bitsandbytes does), so no dense weight outlives its product.
//! In f32, burn's matmul keeps its operands for the backward pass, so a layer's dense weights
//! live until that layer's backward step: gradient checkpointing (which the trainer turns on for
//! quantized models) bounds that to one layer at a time.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, FloatDType, Int, Tensor, TensorData};

/// Bits of the integers indices are packed into: 32 on every backend (an explicit dtype, not
/// the device's default integer type, which is 64 bits on libtorch and ndarray).
const WORD_BITS: usize = 32;

/// Values per run of rows when the tensor operations dequantize into a narrower type
/// ([`QuantizedWeight::dequantize_by_tensor_ops_as`]): 2²³, ≈ 80 MB of f32 temporaries.
const DEQUANTIZE_RUN_VALUES: usize = 1 << 23;

/// A frozen `[out, in]` weight stored block-quantized (see the module documentation).
#[derive(Module, Debug)]
pub struct QuantizedWeight<B: Backend> {
    /// 4-bit indices, eight per 32-bit integer, first value in the highest nibble: `[⌈n / 8⌉]`.
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
    /// 8-bit indices, one per block scale, four per 32-bit integer, first in the highest byte:
    /// `[⌈blocks / 4⌉]`.
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
    /// Block scales (`indices` holds four per integer, the last word perhaps partly).
    #[module(skip)]
    pub blocks: usize,
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
        let floats = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
        let (scales, nested) = match &parts.scales {
            ScaleParts::Plain(values) => (floats(values), None),
            ScaleParts::Nested { indices, code_book, scales, offset, block_size } => {
                let nested = NestedScales {
                    indices: Param::initialized(ParamId::new(), words(indices, device)),
                    code_book: frozen(floats(code_book)),
                    scales: frozen(floats(scales)),
                    offset: *offset,
                    block_size: *block_size,
                    blocks: indices.len(),
                };
                (Tensor::zeros([0], device), Some(nested))
            }
        };
        Self {
            packed: Param::initialized(ParamId::new(), words(&parts.packed_bytes, device)),
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
                let indices = unpack(nested.indices.val(), 8, nested.blocks);
                let values = nested.code_book.val().select(0, indices);
                scale_blocks(values, nested.scales.val(), nested.block_size, nested.blocks).add_scalar(nested.offset)
            }
        }
    }

    /// The dense `[out, in]` weight in the backend's float type, computed on the weight's
    /// device: by one kernel on burn's GPU backends ([`crate::nf4_kernel`]), by one threaded
    /// pass on the CPU backend ([`crate::cpu_nf4`]), by four torch kernels a run of rows on
    /// libtorch ([`crate::tch_nf4`]), else by [`Self::dequantize_by_tensor_ops`]; the same bits
    /// either way.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        self.dequantize_as(alignment_core::precision::float_type::<B>())
    }

    /// [`Self::dequantize`] in `dtype`: the values rounded to it once (as a cast of the f32
    /// weight rounds them), written directly in it by the GPU kernel or torch's kernels, so that
    /// a mixed-precision product never holds the f32 weight; elsewhere by the tensor operations,
    /// a run of rows at a time ([`Self::dequantize_by_tensor_ops_as`]).
    pub fn dequantize_as(&self, dtype: FloatDType) -> Tensor<B, 2> {
        match self.dequantize_by_kernel(dtype) {
            Some(weight) => weight,
            None => self.dequantize_by_tensor_ops_as(dtype, run_values()),
        }
    }

    /// [`Self::dequantize_by_tensor_ops`] cast to `dtype`. When `dtype` is narrower than the
    /// backend's float type (mixed precision on libtorch, where no kernel of ours runs), by runs
    /// of whole rows of at most `run_values` values, each computed in f32 and cast before the
    /// next: the f32 temporaries (unpacked bytes, looked-up and scaled values, ≈ 10 bytes a
    /// value) then exist for one run instead of the whole weight — 0.55 GB for a Mistral-7B MLP
    /// weight, ≈ 80 MB in runs of 2²³ values. The same bits as casting the whole weight: each
    /// value is the same f32 product, rounded once. One run where rows do not start on a packed
    /// word and a block of scales (`in_features` not a multiple of both), or `dtype` is not
    /// narrower.
    pub fn dequantize_by_tensor_ops_as(&self, dtype: FloatDType, run_values: usize) -> Tensor<B, 2> {
        let [out, inp] = self.dims;
        let narrower = DType::from(dtype).size() < DType::from(alignment_core::precision::float_type::<B>()).size();
        let values_per_word = WORD_BITS / 4;
        let aligned = inp.is_multiple_of(values_per_word) && inp.is_multiple_of(self.block_size);
        let rows_per_run = (run_values / inp.max(1)).max(1);
        if !narrower || !aligned || rows_per_run >= out {
            return alignment_core::precision::cast_to(self.dequantize_by_tensor_ops(), dtype);
        }
        let (table, scales) = (byte_table(self.code_book.val()), self.block_scales());
        let runs = (0..out)
            .step_by(rows_per_run)
            .map(|first| {
                let rows = rows_per_run.min(out - first);
                let values = self.values_by_tensor_ops(first * inp, rows * inp, table.clone(), scales.clone());
                alignment_core::precision::cast_to(values.reshape([rows, inp]), dtype)
            })
            .collect();
        Tensor::cat(runs, 0)
    }

    /// The dense weight in `dtype` by the GPU kernel ([`crate::nf4_kernel`]) where `B` is one of
    /// burn's CubeCL backends this crate is built with (`cuda`, `wgpu`), by the CPU's threaded
    /// pass ([`crate::cpu_nf4`]) in f32 where `B` is the CPU backend, or by four torch kernels a
    /// run of rows ([`crate::tch_nf4`]) where `B` is a libtorch backend and the rows are
    /// aligned; under autodiff too (the result is not tracked, the weight being frozen). `None`
    /// elsewhere.
    pub fn dequantize_by_kernel(&self, dtype: FloatDType) -> Option<Tensor<B, 2>> {
        #[cfg(feature = "tch")]
        if let Some(weight) = crate::tch_nf4::dequantize(self, dtype, run_values()) {
            return Some(weight);
        }
        #[cfg(feature = "ndarray")]
        if let Some(weight) = crate::cpu_nf4::dequantize(self, dtype) {
            return Some(weight);
        }
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        return crate::nf4_kernel::dequantize(self, dtype);
        #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
        {
            let _ = dtype;
            None
        }
    }

    /// The dense `[out, in]` weight by backend tensor operations, which every backend has (the
    /// reference the GPU kernel is checked against).
    pub fn dequantize_by_tensor_ops(&self) -> Tensor<B, 2> {
        let [out, inp] = self.dims;
        self.values_by_tensor_ops(0, out * inp, byte_table(self.code_book.val()), self.block_scales()).reshape([out, inp])
    }

    /// Values `start..start + len` (in row-major order) by tensor operations, `start` on a packed
    /// word and a block of `scales` (the block scales, [`Self::block_scales`]); `table` is
    /// [`byte_table`] of the code book.
    fn values_by_tensor_ops(&self, start: usize, len: usize, table: Tensor<B, 2>, scales: Tensor<B, 1>) -> Tensor<B, 1> {
        let values_per_word = WORD_BITS / 4;
        debug_assert!(start.is_multiple_of(values_per_word) && start.is_multiple_of(self.block_size), "a run starts on a word and a block");
        let words = self.packed.val().narrow(0, start / values_per_word, len.div_ceil(values_per_word));
        // Two indices per byte, both looked up at once: half the unpacking passes of a
        // nibble at a time, and one gathered index per two values.
        let pairs = len.div_ceil(2);
        let bytes = unpack(words, 8, pairs);
        let values = table.select(0, bytes).reshape([2 * pairs]).narrow(0, 0, len);
        let scales = scales.narrow(0, start / self.block_size, len.div_ceil(self.block_size));
        scale_blocks(values, scales, self.block_size, len)
    }

    /// Bytes of the quantized format (indices at half a byte, scales as stored), whatever the
    /// backend's integer width.
    pub fn storage_bytes(&self) -> usize {
        let n = self.dims[0] * self.dims[1];
        let scales = match &self.nested {
            None => 4 * self.scales.dims()[0],
            Some(nested) => nested.blocks + 4 * nested.scales.dims()[0] + 4,
        };
        n.div_ceil(2) + scales
    }

    /// Bytes the weight's tensors occupy on the device, at their element types: what
    /// [`QuantizedWeight::storage_bytes`] says, plus the code books and at most three bytes of
    /// padding per packed tensor.
    pub fn device_bytes(&self) -> usize {
        fn bytes<B: Backend, K: burn::tensor::BasicOps<B>>(t: &Tensor<B, 1, K>) -> usize {
            t.dims()[0] * t.dtype().size()
        }
        let nested = self.nested.as_ref().map_or(0, |n| bytes(&n.indices.val()) + bytes(&n.code_book.val()) + bytes(&n.scales.val()));
        bytes(&self.packed.val()) + bytes(&self.code_book.val()) + bytes(&self.scales.val()) + nested
    }
}

/// `bytes` as big-endian 32-bit integers on `device` (the last one zero-padded), an `I32` tensor
/// whatever the device's default integer type.
fn words<B: Backend>(bytes: &[u8], device: &B::Device) -> Tensor<B, 1, Int> {
    let words: Vec<i32> = bytes
        .chunks(WORD_BITS / 8)
        .map(|chunk| {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            i32::from_be_bytes(word)
        })
        .collect();
    let len = words.len();
    Tensor::from_data(TensorData::new(words, [len]), (device, DType::I32))
}

/// Values per run of rows, [`DEQUANTIZE_RUN_VALUES`]; the whole weight at once under
/// `ALIGNMENT_DEQUANTIZE_RUNS=0`, to measure what the runs save.
fn run_values() -> usize {
    static RUNS: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_DEQUANTIZE_RUNS");
    if RUNS.is_on() {
        DEQUANTIZE_RUN_VALUES
    } else {
        usize::MAX
    }
}

/// The code book's values for every byte of two packed indices, `[256, 2]`: the high nibble's
/// value, then the low nibble's.
pub(crate) fn byte_table<B: Backend>(code_book: Tensor<B, 1>) -> Tensor<B, 2> {
    let bytes = Tensor::<B, 1, Int>::arange(0..256, &code_book.device());
    let high = bytes.clone().bitwise_right_shift_scalar(4i64.elem());
    let low = bytes.bitwise_and_scalar(15i64.elem());
    Tensor::stack::<2>(vec![code_book.clone().select(0, high), code_book.select(0, low)], 1)
}

/// The first `len` `bits`-wide fields of `words` (32-bit, the first field in the highest bits),
/// as integers of the words' type.
fn unpack<B: Backend>(words: Tensor<B, 1, Int>, bits: usize, len: usize) -> Tensor<B, 1, Int> {
    let per_word = WORD_BITS / bits;
    let count = words.dims()[0];
    let mask = (1i64 << bits) - 1;
    // Arithmetic right shifts of a word whose top bit is set bring in ones; the mask drops them.
    let fields: Vec<Tensor<B, 1, Int>> = (0..per_word)
        .map(|k| {
            let shift = (bits * (per_word - 1 - k)) as i64;
            words.clone().bitwise_right_shift_scalar(shift.elem()).bitwise_and_scalar(mask.elem())
        })
        .collect();
    Tensor::stack::<2>(fields, 1).reshape([count * per_word]).narrow(0, 0, len)
}

/// `values[i] · scales[i / block]` for the first `len` values (the last block may be partial).
fn scale_blocks<B: Backend>(values: Tensor<B, 1>, scales: Tensor<B, 1>, block: usize, len: usize) -> Tensor<B, 1> {
    let blocks = len.div_ceil(block);
    let padded = blocks * block;
    let values = if padded > len { Tensor::cat(vec![values, Tensor::zeros([padded - len], &scales.device())], 0) } else { values };
    (values.reshape([blocks, block]) * scales.reshape([blocks, 1])).reshape([padded]).narrow(0, 0, len)
}

#[cfg(all(test, any(feature = "ndarray", feature = "tch")))]
pub(crate) mod tests {
    use super::*;

    /// Parts of `len` values with every 4-bit and 8-bit index pattern (high nibbles and bytes
    /// included, whose words are negative as `i32`), a last block and word left partial.
    fn parts(len: usize, nested: bool) -> QuantizedParts {
        parts_in_blocks(len, nested, 64)
    }

    /// [`parts`] with `block_size` values per scale.
    pub(crate) fn parts_in_blocks(len: usize, nested: bool, block_size: usize) -> QuantizedParts {
        let blocks = len.div_ceil(block_size);
        let packed_bytes = (0..len.div_ceil(2)).map(|i| (i * 37 + 11) as u8).collect();
        let code_book = (0..16).map(|i| (i as f32 - 7.5) / 7.5).collect();
        let scales = if nested {
            let indices = (0..blocks).map(|j| (j * 97 + 200) as u8).collect();
            let code_book = (0..256).map(|i| i as f32 / 300.0).collect();
            let scales = (0..blocks.div_ceil(5)).map(|j| 1.0 + j as f32 * 0.25).collect();
            ScaleParts::Nested { indices, code_book, scales, offset: 0.125, block_size: 5 }
        } else {
            ScaleParts::Plain((0..blocks).map(|j| 0.5 + j as f32 / 8.0).collect())
        };
        QuantizedParts { dims: [1, len], packed_bytes, code_book, block_size, scales }
    }

    /// The layout's formula (module documentation), evaluated on the host.
    fn expected(parts: &QuantizedParts) -> Vec<f32> {
        let n = parts.dims[0] * parts.dims[1];
        let scale = |j: usize| match &parts.scales {
            ScaleParts::Plain(s) => s[j],
            ScaleParts::Nested { indices, code_book, scales, offset, block_size } => {
                code_book[indices[j] as usize] * scales[j / block_size] + offset
            }
        };
        (0..n)
            .map(|i| {
                let byte = parts.packed_bytes[i / 2];
                let index = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                parts.code_book[index as usize] * scale(i / parts.block_size)
            })
            .collect()
    }

    /// Returns the device bytes of the largest weight checked.
    fn dequantizes_the_layout_in_half_a_byte_per_index<B: Backend>(device: &B::Device) -> usize {
        let mut largest = 0;
        for (len, nested) in [(64 * 300 + 37, true), (64 * 300 + 37, false), (8 * 5 + 3, true), (64 * 257, true), (1, false)] {
            let parts = parts(len, nested);
            let weight = QuantizedWeight::<B>::from_parts(&parts, device);
            // The backend's own route (a kernel or a threaded pass where it has one) and the
            // tensor operations every backend has.
            for (route, dense) in [("dequantize", weight.dequantize()), ("tensor operations", weight.dequantize_by_tensor_ops())] {
                let values = dense.into_data().convert::<f32>().into_vec::<f32>().unwrap();
                let differing = values.iter().zip(expected(&parts)).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differing, 0, "len {len}, nested {nested}, {route}: values differing from the layout's formula");
            }
            // Indices at half a byte, scale indices at one byte, whatever the backend's integers;
            // beyond the format's own bytes only the code books and a word's padding per packed tensor.
            let code_books = 16 * 4 + if nested { 256 * 4 } else { 0 };
            let (device_bytes, format_bytes) = (weight.device_bytes(), weight.storage_bytes());
            assert!(
                device_bytes + 4 >= format_bytes + code_books && device_bytes <= format_bytes + code_books + 2 * 3,
                "len {len}, nested {nested}: {device_bytes} bytes on the device for a {format_bytes}-byte format"
            );
            largest = largest.max(device_bytes);
        }
        largest
    }

    /// ndarray's integers are 64-bit: the packed words are still 32-bit.
    #[cfg(feature = "ndarray")]
    #[test]
    fn dequantization_follows_the_layout_at_half_a_byte_per_index() {
        assert!(dequantizes_the_layout_in_half_a_byte_per_index::<burn::backend::NdArray<f32>>(&Default::default()) > 10_000);
    }

    /// The CPU backend's threaded pass takes f32 on `NdArray<f32>` and under its autodiff (giving
    /// an untracked weight), the layout's bits; other types go to the tensor operations.
    #[cfg(feature = "ndarray")]
    #[test]
    fn the_cpu_pass_dequantizes_under_autodiff_in_f32_only() {
        type Train = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
        // Blocks starting on a word (bitsandbytes' 64) and blocks starting mid-word (20, 7).
        for (nested, block_size) in [(true, 64), (false, 64), (true, 20), (false, 7)] {
            let parts = parts_in_blocks(64 * 40 + 5, nested, block_size);
            let weight = QuantizedWeight::<Train>::from_parts(&parts, &Default::default());
            let dense = weight.dequantize_by_kernel(FloatDType::F32).expect("the CPU pass");
            assert!(!dense.is_require_grad(), "a frozen weight");
            let values = dense.into_data().into_vec::<f32>().unwrap();
            assert!(
                values.iter().zip(expected(&parts)).all(|(a, b)| a.to_bits() == b.to_bits()),
                "nested {nested}, blocks of {block_size}"
            );
            assert!(weight.dequantize_by_kernel(FloatDType::BF16).is_none(), "bf16 is left to the tensor operations");
        }
    }

    /// Dequantizing into bf16 by runs of rows gives the bits of casting the whole weight, with
    /// runs ending mid-weight and a last run shorter, for plain and double-quantized scales; rows
    /// that do not start on a word and a block go in one run, with the same bits.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_dequantizing_by_runs_of_rows_gives_the_whole_weights_bits() {
        type B = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        for (nested, rows, inp, block_size) in [(true, 37, 128, 64), (false, 37, 128, 64), (true, 9, 40, 20), (false, 5, 100, 64)] {
            let mut parts = parts_in_blocks(rows * inp, nested, block_size);
            parts.dims = [rows, inp];
            let weight = QuantizedWeight::<B>::from_parts(&parts, &device);
            let whole = weight.dequantize_by_tensor_ops().cast(FloatDType::BF16).into_data();
            for run_values in [inp, 5 * inp + 3, rows * inp, usize::MAX / 2] {
                let by_runs = weight.dequantize_by_tensor_ops_as(FloatDType::BF16, run_values);
                assert_eq!(by_runs.dims(), [rows, inp]);
                by_runs.into_data().assert_eq(&whole, true);
            }
        }
    }

    /// libtorch's integers are 64-bit (`Int64`): the words are `Int32` tensors, and torch's
    /// `index_select` takes their 32-bit indices.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_dequantization_follows_the_layout_at_half_a_byte_per_index() {
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert!(dequantizes_the_layout_in_half_a_byte_per_index::<burn::backend::LibTorch<f32>>(&device) > 10_000);
    }
}
