//! The loss's passes over the logits as three CubeCL kernels on burn's GPU backends (`cuda`,
//! `wgpu`): one cube per position for the forward pass and the statistics, one thread per logit
//! for the backward pass, f32 arithmetic whatever the logits' type.
//!
//! ```text
//! forward     (token_logps)     lse = logsumexp(z),  logpᵏ = z[yᵏ] − lse       one read of z
//! statistics  (position_stats)  mean z,  H = Σ p (lse − z),  argmax z,  log Σ p²,
//!                               p = exp(z − lse) with the forward pass's lse   one read of z
//! backward    (token_logps)     ∂z = Σₖ ∂logpᵏ · onehot(yᵏ) − (Σₖ ∂logpᵏ) · exp(z − lse),
//!                               written over z                              one read, one write
//! ```
//!
//! `k` runs over the label sets scored under the same logits: one for SFT and DPO, two for ORPO.
//!
//! The tensor operations they replace read the half-type logits in runs of positions, cast each
//! run to f32 and pass over it about ten times (≈ 80 to 110 bytes moved per logit over the three
//! passes, ≈ 25 launches per run); here each bf16 logit is read three times and written once
//! (≈ 8 bytes), in three launches per step. A row of a 128k vocabulary is 256 KiB in bf16, so a
//! cube's threads stride over it and combine their partial results in shared memory.
//!
//! `ALIGNMENT_LOGITS_KERNEL=0` keeps the tensor operations on the GPU backends too, for
//! measuring one against the other. Like `models::softmax_kernel`, the inputs are taken out of
//! the fusion stream and the outputs registered back into it
//! (`alignment_core::fused_product::register`).

use crate::logprobs::PositionStats;
use alignment_core::backend::{retype, visit_fused_cube, visit_fused_cube_under_autodiff, FusedCubeVisitor};
use alignment_core::cube_rows::{row_threads, writable};
use alignment_core::precision::float_type;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::server::CubeCountSelection;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, CubeDim};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::Fusion;

/// The kernels, in CubeCL's language (its `Tensor` is a kernel argument, not burn's).
mod kernel {
    // The `#[cube]` macro's expansion names the `cubecl` crate.
    use alignment_core::cube_rows::kernel::{combine_running_sums, larger, running_sum, BELOW_EVERY_VALUE};
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Row `row`'s logsumexp, and the log-probability of its label in each of the `sets` label
    /// sets (`targets` and `logp` `[rows, sets]`; NaN for a label outside the vocabulary, which
    /// the caller promises never to pass). `threads` is the cube's size, a power of two.
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn logits_forward<F: Float, W: Float, N: Int>(
        logits: &Tensor<F>,
        targets: &Tensor<N>,
        lse: &mut Tensor<W>,
        logp: &mut Tensor<W>,
        rows: usize,
        vocab: usize,
        sets: usize,
        #[comptime] threads: usize,
        #[define(F, W, N)] _dtypes: [StorageType; 3],
    ) {
        let row = CUBE_POS;
        if row >= rows {
            terminate!();
        }
        let unit = UNIT_POS_X as usize;
        let start = row * vocab;
        // Each thread's running maximum and Σ exp(z − maximum) over the logits it strides over.
        let mut maximum = f32::new(BELOW_EVERY_VALUE);
        let mut sum = f32::new(0.0);
        let mut column = unit;
        while column < vocab {
            let z = f32::cast_from(logits[start + column]);
            sum = running_sum(sum, maximum, z);
            maximum = larger(maximum, z);
            column += CUBE_DIM_X as usize;
        }
        let mut maxima = SharedMemory::<f32>::new(threads);
        let mut sums = SharedMemory::<f32>::new(threads);
        combine_running_sums(&mut maxima, &mut sums, maximum, sum);
        let row_lse = sums[0].ln() + maxima[0];
        if unit == 0 {
            lse[row] = W::cast_from(row_lse);
        }
        // The threads stride over the label sets (a cube sized for a vocabulary of one
        // logit has one thread, fewer than ORPO's two sets).
        let mut set = unit;
        while set < sets {
            let at = row * sets + set;
            // A negative label wraps to a large one (and 64-bit integers are not everywhere).
            let label = u32::cast_from(targets[at]) as usize;
            // NaN, computed at run time: WGSL rejects a NaN constant.
            let mut picked = (-f32::cast_from(vocab)).sqrt();
            if label < vocab {
                picked = f32::cast_from(logits[start + label]);
            }
            logp[at] = W::cast_from(picked - row_lse);
            set += CUBE_DIM_X as usize;
        }
    }

