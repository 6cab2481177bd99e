//! NCCL on a GPU backend's own buffers: the device route of [`crate::tensor_collectives`],
//! written once for every backend that can lend NCCL a raw device pointer ([`NcclBuffers`]:
//! burn-cuda in `cuda_collectives.rs`, libtorch in `tch_collectives.rs`).
//!
//! Each collective reads its input where the model computed it and writes into a new buffer on
//! the same GPU: the backend is synchronised first (the kernels writing the input have
//! finished, whatever streams they ran on), NCCL runs on the communicator's stream, and the call
//! returns once NCCL has finished, so the kernels queued next see the result. Uneven
//! [`ShardLayout`]s are padded to equal chunks of `max_shard_len` on the device, as
//! `NcclCommunicator` pads host buffers.
//!
//! Each function gives the buffer back (`Ok(Err(buffer))`) when the route does not apply: the
//! communicator is not NCCL's, or the tensor is not an f32 tensor of the backend on the
//! communicator's GPU. Public for `bench_train nccl`, which runs each backend's route at world
//! size 1 on one GPU (where [`crate::tensor_collectives`] would take the identity) against the
//! values it must give; compiled here, run only where there are GPUs (issue #12).

use alignment_distributed::{Communicator, DistError, NcclCommunicator, ShardLayout};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// What a route that does not apply gives back: the caller's tensor, untouched.
pub type Declined<B> = Result<Tensor<B, 1>, Tensor<B, 1>>;

/// A GPU backend whose f32 buffers NCCL can read and write in place.
pub trait NcclBuffers {
    /// The backend whose tensors this route takes.
    type Gpu: Backend;

    /// `tensor` as an f32 tensor of [`Self::Gpu`] on `nccl`'s GPU; otherwise `tensor` itself.
    fn accept<B: Backend>(nccl: &NcclCommunicator, tensor: Tensor<B, 1>) -> Result<Tensor<Self::Gpu, 1>, Tensor<B, 1>>;

    /// One NCCL call from `send` into a new buffer of `recv_len` f32 on the same device: the
    /// backend synchronised first, both buffers' addresses taken (contiguous) and kept allocated
    /// while `call` runs; `call` returns once NCCL has finished with them.
    fn into_new_buffer(
        nccl: &mut NcclCommunicator,
        send: &Tensor<Self::Gpu, 1>,
        recv_len: usize,
        call: impl FnOnce(&mut NcclCommunicator, u64, u64) -> Result<(), DistError>,
    ) -> Result<Tensor<Self::Gpu, 1>, DistError>;
}

/// The NCCL communicator and the tensor as `R`'s, when both are; else the tensor.
fn applicable<R: NcclBuffers, B: Backend>(
    comm: &mut dyn Communicator,
    tensor: Tensor<B, 1>,
) -> Result<(&mut NcclCommunicator, Tensor<R::Gpu, 1>), Tensor<B, 1>> {
    let Some(nccl) = comm.as_nccl() else { return Err(tensor) };
    let tensor = R::accept(nccl, tensor)?;
    Ok((nccl, tensor))
}

/// [`crate::tensor_collectives::all_reduce_sum`] on the device, into a new buffer (`buffer`'s
/// may be shared: a reshaped gradient is a view of the gradient).
pub fn all_reduce_sum<R: NcclBuffers, B: Backend>(comm: &mut dyn Communicator, buffer: Tensor<B, 1>) -> Result<Declined<B>, DistError> {
    let (nccl, buffer) = match applicable::<R, B>(comm, buffer) {
        Ok(pair) => pair,
        Err(buffer) => return Ok(Err(buffer)),
    };
    let len = buffer.dims()[0];
    // SAFETY: both buffers hold `len` f32 (see `into_new_buffer`).
    let sum = R::into_new_buffer(nccl, &buffer, len, |nccl, send, recv| unsafe { nccl.all_reduce_sum_on_device(send, recv, len) })?;
    Ok(Ok(alignment_core::backend::retype(sum)))
}

/// [`crate::tensor_collectives::reduce_scatter_sum`] on the device.
pub fn reduce_scatter_sum<R: NcclBuffers, B: Backend>(
    comm: &mut dyn Communicator,
    buffer: Tensor<B, 1>,
    layout: &ShardLayout,
) -> Result<Declined<B>, DistError> {
    let (nccl, buffer) = match applicable::<R, B>(comm, buffer) {
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
    let shard =
        R::into_new_buffer(nccl, &padded, chunk, |nccl, send, recv| unsafe { nccl.reduce_scatter_sum_on_device(send, recv, chunk) })?;
    let own = layout.shard_len(rank);
    let shard = if own == chunk { shard } else { shard.narrow(0, 0, own) };
    Ok(Ok(alignment_core::backend::retype(shard)))
}

/// [`crate::tensor_collectives::all_gather`] on the device.
pub fn all_gather<R: NcclBuffers, B: Backend>(
    comm: &mut dyn Communicator,
    shard: Tensor<B, 1>,
    layout: &ShardLayout,
) -> Result<Declined<B>, DistError> {
    let (nccl, shard) = match applicable::<R, B>(comm, shard) {
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
        R::into_new_buffer(nccl, &padded, chunk * world, |nccl, send, recv| unsafe { nccl.all_gather_on_device(send, recv, chunk) })?;
    let parts: Vec<Tensor<R::Gpu, 1>> =
        (0..world).filter(|&r| layout.shard_len(r) > 0).map(|r| gathered.clone().narrow(0, r * chunk, layout.shard_len(r))).collect();
    Ok(Ok(alignment_core::backend::retype(Tensor::cat(parts, 0))))
}

/// [`crate::tensor_collectives::broadcast`] on the device, into a new buffer.
pub fn broadcast<R: NcclBuffers, B: Backend>(
    comm: &mut dyn Communicator,
    buffer: Tensor<B, 1>,
    root: usize,
) -> Result<Declined<B>, DistError> {
    let (nccl, buffer) = match applicable::<R, B>(comm, buffer) {
        Ok(pair) => pair,
        Err(buffer) => return Ok(Err(buffer)),
    };
    let len = buffer.dims()[0];
    // SAFETY: both buffers hold `len` f32 (see `into_new_buffer`).
    let copy = R::into_new_buffer(nccl, &buffer, len, |nccl, send, recv| unsafe { nccl.broadcast_on_device(send, recv, len, root) })?;
    Ok(Ok(alignment_core::backend::retype(copy)))
}
