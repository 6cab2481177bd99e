//! NCCL on the CUDA backend's own buffers ([`crate::device_collectives`] for burn-cuda).
//!
//! A tensor of the CUDA backend ([`Gpu`]: burn's fusion layer over CubeCL) is resolved to its
//! CubeCL tensor, which names a buffer of the CUDA runtime; `get_resource` gives that buffer's
//! raw device pointer. The backend is synchronised first (so the kernels that wrote the buffer
//! have finished, whatever streams CubeCL used), NCCL runs on the communicator's stream, and
//! the call returns once NCCL has finished, so the kernels queued next see the result.
//!
//! Public for `bench_train nccl` (see [`crate::device_collectives`]).

use crate::device_collectives::NcclBuffers;
use alignment_core::backend::{downcast, retype, Gpu};
use alignment_distributed::{Communicator, DistError, NcclCommunicator};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;

/// The CubeCL backend under [`Gpu`]'s fusion layer.
type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

/// burn-cuda's buffers, lent to NCCL.
pub struct CubeBuffers;

impl NcclBuffers for CubeBuffers {
    type Gpu = Gpu;

    fn accept<B: Backend>(_nccl: &NcclCommunicator, tensor: Tensor<B, 1>) -> Result<Tensor<Gpu, 1>, Tensor<B, 1>> {
        let tensor: Tensor<Gpu, 1> = downcast(tensor)?;
        if tensor.dtype() != DType::F32 {
            return Err(retype(tensor));
        }
        Ok(tensor)
    }

    fn into_new_buffer(
        nccl: &mut NcclCommunicator,
        send: &Tensor<Gpu, 1>,
        recv_len: usize,
        call: impl FnOnce(&mut NcclCommunicator, u64, u64) -> Result<(), DistError>,
    ) -> Result<Tensor<Gpu, 1>, DistError> {
        let device = send.device();
        let recv = Tensor::<Gpu, 1>::zeros([recv_len], &device);
        Gpu::sync(&device).map_err(|e| sync_error(nccl, e))?;
        let send_pointer = DevicePointer::of(send).map_err(|e| resource_error(nccl, e))?;
        let recv_pointer = DevicePointer::of(&recv).map_err(|e| resource_error(nccl, e))?;
        call(nccl, send_pointer.address, recv_pointer.address)?;
        Ok(recv)
    }
}

/// The raw CUDA address of a tensor's buffer, and what keeps that buffer allocated.
struct DevicePointer {
    address: u64,
    /// Holds the allocation (CubeCL reuses freed buffers).
    _resource: Box<dyn std::any::Any>,
}

impl DevicePointer {
    /// The buffer under `tensor` (contiguous: the callers' tensors come from `cat`, `zeros`
    /// and collectives). Resolving the fusion layer's tensor runs its pending operations.
    fn of(tensor: &Tensor<Gpu, 1>) -> Result<Self, String> {
        let TensorPrimitive::Float(fused) = tensor.clone().into_primitive() else {
            return Err("a quantized tensor".into());
        };
        let client = fused.client.clone();
        let cube = client.resolve_tensor_float::<Cube>(fused);
        let resource = cube.client.get_resource(cube.handle.clone()).map_err(|e| format!("{e:?}"))?;
        Ok(Self { address: resource.resource().ptr, _resource: Box::new(resource) })
    }
}

/// A failed synchronisation of the backend before a collective, as the communicator's error.
fn sync_error(nccl: &NcclCommunicator, e: impl std::fmt::Debug) -> DistError {
    DistError::Nccl { rank: nccl.rank(), op: "synchronising the device before a collective".into(), detail: format!("{e:?}") }
}

/// A tensor whose device buffer could not be read, as the communicator's error.
fn resource_error(nccl: &NcclCommunicator, detail: String) -> DistError {
    DistError::Nccl { rank: nccl.rank(), op: "reading a tensor's device buffer".into(), detail }
}
