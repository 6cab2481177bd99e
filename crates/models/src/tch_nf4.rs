//! QLoRA's 4-bit base dequantized on the libtorch backends by four torch kernels a run of rows,
//! writing the dense weight in its final type: the libtorch counterpart of `nf4_kernel.rs`
//! (which needs CubeCL) and `cpu_nf4.rs` (which needs burn-ndarray).
//!
//! burn's tensor operations ([`QuantizedWeight::dequantize_by_tensor_ops_as`]) unpack each
//! 32-bit word into its four bytes by a shift and a mask per byte, stack them, look them up,
//! scale, cast and concatenate the runs: ≈ 36 bytes of memory traffic a value. Here a run is
//!
//! ```text
//! bytes  = words viewed as bytes, each word's four reversed (its first byte is its highest)    1 B a value
//! index  = bytes as int32                                                                      2.5
//! pairs  = table.index_select(0, index)          [256, 2] table: both values a byte stands for  6
//! out[rows] = pairs · scale[block]               written in the weight's final type (`out=`)    6 (bf16 out)
//! ```
//!
//! ≈ 15.5 bytes a value into bf16, no temporary of the whole weight and no concatenation: each
//! run's product is written into its rows of the result. The product is the same f32
//! multiplication as the tensor operations', rounded once to the result's type as it is
//! written, so the bits are the same.
//!
//! Only where the rows start on a packed word and a block of scales (`in` a multiple of 8 and
//! of the block size: bitsandbytes' 64 and every model's widths) and the result is not wider
//! than the code book's type (f32 as stored); other weights get `None` and go to the tensor operations.
//! `ALIGNMENT_DEQUANTIZE_BY_TORCH=0` sends every weight there, to measure what this saves.

use crate::quantized::{byte_table, QuantizedWeight};
use alignment_core::torch_storage::{float_storage, from_float_storage, int_storage, kind_of};
use burn::backend::libtorch::TchTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
use tch::Kind;

/// Indices packed per 32-bit word, and bytes per word.
const VALUES_PER_WORD: usize = 8;
const BYTES_PER_WORD: i64 = 4;

/// The dense `[out, in]` weight in `dtype`, dequantized in runs of at most `run_values` values
/// (whole rows), when `B` is a libtorch backend (or its autodiff: the result is untracked, the
/// weight being frozen) and the weight's rows are aligned; `None` otherwise.
pub(crate) fn dequantize<B: Backend>(weight: &QuantizedWeight<B>, dtype: FloatDType, run_values: usize) -> Option<Tensor<B, 2>> {
    static BY_TORCH: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_DEQUANTIZE_BY_TORCH");
    let [out, inp] = weight.dims;
    let block = weight.block_size;
    if !alignment_core::torch_storage::is_libtorch::<B>()
        || !BY_TORCH.is_on()
        || out * inp == 0
        || !inp.is_multiple_of(VALUES_PER_WORD)
        || !inp.is_multiple_of(block)
    {
        return None;
    }
    let table = byte_table(weight.code_book.val());
    // The products are computed in the code book's type (f32 as stored, whatever the backend's
    // float type): a result wider than that would not hold the tensor operations' values.
    if DType::from(dtype).size() > table.dtype().size() {
        return None;
    }
    let words = int_storage(weight.packed.val())?.tensor;
    let table = float_storage(table)?.tensor;
    let scales = float_storage(weight.block_scales())?.tensor;
    let result = tch::Tensor::empty([out as i64, inp as i64], (kind_of(dtype), words.device()));
    let rows_per_run = (run_values / inp).clamp(1, out);
    for first in (0..out).step_by(rows_per_run) {
        let rows = rows_per_run.min(out - first);
        let (start, len) = (first * inp, rows * inp);
        let bytes = words.narrow(0, (start / VALUES_PER_WORD) as i64, (len / VALUES_PER_WORD) as i64).view_dtype(Kind::Uint8);
        // Words were made from big-endian bytes (`quantized::words`): in a little-endian
        // device's memory the first byte of each word is its last.
        let bytes = if cfg!(target_endian = "little") { bytes.view([-1, BYTES_PER_WORD]).flip([1]) } else { bytes };
        let index = bytes.reshape([-1]).to_kind(Kind::Int);
        let blocks = (len / block) as i64;
        let pairs = table.index_select(0, &index).view([blocks, block as i64]);
        let run_scales = scales.narrow(0, (start / block) as i64, blocks).view([blocks, 1]);
        let target = result.narrow(0, first as i64, rows as i64).view([blocks, block as i64]);
        // One f32 (or the backend's type) product per value, rounded once into `dtype`.
        let _ = pairs.mul_out(&target, &run_scales);
    }
    Some(from_float_storage::<B, 2>(TchTensor::new(result)))
}