    /// Row `row`'s mean logit, entropy `Σ p (lse − z)`, first most likely column and `Σ p²`,
    /// with `p = exp(z − lse)` and the forward pass's `lse`.
    #[cube(launch_unchecked, address_type = "dynamic")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn logits_statistics<F: Float, W: Float, N: Int>(
        logits: &Tensor<F>,
        lse: &Tensor<W>,
        mean_logit: &mut Tensor<W>,
        entropy: &mut Tensor<W>,
        argmax: &mut Tensor<N>,
        sum_sq_probs: &mut Tensor<W>,
        rows: usize,
        vocab: usize,
        #[comptime] threads: usize,
        #[define(F, W, N)] _dtypes: [StorageType; 3],
    ) {
        let row = CUBE_POS;
        if row >= rows {
            terminate!();
        }
        let unit = UNIT_POS_X as usize;
        let start = row * vocab;
        let row_lse = f32::cast_from(lse[row]);
        let mut sum_z = f32::new(0.0);
        let mut sum_h = f32::new(0.0);
        let mut sum_sq = f32::new(0.0);
        // No thread has read a column yet: `vocab` stands for none, below every logit.
        let mut best = f32::new(BELOW_EVERY_VALUE);
        let mut best_column = vocab;
        let mut column = unit;
        while column < vocab {
            let z = f32::cast_from(logits[start + column]);
            let neg_logp = row_lse - z;
            let p = (-neg_logp).exp();
            sum_z += z;
            sum_h += p * neg_logp;
            sum_sq += p * p;
            // Columns rise within a thread, so the first of equal logits stays.
            if z > best || best_column == vocab {
                best = z;
                best_column = column;
            }
            column += CUBE_DIM_X as usize;
        }
        let mut sums_z = SharedMemory::<f32>::new(threads);
        let mut sums_h = SharedMemory::<f32>::new(threads);
        let mut sums_sq = SharedMemory::<f32>::new(threads);
        let mut bests = SharedMemory::<f32>::new(threads);
        let mut best_columns = SharedMemory::<usize>::new(threads);
        sums_z[unit] = sum_z;
        sums_h[unit] = sum_h;
        sums_sq[unit] = sum_sq;
        bests[unit] = best;
        best_columns[unit] = best_column;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if unit < stride {
                let other = unit + stride;
                sums_z[unit] = sums_z[unit] + sums_z[other];
                sums_h[unit] = sums_h[unit] + sums_h[other];
                sums_sq[unit] = sums_sq[unit] + sums_sq[other];
                // The larger logit; of equal ones the smaller column (a thread that read
                // nothing holds `vocab`, larger than any).
                let (own, theirs) = (bests[unit], bests[other]);
                let (own_column, their_column) = (best_columns[unit], best_columns[other]);
                let takes_theirs =
                    their_column < vocab && (own_column == vocab || theirs > own || (theirs == own && their_column < own_column));
                if takes_theirs {
                    bests[unit] = theirs;
                    best_columns[unit] = their_column;
                }
            }
            sync_cube();
            stride /= 2;
        }
        if unit == 0 {
            mean_logit[row] = W::cast_from(sums_z[0] / f32::cast_from(vocab));
            entropy[row] = W::cast_from(sums_h[0]);
            argmax[row] = N::cast_from(best_columns[0]);
            sum_sq_probs[row] = W::cast_from(sums_sq[0]);
        }
    }

    /// `∂z = Σₖ ∂logpᵏ · onehot(yᵏ) − (Σₖ ∂logpᵏ) · exp(z − lse)` over `z`, one thread per
    /// logit (`grad` and `targets` `[rows, sets]`).
    #[cube(launch_unchecked, address_type = "dynamic")]
    pub(super) fn logits_backward<F: Float, W: Float, N: Int>(
        logits: &mut Tensor<F>,
        lse: &Tensor<W>,
        grad: &Tensor<W>,
        targets: &Tensor<N>,
        vocab: usize,
        sets: usize,
        #[define(F, W, N)] _dtypes: [StorageType; 3],
    ) {
        let i = ABSOLUTE_POS;
        if i >= logits.len() {
            terminate!();
        }
        let row = i / vocab;
        let column = i % vocab;
        let mut total = f32::new(0.0);
        let mut picked = f32::new(0.0);
        for k in 0..sets {
            let g = f32::cast_from(grad[row * sets + k]);
            total += g;
            if u32::cast_from(targets[row * sets + k]) as usize == column {
                picked += g;
            }
        }
        let dz = (f32::cast_from(logits[i]) - f32::cast_from(lse[row])).exp() * -total + picked;
        logits[i] = F::cast_from(dz);
    }
}

