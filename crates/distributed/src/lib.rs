#![warn(missing_docs)]
//! `alignment-distributed`: multi-process data-parallel training (issue #7).
//!
//! - [`DistEnv`] reads rank and world from torchrun's or Slurm's environment variables.
//! - [`Communicator`] is the collective interface over flat host `f32` buffers, with
//!   deterministic rank-order sums: [`LocalCommunicator`] (one process), [`TcpCommunicator`]
//!   (CPU, a TCP mesh between processes) and, with the `nccl` feature, `NcclCommunicator`,
//!   which also runs them on device buffers (`*_on_device`, for the trainer's flat tensors).
//! - [`zero`]: ZeRO stages, accelerate-style configs, per-rank memory and [`ZeroPlan`], the
//!   per-step synchronisation the trainer performs around its optimizer.
//! - [`launch`]: the launcher behind `cargo xtask launch`.
//!
//! See `docs/distributed.md` for the design and the scaling plan.

mod comm;
pub mod env;
mod error;
pub mod launch;
#[cfg(feature = "nccl")]
mod nccl;
mod shard;
mod tcp;
pub mod zero;

pub use comm::{Communicator, LocalCommunicator};
pub use env::{timeout_from_env, DistEnv};
pub use error::DistError;
#[cfg(feature = "nccl")]
pub use nccl::NcclCommunicator;
pub use shard::ShardLayout;
pub use tcp::TcpCommunicator;
pub use zero::{AccelerateConfig, ZeroPlan, ZeroStage};

/// The CPU communicator for this process: [`LocalCommunicator`] when the environment describes
/// no multi-process job, otherwise a [`TcpCommunicator`] connected to the other ranks (timeout
/// from `ALIGNMENT_DIST_TIMEOUT_S`). GPU training uses `NcclCommunicator::from_env` instead.
pub fn communicator_from_env() -> Result<Box<dyn Communicator>, DistError> {
    Ok(match TcpCommunicator::from_env()? {
        Some(comm) => Box::new(comm),
        None => Box::new(LocalCommunicator::new()),
    })
}
