//! Contiguous partitioning of a flat buffer among ranks.

use std::ops::Range;

/// How a flat buffer of `len` values is split into `world_size` contiguous shards, one per rank
/// in rank order (DeepSpeed's flat partitioning, without its padding).
///
/// Shards are uneven by at most one value: the first `len % world_size` ranks hold
/// `len / world_size + 1` values, the others `len / world_size` (as `torch.tensor_split`).
/// Nothing is padded, so the shards concatenated in rank order are exactly the buffer; a
/// transport that needs equal chunks (NCCL's reduce-scatter/all-gather) pads internally to
/// [`ShardLayout::max_shard_len`] per rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardLayout {
    len: usize,
    world_size: usize,
}

impl ShardLayout {
    /// The layout of `len` values over `world_size` ranks. Panics if `world_size` is 0.
    pub fn new(len: usize, world_size: usize) -> Self {
        assert!(world_size > 0, "ShardLayout needs at least one rank");
        ShardLayout { len, world_size }
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of shards (ranks).
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The values `rank` owns. Panics if `rank >= world_size`.
    pub fn range(&self, rank: usize) -> Range<usize> {
        assert!(rank < self.world_size, "rank {rank} out of range for world size {}", self.world_size);
        let base = self.len / self.world_size;
        let extra = self.len % self.world_size;
        let start = rank * base + rank.min(extra);
        let end = start + base + usize::from(rank < extra);
        start..end
    }

    /// Number of values `rank` owns.
    pub fn shard_len(&self, rank: usize) -> usize {
        self.range(rank).len()
    }

    /// The largest shard (rank 0's): the per-rank chunk when padding to equal chunks.
    pub fn max_shard_len(&self) -> usize {
        self.len.div_ceil(self.world_size)
    }

    /// Which rank owns value `index`. Panics if `index >= len`.
    pub fn owner(&self, index: usize) -> usize {
        assert!(index < self.len, "index {index} out of range for {} values", self.len);
        (0..self.world_size).find(|&r| self.range(r).contains(&index)).expect("ranges cover the buffer")
    }
}