/// Whether the GPU backends take the kernels: unless `ALIGNMENT_LOGITS_KERNEL=0`.
fn enabled() -> bool {
    crate::logprobs::logits_kernels_enabled()
}

/// The logits `[rows, vocab]` contiguous, their rows and vocabulary, and one cube per row.
struct RowLaunch<R: CubeRuntime> {
    logits: CubeTensor<R>,
    rows: usize,
    vocab: usize,
    cube_count: burn_cubecl::cubecl::CubeCount,
    cube_dim: CubeDim,
    threads: usize,
}

impl<R: CubeRuntime> RowLaunch<R> {
    fn new(logits: CubeTensor<R>) -> Self {
        let logits = burn_cubecl::kernel::into_contiguous(logits);
        let shape = logits.meta.shape().to_vec();
        let vocab = *shape.last().expect("logits have a vocabulary dimension");
        let rows = shape.iter().product::<usize>() / vocab.max(1);
        assert!(vocab > 0 && u32::try_from(rows).is_ok(), "logits {shape:?}");
        let threads = row_threads(&logits, vocab);
        let cube_count = CubeCountSelection::new(&logits.client, rows as u32).cube_count();
        Self { logits, rows, vocab, cube_count, cube_dim: CubeDim::new_1d(threads as u32), threads }
    }

    /// A new `[rows · per_row]`-element tensor of `dtype`.
    fn per_row(&self, per_row: usize, dtype: DType) -> CubeTensor<R> {
        empty_device_dtype(self.logits.client.clone(), self.logits.device.clone(), [self.rows * per_row].into(), dtype)
    }

    /// `t` contiguous with `per_row` values per row (a malformed call panics here rather than
    /// reading out of bounds on the device).
    fn per_row_input(&self, t: CubeTensor<R>, per_row: usize, what: &str) -> CubeTensor<R> {
        let t = burn_cubecl::kernel::into_contiguous(t);
        assert_eq!(t.meta.shape().num_elements(), self.rows * per_row, "{what}: {per_row} per position of the logits");
        t
    }
}

/// `(lse [rows], logp [rows · sets])` by [`kernel::logits_forward`], in `wide`, for `targets`
/// `[rows · sets]`.
fn launch_forward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    sets: usize,
    wide: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let launch = RowLaunch::new(logits);
    let targets = launch.per_row_input(targets, sets, "targets");
    let (lse, logp) = (launch.per_row(1, wide), launch.per_row(sets, wide));
    let address_type = [&launch.logits, &targets, &lse, &logp].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
    let dtypes = [launch.logits.dtype.into(), wide.into(), targets.dtype.into()];
    let client = launch.logits.client.clone();
    // SAFETY: `RowLaunch`: each of the `rows` cubes reads `vocab` logits of its row in a
    // contiguous `[rows, vocab]` tensor, one value of `lse` and `sets` of each `[rows, sets]`
    // tensor, and a label's logit only when the label lies in `0..vocab`; cubes past the last
    // row stop first.
    unsafe {
        kernel::logits_forward::launch_unchecked::<R>(
            &client,
            launch.cube_count,
            launch.cube_dim,
            address_type,
            launch.logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            logp.clone().into_tensor_arg(),
            launch.rows,
            launch.vocab,
            sets,
            launch.threads,
            dtypes,
        );
    }
    (lse, logp)
}

