//! What the handbook's own CubeCL kernels share on burn's fused CubeCL backends (`cuda`,
//! `wgpu`): `models::softmax_kernel`'s attention rows, `objectives::logits_kernel`'s rows of
//! logits and `trainer::adamw_kernel`'s in-place update.
//!
//! - [`row_threads`]: a cube's threads for one row, a power of two so that the trees halve evenly;
//! - [`writable`]: a tensor as a buffer a kernel may write over;
//! - [`kernel`]: the running logsumexp every row kernel keeps per thread, and the shared-memory
//!   trees that combine the threads' partial results.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

/// Threads per cube for a kernel that gives one cube to each row of `row_len` values of
/// `tensor`: a power of two, no more than the row needs, than 256, nor than the device allows.
pub fn row_threads<R: CubeRuntime>(tensor: &CubeTensor<R>, row_len: usize) -> usize {
    let properties = tensor.client.properties();
    let hardware = properties.hardware.max_cube_dim.0.min(properties.hardware.max_units_per_cube);
    // The largest power of two within the limit.
    let limit = 1 << 256.min(hardware as usize).max(1).ilog2();
    row_len.next_power_of_two().clamp(1, limit)
}

/// `t` as a buffer a kernel may write over: itself when no other handle shares it and it is laid
/// out row-major, a contiguous copy otherwise.
pub fn writable<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    match (t.can_mut(), t.is_contiguous()) {
        (true, true) => t,
        (false, true) => t.copy(),
        (_, false) => burn_cubecl::kernel::into_contiguous(t),
    }
}

/// The pieces of the row kernels, in CubeCL's language, called from their `#[cube]` kernels.
pub mod kernel {
    // The `#[cube]` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Where a thread's running maximum starts: below every value a row holds, masked scores
    /// included, so that a thread that reads nothing keeps a zero sum.
    pub const BELOW_EVERY_VALUE: f32 = -3.0e38;

    /// A thread's running `Σ exp(value − maximum)` after it reads `value`, given its running
    /// `maximum` before; the new maximum is [`larger`]`(maximum, value)`. (Online softmax: one
    /// pass over the row, rescaling the sum when the maximum rises.)
    #[cube]
    pub fn running_sum(sum: f32, maximum: f32, value: f32) -> f32 {
        let mut next = sum;
        if value > maximum {
            next = sum * (maximum - value).exp() + f32::new(1.0);
        } else {
            next += (value - maximum).exp();
        }
        next
    }

    /// The larger of `a` and `b`.
    #[cube]
    pub fn larger(a: f32, b: f32) -> f32 {
        let mut m = a;
        if b > a {
            m = b;
        }
        m
    }

    /// Combines every thread's running `(maximum, sum)` (see [`running_sum`]) into the row's
    /// largest value, left in `maxima[0]`, and its `Σ exp(value − largest)`, left in `sums[0]`:
    /// a shared-memory tree over the cube's threads (a power of two), every thread calling it.
    #[cube]
    pub fn combine_running_sums(maxima: &mut SharedMemory<f32>, sums: &mut SharedMemory<f32>, maximum: f32, sum: f32) {
        let unit = UNIT_POS_X as usize;
        maxima[unit] = maximum;
        sums[unit] = sum;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if unit < stride {
                let (own, other) = (maxima[unit], maxima[unit + stride]);
                let both = larger(own, other);
                sums[unit] = sums[unit] * (own - both).exp() + sums[unit + stride] * (other - both).exp();
                maxima[unit] = both;
            }
            sync_cube();
            stride /= 2;
        }
    }

    /// Sums every thread's `value` into `values[0]`: a shared-memory tree over the cube's
    /// threads (a power of two), every thread calling it.
    #[cube]
    pub fn combine_sums(values: &mut SharedMemory<f32>, value: f32) {
        let unit = UNIT_POS_X as usize;
        values[unit] = value;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if unit < stride {
                values[unit] = values[unit] + values[unit + stride];
            }
            sync_cube();
            stride /= 2;
        }
    }
}
