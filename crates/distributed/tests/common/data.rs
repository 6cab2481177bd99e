// Shared by the worker binary and the tests: each rank's deterministic input, with magnitudes
// spread over 1e-3..1e3 and both signs so that a different summation order changes bits.

/// Rank `rank`'s value at index `i`.
pub fn value(rank: usize, i: usize) -> f32 {
    let base = ((i * 7919 + rank * 104_729 + 13) % 1000) as f32 + 0.123_456_7;
    let scale = 10f32.powi(((i + 3 * rank) % 7) as i32 - 3);
    let sign = if (i + rank).is_multiple_of(3) { -1.0 } else { 1.0 };
    sign * base * scale
}

/// Rank `rank`'s buffer of `len` values.
pub fn buffer(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

/// The buffer lengths the collectives test uses (empty, fewer values than ranks, uneven, large).
pub const LENGTHS: [usize; 5] = [0, 2, 7, 1001, (1 << 18) + 3];

/// Values as their bit patterns (hex), for bit-for-bit comparisons between processes.
pub fn bits(values: &[f32]) -> String {
    values.iter().map(|v| format!("{:08x}", v.to_bits())).collect::<Vec<_>>().join(" ")
}