/// `[mean logit, entropy, argmax, Σ p²]` per row by [`kernel::logits_statistics`]: the floats
/// in `lse`'s type, the argmax in `int`.
fn launch_statistics<R: CubeRuntime>(logits: CubeTensor<R>, lse: CubeTensor<R>, int: DType) -> [CubeTensor<R>; 4] {
    let launch = RowLaunch::new(logits);
    let lse = launch.per_row_input(lse, 1, "logsumexp");
    let wide = lse.dtype;
    let outputs = [launch.per_row(1, wide), launch.per_row(1, wide), launch.per_row(1, int), launch.per_row(1, wide)];
    let address_type = [&launch.logits, &lse].into_iter().chain(&outputs).map(|t| t.required_address_type()).max().unwrap_or_default();
    let dtypes = [launch.logits.dtype.into(), wide.into(), int.into()];
    let client = launch.logits.client.clone();
    let [mean_logit, entropy, argmax, sum_sq] = outputs.clone();
    // SAFETY: as in `launch_forward`.
    unsafe {
        kernel::logits_statistics::launch_unchecked::<R>(
            &client,
            launch.cube_count,
            launch.cube_dim,
            address_type,
            launch.logits.into_tensor_arg(),
            lse.into_tensor_arg(),
            mean_logit.into_tensor_arg(),
            entropy.into_tensor_arg(),
            argmax.into_tensor_arg(),
            sum_sq.into_tensor_arg(),
            launch.rows,
            launch.vocab,
            launch.threads,
            dtypes,
        );
    }
    outputs
}

/// `∂z` by [`kernel::logits_backward`], written over the logits where no other handle shares
/// them and they are laid out row-major, else over a contiguous copy.
fn launch_backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
    targets: CubeTensor<R>,
    sets: usize,
) -> CubeTensor<R> {
    let logits = writable(logits);
    let shape = logits.meta.shape().to_vec();
    let vocab = *shape.last().expect("logits have a vocabulary dimension");
    let elements = logits.meta.shape().num_elements();
    let rows = elements / vocab.max(1);
    let per_row = |t: CubeTensor<R>, per_row: usize, what: &str| {
        let t = burn_cubecl::kernel::into_contiguous(t);
        assert_eq!(t.meta.shape().num_elements(), rows * per_row, "{what}: {per_row} per position of the logits {shape:?}");
        t
    };
    let (grad, targets) = (per_row(grad, sets, "∂logp"), per_row(targets, sets, "targets"));
    let lse = per_row(burn_cubecl::kernel::cast(lse, grad.dtype), 1, "logsumexp");
    let client = logits.client.clone();
    let cube_dim = CubeDim::new(&client, elements);
    let cube_count = calculate_cube_count_elemwise(&client, elements, cube_dim);
    let address_type = [&logits, &lse, &grad, &targets].map(|t| t.required_address_type()).into_iter().max().unwrap_or_default();
    let dtypes = [logits.dtype.into(), grad.dtype.into(), targets.dtype.into()];
    // SAFETY: `i < logits.len()` is checked in the kernel; `lse` holds one contiguous value per
    // row of `vocab` logits, `grad` and `targets` `sets` (asserted above).
    unsafe {
        kernel::logits_backward::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            address_type,
            logits.clone().into_tensor_arg(),
            lse.into_tensor_arg(),
            grad.into_tensor_arg(),
            targets.into_tensor_arg(),
            vocab,
            sets,
            dtypes,
        );
    }
    logits
}

/// The fused backend `Fusion<CubeBackend<R, F, I, BT>>`.
type Fused<R, F, I, BT> = Fusion<CubeBackend<R, F, I, BT>>;

/// The fusion stream's client of the fused backend.
type FusionClient<R, F, I, BT> = burn_fusion::Client<<CubeBackend<R, F, I, BT> as burn_fusion::FusionBackend>::FusionRuntime>;

/// The fusion stream's client of `t`.
fn client_of<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: &Tensor<Fused<R, F, I, BT>, D>,
) -> FusionClient<R, F, I, BT> {
    t.clone().into_primitive().tensor().client.clone()
}

