//! cuBLAS under burn-cuda's matrix products ([`crate::gemm`]'s route on `cuda`/`cuda-bf16`).
//!
//! A product of two tensors of [`Gpu`] or [`GpuBf16`] (burn's fusion layer over CubeCL):
//! 1. the operands are resolved out of the fusion stream, copied contiguous only when one call
//!    cannot read their views in place ([`crate::fused_product`], which CI runs on `wgpu` with a
//!    kernel of cuBLAS's semantics in place of cuBLAS);
//! 2. the output is allocated by CubeCL (so its memory pool owns it), and the three buffers'
//!    device addresses are taken, with the CUDA stream the output belongs to;
//! 3. one `cublasGemmStridedBatchedEx` is queued on that stream, behind the kernels that wrote
//!    the operands and ahead of those that will read the result, in the operands' type with f32
//!    accumulation (`CUBLAS_COMPUTE_32F`: no TF32 for f32, as PyTorch's default);
//! 4. the output is registered back into the fusion stream as a new tensor.
//!
//! CubeCL keeps its streams private; the stream comes from a one-field patch of cubecl-cuda
//! (`vendor/README.md`). `ALIGNMENT_CUBLAS=sync` takes the way that needs no patch instead:
//! synchronise the backend from the host, run cuBLAS on a stream of its own and wait for it, two
//! host round trips per product while the GPU idles. Predicted and measured in
//! docs/performance.md ("Products by cuBLAS on burn-cuda").

use crate::backend::{retype, Gpu, GpuBf16};
use crate::fused_product::product_dims;
use crate::gemm::ColumnMajorGemm;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use burn_fusion::Fusion;
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
    (b == TypeId::of::<Gpu>() || b == TypeId::of::<GpuBf16>()) && ordering().is_some()
}

/// The route's name in reports ([`crate::gemm::products_route`]).
pub(crate) fn route_name() -> &'static str {
    match ordering() {
        Some(Ordering::OnCubeclStream) => "cublas",
        Some(Ordering::HostSynchronised) => "cublas-sync",
        None => "backend",
    }
}

/// How a cuBLAS product is ordered with CubeCL's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ordering {
    /// Queued on the stream of CubeCL's buffers: nothing waits (the default).
    OnCubeclStream,
    /// The backend synchronised from the host before, cuBLAS waited for after
    /// (`ALIGNMENT_CUBLAS=sync`).
    HostSynchronised,
}

/// The route's switch, read once from `ALIGNMENT_CUBLAS`: `0` off, `sync` host-synchronised,
/// anything else (or unset) on CubeCL's stream; off where `libcublas` does not load (a message
/// says so).
fn ordering() -> Option<Ordering> {
    static ORDERING: OnceLock<Option<Ordering>> = OnceLock::new();
    *ORDERING.get_or_init(|| {
        let setting = std::env::var("ALIGNMENT_CUBLAS").unwrap_or_default();
        // Surrounding spaces ignored, as by every other switch (env_switch.rs).
        let setting = setting.trim();
        if setting == "0" {
            eprintln!("ALIGNMENT_CUBLAS=0: burn-cuda's products run on CubeCL's matmul");
            return None;
        }
        // SAFETY: only tries to open the library by its candidate names.
        if !unsafe { sys::is_culib_present() } {
            eprintln!("libcublas not found on the library path: burn-cuda's products run on CubeCL's matmul (slower on Hopper)");
            return None;
        }
        if setting == "sync" {
            eprintln!("ALIGNMENT_CUBLAS=sync: each cuBLAS product synchronises burn-cuda from the host");
            return Some(Ordering::HostSynchronised);
        }
        Some(Ordering::OnCubeclStream)
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
    crate::fused_product::product::<CudaRuntime, F, I, BT>(lhs, rhs, gemm_on_device).0
}

/// Steps 2 and 3: the product of `gemm` into a new contiguous tensor.
fn gemm_on_device(gemm: ColumnMajorGemm, lhs: CubeTensor<CudaRuntime>, rhs: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    let ordering = ordering().expect("float_matmul checked that the route is on");
    let dtype = lhs.dtype;
    let client = lhs.client.clone();
    let output = empty_device_dtype(client.clone(), lhs.device.clone(), product_dims(&lhs, &rhs).into(), dtype);
    let address = |t: &CubeTensor<CudaRuntime>| {
        let resource = client.get_resource(t.handle.clone()).unwrap_or_else(|e| panic!("a tensor's device buffer: {e:?}"));
        (resource.resource().ptr, resource.resource().stream, resource)
    };
    let (a, _, _a_alive) = address(&rhs);
    let (b, _, _b_alive) = address(&lhs);
    let (c, cubecl_stream, _c_alive) = address(&output);
    // A buffer without its stream (not one of the patched storage's) is ordered from the host.
    let ordering = if cubecl_stream.is_null() { Ordering::HostSynchronised } else { ordering };
    if ordering == Ordering::HostSynchronised {
        burn_cubecl::cubecl::future::block_on(client.sync())
            .unwrap_or_else(|e| panic!("synchronising burn-cuda before a cuBLAS product: {e:?}"));
    }
    let mut handles = handles().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cuda = handles.entry(lhs.device.index).or_insert_with_key(|&index| Cuda::new(index));
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
    let stream = match ordering {
        Ordering::OnCubeclStream => cubecl_stream as sys::cudaStream_t,
        Ordering::HostSynchronised => cuda.stream.cu_stream() as sys::cudaStream_t,
    };
    // SAFETY: the handle is this module's, used under the lock; the stream is CubeCL's (alive
    // as long as its server) or the handle's own.
    unsafe { cudarc::cublas::result::set_stream(*cuda.blas.handle(), stream) }.unwrap_or_else(|e| panic!("setting cuBLAS's stream: {e:?}"));
    // SAFETY: a, b and c are live device buffers of the operands' type (kept allocated by the
    // resources above until the call is queued; CubeCL reuses a freed buffer only for work
    // queued after it on the same stream) holding every element the plan addresses: the plan
    // was made from these tensors' own shapes and strides, and c from the output's contiguous
    // shape. The work that writes a and b precedes the call on CubeCL's stream, or has finished
    // (synchronised above).
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
    if ordering == Ordering::HostSynchronised {
        cuda.stream.synchronize().unwrap_or_else(|e| panic!("waiting for a cuBLAS product: {e:?}"));
    }
    output
}

/// One GPU's cuBLAS handle, a stream of its own (for [`Ordering::HostSynchronised`]) and the
/// context both belong to: the device's primary context, which CubeCL uses too, so the
/// addresses and streams are the same.
struct Cuda {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

impl Cuda {
    fn new(index: usize) -> Self {
        let context = CudaContext::new(index).unwrap_or_else(|e| panic!("the CUDA context of GPU {index}: {e:?}"));
        let stream = context.new_stream().unwrap_or_else(|e| panic!("a CUDA stream on GPU {index}: {e:?}"));
        let blas = CudaBlas::new(stream.clone()).unwrap_or_else(|e| panic!("a cuBLAS handle on GPU {index}: {e:?}"));
        Cuda { context, stream, blas }
    }
}

/// Each GPU's [`Cuda`], created on first use and kept for the process; locked while a product
/// sets the handle's stream and queues its call.
fn handles() -> &'static Mutex<HashMap<usize, Cuda>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Cuda>>> = OnceLock::new();
    HANDLES.get_or_init(Default::default)
}
