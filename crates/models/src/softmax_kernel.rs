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

use alignment_core::backend::{retype, visit_fused_cube, FusedCubeVisitor};
use alignment_core::cube_rows::row_threads;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::ir::{AddressType, StorageType};
use burn_cubecl::cubecl::server::CubeCountSelection;
use burn_cubecl::cubecl::{CubeCount, CubeDim};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;

/// The kernels, in CubeCL's language (its `Tensor` is a kernel argument, not burn's).
mod kernel {
    // The `#[cube]` macro's expansion names the `cubecl` crate.
    use alignment_core::cube_rows::kernel::{combine_running_sums, combine_sums, larger, running_sum, BELOW_EVERY_VALUE};
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// How a block's rows of scores meet the mask: `Rows`, as the kernels receive it.
    #[derive(CubeLaunch, CubeType)]
    pub(super) struct RowLayout {
        /// Rows of scores; cubes past the last stop at once.
        pub rows: usize,
        /// Keys per row.
        pub keys: usize,
        /// Queries in the block.
        pub len: usize,
        /// Rows per batch element.
        pub per_batch: usize,
        /// The block's first query, a row of the mask.
        pub start: usize,
        /// The scores' factor.
        pub scale: f32,
        /// What a masked key's score becomes (`attention::MASKED_SCORE`).
        pub masked_score: f32,
    }

    /// Score `key` of row `row`, scaled, or the masked score where the mask hides it.
    #[cube]
    fn score<F: Float, M: Int>(scores: &Tensor<F>, mask: &Tensor<M>, layout: &RowLayout, row: usize, key: usize) -> f32 {
        let query = layout.start + row % layout.len;
        let at = (row / layout.per_batch) * mask.stride(0) + query * mask.stride(2) + key * mask.stride(3);
        let mut s = f32::cast_from(scores[row * layout.keys + key]) * layout.scale;
        if u32::cast_from(mask[at]) != 0 {
            s = layout.masked_score;
        }
        s
    }

    /// Leaves the row's largest score in `maxima[0]` and `Σ exp(score − largest)` in
    /// `sums[0]`: each thread's running pair over the keys it strides over, then a tree.
    #[cube]
    fn row_statistics<F: Float, M: Int>(
        scores: &Tensor<F>,
        mask: &Tensor<M>,
        layout: &RowLayout,
        row: usize,
        maxima: &mut SharedMemory<f32>,
        sums: &mut SharedMemory<f32>,
    ) {
        let mut maximum = f32::new(BELOW_EVERY_VALUE);
        let mut sum = f32::new(0.0);
        let mut key = UNIT_POS_X as usize;
        while key < layout.keys {
            let s = score::<F, M>(scores, mask, layout, row, key);
            sum = running_sum(sum, maximum, s);
            maximum = larger(maximum, s);
            key += CUBE_DIM_X as usize;
        }
        combine_running_sums(maxima, sums, maximum, sum);
    }

