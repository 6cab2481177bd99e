//! NCCL on libtorch's own buffers ([`crate::device_collectives`] for the `tch` build): a
//! multi-GPU run on the libtorch route sums its gradients and gathers its shards where torch
//! holds them, rather than through host memory and TCP.
//!
//! A tensor of the libtorch backend on the communicator's GPU is its torch tensor; made
//! contiguous, its `data_ptr` is the raw device address NCCL reads or writes (the result goes
//! into a new torch tensor). torch's kernels run on torch's streams and NCCL on the
//! communicator's own, so the GPU is synchronised first (`torch.cuda.synchronize`: the kernels
//! that wrote the input have finished), and the call returns once NCCL has finished, so torch's
//! next kernels see the result. Both tensors are held until then, so torch's caching allocator
//! cannot hand their memory to anything else meanwhile.
//!
//! Public for `bench_train nccl` (see [`crate::device_collectives`]).

use crate::device_collectives::NcclBuffers;
use alignment_core::backend::{downcast, retype};
use alignment_distributed::{DistError, NcclCommunicator};
use burn::backend::libtorch::{LibTorch, LibTorchDevice, TchTensor};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};

type Torch = LibTorch<f32>;

/// libtorch's CUDA buffers, lent to NCCL.
pub struct TorchBuffers;

impl NcclBuffers for TorchBuffers {
    type Gpu = Torch;

    fn accept<B: Backend>(nccl: &NcclCommunicator, tensor: Tensor<B, 1>) -> Result<Tensor<Torch, 1>, Tensor<B, 1>> {
        let tensor: Tensor<Torch, 1> = downcast(tensor)?;
        let on_the_communicators_gpu = tensor.device() == LibTorchDevice::Cuda(nccl.device_ordinal());
        if tensor.dtype() != DType::F32 || !on_the_communicators_gpu {
            return Err(retype(tensor));
        }
        Ok(tensor)
    }

    fn into_new_buffer(
        nccl: &mut NcclCommunicator,
        send: &Tensor<Torch, 1>,
        recv_len: usize,
        call: impl FnOnce(&mut NcclCommunicator, u64, u64) -> Result<(), DistError>,
    ) -> Result<Tensor<Torch, 1>, DistError> {
        let send = send.clone().into_primitive().tensor().tensor;
        let send = if send.is_contiguous() { send } else { send.contiguous() };
        let recv = tch::Tensor::zeros([recv_len as i64], (tch::Kind::Float, send.device()));
        tch::Cuda::synchronize(nccl.device_ordinal() as i64);
        call(nccl, send.data_ptr() as u64, recv.data_ptr() as u64)?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(TchTensor::new(recv))))
    }
}
