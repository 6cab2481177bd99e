//! A matrix product computed outside burn's operations, on burn's fused CubeCL backends
//! (`cuda`, `wgpu`): the seam `crate::cublas` runs cuBLAS through, and which CI exercises on
//! `wgpu` (lavapipe) with a kernel of cuBLAS's semantics in cuBLAS's place: every product of a
//! step there ([`float_matmul_on_wgpu`]), and each layout on its own ([`matmul_by_plan_on_wgpu`]).
//!
//! 1. The operands are resolved out of the fusion stream (which queues the kernels that produce
//!    them), and copied contiguous only when one call cannot read their views in place
//!    ([`ColumnMajorGemm::for_row_major_product`]; broadcast batches stay on the backend's
//!    matmul).
//! 2. The caller's GEMM computes the planned call into a new contiguous tensor.
//! 3. The result is registered back into the fusion stream as a new tensor.

use crate::gemm::ColumnMajorGemm;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::OperationStreams;
use burn_fusion::{Fusion, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};

/// How [`product`] read its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    /// In place: one call read both views as they were.
    InPlace,
    /// Copied contiguous first.
    Copied,
    /// Not by the caller's GEMM: broadcast batches, multiplied by the backend's own matmul.
    BackendMatmul,
}

/// A float tensor of burn's fused CubeCL backend on runtime `R`.
type FusedTensor<R, F, I, BT> = FloatTensor<Fusion<CubeBackend<R, F, I, BT>>>;

/// `lhs · rhs` on `Fusion<CubeBackend<R, …>>` by `gemm` (which receives the plan, `lhs` and
/// `rhs` and returns the contiguous product), steps 1–3 of the module documentation.
pub(crate) fn product<R, F, I, BT>(
    lhs: FusedTensor<R, F, I, BT>,
    rhs: FusedTensor<R, F, I, BT>,
    gemm: impl FnOnce(ColumnMajorGemm, CubeTensor<R>, CubeTensor<R>) -> CubeTensor<R>,
) -> (FusedTensor<R, F, I, BT>, Operands)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;
    let client = lhs.client.clone();
    let lhs = client.resolve_tensor_float::<Cube<R, F, I, BT>>(lhs);
    let rhs = client.resolve_tensor_float::<Cube<R, F, I, BT>>(rhs);
    let (product, operands) = match plan(&lhs, &rhs) {
        Some(call) => (gemm(call, lhs, rhs), Operands::InPlace),
        None => {
            let (lhs, rhs) = (burn_cubecl::kernel::into_contiguous(lhs), burn_cubecl::kernel::into_contiguous(rhs));
            match plan(&lhs, &rhs) {
                Some(call) => (gemm(call, lhs, rhs), Operands::Copied),
                None => (Cube::<R, F, I, BT>::float_matmul(lhs, rhs), Operands::BackendMatmul),
            }
        }
    };
    (register::<R, F, I, BT>(&client, product), operands)
}

/// `tensor`, computed outside the fusion stream of `client`, registered into it as a new tensor
/// (an `Init` operation): how a kernel or library call of our own hands its result back to
/// burn's fused CubeCL backends (this module, `models::nf4_kernel`).
pub fn register<R, F, I, BT>(
    client: &burn_fusion::Client<<CubeBackend<R, F, I, BT> as burn_fusion::FusionBackend>::FusionRuntime>,
    tensor: CubeTensor<R>,
) -> FusedTensor<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let shape = tensor.meta.shape().clone();
    let dtype = tensor.dtype;
    let handle = <CubeBackend<R, F, I, BT> as BackendIr>::float_tensor_handle(tensor);
    let init = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let mut outputs = client.register(OperationStreams::default(), OperationIr::Init(init), NoOp::<CubeBackend<R, F, I, BT>>::new());
    outputs.pop().expect("an initialisation registers one tensor")
}

