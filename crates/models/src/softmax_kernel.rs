//! Blocked attention's softmax and its backward pass as two CubeCL kernels on burn's GPU
//! backends (`cuda`, `wgpu`): one cube per row of scores, f32 arithmetic, the results written
//! once in the products' type ([`crate::block_softmax`] says what they compute and holds the
//! tensor operations they replace).
//!
//! ```text
//! per row, threads striding over its keys:
//!   s_j = masked_j ? MASKED_SCORE : f32(S_j) · scale
//!   m, l = max_j s_j, Σ_j exp(s_j − m)        (each thread's running pair, then a tree in shared memory)
//!   forward:   P_j = exp(s_j − m) / l
//!   backward:  D = Σ_j P_j · ∂P_j (a second tree),  ∂S_j = masked_j ? 0 : P_j (∂P_j − D) · scale
//! ```
//!
//! The mask is read where it lies (`[batch, 1, queries, keys]`, any strides): row `r` is query
//! `start + r mod len` of batch `r / per_batch`. Each row is read two (forward) or three
//! (backward) times by the same cube, so from cache after the first: ≈ 2 bytes read and 2
//! written per bf16 score forward, ≈ 4 read and 4 written backward, where the tensor operations
//! move ≈ 60 to 120 bytes per score over ≈ 25 launches.
//!
//! Like `nf4_kernel`, the inputs are taken out of the fusion stream and the outputs registered
//! back into it (`alignment_core::fused_product::register`).

use alignment_core::backend::retype;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::server::CubeCountSelection;
use burn_cubecl::cubecl::{CubeCount, CubeDim};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;
use std::any::TypeId;

/// The kernels, in CubeCL's language (its `Tensor` is a kernel argument, not burn's).
mod kernel {
    // The `#[cube]` macro's expansion names the `cubecl` crate.
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Score `key` of row `row`, scaled, or `masked_score` where the mask hides it.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn score<F: Float, M: Int>(
        scores: &Tensor<F>,
        mask: &Tensor<M>,
        row: usize,
        key: usize,
        keys: usize,
        len: usize,
        per_batch: usize,
        start: usize,
        scale: f32,
        masked_score: f32,
    ) -> f32 {
        let at = (row / per_batch) * mask.stride(0) + (start + row % len) * mask.stride(2) + key * mask.stride(3);
        let mut s = f32::cast_from(scores[row * keys + key]) * scale;
        if u32::cast_from(mask[at]) != 0 {
            s = masked_score;
        }
        s
    }

