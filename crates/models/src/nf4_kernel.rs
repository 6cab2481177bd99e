//! QLoRA's 4-bit base dequantized by one CubeCL kernel on burn's GPU backends (`cuda`, `wgpu`):
//! each value read at half a byte and written once, in the type the matrix product wants.
//!
//! [`crate::quantized`] dequantizes with backend tensor operations, which every backend has:
//! unpack the bytes (four shift/mask passes over the words), gather pairs of values from a
//! `[256, 2]` table, multiply by the block scales. On the GPU backends each pass is a kernel
//! reading and writing whole tensors, ≈ 26 bytes moved per value, and under mixed precision a
//! cast to the half type reads the f32 weight again and writes the copy the product uses. Here
//! one thread per value reads its word (eight threads share it), looks its 4-bit index up in the
//! code book, multiplies by its block's scale in f32 and writes the result in the output type:
//! ≈ 0.5 + 4 / 64 bytes read and 2 (bf16) or 4 (f32) written per value.
//!
//! ```text
//! value[i] = output_type(code_book[(word[i / 8] >> 4·(7 − i mod 8)) & 15] · scale[i / block_size])
//! ```
//! The f32 product and the rounding to the output type are those of the tensor path (one f32
//! multiplication, then burn's cast), so the bits are the same; `tests/backend_check.rs` checks
//! that on lavapipe. The block scales (one per 64 values, double-quantized or not) are still
//! computed by tensor operations ([`QuantizedWeight::block_scales`]).
//!
//! burn's `cuda` and `wgpu` backends are `Fusion<CubeBackend<…>>` here (the crate's features turn
//! fusion on): the kernel's inputs are taken out of the fusion stream (which runs what is queued
//! before them) and its output registered back as a new tensor of that stream
//! (`alignment_core::fused_product::register`).

use crate::quantized::QuantizedWeight;
use alignment_core::backend::{visit_fused_cube, visit_fused_cube_under_autodiff, FusedCubeVisitor};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, CubeDim};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;

/// The kernel, in CubeCL's language (its `Tensor` is a kernel argument, not burn's).
mod kernel {
    // The `#[cube]` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// One thread per value: see the module documentation. `words` holds eight 4-bit indices
    /// per 32-bit integer, the first in the highest nibble.
    #[cube(launch_unchecked, address_type = "dynamic")]
    pub(super) fn dequantize_nf4<F: Float>(
        words: &Tensor<i32>,
        code_book: &Tensor<f32>,
        scales: &Tensor<f32>,
        output: &mut Tensor<F>,
        #[comptime] block_size: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= output.len() {
            terminate!();
        }
        // An arithmetic shift of a negative word brings in ones; the mask drops them.
        let shift = (28 - 4 * (i % 8)) as i32;
        let index = (words[i / 8] >> shift) & 15;
        output[i] = F::cast_from(code_book[index as usize] * scales[i / block_size]);
    }
}

/// Launches the kernel on contiguous copies of the inputs (`code_book` and `scales` in f32);
/// the `[out, in]` weight in `dtype`.
fn launch<R: CubeRuntime>(
    words: CubeTensor<R>,
    code_book: CubeTensor<R>,
    scales: CubeTensor<R>,
    dims: [usize; 2],
    block_size: usize,
    dtype: DType,
) -> CubeTensor<R> {
    let contiguous_f32 = |t: CubeTensor<R>| burn_cubecl::kernel::into_contiguous(burn_cubecl::kernel::cast(t, DType::F32));
    let (words, code_book, scales) = (burn_cubecl::kernel::into_contiguous(words), contiguous_f32(code_book), contiguous_f32(scales));
    let values = dims[0] * dims[1];
    // What makes the unchecked launch safe (a malformed weight panics here rather than reading
    // out of bounds on the device).
    let len = |t: &CubeTensor<R>| t.meta.shape().num_elements();
    assert_eq!(words.dtype, DType::I32, "NF4 indices are packed into 32-bit words");
    assert!(len(&words) >= values.div_ceil(8), "{} words for {values} 4-bit indices", len(&words));
    assert!(len(&code_book) >= 16, "a 4-bit code book of {} values", len(&code_book));
    assert!(len(&scales) >= values.div_ceil(block_size), "{} scales for {values} values in blocks of {block_size}", len(&scales));
    let client = words.client.clone();
    let output = empty_device_dtype(client.clone(), words.device.clone(), dims.into(), dtype);
    let cube_dim = CubeDim::new(&client, values);
    let cube_count = calculate_cube_count_elemwise(&client, values, cube_dim);
    let address_type = [&words, &output].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
    // SAFETY: every index the kernel reads is in bounds: `i < values` (checked in the kernel),
    // `i / 8` below the ⌈values / 8⌉ words, `index < 16` entries, `i / block_size` below the
    // ⌈values / block_size⌉ scales (asserted above).
    unsafe {
        kernel::dequantize_nf4::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type,
            words.into_tensor_arg(),
            code_book.into_tensor_arg(),
            scales.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            block_size,
            dtype.into(),
        );
    }
    output
}