/// A burn float tensor of the fused backend, taken out of its fusion stream.
fn float_out<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    client: &FusionClient<R, F, I, BT>,
    t: Tensor<Fused<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    client.resolve_tensor_float::<CubeBackend<R, F, I, BT>>(t.into_primitive().tensor())
}

/// A burn int tensor of the fused backend, taken out of its fusion stream.
fn int_out<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    client: &FusionClient<R, F, I, BT>,
    t: Tensor<Fused<R, F, I, BT>, D, Int>,
) -> CubeTensor<R> {
    client.resolve_tensor_int::<CubeBackend<R, F, I, BT>>(t.into_primitive())
}

/// A kernel's float output registered back into the fusion stream, as a burn tensor of `shape`.
fn float_in<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    client: &FusionClient<R, F, I, BT>,
    t: CubeTensor<R>,
    shape: [usize; D],
) -> Tensor<Fused<R, F, I, BT>, D> {
    let t = TensorPrimitive::Float(alignment_core::fused_product::register::<R, F, I, BT>(client, t));
    Tensor::<Fused<R, F, I, BT>, 1>::from_primitive(t).reshape(shape)
}

/// `(logp [batch, seq, sets], lse [batch, seq, 1])` in `B`'s own float type for `targets`
/// `[batch, seq, sets]`, as `token_logps`' forward pass computes them, by
/// [`kernel::logits_forward`] where `B` is one of the fused CubeCL backends this crate is built
/// with and the kernels are on; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn forward<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 3, Int>,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>), (Tensor<B, 3>, Tensor<B, 3, Int>)> {
    /// The call, for the backend's parts.
    struct Forward<B: Backend> {
        logits: Tensor<B, 3>,
        targets: Tensor<B, 3, Int>,
    }
    impl<B: Backend> FusedCubeVisitor for Forward<B> {
        type Output = (Tensor<B, 3>, Tensor<B, 3>);
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> Self::Output {
            let [batch, seq, _] = self.logits.dims();
            let sets = self.targets.dims()[2];
            let logits: Tensor<Fused<R, F, I, BT>, 3> = retype(self.logits);
            let client = client_of(&logits);
            let wide = DType::from(float_type::<B>());
            let (lse, logp) = launch_forward(
                float_out(&client, logits),
                int_out(&client, retype::<_, Tensor<Fused<R, F, I, BT>, 3, Int>>(self.targets)),
                sets,
                wide,
            );
            (
                retype(float_in::<R, F, I, BT, 3>(&client, logp, [batch, seq, sets])),
                retype(float_in::<R, F, I, BT, 3>(&client, lse, [batch, seq, 1])),
            )
        }
    }
    if !enabled() {
        return Err((logits, targets));
    }
    visit_fused_cube::<B, _>(Forward { logits, targets }).map_err(|v| (v.logits, v.targets))
}

/// `∂z` for `token_logps`' backward pass (`lse` `[batch, seq, 1]`, `grad` and `targets` `[batch,
/// seq, sets]`), in the logits' type, written over them, by [`kernel::logits_backward`] where
/// [`forward`] runs its kernel; the logits back otherwise.
pub(crate) fn backward<B: Backend>(
    logits: Tensor<B, 3>,
    lse: &Tensor<B, 3>,
    grad: &Tensor<B, 3>,
    targets: &Tensor<B, 3, Int>,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    /// The call, for the backend's parts.
    struct Backward<'a, B: Backend> {
        logits: Tensor<B, 3>,
        lse: &'a Tensor<B, 3>,
        grad: &'a Tensor<B, 3>,
        targets: &'a Tensor<B, 3, Int>,
    }
    impl<B: Backend> FusedCubeVisitor for Backward<'_, B> {
        type Output = Tensor<B, 3>;
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> Tensor<B, 3> {
            let dims = self.logits.dims();
            let sets = self.targets.dims()[2];
            let logits: Tensor<Fused<R, F, I, BT>, 3> = retype(self.logits);
            let client = client_of(&logits);
            let dz = launch_backward(
                float_out(&client, logits),
                float_out(&client, retype::<_, Tensor<Fused<R, F, I, BT>, 3>>(self.lse.clone())),
                float_out(&client, retype::<_, Tensor<Fused<R, F, I, BT>, 3>>(self.grad.clone())),
                int_out(&client, retype::<_, Tensor<Fused<R, F, I, BT>, 3, Int>>(self.targets.clone())),
                sets,
            );
            retype(float_in::<R, F, I, BT, 3>(&client, dz, dims))
        }
    }
    if !enabled() {
        return Err(logits);
    }
    visit_fused_cube::<B, _>(Backward { logits, lse, grad, targets }).map_err(|v| v.logits)
}