    /// Leaves the row's largest score in `maxima[0]` and `Σ exp(score − largest)` in
    /// `sums[0]`: each thread's running pair over the keys it strides over, then a tree.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn row_statistics<F: Float, M: Int>(
        scores: &Tensor<F>,
        mask: &Tensor<M>,
        maxima: &mut SharedMemory<f32>,
        sums: &mut SharedMemory<f32>,
        row: usize,
        keys: usize,
        len: usize,
        per_batch: usize,
        start: usize,
        scale: f32,
        masked_score: f32,
    ) {
        let unit = UNIT_POS_X as usize;
        let threads = CUBE_DIM_X as usize;
        // Below every score, masked ones included: a thread that reads no key keeps a zero sum.
        let mut maximum = f32::new(-3.0e38);
        let mut sum = f32::new(0.0);
        let mut key = unit;
        while key < keys {
            let s = score::<F, M>(scores, mask, row, key, keys, len, per_batch, start, scale, masked_score);
            if s > maximum {
                sum = sum * (maximum - s).exp() + f32::new(1.0);
                maximum = s;
            } else {
                sum += (s - maximum).exp();
            }
            key += threads;
        }
        maxima[unit] = maximum;
        sums[unit] = sum;
        sync_cube();
        let mut stride = threads / 2;
        while stride > 0 {
            if unit < stride {
                let (own, other) = (maxima[unit], maxima[unit + stride]);
                let mut larger = own;
                if other > own {
                    larger = other;
                }
                sums[unit] = sums[unit] * (own - larger).exp() + sums[unit + stride] * (other - larger).exp();
                maxima[unit] = larger;
            }
            sync_cube();
            stride /= 2;
        }
    }

    /// The rows' probabilities. `threads` is the cube's size, a power of two. (Named for
    /// `scripts/gpu/profile_table.py`, which counts kernels named for attention as attention.)
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_softmax<F: Float, M: Int>(
        scores: &Tensor<F>,
        mask: &Tensor<M>,
        output: &mut Tensor<F>,
        rows: u32,
        keys: u32,
        len: u32,
        per_batch: u32,
        start: u32,
        scale: f32,
        masked_score: f32,
        #[comptime] threads: usize,
        #[define(F, M)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= rows as usize {
            terminate!();
        }
        let (keys, len, per_batch, start) = (keys as usize, len as usize, per_batch as usize, start as usize);
        let mut maxima = SharedMemory::<f32>::new(threads);
        let mut sums = SharedMemory::<f32>::new(threads);
        row_statistics::<F, M>(scores, mask, &mut maxima, &mut sums, row, keys, len, per_batch, start, scale, masked_score);
        let (maximum, sum) = (maxima[0], sums[0]);
        let mut key = UNIT_POS_X as usize;
        while key < keys {
            let s = score::<F, M>(scores, mask, row, key, keys, len, per_batch, start, scale, masked_score);
            output[row * keys + key] = F::cast_from((s - maximum).exp() / sum);
            key += CUBE_DIM_X as usize;
        }
    }

    /// The rows' probabilities (recomputed) and ∂S from ∂P.
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_softmax_backward<F: Float, M: Int>(
        scores: &Tensor<F>,
        dp: &Tensor<F>,
        mask: &Tensor<M>,
        p_output: &mut Tensor<F>,
        ds_output: &mut Tensor<F>,
        rows: u32,
        keys: u32,
        len: u32,
        per_batch: u32,
        start: u32,
        scale: f32,
        masked_score: f32,
        #[comptime] threads: usize,
        #[define(F, M)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= rows as usize {
            terminate!();
        }
        let (keys, len, per_batch, start) = (keys as usize, len as usize, per_batch as usize, start as usize);
        let unit = UNIT_POS_X as usize;
        let mut maxima = SharedMemory::<f32>::new(threads);
        let mut sums = SharedMemory::<f32>::new(threads);
        let mut dots = SharedMemory::<f32>::new(threads);
        row_statistics::<F, M>(scores, mask, &mut maxima, &mut sums, row, keys, len, per_batch, start, scale, masked_score);
        let (maximum, sum) = (maxima[0], sums[0]);
        // D = Σ P ⊙ ∂P, a tree like the statistics'.
        let mut dot = f32::new(0.0);
        let mut key = unit;
        while key < keys {
            let s = score::<F, M>(scores, mask, row, key, keys, len, per_batch, start, scale, masked_score);
            dot += (s - maximum).exp() / sum * f32::cast_from(dp[row * keys + key]);
            key += CUBE_DIM_X as usize;
        }
        dots[unit] = dot;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if unit < stride {
                dots[unit] = dots[unit] + dots[unit + stride];
            }
            sync_cube();
            stride /= 2;
        }
        let d = dots[0];
        key = unit;
        while key < keys {
            let at = row * keys + key;
            let s = score::<F, M>(scores, mask, row, key, keys, len, per_batch, start, scale, masked_score);
            let p = (s - maximum).exp() / sum;
            p_output[at] = F::cast_from(p);
            let mut ds = p * (f32::cast_from(dp[at]) - d) * scale;
            // Only a masked key's score is `masked_score` (scaled scores are far from -1e30).
            if s == masked_score {
                ds = f32::new(0.0);
            }
            ds_output[at] = F::cast_from(ds);
            key += CUBE_DIM_X as usize;
        }
    }
}

/// A block's score rows, as the kernels index them (`block_softmax::BlockSoftmax::rows`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    /// Rows of scores, `batch · heads · len`.
    pub count: usize,
    /// Keys per row (the keys the block reads: the mask may have more).
    pub keys: usize,
    /// Queries in the block.
    pub len: usize,
    /// Rows per batch element, `heads · len`.
    pub per_batch: usize,
    /// The block's first query, a row of the mask.
    pub start: usize,
    /// The scores' factor.
    pub scale: f32,
}

/// Threads per cube: a power of two, no more than the keys need nor than 256.
fn threads_for<R: CubeRuntime>(tensor: &CubeTensor<R>, keys: usize) -> usize {
    let hardware = tensor.client.properties().hardware.max_cube_dim.0.min(tensor.client.properties().hardware.max_units_per_cube);
    let limit = 256.min(hardware as usize);
    // The largest power of two within the limit, so that the trees halve evenly.
    let limit = 1 << limit.ilog2();
    keys.next_power_of_two().clamp(1, limit)
}

