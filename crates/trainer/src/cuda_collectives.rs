//! NCCL on the CUDA backend's own buffers: the device route of [`crate::tensor_collectives`].
//!
//! A tensor of the CUDA backend ([`Gpu`]: burn's fusion layer over CubeCL) is resolved to its
//! CubeCL tensor, which names a buffer of the CUDA runtime; `get_resource` gives that buffer's
//! raw device pointer. The backend is synchronised first (so the kernels that wrote the buffer
//! have finished, whatever streams CubeCL used), NCCL runs on the communicator's stream, and
//! the call returns once NCCL has finished, so the kernels queued next see the result.
//!
//! Uneven [`ShardLayout`]s are padded to equal chunks of `max_shard_len` on the device, as
//! `NcclCommunicator` pads host buffers.
//!
//! Each function gives the buffer back (`Ok(Err(buffer))`) when the route does not apply: the
//! communicator is not NCCL's, the tensor is not the f32 CUDA backend's, or it is not f32.
//! Public for `bench_train nccl`, which runs them at world size 1 on one GPU (where
//! [`crate::tensor_collectives`] would take the identity) against the values they must give;
//! compiled here, run only where there are GPUs (issue #12).

use alignment_core::backend::{downcast, retype, Gpu};
use alignment_distributed::{Communicator, DistError, NcclCommunicator, ShardLayout};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;

/// The CubeCL backend under [`Gpu`]'s fusion layer.
type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;

/// What a route that does not apply gives back: the caller's tensor, untouched.
pub type Declined<B> = Result<Tensor<B, 1>, Tensor<B, 1>>;

/// [`crate::tensor_collectives::all_reduce_sum`] on the device, into a new buffer (`buffer`'s
/// may be shared: a reshaped gradient is a view of the gradient).
pub fn all_reduce_sum<B: Backend>(comm: &mut dyn Communicator, buffer: Tensor<B, 1>) -> Result<Declined<B>, DistError> {
    let (nccl, buffer) = match applicable(comm, buffer) {
        Ok(pair) => pair,
        Err(buffer) => return Ok(Err(buffer)),
    };
    let len = buffer.dims()[0];
    // SAFETY: both buffers hold `len` f32 (see `into_new_buffer`).
    let sum = into_new_buffer(nccl, &buffer, len, |nccl, send, recv| unsafe { nccl.all_reduce_sum_on_device(send, recv, len) })?;
    Ok(Ok(retype(sum)))
}

/// [`crate::tensor_collectives::reduce_scatter_sum`] on the device.
pub fn reduce_scatter_sum<B: Backend>(
    comm: &mut dyn Communicator,
    buffer: Tensor<B, 1>,
    layout: &ShardLayout,
) -> Result<Declined<B>, DistError> {
    let (nccl, buffer) = match applicable(comm, buffer) {
        Ok(pair) => pair,
        Err(buffer) => return Ok(Err(buffer)),
    };
    let (rank, world) = (nccl.rank(), nccl.world_size());
    let device = buffer.device();
    let chunk = layout.max_shard_len().max(1);
    // Rank r's part at r·chunk, each padded with zeros to `chunk`.
    let padded = Tensor::cat(
        (0..world)
            .flat_map(|r| {
                let range = layout.range(r);
                let pad = chunk - range.len();
                let part = (!range.is_empty()).then(|| buffer.clone().narrow(0, range.start, range.len()));
                part.into_iter().chain((pad > 0).then(|| Tensor::zeros([pad], &device)))
            })
            .collect(),
        0,
    );
    // SAFETY: `send` holds chunk · world f32 and `recv` chunk (see `into_new_buffer`).
    let shard = into_new_buffer(nccl, &padded, chunk, |nccl, send, recv| unsafe { nccl.reduce_scatter_sum_on_device(send, recv, chunk) })?;
    let own = layout.shard_len(rank);
    let shard = if own == chunk { shard } else { shard.narrow(0, 0, own) };
    Ok(Ok(retype(shard)))
}

/// [`crate::tensor_collectives::all_gather`] on the device.
pub fn all_gather<B: Backend>(comm: &mut dyn Communicator, shard: Tensor<B, 1>, layout: &ShardLayout) -> Result<Declined<B>, DistError> {
    let (nccl, shard) = match applicable(comm, shard) {
        Ok(pair) => pair,
        Err(shard) => return Ok(Err(shard)),
    };
    let world = nccl.world_size();
    let device = shard.device();
    let chunk = layout.max_shard_len().max(1);
    let pad = chunk - shard.dims()[0];
    let padded = if pad > 0 { Tensor::cat(vec![shard, Tensor::zeros([pad], &device)], 0) } else { shard };
    // SAFETY: `send` holds chunk f32 and `recv` chunk · world (see `into_new_buffer`).
    let gathered =
        into_new_buffer(nccl, &padded, chunk * world, |nccl, send, recv| unsafe { nccl.all_gather_on_device(send, recv, chunk) })?;
    let parts: Vec<Tensor<Gpu, 1>> =
        (0..world).filter(|&r| layout.shard_len(r) > 0).map(|r| gathered.clone().narrow(0, r * chunk, layout.shard_len(r))).collect();
    Ok(Ok(retype(Tensor::cat(parts, 0))))
}

/// [`crate::tensor_collectives::broadcast`] on the device, into a new buffer.
pub fn broadcast<B: Backend>(comm: &mut dyn Communicator, buffer: Tensor<B, 1>, root: usize) -> Result<Declined<B>, DistError> {
    let (nccl, buffer) = match applicable(comm, buffer) {
        Ok(pair) => pair,
        Err(buffer) => return Ok(Err(buffer)),
    };
    let len = buffer.dims()[0];
    // SAFETY: both buffers hold `len` f32 (see `into_new_buffer`).
    let copy = into_new_buffer(nccl, &buffer, len, |nccl, send, recv| unsafe { nccl.broadcast_on_device(send, recv, len, root) })?;
    Ok(Ok(retype(copy)))
}

/// One NCCL call from `send` into a new buffer of `recv_len` values on the same device: the
/// backend is synchronised (the kernels writing `send` have finished), both buffers' addresses
/// are taken and kept allocated while `call` runs, and `call` returns once NCCL has finished
/// with them (the `*_on_device` methods do), so the kernels queued next see the result.
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

/// The NCCL communicator and the tensor as the CUDA backend's, when both are; else the tensor.
fn applicable<B: Backend>(
    comm: &mut dyn Communicator,
    tensor: Tensor<B, 1>,
) -> Result<(&mut NcclCommunicator, Tensor<Gpu, 1>), Tensor<B, 1>> {
    let Some(nccl) = comm.as_nccl() else { return Err(tensor) };
    let tensor: Tensor<Gpu, 1> = downcast(tensor)?;
    if tensor.dtype() != DType::F32 {
        return Err(retype(tensor));
    }
    Ok((nccl, tensor))
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

fn sync_error(nccl: &NcclCommunicator, e: impl std::fmt::Debug) -> DistError {
    DistError::Nccl { rank: nccl.rank(), op: "synchronising the CUDA backend".into(), detail: format!("{e:?}") }
}

fn resource_error(nccl: &NcclCommunicator, detail: String) -> DistError {
    DistError::Nccl { rank: nccl.rank(), op: "reading a tensor's device buffer".into(), detail }
}
