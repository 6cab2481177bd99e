//! NCCL collectives through cudarc (`nccl` feature, enabled by the `cuda` and `tch` builds): the
//! GPU transport.
//!
//! The TCP rendezvous ([`TcpCommunicator`]) comes first: it checks that every rank arrived and
//! carries NCCL's unique id from rank 0 to the others; it then serves `barrier`. Each collective
//! copies the host buffer to the device of `LOCAL_RANK`, runs the NCCL call on a dedicated
//! stream, and copies back. A watchdog polls the stream's completion: if the call has not
//! finished within the timeout (a peer died or is stuck: NCCL itself would wait forever), the
//! communicator is marked failed and returns [`DistError::Nccl`]; dropping it aborts the NCCL
//! communicator (`ncclCommAbort`).
//!
//! The `*_on_device` methods run the same calls on buffers already on the GPU (raw device
//! pointers another library owns: the trainer's flat tensors), with no copy.
//!
//! Uneven [`ShardLayout`]s are padded to equal chunks of `max_shard_len` for NCCL's
//! reduce-scatter and all-gather, and unpadded on the way back.
//!
//! Determinism: NCCL sums in its own order (ring/tree, chosen per size and topology), not rank
//! order; results are identical across ranks for all-reduce and reproducible run to run on the
//! same topology with `NCCL_ALGO` and `NCCL_PROTO` fixed, but not bit-identical to the TCP
//! transport's rank-order sums.
//!
//! Compiled (`cargo check -p alignment-distributed --features nccl`) but not run in this
//! repository's CI: there is no GPU there.

use crate::comm::{check_layout, check_shard};
use crate::{Communicator, DistEnv, DistError, ShardLayout, TcpCommunicator};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// [`Communicator`] over NCCL, one process per GPU (`LOCAL_RANK` selects the device).
pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    stream: Arc<CudaStream>,
    comm: Comm,
    tcp: TcpCommunicator,
    timeout: Duration,
    failed: Option<String>,
}

// SAFETY: the raw NCCL communicator is only used through `&mut self` (one thread at a time);
// NCCL communicators may be used from any thread as long as calls are not concurrent.
unsafe impl Send for NcclCommunicator {}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator").field("rank", &self.rank).field("world_size", &self.world_size).finish()
    }
}