/// The one call reading `lhs` and `rhs` in place, if there is one.
fn plan<R: CubeRuntime>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>) -> Option<ColumnMajorGemm> {
    let view = |t: &CubeTensor<R>| (t.meta.shape().to_vec(), t.meta.strides().to_vec());
    let ((lhs_shape, lhs_strides), (rhs_shape, rhs_strides)) = (view(lhs), view(rhs));
    ColumnMajorGemm::for_row_major_product((&lhs_shape, &lhs_strides), (&rhs_shape, &rhs_strides))
}

/// The row-major shape of the product of `lhs` and `rhs` (their batch, `lhs`'s rows, `rhs`'s
/// columns).
pub(crate) fn product_dims<R: CubeRuntime>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>) -> Vec<usize> {
    let mut dims = lhs.meta.shape().to_vec();
    let last = dims.len() - 1;
    dims[last] = rhs.meta.shape()[last];
    dims
}

/// Whether `B` is burn's `wgpu` backend, whose products [`crate::gemm`] routes through
/// [`float_matmul_on_wgpu`] as it routes burn-cuda's through cuBLAS; `ALIGNMENT_CUBLAS=0` turns
/// both routes off (CubeCL's matmul, e.g. to benchmark a real Vulkan device).
#[cfg(feature = "wgpu")]
pub(crate) fn applies_on_wgpu<B: burn::tensor::backend::Backend>() -> bool {
    static ROUTE: crate::env_switch::EnvSwitch = crate::env_switch::EnvSwitch::new("ALIGNMENT_CUBLAS");
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<crate::backend::Wgpu>() && ROUTE.is_on()
}

/// `lhs · rhs` on burn's `wgpu` backend through the seam cuBLAS takes on burn-cuda, with the
/// plain kernel of cuBLAS's semantics in its place (f32 and f16 operands of one type); the
/// operands back otherwise. So CI runs the training step's products on lavapipe as the device
/// runs them (the plans, the recorded steps of [`crate::gemm`], the registration into the fusion
/// stream), and never compiles CubeCL's tiled matmul kernels there, whose compilation (every
/// autotune candidate, each new shape) on lavapipe took most of the wgpu tests' 15 minutes
/// (≈ 4 with this route).
#[cfg(feature = "wgpu")]
#[allow(clippy::type_complexity)]
pub(crate) fn float_matmul_on_wgpu<B: burn::tensor::backend::Backend>(
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
) -> Result<FloatTensor<B>, (FloatTensor<B>, FloatTensor<B>)> {
    use crate::backend::{retype, Wgpu};
    use burn::tensor::{DType, TensorMetadata};
    if !applies_on_wgpu::<B>() || !matches!(lhs.dtype(), DType::F32 | DType::F16) || lhs.dtype() != rhs.dtype() {
        return Err((lhs, rhs));
    }
    let (lhs, rhs): (FloatTensor<Wgpu>, FloatTensor<Wgpu>) = (retype(lhs), retype(rhs));
    type Runtime = burn::backend::wgpu::WgpuRuntime;
    Ok(retype(product::<Runtime, f32, i32, u32>(lhs, rhs, reference_kernel::launch).0))
}

/// [`product`] on burn's `wgpu` backend with a plain CubeCL kernel of cuBLAS's semantics in
/// place of cuBLAS (one thread per output value, f32 accumulation), and how it read the
/// operands: CI's check, on lavapipe, that the seam and the plans made from burn's own views
/// give the products (`tests/backend_check.rs`). Not a fast product: [`crate::gemm`] takes it on
/// `wgpu` only so that CI runs the device's route ([`float_matmul_on_wgpu`]).
#[cfg(feature = "wgpu")]
pub fn matmul_by_plan_on_wgpu<const D: usize>(
    lhs: burn::tensor::Tensor<crate::backend::Wgpu, D>,
    rhs: burn::tensor::Tensor<crate::backend::Wgpu, D>,
) -> (burn::tensor::Tensor<crate::backend::Wgpu, D>, Operands) {
    use burn::tensor::{Tensor, TensorPrimitive};
    type Runtime = burn::backend::wgpu::WgpuRuntime;
    let (product, operands) =
        product::<Runtime, f32, i32, u32>(lhs.into_primitive().tensor(), rhs.into_primitive().tensor(), reference_kernel::launch);
    (Tensor::from_primitive(TensorPrimitive::Float(product)), operands)
}