/// The checks that make the unchecked launches' reads and writes stay inside their tensors:
/// a malformed call panics here rather than reading out of bounds on the device.
fn check_bounds<R: CubeRuntime>(scores: &CubeTensor<R>, mask: &CubeTensor<R>, rows: &Rows) {
    let scores_shape = scores.meta.shape().to_vec();
    let mask_shape = mask.meta.shape().to_vec();
    assert!(scores.is_contiguous(), "scores laid out row-major");
    assert_eq!(scores_shape.iter().product::<usize>(), rows.count * rows.keys, "scores {scores_shape:?} for {rows:?}");
    assert_eq!(mask_shape.len(), 4, "a [batch, 1, queries, keys] mask, not {mask_shape:?}");
    assert!(rows.len > 0 && rows.per_batch.is_multiple_of(rows.len) && rows.count.is_multiple_of(rows.per_batch), "{rows:?}");
    assert_eq!(mask_shape[0], rows.count / rows.per_batch, "mask {mask_shape:?} for {rows:?}");
    assert!(rows.start + rows.len <= mask_shape[2] && rows.keys <= mask_shape[3], "mask {mask_shape:?} for {rows:?}");
    assert!(u32::try_from(rows.count).is_ok() && u32::try_from(rows.keys).is_ok(), "{rows:?} beyond 32-bit counts");
}

/// The cubes (one per row, spread over the count's dimensions within the device's limits; the
/// kernels read the linear `CUBE_POS`) and their threads.
fn launch_shape<R: CubeRuntime>(scores: &CubeTensor<R>, rows: &Rows) -> (CubeCount, CubeDim, usize) {
    let threads = threads_for(scores, rows.keys);
    let count = CubeCountSelection::new(&scores.client, rows.count as u32).cube_count();
    (count, CubeDim::new_1d(threads as u32), threads)
}

/// [`kernel::attention_softmax`] into a new tensor of the scores' shape and type.
fn launch_probabilities<R: CubeRuntime>(scores: CubeTensor<R>, mask: CubeTensor<R>, rows: &Rows) -> CubeTensor<R> {
    let scores = burn_cubecl::kernel::into_contiguous(scores);
    check_bounds(&scores, &mask, rows);
    let client = scores.client.clone();
    let output = empty_device_dtype(client.clone(), scores.device.clone(), scores.meta.shape().clone(), scores.dtype);
    let (cube_count, cube_dim, threads) = launch_shape(&scores, rows);
    let address_type = [&scores, &mask, &output].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
    let dtypes = [scores.dtype.into(), mask.dtype.into()];
    // SAFETY: `check_bounds`: every row below `rows.count` reads and writes `rows.keys` values
    // of contiguous tensors holding `count · keys`, and the mask at a batch, query and key
    // inside its shape; cubes past the last row stop first.
    unsafe {
        kernel::attention_softmax::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type,
            scores.into_tensor_arg(),
            mask.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            rows.count as u32,
            rows.keys as u32,
            rows.len as u32,
            rows.per_batch as u32,
            rows.start as u32,
            rows.scale,
            crate::attention::MASKED_SCORE,
            threads,
            dtypes,
        );
    }
    output
}

/// [`kernel::attention_softmax_backward`] into two new tensors of the scores' shape and type: `(P, ∂S)`.
fn launch_gradients<R: CubeRuntime>(
    scores: CubeTensor<R>,
    dp: CubeTensor<R>,
    mask: CubeTensor<R>,
    rows: &Rows,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let scores = burn_cubecl::kernel::into_contiguous(scores);
    let dp = burn_cubecl::kernel::into_contiguous(burn_cubecl::kernel::cast(dp, scores.dtype));
    check_bounds(&scores, &mask, rows);
    assert_eq!(dp.meta.shape(), scores.meta.shape(), "∂P and the scores");
    let client = scores.client.clone();
    let empty = || empty_device_dtype(client.clone(), scores.device.clone(), scores.meta.shape().clone(), scores.dtype);
    let (p, ds) = (empty(), empty());
    let (cube_count, cube_dim, threads) = launch_shape(&scores, rows);
    let address_type = [&scores, &dp, &mask, &p, &ds].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
    let dtypes = [scores.dtype.into(), mask.dtype.into()];
    // SAFETY: as in `launch_probabilities`; ∂P, P and ∂S have the scores' shape, contiguous.
    unsafe {
        kernel::attention_softmax_backward::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type,
            scores.into_tensor_arg(),
            dp.into_tensor_arg(),
            mask.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            rows.count as u32,
            rows.keys as u32,
            rows.len as u32,
            rows.per_batch as u32,
            rows.start as u32,
            rows.scale,
            crate::attention::MASKED_SCORE,
            threads,
            dtypes,
        );
    }
    (p, ds)
}