/// `position_stats` by [`kernel::logits_statistics`] (`log Σ p²` only where `log_sum_sq_probs`)
/// where `B` is one of the fused CubeCL backends this crate is built with, or its autodiff (the
/// logits are detached: nothing is tracked), and the kernels are on; `None` otherwise.
pub(crate) fn position_stats<B: Backend>(logits: &Tensor<B, 3>, lse: &Tensor<B, 3>, log_sum_sq_probs: bool) -> Option<PositionStats<B>> {
    /// The call, for the parts of `B` or of the backend its autodiff wraps.
    struct Statistics<'a, B: Backend> {
        logits: &'a Tensor<B, 3>,
        lse: &'a Tensor<B, 3>,
        log_sum_sq_probs: bool,
        under_autodiff: bool,
    }
    impl<B: Backend> FusedCubeVisitor for Statistics<'_, B> {
        type Output = PositionStats<B>;
        fn visit<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(self) -> PositionStats<B> {
            if !self.under_autodiff {
                let stats = statistics_on::<R, F, I, BT>(retype(self.logits.clone()), retype(self.lse.clone()), self.log_sum_sq_probs);
                return stats.map_tensors(retype, retype);
            }
            // Detached tensors of `Autodiff<Fused>`: the fused backend's, and back untracked.
            type Tracked<R, F, I, BT> = Autodiff<Fused<R, F, I, BT>>;
            let inner = |t: &Tensor<B, 3>| retype::<_, Tensor<Tracked<R, F, I, BT>, 3>>(t.clone()).inner();
            let stats = statistics_on::<R, F, I, BT>(inner(self.logits), inner(self.lse), self.log_sum_sq_probs);
            stats.map_tensors(
                |t| retype(Tensor::<Tracked<R, F, I, BT>, 2>::from_inner(t)),
                |t| retype(Tensor::<Tracked<R, F, I, BT>, 2, Int>::from_inner(t)),
            )
        }
    }
    if !enabled() {
        return None;
    }
    let visitor = Statistics { logits, lse, log_sum_sq_probs, under_autodiff: false };
    visit_fused_cube::<B, _>(visitor)
        .or_else(|visitor| visit_fused_cube_under_autodiff::<B, _>(Statistics { under_autodiff: true, ..visitor }))
        .ok()
}

/// [`position_stats`] of the fused backend's `logits` and `lse`, by the kernel.
fn statistics_on<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    logits: Tensor<Fused<R, F, I, BT>, 3>,
    lse: Tensor<Fused<R, F, I, BT>, 3>,
    log_sum_sq_probs: bool,
) -> PositionStats<Fused<R, F, I, BT>> {
    let [batch, seq, _] = logits.dims();
    let client = client_of(&logits);
    let int = <I as burn::tensor::Element>::dtype();
    let [mean_logit, entropy, argmax, sum_sq] = launch_statistics(float_out(&client, logits), float_out(&client, lse), int);
    // `register` takes a tensor of any type (the fusion stream's tensors are one type).
    let argmax = alignment_core::fused_product::register::<R, F, I, BT>(&client, argmax);
    let argmax = Tensor::<Fused<R, F, I, BT>, 1, Int>::from_primitive(argmax).reshape([batch, seq]);
    let float = |t| float_in::<R, F, I, BT, 2>(&client, t, [batch, seq]);
    PositionStats {
        mean_logit: float(mean_logit),
        entropy: float(entropy),
        argmax,
        log_sum_sq_probs: log_sum_sq_probs.then(|| float(sum_sq).log()),
    }
}
