//! cuBLAS under burn-cuda's matrix products ([`crate::gemm`]'s route on `cuda`/`cuda-bf16`).
//!
//! A product of two tensors of [`Gpu`] or [`GpuBf16`] (burn's fusion layer over CubeCL):
//! 1. the operands are resolved out of the fusion stream (which queues what produced them), and
//!    copied contiguous only when one call cannot read their views in place
//!    ([`ColumnMajorGemm::for_row_major_product`]);
//! 2. the output is allocated by CubeCL (so its memory pool owns it), the backend synchronised
//!    (CubeCL's streams are private to it, so the kernels that wrote the operands are waited for
//!    from the host), and the three buffers' device addresses taken;
//! 3. one `cublasGemmStridedBatchedEx` runs on this module's stream, in the operands' type with
//!    f32 accumulation (`CUBLAS_COMPUTE_32F`: no TF32 for f32, as PyTorch's default), and is
//!    waited for, so the kernels queued next see its result;
//! 4. the output is registered back into the fusion stream as a new tensor.
//!
//! The two host synchronisations per product are the price of the private streams: the GPU
//! idles while the host queues the next operations. Predicted and measured in
//! docs/performance.md ("Products by cuBLAS on burn-cuda").

use crate::backend::{retype, Gpu, GpuBf16};
use crate::gemm::ColumnMajorGemm;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::stream::OperationStreams;
use burn_fusion::{Fusion, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaStream};
use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The CubeCL backend under a fused CUDA backend.
type Cube<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// Whether `B` is a CUDA backend whose products go to cuBLAS: [`Gpu`] or [`GpuBf16`], with
/// `libcublas` loadable and `ALIGNMENT_CUBLAS` not `0`.
pub(crate) fn applies<B: Backend>() -> bool {
    let b = TypeId::of::<B>();
    (b == TypeId::of::<Gpu>() || b == TypeId::of::<GpuBf16>()) && enabled()
}

/// The route's switch, read once: on unless `ALIGNMENT_CUBLAS=0`, and only where `libcublas`
/// loads (a message says so where it does not).
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        if std::env::var("ALIGNMENT_CUBLAS").is_ok_and(|v| v == "0") {
            eprintln!("ALIGNMENT_CUBLAS=0: burn-cuda's products run on CubeCL's matmul");
            return false;
        }
        // SAFETY: only tries to open the library by its candidate names.
        let present = unsafe { sys::is_culib_present() };
        if !present {
            eprintln!("libcublas not found on the library path: burn-cuda's products run on CubeCL's matmul (slower on Hopper)");
        }
        present
    })
}

/// `lhs · rhs` by cuBLAS when `B` is one of the CUDA backends of [`applies`] and the operands
/// are f32, bf16 or f16; the operands back otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn float_matmul<B: Backend>(
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
) -> Result<FloatTensor<B>, (FloatTensor<B>, FloatTensor<B>)> {
    if !applies::<B>() || !matches!(lhs.dtype(), DType::F32 | DType::BF16 | DType::F16) || lhs.dtype() != rhs.dtype() {
        return Err((lhs, rhs));
    }
    macro_rules! on {
        ($backend:ty, $float:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$backend>() {
                let (lhs, rhs): (FloatTensor<$backend>, FloatTensor<$backend>) = (retype(lhs), retype(rhs));
                return Ok(retype(on_fusion::<$float, i32, u8>(lhs, rhs)));
            }
        };
    }
    on!(Gpu, f32);
    on!(GpuBf16, burn::tensor::bf16);
    Err((lhs, rhs))
}

/// The product on a fused CUDA backend (steps 1–4 of the module documentation).
fn on_fusion<F: FloatElement, I: IntElement, BT: BoolElement>(
    lhs: FloatTensor<Fusion<Cube<F, I, BT>>>,
    rhs: FloatTensor<Fusion<Cube<F, I, BT>>>,
) -> FloatTensor<Fusion<Cube<F, I, BT>>> {
    let client = lhs.client.clone();
    let lhs = client.resolve_tensor_float::<Cube<F, I, BT>>(lhs);
    let rhs = client.resolve_tensor_float::<Cube<F, I, BT>>(rhs);
    let product = match plan(&lhs, &rhs) {
        Some(gemm) => gemm_on_device(gemm, lhs, rhs),
        None => {
            let (lhs, rhs) = (burn_cubecl::kernel::into_contiguous(lhs), burn_cubecl::kernel::into_contiguous(rhs));
            match plan(&lhs, &rhs) {
                Some(gemm) => gemm_on_device(gemm, lhs, rhs),
                // Broadcast batches: CubeCL's own matmul.
                None => Cube::<F, I, BT>::float_matmul(lhs, rhs),
            }
        }
    };
    let shape = product.meta.shape().clone();
    let dtype = product.dtype;
    let handle = <Cube<F, I, BT> as BackendIr>::float_tensor_handle(product);
    let init = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let mut outputs = client.register(OperationStreams::default(), OperationIr::Init(init), NoOp::<Cube<F, I, BT>>::new());
    outputs.pop().expect("an initialisation registers one tensor")
}