    /// The rows' probabilities. `threads` is the cube's size, a power of two. (Named for
    /// `scripts/gpu/profile_table.py`, which counts kernels named for attention as attention.)
    #[cube(launch_unchecked, address_type = "dynamic")]
    pub(super) fn attention_softmax<F: Float, M: Int>(
        scores: &Tensor<F>,
        mask: &Tensor<M>,
        output: &mut Tensor<F>,
        layout: &RowLayout,
        #[comptime] threads: usize,
        #[define(F, M)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= layout.rows {
            terminate!();
        }
        let mut maxima = SharedMemory::<f32>::new(threads);
        let mut sums = SharedMemory::<f32>::new(threads);
        row_statistics::<F, M>(scores, mask, layout, row, &mut maxima, &mut sums);
        let (maximum, sum) = (maxima[0], sums[0]);
        let mut key = UNIT_POS_X as usize;
        while key < layout.keys {
            let s = score::<F, M>(scores, mask, layout, row, key);
            output[row * layout.keys + key] = F::cast_from((s - maximum).exp() / sum);
            key += CUBE_DIM_X as usize;
        }
    }

    /// The rows' probabilities (recomputed) and ∂S from ∂P.
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_softmax_backward<F: Float, M: Int>(
        scores: &Tensor<F>,
        mask: &Tensor<M>,
        dp: &Tensor<F>,
        p_output: &mut Tensor<F>,
        ds_output: &mut Tensor<F>,
        layout: &RowLayout,
        #[comptime] threads: usize,
        #[define(F, M)] _dtypes: [StorageType; 2],
    ) {
        let row = CUBE_POS;
        if row >= layout.rows {
            terminate!();
        }
        let unit = UNIT_POS_X as usize;
        let mut maxima = SharedMemory::<f32>::new(threads);
        let mut sums = SharedMemory::<f32>::new(threads);
        let mut dots = SharedMemory::<f32>::new(threads);
        row_statistics::<F, M>(scores, mask, layout, row, &mut maxima, &mut sums);
        let (maximum, sum) = (maxima[0], sums[0]);
        // D = Σ P ⊙ ∂P, a tree like the statistics'.
        let mut dot = f32::new(0.0);
        let mut key = unit;
        while key < layout.keys {
            let s = score::<F, M>(scores, mask, layout, row, key);
            dot += (s - maximum).exp() / sum * f32::cast_from(dp[row * layout.keys + key]);
            key += CUBE_DIM_X as usize;
        }
        combine_sums(&mut dots, dot);
        let d = dots[0];
        key = unit;
        while key < layout.keys {
            let at = row * layout.keys + key;
            let s = score::<F, M>(scores, mask, layout, row, key);
            let p = (s - maximum).exp() / sum;
            p_output[at] = F::cast_from(p);
            let mut ds = p * (f32::cast_from(dp[at]) - d) * layout.scale;
            // Only a masked key's score is the masked score (scaled scores are far from -1e30).
            if s == layout.masked_score {
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

/// A launch over a block's rows, prepared: the scores contiguous, the bounds checked, the cube
/// shape and address type chosen (what both kernels share).
struct Launch<R: CubeRuntime> {
    scores: CubeTensor<R>,
    mask: CubeTensor<R>,
    rows: Rows,
    cube_count: CubeCount,
    cube_dim: CubeDim,
    threads: usize,
}

impl<R: CubeRuntime> Launch<R> {
    /// Checks what makes the unchecked launches' reads and writes stay inside their tensors (a
    /// malformed call panics here rather than reading out of bounds on the device), and picks
    /// one cube per row (spread over the count's dimensions within the device's limits; the
    /// kernels read the linear `CUBE_POS`) of [`row_threads`] threads.
    fn new(scores: CubeTensor<R>, mask: CubeTensor<R>, rows: &Rows) -> Self {
        let scores = burn_cubecl::kernel::into_contiguous(scores);
        let scores_shape = scores.meta.shape().to_vec();
        let mask_shape = mask.meta.shape().to_vec();
        assert_eq!(scores_shape.iter().product::<usize>(), rows.count * rows.keys, "scores {scores_shape:?} for {rows:?}");
        assert_eq!(mask_shape.len(), 4, "a [batch, 1, queries, keys] mask, not {mask_shape:?}");
        assert!(rows.len > 0 && rows.per_batch.is_multiple_of(rows.len) && rows.count.is_multiple_of(rows.per_batch), "{rows:?}");
        assert_eq!(mask_shape[0], rows.count / rows.per_batch, "mask {mask_shape:?} for {rows:?}");
        assert!(rows.start + rows.len <= mask_shape[2] && rows.keys <= mask_shape[3], "mask {mask_shape:?} for {rows:?}");
        assert!(u32::try_from(rows.count).is_ok(), "{rows:?} beyond 32-bit cube counts");
        let threads = row_threads(&scores, rows.keys);
        let cube_count = CubeCountSelection::new(&scores.client, rows.count as u32).cube_count();
        Self { scores, mask, rows: *rows, cube_count, cube_dim: CubeDim::new_1d(threads as u32), threads }
    }

    /// A new tensor of the scores' shape and type.
    fn empty_like_scores(&self) -> CubeTensor<R> {
        empty_device_dtype(self.scores.client.clone(), self.scores.device.clone(), self.scores.meta.shape().clone(), self.scores.dtype)
    }

    /// The kernels' row layout.
    fn layout(&self) -> kernel::RowLayoutLaunch<R> {
        let r = &self.rows;
        kernel::RowLayoutLaunch::new(r.count, r.keys, r.len, r.per_batch, r.start, r.scale, crate::attention::MASKED_SCORE)
    }

    /// The address type every tensor of the launch fits.
    fn address_type(&self, others: &[&CubeTensor<R>]) -> AddressType {
        [&self.scores, &self.mask].into_iter().chain(others.iter().copied()).map(|t| t.required_address_type()).max().unwrap_or_default()
    }

    /// The element types the kernels are defined over: the scores', the mask's.
    fn dtypes(&self) -> [StorageType; 2] {
        [self.scores.dtype.into(), self.mask.dtype.into()]
    }
}

/// [`kernel::attention_softmax`] into a new tensor of the scores' shape and type.
fn launch_probabilities<R: CubeRuntime>(scores: CubeTensor<R>, mask: CubeTensor<R>, rows: &Rows) -> CubeTensor<R> {
    let launch = Launch::new(scores, mask, rows);
    let output = launch.empty_like_scores();
    let (address_type, layout, dtypes) = (launch.address_type(&[&output]), launch.layout(), launch.dtypes());
    let client = launch.scores.client.clone();
    // SAFETY: `Launch::new`: every row below `rows.count` reads and writes `rows.keys` values
    // of contiguous tensors holding `count · keys`, and the mask at a batch, query and key
    // inside its shape; cubes past the last row stop first.
    unsafe {
        kernel::attention_softmax::launch_unchecked::<R>(
            &client,
            launch.cube_count,
            launch.cube_dim,
            address_type,
            launch.scores.into_tensor_arg(),
            launch.mask.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            layout,
            launch.threads,
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
    let launch = Launch::new(scores, mask, rows);
    let dp = burn_cubecl::kernel::into_contiguous(burn_cubecl::kernel::cast(dp, launch.scores.dtype));
    assert_eq!(dp.meta.shape(), launch.scores.meta.shape(), "∂P and the scores");
    let (p, ds) = (launch.empty_like_scores(), launch.empty_like_scores());
    let (address_type, layout, dtypes) = (launch.address_type(&[&dp, &p, &ds]), launch.layout(), launch.dtypes());
    let client = launch.scores.client.clone();
    // SAFETY: as in `launch_probabilities`; ∂P, P and ∂S have the scores' shape, contiguous.
    unsafe {
        kernel::attention_softmax_backward::launch_unchecked::<R>(
            &client,
            launch.cube_count,
            launch.cube_dim,
            address_type,
            launch.scores.into_tensor_arg(),
            launch.mask.into_tensor_arg(),
            dp.into_tensor_arg(),
            p.clone().into_tensor_arg(),
            ds.clone().into_tensor_arg(),
            layout,
            launch.threads,
            dtypes,
        );
    }
    (p, ds)
}

/// The fused backend `Fusion<CubeBackend<R, F, I, BT>>`.
type Fused<R, F, I, BT> = Fusion<CubeBackend<R, F, I, BT>>;

/// `BlockSoftmax::probabilities` by [`kernel::attention_softmax`] where `B` is one of the fused
/// CubeCL backends this crate is built with; `None` on every other backend.
pub(crate) fn probabilities<B: Backend>(scores: &Tensor<B, 4>, masked: &Tensor<B, 4, Bool>, rows: &Rows) -> Option<Tensor<B, 4>> {
    /// The call, for the backend's parts.
    struct Probabilities<'a, B: Backend> {
        scores: &'a Tensor<B, 4>,
        masked: &'a Tensor<B, 4, Bool>,
        rows: &'a Rows,
    }
    impl<B: Backend> FusedCubeVisitor for Probabilities<'_, B> {
        type Output = Tensor<B, 4>;
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> Tensor<B, 4> {
            let scores: Tensor<Fused<R, F, I, BT>, 4> = retype(self.scores.clone());
            let (client, scores, mask) = resolve::<R, F, I, BT>(scores.into_primitive().tensor(), retype(self.masked.clone()));
            let p = launch_probabilities(scores, mask, self.rows);
            retype(registered::<R, F, I, BT>(&client, p))
        }
    }
    visit_fused_cube::<B, _>(Probabilities { scores, masked, rows }).ok()
}

/// `BlockSoftmax::gradients` by [`kernel::attention_softmax_backward`] where [`probabilities`] runs its kernel.
pub(crate) fn gradients<B: Backend>(
    scores: &Tensor<B, 4>,
    dp: &Tensor<B, 4>,
    masked: &Tensor<B, 4, Bool>,
    rows: &Rows,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
    /// The call, for the backend's parts.
    struct Gradients<'a, B: Backend> {
        scores: &'a Tensor<B, 4>,
        dp: &'a Tensor<B, 4>,
        masked: &'a Tensor<B, 4, Bool>,
        rows: &'a Rows,
    }
    impl<B: Backend> FusedCubeVisitor for Gradients<'_, B> {
        type Output = (Tensor<B, 4>, Tensor<B, 4>);
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> Self::Output {
            let scores: Tensor<Fused<R, F, I, BT>, 4> = retype(self.scores.clone());
            let dp: Tensor<Fused<R, F, I, BT>, 4> = retype(self.dp.clone());
            let (client, scores, mask) = resolve::<R, F, I, BT>(scores.into_primitive().tensor(), retype(self.masked.clone()));
            let dp = client.resolve_tensor_float::<CubeBackend<R, F, I, BT>>(dp.into_primitive().tensor());
            let (p, ds) = launch_gradients(scores, dp, mask, self.rows);
            (retype(registered::<R, F, I, BT>(&client, p)), retype(registered::<R, F, I, BT>(&client, ds)))
        }
    }
    visit_fused_cube::<B, _>(Gradients { scores, dp, masked, rows }).ok()
}

/// The fusion stream's client, and the scores and mask taken out of it.
#[allow(clippy::type_complexity)]
fn resolve<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    scores: FloatTensor<Fused<R, F, I, BT>>,
    masked: Tensor<Fused<R, F, I, BT>, 4, Bool>,
) -> (burn_fusion::Client<<CubeBackend<R, F, I, BT> as burn_fusion::FusionBackend>::FusionRuntime>, CubeTensor<R>, CubeTensor<R>) {
    let client = scores.client.clone();
    let scores = client.resolve_tensor_float::<CubeBackend<R, F, I, BT>>(scores);
    let mask = client.resolve_tensor_bool::<CubeBackend<R, F, I, BT>>(masked.into_primitive());
    (client, scores, mask)
}

/// A kernel's output registered back into the fusion stream, as a burn tensor.
fn registered<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    client: &burn_fusion::Client<<CubeBackend<R, F, I, BT> as burn_fusion::FusionBackend>::FusionRuntime>,
    output: CubeTensor<R>,
) -> Tensor<Fused<R, F, I, BT>, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(alignment_core::fused_product::register::<R, F, I, BT>(client, output)))
}