impl NcclCommunicator {
    /// Rendezvous over TCP at `env.master()`, then `ncclCommInitRank` on GPU `env.local_rank`
    /// with the unique id rank 0 created. `timeout` bounds the rendezvous and every collective.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self, DistError> {
        let mut tcp = TcpCommunicator::connect(env, timeout)?;
        let rank = env.rank;
        let nccl_error = |op: &str, detail: String| DistError::Nccl { rank, op: op.to_string(), detail };
        let ctx = CudaContext::new(env.local_rank).map_err(|e| nccl_error("cuCtxCreate", format!("GPU {}: {e:?}", env.local_rank)))?;
        let stream = ctx.new_stream().map_err(|e| nccl_error("cuStreamCreate", format!("{e:?}")))?;
        let mut id_bytes = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", format!("{e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        tcp.broadcast_bytes(&mut id_bytes, 0)?;
        let internal: [std::ffi::c_char; 128] = id_bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| nccl_error("unique id exchange", format!("received {} bytes instead of 128", id_bytes.len())))?;
        let comm = Comm::from_rank(stream.clone(), rank, env.world_size, Id::uninit(internal))
            .map_err(|e| nccl_error("ncclCommInitRank", format!("{e:?}")))?;
        Ok(NcclCommunicator { rank, world_size: env.world_size, stream, comm, tcp, timeout, failed: None })
    }

    /// [`NcclCommunicator::connect`] from the environment; `Ok(None)` outside a multi-process job.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(None);
        };
        Ok(Some(Self::connect(&env, crate::env::timeout_from_env()?)?))
    }

    /// The NCCL communicator itself (the `*_on_device` methods below wrap it for the trainer's
    /// device buffers).
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// The stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU this rank's collectives run on (`LOCAL_RANK`): device buffers handed to the
    /// `*_on_device` methods must live there.
    pub fn device_ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    fn check(&self) -> Result<(), DistError> {
        match &self.failed {
            Some(first_error) => Err(DistError::Poisoned { rank: self.rank, first_error: first_error.clone() }),
            None => Ok(()),
        }
    }

    fn fail(&mut self, op: &str, detail: String) -> DistError {
        let error = DistError::Nccl { rank: self.rank, op: op.to_string(), detail };
        self.failed = Some(error.to_string());
        error
    }

    /// Waits for the work queued on the stream, at most the timeout.
    fn wait(&mut self, op: &str) -> Result<(), DistError> {
        let event = match self.stream.record_event(None) {
            Ok(event) => event,
            Err(e) => return Err(self.fail(op, format!("cuEventRecord: {e:?}"))),
        };
        let start = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(op, format!("{e:?}"))),
            }
            if start.elapsed() > self.timeout {
                let timeout = self.timeout;
                return Err(self.fail(op, format!("did not complete within {timeout:?}: a rank died or is stuck outside the collective (NCCL does not say which; raise ALIGNMENT_DIST_TIMEOUT_S for long phases)")));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn upload(&mut self, op: &str, values: &[f32]) -> Result<CudaSlice<f32>, DistError> {
        // NCCL and CUDA reject zero-sized buffers in places: keep at least one element.
        let result = if values.is_empty() { self.stream.alloc_zeros::<f32>(1) } else { self.stream.clone_htod(values) };
        result.map_err(|e| self.fail(op, format!("host to device copy: {e:?}")))
    }

    fn download(&mut self, op: &str, slice: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, DistError> {
        let mut out = match self.stream.clone_dtoh(slice) {
            Ok(out) => out,
            Err(e) => return Err(self.fail(op, format!("device to host copy: {e:?}"))),
        };
        if let Err(e) = self.stream.synchronize() {
            return Err(self.fail(op, format!("{e:?}")));
        }
        out.truncate(len);
        Ok(out)
    }

    fn nccl<T>(&mut self, op: &str, result: Result<T, cudarc::nccl::result::NcclError>) -> Result<(), DistError> {
        match result {
            Ok(_) => self.wait(op),
            Err(e) => Err(self.fail(op, format!("{:?}", e.0))),
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), DistError> {
        self.check()?;
        if buffer.is_empty() {
            return self.barrier();
        }
        let mut slice = self.upload("all_reduce", buffer)?;
        let result = self.comm.all_reduce_in_place(&mut slice, &ReduceOp::Sum);
        self.nccl("all_reduce", result)?;
        let out = self.download("all_reduce", &slice, buffer.len())?;
        buffer.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buffer: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError> {
        self.check()?;
        check_layout(self.rank, self.world_size, layout, buffer.len(), "reduce_scatter")?;
        let chunk = layout.max_shard_len().max(1);
        let mut padded = vec![0f32; chunk * self.world_size];
        for r in 0..self.world_size {
            let range = layout.range(r);
            padded[r * chunk..r * chunk + range.len()].copy_from_slice(&buffer[range]);
        }
        let send = self.upload("reduce_scatter", &padded)?;
        let mut recv = self.upload("reduce_scatter", &vec![0f32; chunk])?;
        let result = self.comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum);
        self.nccl("reduce_scatter", result)?;
        self.download("reduce_scatter", &recv, layout.shard_len(self.rank))
    }

    fn all_gather(&mut self, shard: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError> {
        self.check()?;
        check_shard(self.rank, self.world_size, layout, shard.len(), "all_gather")?;
        let chunk = layout.max_shard_len().max(1);
        let mut padded = vec![0f32; chunk];
        padded[..shard.len()].copy_from_slice(shard);
        let send = self.upload("all_gather", &padded)?;
        let mut recv = self.upload("all_gather", &vec![0f32; chunk * self.world_size])?;
        let result = self.comm.all_gather(&send, &mut recv);
        self.nccl("all_gather", result)?;
        let gathered = self.download("all_gather", &recv, chunk * self.world_size)?;
        Ok((0..self.world_size).flat_map(|r| gathered[r * chunk..r * chunk + layout.shard_len(r)].to_vec()).collect())
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), DistError> {
        self.check()?;
        if root >= self.world_size {
            return Err(DistError::InvalidArgument {
                rank: self.rank,
                detail: format!("broadcast: root {root} out of range for world size {}", self.world_size),
            });
        }
        if buffer.is_empty() {
            return self.barrier();
        }
        let mut slice = self.upload("broadcast", buffer)?;
        let result = self.comm.broadcast_in_place(&mut slice, root as i32);
        self.nccl("broadcast", result)?;
        let out = self.download("broadcast", &slice, buffer.len())?;
        buffer.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        self.check()?;
        self.tcp.barrier()
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.tcp.set_timeout(timeout);
    }

    fn as_nccl(&mut self) -> Option<&mut NcclCommunicator> {
        Some(self)
    }
}

/// An f32 buffer on this rank's GPU that another library owns (a burn tensor's storage), seen
/// by cudarc's NCCL calls. The owner's writes must have finished before the call (the caller
/// synchronises its streams); the NCCL call itself is waited for before the methods return.
struct BorrowedBuffer {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for BorrowedBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtr<f32> for BorrowedBuffer {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl DevicePtrMut<f32> for BorrowedBuffer {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

/// Collectives on device buffers: the data-parallel step's gradients and parameters reduced
/// and gathered where they are, with no host copy. Each takes raw `CUdeviceptr`s of f32 buffers
/// on GPU `LOCAL_RANK` and returns once NCCL has finished with them (at most the timeout).
///
/// # Safety
/// Every pointer must address at least the number of f32 values the method names, on this
/// rank's GPU, and stay allocated until the method returns; no other work may write them
/// meanwhile (the caller has synchronised the streams that produced them).
impl NcclCommunicator {
    fn borrowed(&self, ptr: u64, len: usize) -> BorrowedBuffer {
        BorrowedBuffer { ptr, len, stream: self.stream.clone() }
    }

    /// Sums the `len` values at `send` over all ranks into `recv` (which may be `send`).
    ///
    /// # Safety
    /// See the `impl` block: `send` and `recv` hold `len` f32 on this rank's GPU.
    pub unsafe fn all_reduce_sum_on_device(&mut self, send: u64, recv: u64, len: usize) -> Result<(), DistError> {
        self.check()?;
        let send = self.borrowed(send, len);
        let mut recv = self.borrowed(recv, len);
        let result = self.comm.all_reduce(&send, &mut recv, &ReduceOp::Sum);
        self.nccl("all_reduce", result)
    }

    /// Sums `send` (`chunk × world_size` values) over all ranks and writes this rank's chunk of
    /// the sum (`chunk` values) to `recv`.
    ///
    /// # Safety
    /// See the `impl` block: `send` holds `chunk × world_size` f32, `recv` `chunk`.
    pub unsafe fn reduce_scatter_sum_on_device(&mut self, send: u64, recv: u64, chunk: usize) -> Result<(), DistError> {
        self.check()?;
        let send = self.borrowed(send, chunk * self.world_size);
        let mut recv = self.borrowed(recv, chunk);
        let result = self.comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum);
        self.nccl("reduce_scatter", result)
    }

    /// Copies `root`'s `send` (`len` values) into every rank's `recv` (`send` is read on `root`
    /// only).
    ///
    /// # Safety
    /// See the `impl` block: `send` and `recv` hold `len` f32 on this rank's GPU.
    pub unsafe fn broadcast_on_device(&mut self, send: u64, recv: u64, len: usize, root: usize) -> Result<(), DistError> {
        self.check()?;
        let send = self.borrowed(send, len);
        let mut recv = self.borrowed(recv, len);
        let result = self.comm.broadcast(Some(&send), &mut recv, root as i32);
        self.nccl("broadcast", result)
    }

    /// Writes every rank's `send` (`chunk` values) into `recv` in rank order.
    ///
    /// # Safety
    /// See the `impl` block: `send` holds `chunk` f32, `recv` `chunk × world_size`.
    pub unsafe fn all_gather_on_device(&mut self, send: u64, recv: u64, chunk: usize) -> Result<(), DistError> {
        self.check()?;
        let send = self.borrowed(send, chunk);
        let mut recv = self.borrowed(recv, chunk * self.world_size);
        let result = self.comm.all_gather(&send, &mut recv);
        self.nccl("all_gather", result)
    }
}