/// A fused CubeCL backend (`Fusion<CubeBackend<…>>`), and the kernels on it: the inputs
/// resolved out of the fusion stream, the outputs registered back into it.
trait FusedCube: Backend {
    fn probabilities(scores: Tensor<Self, 4>, masked: Tensor<Self, 4, Bool>, rows: &Rows) -> Tensor<Self, 4>;
    fn gradients(
        scores: Tensor<Self, 4>,
        dp: Tensor<Self, 4>,
        masked: Tensor<Self, 4, Bool>,
        rows: &Rows,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>);
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedCube for Fusion<CubeBackend<R, F, I, BT>> {
    fn probabilities(scores: Tensor<Self, 4>, masked: Tensor<Self, 4, Bool>, rows: &Rows) -> Tensor<Self, 4> {
        let (client, scores, mask) = resolve::<R, F, I, BT>(scores.into_primitive().tensor(), masked.into_primitive());
        let p = launch_probabilities(scores, mask, rows);
        Tensor::from_primitive(TensorPrimitive::Float(alignment_core::fused_product::register::<R, F, I, BT>(&client, p)))
    }

    fn gradients(
        scores: Tensor<Self, 4>,
        dp: Tensor<Self, 4>,
        masked: Tensor<Self, 4, Bool>,
        rows: &Rows,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        let (client, scores, mask) = resolve::<R, F, I, BT>(scores.into_primitive().tensor(), masked.into_primitive());
        let dp = client.resolve_tensor_float::<CubeBackend<R, F, I, BT>>(dp.into_primitive().tensor());
        let (p, ds) = launch_gradients(scores, dp, mask, rows);
        let register =
            |t| Tensor::from_primitive(TensorPrimitive::Float(alignment_core::fused_product::register::<R, F, I, BT>(&client, t)));
        (register(p), register(ds))
    }
}

/// The fusion stream's client, and the scores and mask taken out of it.
#[allow(clippy::type_complexity)]
fn resolve<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    scores: FloatTensor<Fusion<CubeBackend<R, F, I, BT>>>,
    masked: BoolTensor<Fusion<CubeBackend<R, F, I, BT>>>,
) -> (burn_fusion::Client<<CubeBackend<R, F, I, BT> as burn_fusion::FusionBackend>::FusionRuntime>, CubeTensor<R>, CubeTensor<R>) {
    let client = scores.client.clone();
    let scores = client.resolve_tensor_float::<CubeBackend<R, F, I, BT>>(scores);
    let mask = client.resolve_tensor_bool::<CubeBackend<R, F, I, BT>>(masked);
    (client, scores, mask)
}

/// `Some($on::<$b, K>(args))` where `$b` is, by `TypeId`, the fused CubeCL backend `K` (one of
/// those this crate is built with); `None` otherwise.
macro_rules! on_fused_cube {
    ($b:ty, $on:ident($($arg:expr),*)) => {{
        #[cfg(feature = "cuda")]
        {
            if TypeId::of::<$b>() == TypeId::of::<alignment_core::backend::Gpu>() {
                return Some($on::<$b, alignment_core::backend::Gpu>($($arg),*));
            }
            if TypeId::of::<$b>() == TypeId::of::<alignment_core::backend::GpuBf16>() {
                return Some($on::<$b, alignment_core::backend::GpuBf16>($($arg),*));
            }
        }
        #[cfg(feature = "wgpu")]
        if TypeId::of::<$b>() == TypeId::of::<alignment_core::backend::Wgpu>() {
            return Some($on::<$b, alignment_core::backend::Wgpu>($($arg),*));
        }
        None
    }};
}

/// `BlockSoftmax::probabilities` by [`kernel::attention_softmax`] where `B` is one of the fused
/// CubeCL backends this crate is built with; `None` on every other backend.
pub(crate) fn probabilities<B: Backend>(scores: &Tensor<B, 4>, masked: &Tensor<B, 4, Bool>, rows: &Rows) -> Option<Tensor<B, 4>> {
    fn on<B: Backend, K: FusedCube>(scores: &Tensor<B, 4>, masked: &Tensor<B, 4, Bool>, rows: &Rows) -> Tensor<B, 4> {
        retype(K::probabilities(retype(scores.clone()), retype(masked.clone()), rows))
    }
    on_fused_cube!(B, on(scores, masked, rows))
}

/// `BlockSoftmax::gradients` by [`kernel::attention_softmax_backward`] where [`probabilities`] runs its kernel.
pub(crate) fn gradients<B: Backend>(
    scores: &Tensor<B, 4>,
    dp: &Tensor<B, 4>,
    masked: &Tensor<B, 4, Bool>,
    rows: &Rows,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
    fn on<B: Backend, K: FusedCube>(
        scores: &Tensor<B, 4>,
        dp: &Tensor<B, 4>,
        masked: &Tensor<B, 4, Bool>,
        rows: &Rows,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (p, ds) = K::gradients(retype(scores.clone()), retype(dp.clone()), retype(masked.clone()), rows);
        (retype(p), retype(ds))
    }
    on_fused_cube!(B, on(scores, dp, masked, rows))
}
