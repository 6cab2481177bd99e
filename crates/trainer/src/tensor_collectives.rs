//! Collectives on flat backend tensors (`[len]`, f32): what the data-parallel step calls so that
//! its gradients, parameters and moments stay where the model computes (`data_parallel.rs`).
//!
//! Each call takes the route its arguments allow:
//! - **a world of one**: the identity; nothing is read or copied;
//! - **NCCL on the device** (a GPU build's CUDA tensor and an NCCL communicator): on the
//!   tensor's own buffer, into a new one (`device_collectives.rs`: burn-cuda's buffers in
//!   `cuda_collectives.rs`, libtorch's in `tch_collectives.rs`);
//! - **through the host** otherwise: the tensor is read, the [`Communicator`] runs on host
//!   slices (TCP between CPU processes), and the result is written back to the tensor's device.
//!
//! The host route is what the CPU backend does anyway (its device is the host); on a GPU it is
//! the fallback that keeps every transport working.

#[cfg(feature = "cuda")]
use crate::cuda_collectives::CubeBuffers;
#[cfg(any(feature = "cuda", feature = "tch"))]
use crate::device_collectives as device;
#[cfg(feature = "tch")]
use crate::tch_collectives::TorchBuffers;
use alignment_distributed::{Communicator, DistError, ShardLayout};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// `buffer` summed over all ranks, identical on every rank.
pub(crate) fn all_reduce_sum<B: Backend>(comm: &mut dyn Communicator, buffer: Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError> {
    if comm.world_size() == 1 {
        return Ok(buffer);
    }
    #[cfg(feature = "cuda")]
    let buffer = match device::all_reduce_sum::<CubeBuffers, B>(comm, buffer)? {
        Ok(reduced) => return Ok(reduced),
        Err(buffer) => buffer,
    };
    #[cfg(feature = "tch")]
    let buffer = match device::all_reduce_sum::<TorchBuffers, B>(comm, buffer)? {
        Ok(reduced) => return Ok(reduced),
        Err(buffer) => buffer,
    };
    through_host(buffer, |mut values| {
        comm.all_reduce_sum(&mut values)?;
        Ok(values)
    })
}

/// This rank's shard (`layout.range(rank)`) of `buffer` (`layout.len()` values) summed over
/// all ranks.
pub(crate) fn reduce_scatter_sum<B: Backend>(
    comm: &mut dyn Communicator,
    buffer: Tensor<B, 1>,
    layout: &ShardLayout,
) -> Result<Tensor<B, 1>, DistError> {
    if comm.world_size() == 1 && layout.world_size() == 1 && buffer.dims()[0] == layout.len() {
        return Ok(buffer);
    }
    #[cfg(feature = "cuda")]
    let buffer = match device::reduce_scatter_sum::<CubeBuffers, B>(comm, buffer, layout)? {
        Ok(shard) => return Ok(shard),
        Err(buffer) => buffer,
    };
    #[cfg(feature = "tch")]
    let buffer = match device::reduce_scatter_sum::<TorchBuffers, B>(comm, buffer, layout)? {
        Ok(shard) => return Ok(shard),
        Err(buffer) => buffer,
    };
    through_host(buffer, |values| comm.reduce_scatter_sum(&values, layout))
}

/// Every rank's `shard` concatenated in rank order: the whole buffer of `layout.len()` values.
pub(crate) fn all_gather<B: Backend>(
    comm: &mut dyn Communicator,
    shard: Tensor<B, 1>,
    layout: &ShardLayout,
) -> Result<Tensor<B, 1>, DistError> {
    if comm.world_size() == 1 && layout.world_size() == 1 && shard.dims()[0] == layout.len() {
        return Ok(shard);
    }
    #[cfg(feature = "cuda")]
    let shard = match device::all_gather::<CubeBuffers, B>(comm, shard, layout)? {
        Ok(whole) => return Ok(whole),
        Err(shard) => shard,
    };
    #[cfg(feature = "tch")]
    let shard = match device::all_gather::<TorchBuffers, B>(comm, shard, layout)? {
        Ok(whole) => return Ok(whole),
        Err(shard) => shard,
    };
    through_host(shard, |values| comm.all_gather(&values, layout))
}

/// `root`'s `buffer` on every rank (the same length everywhere).
pub(crate) fn broadcast<B: Backend>(comm: &mut dyn Communicator, buffer: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, DistError> {
    if comm.world_size() == 1 && root == 0 {
        return Ok(buffer);
    }
    #[cfg(feature = "cuda")]
    let buffer = match device::broadcast::<CubeBuffers, B>(comm, buffer, root)? {
        Ok(copied) => return Ok(copied),
        Err(buffer) => buffer,
    };
    #[cfg(feature = "tch")]
    let buffer = match device::broadcast::<TorchBuffers, B>(comm, buffer, root)? {
        Ok(copied) => return Ok(copied),
        Err(buffer) => buffer,
    };
    through_host(buffer, |mut values| {
        comm.broadcast(&mut values, root)?;
        Ok(values)
    })
}

/// The host route: `buffer`'s values read, `collective` run on them, its result written back to
/// `buffer`'s device.
fn through_host<B: Backend>(
    buffer: Tensor<B, 1>,
    collective: impl FnOnce(Vec<f32>) -> Result<Vec<f32>, DistError>,
) -> Result<Tensor<B, 1>, DistError> {
    let device = buffer.device();
    let values = collective(buffer.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert"))?;
    let len = values.len();
    Ok(Tensor::from_data(TensorData::new(values, [len]), &device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alignment_distributed::LocalCommunicator;

    type B = alignment_core::backend::Cpu;

    #[test]
    fn a_world_of_one_returns_its_buffers_as_they_are() {
        let device = Default::default();
        let values = [1.0f32, -2.0, 3.5];
        let t = Tensor::<B, 1>::from_floats(values, &device);
        let layout = ShardLayout::new(3, 1);
        let mut comm = LocalCommunicator::new();
        for out in [
            all_reduce_sum(&mut comm, t.clone()).unwrap(),
            reduce_scatter_sum(&mut comm, t.clone(), &layout).unwrap(),
            all_gather(&mut comm, t.clone(), &layout).unwrap(),
            broadcast(&mut comm, t.clone(), 0).unwrap(),
        ] {
            assert_eq!(out.into_data().to_vec::<f32>().unwrap(), values);
        }
    }
}