/// The kernel of [`matmul_by_plan_on_wgpu`].
#[cfg(feature = "wgpu")]
mod reference_kernel {
    use super::product_dims;
    use crate::gemm::ColumnMajorGemm;
    use burn_cubecl::cubecl::{calculate_cube_count_elemwise, CubeDim};
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeRuntime;

    mod kernel {
        // The `#[cube]` macro's expansion names the `cubecl` crate.
        use burn_cubecl::cubecl;
        use cubecl::prelude::*;

        /// `C[p] = op(A[p]) · op(B[p])`, column-major, `C` contiguous (`ldc = m`,
        /// `stride_c = m · n`): one thread per value of `C`, reading `A` and `B` as raw buffers
        /// with the plan's leading dimensions and batch strides, as cuBLAS does.
        #[cube(launch_unchecked, address_type = "dynamic")]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn column_major_gemm<F: Float>(
            a: &Tensor<F>,
            b: &Tensor<F>,
            c: &mut Tensor<F>,
            #[comptime] m: usize,
            #[comptime] n: usize,
            #[comptime] k: usize,
            #[comptime] lda: usize,
            #[comptime] ldb: usize,
            #[comptime] stride_a: usize,
            #[comptime] stride_b: usize,
            #[comptime] transpose_a: bool,
            #[comptime] transpose_b: bool,
            #[define(F)] _dtype: StorageType,
        ) {
            let index = ABSOLUTE_POS;
            if index >= c.len() {
                terminate!();
            }
            let p = index / (m * n);
            let j = (index % (m * n)) / m;
            let i = index % m;
            let mut sum = f32::new(0.0);
            for l in 0..k {
                let a_il = if transpose_a { a[p * stride_a + l + i * lda] } else { a[p * stride_a + i + l * lda] };
                let b_lj = if transpose_b { b[p * stride_b + j + l * ldb] } else { b[p * stride_b + l + j * ldb] };
                sum += f32::cast_from(a_il) * f32::cast_from(b_lj);
            }
            c[index] = F::cast_from(sum);
        }
    }

    /// The planned call into a new contiguous tensor (cuBLAS's `A` is `rhs`, its `B` `lhs`).
    pub(super) fn launch<R: CubeRuntime>(gemm: ColumnMajorGemm, lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
        assert_eq!((gemm.ldc, gemm.stride_c), (gemm.m, gemm.m * gemm.n), "a contiguous output");
        let client = lhs.client.clone();
        let output = empty_device_dtype(client.clone(), lhs.device.clone(), product_dims(&lhs, &rhs).into(), lhs.dtype);
        let values = gemm.output_len();
        let cube_dim = CubeDim::new(&client, values);
        let cube_count = calculate_cube_count_elemwise(&client, values, cube_dim);
        let address_type = [&lhs, &rhs, &output].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
        let dtype = lhs.dtype;
        // SAFETY: the plan was made from these tensors' own shapes and strides, so every index
        // the kernel reads is inside their views, and `index < c.len()` is checked.
        unsafe {
            kernel::column_major_gemm::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                address_type,
                rhs.into_tensor_arg(),
                lhs.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                gemm.m,
                gemm.n,
                gemm.k,
                gemm.lda,
                gemm.ldb,
                gemm.stride_a,
                gemm.stride_b,
                gemm.transpose_a,
                gemm.transpose_b,
                dtype.into(),
            );
        }
        output
    }
}
