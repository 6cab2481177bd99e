//! QLoRA's 4-bit base dequantized on the CPU backend (burn-ndarray) in one threaded pass: the
//! CPU's counterpart of `nf4_kernel.rs`.
//!
//! The tensor operations ([`QuantizedWeight::dequantize_by_tensor_ops`]) look each packed byte
//! up in a `[256, 2]` table with `select`. burn-ndarray 0.21 runs a `select` on a 2-D array as
//! ndarray's, which builds one sub-view per index (each with its own heap-allocated shape) and
//! concatenates them: ≈ 85–120 ns per value measured (docs/performance.md), about 9–13 s to
//! dequantize SmolLM2-135M's 106 M quantized values once, twice a checkpointed training step.
//! Here each thread takes whole blocks of values and writes
//!
//! ```text
//! value[i] = code_book[(word[i / 8] >> 4·(7 − i mod 8)) & 15] · scale[i / block_size]
//! ```
//! reading its block's scale once and each word where it lies. The product is the tensor
//! operations' one f32 multiplication, so the bits are the same. The block scales (one per 64
//! values, double-quantized or not) are still computed by tensor operations
//! ([`QuantizedWeight::block_scales`]), a 1-D `select` that ndarray runs as a plain gather.
//!
//! Only for `NdArray<f32>` and its autodiff (the weight is frozen, so the result is not
//! tracked), in f32; every other backend, type or storage gets `None`.

use crate::quantized::QuantizedWeight;
use alignment_core::cpu_storage::{f32_values, float_storage, from_float_storage, int_storage};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::{backend::Backend, FloatDType, Tensor};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// Values per task, rounded down to whole blocks: large enough to amortise scheduling, small
/// enough to balance the cores.
const CHUNK: usize = 1 << 16;

/// Entries of the 4-bit code book.
const CODES: usize = 16;

/// The `n` values of the layout (module documentation): `words` holds eight 4-bit indices per
/// integer, the first in the highest nibble; one scale per `block` values.
fn dequantize_values(words: &[i32], code_book: &[f32; CODES], scales: &[f32], block: usize, n: usize) -> Vec<f32> {
    let per_task = (CHUNK / block).max(1) * block;
    let mut values = vec![0f32; n];
    values.par_chunks_mut(per_task).enumerate().for_each(|(task, values)| {
        let first_block = task * per_task / block;
        for (b, values) in values.chunks_mut(block).enumerate() {
            let (start, scale) = ((first_block + b) * block, scales[first_block + b]);
            // An arithmetic shift of a negative word brings in ones; the mask drops them.
            let value = |word: i32, k: usize| code_book[((word >> (28 - 4 * k)) & 15) as usize] * scale;
            if start % 8 == 0 {
                // The block starts on a word (always, for blocks of a multiple of 8 values):
                // a word at a time, its eight values unrolled.
                let whole = values.len() / 8 * 8;
                let (eights, rest) = values.split_at_mut(whole);
                for (eight, &word) in eights.chunks_exact_mut(8).zip(&words[start / 8..]) {
                    for (k, v) in eight.iter_mut().enumerate() {
                        *v = value(word, k);
                    }
                }
                for (k, v) in rest.iter_mut().enumerate() {
                    *v = value(words[(start + whole) / 8], k);
                }
            } else {
                for (k, v) in values.iter_mut().enumerate() {
                    let i = start + k;
                    *v = value(words[i / 8], i % 8);
                }
            }
        }
    });
    values
}

/// [`QuantizedWeight::dequantize_by_tensor_ops`]'s values by one threaded pass, where `B` is the
/// CPU backend or its autodiff and `dtype` is f32; `None` otherwise.
pub(crate) fn dequantize<B: Backend>(weight: &QuantizedWeight<B>, dtype: FloatDType) -> Option<Tensor<B, 2>> {
    if dtype != FloatDType::F32 || weight.block_size == 0 {
        return None;
    }
    let [out, inp] = weight.dims;
    let n = out * inp;
    let words = int_storage(weight.packed.val())?;
    let NdArrayTensor::I32(words) = &words else { return None };
    let words = words.view();
    let words = words.as_slice()?;
    let (code_book, scales) = (float_storage(weight.code_book.val())?, float_storage(weight.block_scales())?);
    let code_book: [f32; CODES] = f32_values(&code_book)?.as_slice()?.try_into().ok()?;
    let scales = f32_values(&scales)?;
    let scales = scales.as_slice()?;
    if words.len() < n.div_ceil(8) || scales.len() < n.div_ceil(weight.block_size) {
        return None;
    }
    let values = dequantize_values(words, &code_book, scales, weight.block_size, n);
    let array = ArrayD::from_shape_vec(IxDyn(&[out, inp]), values).expect("one value per element");
    Some(from_float_storage(NdArrayTensor::from(array.into_shared())))
}