#[cfg(test)]
mod tests {
    use crate::quantized::tests::parts_in_blocks;
    use crate::quantized::QuantizedWeight;
    use burn::backend::libtorch::{LibTorch, LibTorchDevice};
    use burn::backend::Autodiff;
    use burn::tensor::FloatDType;

    /// torch's kernels give the tensor operations' bits, in f32 and bf16, for plain and
    /// double-quantized scales, in one run and in runs ending mid-weight with a shorter last one;
    /// under autodiff the weight is untracked; rows not starting on a word and a block are left
    /// to the tensor operations.
    #[test]
    fn torchs_kernels_give_the_tensor_operations_bits() {
        type Train = Autodiff<LibTorch<f32>>;
        let device = LibTorchDevice::Cpu;
        for (nested, rows, inp, block_size) in [(true, 37, 128, 64), (false, 37, 128, 64), (true, 6, 64, 32), (false, 3, 8, 8)] {
            let mut parts = parts_in_blocks(rows * inp, nested, block_size);
            parts.dims = [rows, inp];
            let weight = QuantizedWeight::<Train>::from_parts(&parts, &device);
            for dtype in [FloatDType::F32, FloatDType::BF16] {
                let expected = weight.dequantize_by_tensor_ops().inner().cast(dtype).into_data();
                for run_values in [inp, 5 * inp + 3, rows * inp, usize::MAX] {
                    let dense = super::dequantize(&weight, dtype, run_values).expect("aligned rows on libtorch");
                    assert!(!dense.is_require_grad(), "a frozen weight");
                    assert_eq!(dense.dims(), [rows, inp]);
                    dense.inner().into_data().assert_eq(&expected, true);
                }
                // What `Linear`'s products call.
                weight.dequantize_as(dtype).inner().into_data().assert_eq(&expected, true);
            }
        }
        for (rows, inp, block_size) in [(4, 100, 64), (4, 60, 20)] {
            let mut parts = parts_in_blocks(rows * inp, true, block_size);
            parts.dims = [rows, inp];
            let weight = QuantizedWeight::<Train>::from_parts(&parts, &device);
            assert!(super::dequantize(&weight, FloatDType::BF16, usize::MAX).is_none(), "in {inp}, blocks of {block_size}");
        }
    }

    /// On the bf16 backend the code book and scales are stored f32 too: both types get the
    /// tensor operations' bits.
    #[test]
    fn the_bf16_backend_gets_the_tensor_operations_bits() {
        type B = LibTorch<burn::tensor::bf16>;
        let device = LibTorchDevice::Cpu;
        let mut parts = parts_in_blocks(9 * 128, true, 64);
        parts.dims = [9, 128];
        let weight = QuantizedWeight::<B>::from_parts(&parts, &device);
        for dtype in [FloatDType::F32, FloatDType::BF16] {
            let expected = weight.dequantize_by_tensor_ops().cast(dtype).into_data();
            super::dequantize(&weight, dtype, 256).expect("aligned rows on libtorch").into_data().assert_eq(&expected, true);
        }
    }
}
