//! A training step captured once as a CUDA graph and replayed (libtorch, `--features tch`).
//!
//! On the default small model the GPU step is the host's: burn's autodiff and the torch calls
//! under it issue thousands of operations a step, each a few microseconds of host time, while the
//! kernels themselves take a fraction of the step (docs/performance.md, "The next lever").
//! Replaying a captured step launches every kernel with one call. What that asks of the step: every
//! value that changes between steps lives on the device before capture (the batch in tensors made
//! before it, AdamW's step count and learning rate as tensors: `tch_adamw`), nothing is read back
//! to the host inside it, and the parameters and moments are updated in place, so that each replay
//! reads what the previous one wrote.
//!
//! [`SideStream`] makes a stream from torch's pool current (capture cannot use the default
//! stream; warm-up steps run there too, so that cuBLAS's workspaces and the like exist before
//! capture), [`CudaGraph::capture`] records a closure's work, [`CudaGraph::replay`] runs it again.
//! The C++ side is `csrc/cuda_graph.cpp`, built only where CUDA's runtime headers were given
//! (`ALIGNMENT_CUDA_RUNTIME`, set by `scripts/gpu/run.sh stage`): elsewhere every call returns
//! [`GraphError::NotBuilt`].

use crate::optimizer::AdamW;
use alignment_core::backend::retype;
use burn::backend::libtorch::{LibTorch, TchTensor};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use std::ffi::c_void;
#[cfg(alignment_cuda_graph)]
use std::ffi::{c_char, c_int, CStr};

/// Why a graph could not be captured or replayed.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// This binary was built without `csrc/cuda_graph.cpp`.
    #[error("this binary was built without CUDA graphs (build it against a CUDA libtorch with ALIGNMENT_CUDA_RUNTIME set: scripts/gpu/run.sh stage)")]
    NotBuilt,
    /// torch refused (the message is torch's: a host synchronisation or a host-to-device copy
    /// inside the captured work, an operation that cannot be captured, ...).
    #[error("torch's CUDA graph {what} failed: {message}")]
    Torch { what: &'static str, message: String },
}

#[cfg(alignment_cuda_graph)]
extern "C" {
    fn alignment_side_stream_enter(device: c_int, guard: *mut *mut c_void) -> *mut c_char;
    fn alignment_side_stream_leave(guard: *mut c_void) -> *mut c_char;
    fn alignment_graph_capture_begin(graph: *mut *mut c_void, share_pool_with: *mut c_void) -> *mut c_char;
    fn alignment_graph_capture_end(graph: *mut c_void) -> *mut c_char;
    fn alignment_graph_replay(graph: *mut c_void) -> *mut c_char;
    fn alignment_graph_free(graph: *mut c_void);
    fn free(ptr: *mut c_void);
}

/// Turns a C++ entry's error message (or nullptr) into a result.
#[cfg(alignment_cuda_graph)]
fn check(what: &'static str, error: *mut c_char) -> Result<(), GraphError> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from strdup, freed once.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { free(error.cast()) };
    Err(GraphError::Torch { what, message })
}

/// While alive, a stream from torch's pool is the calling thread's current stream on its GPU:
/// everything torch launches from this thread (and the backward passes torch's autograd runs for
/// it) goes there. Dropping it waits for that stream and restores the previous one.
pub struct SideStream {
    guard: *mut c_void,
}

impl SideStream {
    /// Waits for the work queued so far on GPU `device`, then makes a pool stream current.
    pub fn enter(device: usize) -> Result<Self, GraphError> {
        #[cfg(alignment_cuda_graph)]
        {
            let mut guard = std::ptr::null_mut();
            // SAFETY: the entry writes a new guard into `guard` or returns an error.
            check("stream switch", unsafe { alignment_side_stream_enter(device as c_int, &mut guard) })?;
            Ok(SideStream { guard })
        }
        #[cfg(not(alignment_cuda_graph))]
        {
            let _ = device;
            Err(GraphError::NotBuilt)
        }
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        #[cfg(alignment_cuda_graph)]
        // SAFETY: `guard` came from `enter` and is left once. An error here (the device failed
        // while the stream drained) has no one to go to: the next torch call reports it.
        let _ = check("stream switch", unsafe { alignment_side_stream_leave(self.guard) });
        #[cfg(not(alignment_cuda_graph))]
        let _ = self.guard;
    }
}

/// A captured CUDA graph: the kernels some work launched, with the memory it used kept in a
/// pool of its own, replayed with one call.
pub struct CudaGraph {
    graph: *mut c_void,
}

impl CudaGraph {
    /// Records what `work` launches on the current stream (a [`SideStream`]) into a graph,
    /// returning it with `work`'s result. The kernels do not run during capture: the result's
    /// tensors hold their values only after a replay. Fails with torch's message if `work`
    /// synchronises with the host or copies from host memory.
    pub fn capture<T>(work: impl FnOnce() -> T) -> Result<(Self, T), GraphError> {
        Self::capture_sharing(None, work)
    }