/// The kernel on a fused CubeCL backend: the inputs resolved out of the fusion stream, the
/// output registered back into it.
fn on_fusion<R, F, I, BT>(
    words: IntTensor<Fusion<CubeBackend<R, F, I, BT>>>,
    code_book: FloatTensor<Fusion<CubeBackend<R, F, I, BT>>>,
    scales: FloatTensor<Fusion<CubeBackend<R, F, I, BT>>>,
    dims: [usize; 2],
    block_size: usize,
    dtype: DType,
) -> FloatTensor<Fusion<CubeBackend<R, F, I, BT>>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type Inner<R, F, I, BT> = CubeBackend<R, F, I, BT>;
    let client = words.client.clone();
    let words = client.resolve_tensor_int::<Inner<R, F, I, BT>>(words);
    let code_book = client.resolve_tensor_float::<Inner<R, F, I, BT>>(code_book);
    let scales = client.resolve_tensor_float::<Inner<R, F, I, BT>>(scales);
    let output = launch(words, code_book, scales, dims, block_size, dtype);
    alignment_core::fused_product::register::<R, F, I, BT>(&client, output)
}

/// [`QuantizedWeight::dequantize_by_tensor_ops`]'s values, in `dtype`, by the kernel, where `B`
/// is one of the fused CubeCL backends this crate is built with (or its autodiff: a frozen
/// weight, so the result is not tracked); `None` on every other backend.
pub(crate) fn dequantize<B: Backend>(weight: &QuantizedWeight<B>, dtype: FloatDType) -> Option<Tensor<B, 2>> {
    /// The call, for the parts of `B` or of the backend its autodiff wraps.
    struct Dequantize<'a, B: Backend> {
        weight: &'a QuantizedWeight<B>,
        dtype: FloatDType,
        under_autodiff: bool,
    }
    impl<B: Backend> FusedCubeVisitor for Dequantize<'_, B> {
        type Output = Tensor<B, 2>;
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> Tensor<B, 2> {
            type Fused<R, F, I, BT> = Fusion<CubeBackend<R, F, I, BT>>;
            match self.under_autodiff {
                false => run::<B, Fused<R, F, I, BT>>(self.weight, self.dtype),
                true => run::<B, Autodiff<Fused<R, F, I, BT>>>(self.weight, self.dtype),
            }
        }
    }
    visit_fused_cube::<B, _>(Dequantize { weight, dtype, under_autodiff: false })
        .or_else(|visitor| visit_fused_cube_under_autodiff::<B, _>(Dequantize { under_autodiff: true, ..visitor }))
        .ok()
}

/// The kernel for `B`, known (by the visit) to be `K`.
fn run<B: Backend, K: OnFusedCube>(weight: &QuantizedWeight<B>, dtype: FloatDType) -> Tensor<B, 2> {
    use alignment_core::backend::retype;
    let words = K::int_to_fused(retype::<Tensor<B, 1, Int>, Tensor<K, 1, Int>>(weight.packed.val()));
    let code_book = K::float_to_fused(retype::<Tensor<B, 1>, Tensor<K, 1>>(weight.code_book.val()));
    let scales = K::float_to_fused(retype::<Tensor<B, 1>, Tensor<K, 1>>(weight.block_scales()));
    let output = K::Fused::launch(words, code_book, scales, weight.dims, weight.block_size, dtype.into());
    retype::<Tensor<K, 2>, Tensor<B, 2>>(K::from_fused(output))
}

/// Backends that are, or wrap, a fused CubeCL backend: the way to its tensors and back.
trait OnFusedCube: Backend {
    /// `Fusion<CubeBackend<…>>`: `Self`, or what its autodiff wraps.
    type Fused: FusedCube;
    fn int_to_fused(t: Tensor<Self, 1, Int>) -> Tensor<Self::Fused, 1, Int>;
    fn float_to_fused(t: Tensor<Self, 1>) -> Tensor<Self::Fused, 1>;
    /// An untracked tensor of `Self` from the fused backend's.
    fn from_fused(t: Tensor<Self::Fused, 2>) -> Tensor<Self, 2>;
}

/// A fused CubeCL backend (`Fusion<CubeBackend<…>>`), and the kernel on it.
trait FusedCube: Backend {
    /// [`on_fusion`] on this backend's tensors.
    fn launch(
        words: Tensor<Self, 1, Int>,
        code_book: Tensor<Self, 1>,
        scales: Tensor<Self, 1>,
        dims: [usize; 2],
        block_size: usize,
        dtype: DType,
    ) -> Tensor<Self, 2>;
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedCube for Fusion<CubeBackend<R, F, I, BT>> {
    fn launch(
        words: Tensor<Self, 1, Int>,
        code_book: Tensor<Self, 1>,
        scales: Tensor<Self, 1>,
        dims: [usize; 2],
        block_size: usize,
        dtype: DType,
    ) -> Tensor<Self, 2> {
        let float = |t: Tensor<Self, 1>| t.into_primitive().tensor();
        let output = on_fusion::<R, F, I, BT>(words.into_primitive(), float(code_book), float(scales), dims, block_size, dtype);
        Tensor::from_primitive(TensorPrimitive::Float(output))
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> OnFusedCube for Fusion<CubeBackend<R, F, I, BT>> {
    type Fused = Self;

    fn int_to_fused(t: Tensor<Self, 1, Int>) -> Tensor<Self, 1, Int> {
        t
    }

    fn float_to_fused(t: Tensor<Self, 1>) -> Tensor<Self, 1> {
        t
    }

    fn from_fused(t: Tensor<Self, 2>) -> Tensor<Self, 2> {
        t
    }
}

impl<X: FusedCube> OnFusedCube for Autodiff<X> {
    type Fused = X;

    fn int_to_fused(t: Tensor<Self, 1, Int>) -> Tensor<X, 1, Int> {
        t.inner()
    }

    fn float_to_fused(t: Tensor<Self, 1>) -> Tensor<X, 1> {
        t.inner()
    }

    fn from_fused(t: Tensor<X, 2>) -> Tensor<Self, 2> {
        Tensor::from_inner(t)
    }
}