/// The cuBLAS call reading `lhs` and `rhs` in place, if there is one.
fn plan(lhs: &CubeTensor<CudaRuntime>, rhs: &CubeTensor<CudaRuntime>) -> Option<ColumnMajorGemm> {
    let view = |t: &CubeTensor<CudaRuntime>| (t.meta.shape().to_vec(), t.meta.strides().to_vec());
    let ((lhs_shape, lhs_strides), (rhs_shape, rhs_strides)) = (view(lhs), view(rhs));
    ColumnMajorGemm::for_row_major_product((&lhs_shape, &lhs_strides), (&rhs_shape, &rhs_strides))
}

/// Steps 2 and 3: the product of `gemm` into a new contiguous tensor.
fn gemm_on_device(gemm: ColumnMajorGemm, lhs: CubeTensor<CudaRuntime>, rhs: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    let dims = lhs.meta.shape().to_vec();
    let mut out_dims = dims.clone();
    out_dims[dims.len() - 1] = rhs.meta.shape()[dims.len() - 1];
    let dtype = lhs.dtype;
    let client = lhs.client.clone();
    let output = empty_device_dtype(client.clone(), lhs.device.clone(), Shape::from(out_dims), dtype);
    burn_cubecl::cubecl::future::block_on(client.sync())
        .unwrap_or_else(|e| panic!("synchronising burn-cuda before a cuBLAS product: {e:?}"));
    let address = |t: &CubeTensor<CudaRuntime>| {
        let resource = client.get_resource(t.handle.clone()).unwrap_or_else(|e| panic!("a tensor's device buffer: {e:?}"));
        (resource.resource().ptr, resource)
    };
    let (a, _a_alive) = address(&rhs);
    let (b, _b_alive) = address(&lhs);
    let (c, _c_alive) = address(&output);
    let cuda = handle_for(lhs.device.index);
    let data_type = match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        other => unreachable!("checked by float_matmul: {other:?}"),
    };
    let operation = |transpose: bool| if transpose { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    let (alpha, beta) = (1f32, 0f32);
    let int = |v: usize| v as std::ffi::c_int; // ≤ i32::MAX: checked by the plan.
    cuda.context.bind_to_thread().unwrap_or_else(|e| panic!("binding the CUDA context for cuBLAS: {e:?}"));
    // SAFETY: a, b and c are live device buffers of the operands' type (kept allocated by the
    // resources above) holding every element the plan addresses: the plan was made from these
    // tensors' own shapes and strides, and c from the output's contiguous shape. The work that
    // wrote a and b has finished (synchronised above).
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *cuda.blas.handle(),
            operation(gemm.transpose_a),
            operation(gemm.transpose_b),
            int(gemm.m),
            int(gemm.n),
            int(gemm.k),
            (&alpha as *const f32).cast(),
            a as *const std::ffi::c_void,
            data_type,
            int(gemm.lda),
            gemm.stride_a as i64,
            b as *const std::ffi::c_void,
            data_type,
            int(gemm.ldb),
            gemm.stride_b as i64,
            (&beta as *const f32).cast(),
            c as *mut std::ffi::c_void,
            data_type,
            int(gemm.ldc),
            gemm.stride_c as i64,
            int(gemm.batch),
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .unwrap_or_else(|e| panic!("cublasGemmStridedBatchedEx ({gemm:?}, {dtype:?}): {e:?}"));
    cuda.stream.synchronize().unwrap_or_else(|e| panic!("waiting for a cuBLAS product: {e:?}"));
    output
}

/// One GPU's cuBLAS handle, the stream it runs on and the context both belong to (the device's
/// primary context, which CubeCL uses too, so the addresses are the same).
struct Cuda {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

/// The handle of GPU `index`, created on first use and kept for the process.
fn handle_for(index: usize) -> Arc<Cuda> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<Cuda>>>> = OnceLock::new();
    let mut handles = HANDLES.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    handles
        .entry(index)
        .or_insert_with(|| {
            let context = CudaContext::new(index).unwrap_or_else(|e| panic!("the CUDA context of GPU {index}: {e:?}"));
            let stream = context.new_stream().unwrap_or_else(|e| panic!("a CUDA stream on GPU {index}: {e:?}"));
            let blas = CudaBlas::new(stream.clone()).unwrap_or_else(|e| panic!("a cuBLAS handle on GPU {index}: {e:?}"));
            Arc::new(Cuda { context, stream, blas })
        })
        .clone()
}