    /// [`CudaGraph::capture`], the graph allocating from `pool_of`'s memory pool when given
    /// (`torch.cuda.graph(pool=...)`): graphs of a run's several batch shapes then take the
    /// memory of the largest one's intermediates, not the sum. Only for graphs that never read
    /// what another left in the pool: a replay's outputs are copied out before the next replay.
    pub fn capture_sharing<T>(pool_of: Option<&CudaGraph>, work: impl FnOnce() -> T) -> Result<(Self, T), GraphError> {
        #[cfg(alignment_cuda_graph)]
        {
            let mut graph = std::ptr::null_mut();
            let share = pool_of.map_or(std::ptr::null_mut(), |g| g.graph);
            // SAFETY: the entry writes a new graph into `graph` or returns an error; `share` is
            // null or a captured graph, alive for the call.
            check("capture", unsafe { alignment_graph_capture_begin(&mut graph, share) })?;
            let graph = CudaGraph { graph };
            let out = work();
            // SAFETY: `graph.graph` is the graph whose capture began above.
            check("capture", unsafe { alignment_graph_capture_end(graph.graph) })?;
            Ok((graph, out))
        }
        #[cfg(not(alignment_cuda_graph))]
        {
            let _ = (pool_of, work);
            Err(GraphError::NotBuilt)
        }
    }

    /// Launches every captured kernel again, on the current stream.
    pub fn replay(&self) -> Result<(), GraphError> {
        #[cfg(alignment_cuda_graph)]
        {
            // SAFETY: `self.graph` is a captured graph, alive until drop.
            check("replay", unsafe { alignment_graph_replay(self.graph) })
        }
        #[cfg(not(alignment_cuda_graph))]
        Err(GraphError::NotBuilt)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(alignment_cuda_graph)]
        // SAFETY: freed once; torch takes back the graph's memory pool.
        unsafe {
            alignment_graph_free(self.graph)
        };
        #[cfg(not(alignment_cuda_graph))]
        let _ = self.graph;
    }
}

/// Where a training step's state lives on the device: every parameter of `module` (in visiting
/// order), then `optimizer`'s moments (by path) and its step count and learning rate, as
/// (name, address) pairs. A captured step must leave them all where they were — updated in place —
/// or its replays would read the state from before capture and write where nothing reads: compare
/// this before and after [`CudaGraph::capture`]. Empty unless the inner backend is libtorch's f32
/// one, the only one the fused in-place update runs on.
pub fn state_addresses<AD: AutodiffBackend, M: AutodiffModule<AD>>(
    module: &M,
    optimizer: &AdamW<AD::InnerBackend>,
) -> Vec<(String, usize)> {
    if !crate::tch_adamw::applies::<AD::InnerBackend>() {
        return Vec::new();
    }
    struct Addresses {
        out: Vec<(String, usize)>,
    }
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for Addresses {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            self.out.push((format!("parameter {}", self.out.len()), address(param.val().inner())));
        }
    }
    let mut addresses = Addresses { out: Vec::new() };
    module.visit(&mut addresses);
    let mut moments: Vec<_> = optimizer.state.iter().collect();
    moments.sort_by(|a, b| a.0.cmp(b.0));
    for (path, m) in moments {
        addresses.out.push((format!("{path} exp_avg"), address(m.exp_avg.clone())));
        addresses.out.push((format!("{path} exp_avg_sq"), address(m.exp_avg_sq.clone())));
    }
    if let Some(scalars) = &optimizer.device_scalars {
        addresses.out.push(("AdamW's step count".into(), address(scalars.step.clone())));
        addresses.out.push(("AdamW's learning rate".into(), address(scalars.lr.clone())));
    }
    addresses.out
}

/// The device address of a libtorch f32 tensor's first element.
fn address<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> usize {
    let primitive: TchTensor = retype::<_, Tensor<LibTorch<f32>, D>>(tensor).into_primitive().tensor();
    primitive.tensor.data_ptr() as usize
}

/// Whether this binary can capture CUDA graphs (built with `csrc/cuda_graph.cpp`).
pub fn built() -> bool {
    cfg!(alignment_cuda_graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `csrc/cuda_graph.cpp` (every build but the device's), each entry says so rather
    /// than failing later; with it but no GPU, torch's own error comes back, not a crash.
    #[test]
    fn without_a_gpu_capture_is_refused_with_a_reason() {
        let entered = SideStream::enter(0);
        let captured = CudaGraph::capture(|| 1);
        if built() {
            assert!(matches!(entered, Err(GraphError::Torch { .. })), "a CUDA stream without a GPU");
        } else {
            assert!(matches!(entered, Err(GraphError::NotBuilt)));
            assert!(matches!(captured, Err(GraphError::NotBuilt)));
            assert!(GraphError::NotBuilt.to_string().contains("ALIGNMENT_CUDA_RUNTIME"));
        }
    }
}
