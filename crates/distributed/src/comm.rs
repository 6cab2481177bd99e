//! The collective interface the trainer uses, and the single-process implementation.

use crate::{DistError, ShardLayout};
use std::time::Duration;

/// Collectives over flat host `f32` buffers: the trainer flattens gradients or parameters into
/// one `Vec<f32>` in a fixed parameter order, the same on every rank.
///
/// Every rank must call the same collectives in the same order with buffers of the same length
/// (a mismatch is detected by the TCP transport and reported as [`DistError::Protocol`]).
///
/// Sums are deterministic: each value is summed in rank order, `((x₀ + x₁) + x₂) + …`, and every
/// rank receives the same bits, so a run is reproducible and its ranks never drift apart.
/// After an error the communicator is unusable (later calls return [`DistError::Poisoned`]) and
/// its peers are disconnected so that they fail fast too.
pub trait Communicator: Send {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Replaces every value with its sum over all ranks (rank order), identical on every rank.
    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), DistError>;

    /// Sums `buffer` (the full `layout.len()` values) over all ranks and returns this rank's
    /// shard of the sum, `layout.range(rank())`.
    fn reduce_scatter_sum(&mut self, buffer: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError>;

    /// Concatenates every rank's `shard` (this rank's is `layout.range(rank())` long) in rank
    /// order into the full buffer of `layout.len()` values, identical on every rank.
    fn all_gather(&mut self, shard: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError>;

    /// Copies `root`'s `buffer` into every other rank's `buffer` (same length everywhere).
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), DistError>;

    /// Returns once every rank has called `barrier`.
    fn barrier(&mut self) -> Result<(), DistError>;

    /// Changes how long a collective waits for a silent peer before failing (for phases where
    /// one rank legitimately works alone for long, e.g. saving a checkpoint). No-op by default.
    fn set_timeout(&mut self, _timeout: Duration) {}

    /// The NCCL communicator this is, for collectives on device buffers (GPU builds: the `nccl`
    /// feature); `None` for host transports.
    #[cfg(feature = "nccl")]
    fn as_nccl(&mut self) -> Option<&mut crate::NcclCommunicator> {
        None
    }
}

/// Checks shared by the implementations: the layout matches the world and the buffer.
pub(crate) fn check_layout(rank: usize, world_size: usize, layout: &ShardLayout, len: usize, what: &str) -> Result<(), DistError> {
    if layout.world_size() != world_size {
        return Err(DistError::InvalidArgument {
            rank,
            detail: format!("{what}: layout is for {} ranks but the world has {world_size}", layout.world_size()),
        });
    }
    if len != layout.len() {
        return Err(DistError::InvalidArgument {
            rank,
            detail: format!("{what}: buffer has {len} values but the layout {}", layout.len()),
        });
    }
    Ok(())
}

/// Checks that a shard has the length the layout gives this rank.
pub(crate) fn check_shard(rank: usize, world_size: usize, layout: &ShardLayout, shard_len: usize, what: &str) -> Result<(), DistError> {
    check_layout(rank, world_size, layout, layout.len(), what)?;
    if shard_len != layout.shard_len(rank) {
        return Err(DistError::InvalidArgument {
            rank,
            detail: format!("{what}: shard has {shard_len} values but rank {rank} owns {} of {}", layout.shard_len(rank), layout.len()),
        });
    }
    Ok(())
}

/// The world of one process: every collective is the identity (rank 0 of 1).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCommunicator;

impl LocalCommunicator {
    /// A single-process communicator.
    pub fn new() -> Self {
        LocalCommunicator
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buffer: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buffer: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError> {
        check_layout(0, 1, layout, buffer.len(), "reduce_scatter")?;
        Ok(buffer.to_vec())
    }

    fn all_gather(&mut self, shard: &[f32], layout: &ShardLayout) -> Result<Vec<f32>, DistError> {
        check_shard(0, 1, layout, shard.len(), "all_gather")?;
        Ok(shard.to_vec())
    }

    fn broadcast(&mut self, _buffer: &mut [f32], root: usize) -> Result<(), DistError> {
        if root != 0 {
            return Err(DistError::InvalidArgument { rank: 0, detail: format!("broadcast root {root} out of range for world size 1") });
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        Ok(())
    }
}
