//! Matrix products through the fastest GEMM a backend has: cuBLAS on burn-cuda (on `wgpu`, a
//! plain kernel in its place, for CI), the backend's own `matmul` everywhere else.
//!
//! burn-cuda 0.21 multiplies with CubeCL's matmul, which has no Hopper (wgmma) kernels: ≈ 87
//! TFLOP/s in bf16 measured on an H100, where cuBLAS reaches ≈ 790. Every product of a training
//! step on `cuda`/`cuda-bf16` is therefore routed here ([`matmul`] for tensors, [`float_matmul`]
//! inside recorded steps), and on those backends runs as one `cublasGemmStridedBatchedEx`
//! (`crate::cublas`); under autodiff as one recorded step whose backward products are cuBLAS's
//! too:
//!
//! ```text
//! forward:   C  = A · B
//! backward:  ∂A = ∂C · Bᵀ      ∂B = Aᵀ · ∂C          (each operand kept only if the other is tracked)
//! ```
//!
//! cuBLAS is column-major and burn's tensors are row-major views with arbitrary strides:
//! [`ColumnMajorGemm::for_row_major_product`] maps a product of two strided views onto one
//! cuBLAS call without copying either (a transposed view is a transposed operand, a view of
//! rows is a leading dimension), or says that it cannot (a batch that is not one stride apart,
//! broadcasting), and the caller copies the operands contiguous first. That mapping is checked
//! on the CPU against [`ColumnMajorGemm::reference`], a plain loop with cuBLAS's semantics; the
//! call itself only on the device (`bench_train gemm`).
//!
//! On burn's `wgpu` backend (CI, on lavapipe) the same route runs with a plain kernel of cuBLAS's
//! semantics in cuBLAS's place (`crate::fused_product`), so the plans and the recorded steps are
//! checked there as the device runs them.
//!
//! `ALIGNMENT_CUBLAS=0` turns the route off (CubeCL's matmul again), for measuring one against
//! the other; so does a machine without `libcublas`, with a message saying so.
//! `ALIGNMENT_CUBLAS=sync` orders each call by host synchronisation instead of on CubeCL's
//! stream (`crate::cublas`).

use crate::backend::{retype, visit_autodiff, AutodiffVisitor};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// `lhs · rhs` (burn's batched `matmul`): by cuBLAS where `B` is burn-cuda or its autodiff and
/// the route is on ([`has_own_gemm`]), by `matmul` otherwise.
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    if !routes_products::<B>() {
        return lhs.matmul(rhs);
    }
    if has_own_gemm::<B>() {
        let product = float_matmul::<B>(lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        return Tensor::from_primitive(TensorPrimitive::Float(product));
    }
    match record(lhs, rhs) {
        Ok(product) => product,
        Err((lhs, rhs)) => lhs.matmul(rhs),
    }
}

/// `lhs · rhs` on burn's primitives (what recorded steps hold): cuBLAS where `B` has it
/// ([`has_own_gemm`]), `B::float_matmul` otherwise.
pub fn float_matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    #[cfg(feature = "cuda")]
    let (lhs, rhs) = match crate::cublas::float_matmul::<B>(lhs, rhs) {
        Ok(product) => return product,
        Err(operands) => operands,
    };
    #[cfg(feature = "wgpu")]
    let (lhs, rhs) = match crate::fused_product::float_matmul_on_wgpu::<B>(lhs, rhs) {
        Ok(product) => return product,
        Err(operands) => operands,
    };
    B::float_matmul(lhs, rhs)
}

/// Whether `B` itself multiplies by a GEMM of its own here (cuBLAS on burn-cuda, route on; the
/// column-major kernel standing in for it on `wgpu`).
pub fn has_own_gemm<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    if crate::cublas::applies::<B>() {
        return true;
    }
    #[cfg(feature = "wgpu")]
    if crate::fused_product::applies_on_wgpu::<B>() {
        return true;
    }
    false
}

/// Who multiplies on `B`, for reports: `"cublas"` (queued on CubeCL's stream),
/// `"cublas-sync"` (host-synchronised, `ALIGNMENT_CUBLAS=sync`), `"column-major kernel"` (`wgpu`'s
/// stand-in for cuBLAS) or `"backend"` (its own matmul).
pub fn products_route<B: Backend>() -> &'static str {
    #[cfg(feature = "cuda")]
    if crate::cublas::applies::<B>() {
        return crate::cublas::route_name();
    }
    #[cfg(feature = "wgpu")]
    if crate::fused_product::applies_on_wgpu::<B>() {
        return "column-major kernel";
    }
    "backend"
}

/// Whether products on `B` take this module's route: `B` has its own GEMM, or is the autodiff
/// of a backend that has.
fn routes_products<B: Backend>() -> bool {
    struct InnerHasOwnGemm;
    impl AutodiffVisitor for InnerHasOwnGemm {
        type Output = bool;
        fn visit<I: Backend>(self) -> bool {
            has_own_gemm::<I>()
        }
    }
    has_own_gemm::<B>() || visit_autodiff::<B, _>(InnerHasOwnGemm).unwrap_or(false)
}

/// The product as one recorded step of `B = Autodiff<I>` whose forward and backward products
/// are [`float_matmul`]'s; the operands back when `B` records nothing here, or when their batch
/// dimensions differ (burn's broadcasting, whose backward sums over the broadcast dimensions).
#[allow(clippy::type_complexity)]
fn record<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if lhs.dims()[..D - 2] != rhs.dims()[..D - 2] {
        return Err((lhs, rhs));
    }
    visit_autodiff::<B, _>(RecordedMatmul { lhs, rhs }).map_err(|r| (r.lhs, r.rhs))
}

/// [`record`]'s operands, visited with the autodiff backend's inner backend.
struct RecordedMatmul<B: Backend, const D: usize> {
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
}

impl<B: Backend, const D: usize> AutodiffVisitor for RecordedMatmul<B, D> {
    type Output = Tensor<B, D>;

    fn visit<I: Backend>(self) -> Tensor<B, D> {
        let (lhs, rhs): (Tensor<Autodiff<I>, D>, Tensor<Autodiff<I>, D>) = (retype(self.lhs), retype(self.rhs));
        let (lhs, rhs) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        // Each operand is needed only for the other's gradient.
        let (lhs_tracked, rhs_tracked) = (!lhs.node.requirement.is_none(), !rhs.node.requirement.is_none());
        let prepared = <MatmulBackward as Backward<I, 2>>::prepare::<NoCheckpointing>(MatmulBackward, [lhs.node.clone(), rhs.node.clone()]);
        let product = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let keep_lhs = rhs_tracked.then(|| lhs.primitive.clone());
                let keep_rhs = lhs_tracked.then(|| rhs.primitive.clone());
                let product = float_matmul::<I>(lhs.primitive, rhs.primitive);
                prep.finish(MatmulState { lhs: keep_lhs, rhs: keep_rhs }, product)
            }
            OpsKind::UnTracked(prep) => prep.finish(float_matmul::<I>(lhs.primitive, rhs.primitive)),
        };
        retype(Tensor::<Autodiff<I>, D>::from_primitive(TensorPrimitive::Float(product)))
    }
}

/// What the backward pass of a recorded product keeps: `lhs` when `rhs` is tracked, `rhs` when
/// `lhs` is.
#[derive(Clone, Debug)]
struct MatmulState<I: Backend> {
    lhs: Option<FloatTensor<I>>,
    rhs: Option<FloatTensor<I>>,
}

#[derive(Debug)]
struct MatmulBackward;

impl<I: Backend> Backward<I, 2> for MatmulBackward {
    type State = MatmulState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let MatmulState { lhs, rhs } = ops.state;
        let [lhs_node, rhs_node] = ops.parents;
        let d_product = grads.consume::<I>(&ops.node);
        if let (Some(node), Some(rhs)) = (lhs_node, rhs) {
            grads.register::<I>(node.id, float_matmul::<I>(d_product.clone(), I::float_transpose(rhs)));
        }
        if let (Some(node), Some(lhs)) = (rhs_node, lhs) {
            grads.register::<I>(node.id, float_matmul::<I>(I::float_transpose(lhs), d_product));
        }
    }
}

/// One strided-batched GEMM in cuBLAS's column-major terms (`cublasGemmStridedBatchedEx`'s
/// arguments, in elements): for each batch `p`,
/// `C[p] = op(A[p]) · op(B[p])` with `op(A[p])` `m × k`, `op(B[p])` `k × n`, `C[p]` `m × n`,
/// `X[p]` starting `p · stride_x` elements after `X`'s pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    /// `op(A) = Aᵀ` (`CUBLAS_OP_T`) rather than `A`.
    pub transpose_a: bool,
    /// `op(B) = Bᵀ`.
    pub transpose_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Leading dimensions: elements between the starts of two columns of the stored matrix.
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
}

impl ColumnMajorGemm {
    /// The call computing the row-major product `C = lhs · rhs` of two strided views (`shape`,
    /// `strides` in elements, at least two dimensions, equal leading batch dimensions) into a
    /// contiguous row-major `C`: cuBLAS's `A` is `rhs` and its `B` is `lhs`, since a row-major
    /// `C` is the column-major `Cᵀ = rhsᵀ · lhsᵀ`. `None` where one call cannot read the views in
    /// place (their batch is not one stride apart, or broadcast, or a size or leading dimension
    /// is beyond cuBLAS's 32-bit integers, or a dimension is empty): copy them contiguous.
    pub fn for_row_major_product(lhs: (&[usize], &[usize]), rhs: (&[usize], &[usize])) -> Option<Self> {
        let ((lhs_shape, lhs_strides), (rhs_shape, rhs_strides)) = (lhs, rhs);
        let d = lhs_shape.len();
        if d < 2 || rhs_shape.len() != d || lhs_strides.len() != d || rhs_strides.len() != d {
            return None;
        }
        let (m, k, n) = (lhs_shape[d - 2], lhs_shape[d - 1], rhs_shape[d - 1]);
        if rhs_shape[d - 2] != k || lhs_shape[..d - 2] != rhs_shape[..d - 2] || m == 0 || n == 0 || k == 0 {
            return None;
        }
        let batch: usize = lhs_shape[..d - 2].iter().product();
        let (lhs_row_major, ldb) = matrix_layout(m, k, lhs_strides[d - 2], lhs_strides[d - 1])?;
        let (rhs_row_major, lda) = matrix_layout(k, n, rhs_strides[d - 2], rhs_strides[d - 1])?;
        let stride_b = batch_stride(&lhs_shape[..d - 2], &lhs_strides[..d - 2])?;
        let stride_a = batch_stride(&rhs_shape[..d - 2], &rhs_strides[..d - 2])?;
        let gemm = Self {
            transpose_a: !rhs_row_major,
            transpose_b: !lhs_row_major,
            m: n,
            n: m,
            k,
            lda,
            ldb,
            ldc: n,
            stride_a,
            stride_b,
            stride_c: m * n,
            batch,
        };
        let fits = [gemm.m, gemm.n, gemm.k, gemm.lda, gemm.ldb, gemm.ldc, gemm.batch].iter().all(|&v| v <= i32::MAX as usize);
        fits.then_some(gemm)
    }

    /// Elements of `C` the call writes: `batch · m · n`, contiguous.
    pub fn output_len(&self) -> usize {
        self.batch * self.m * self.n
    }

    /// What cuBLAS computes for this call, by a plain loop (`α = 1`, `β = 0`): the CPU check of
    /// the mapping above. `a`, `b` are whole buffers, the operands starting at `a_offset`,
    /// `b_offset`; `c` receives [`Self::output_len`] values.
    pub fn reference(&self, a: &[f64], a_offset: usize, b: &[f64], b_offset: usize) -> Vec<f64> {
        let mut c = vec![0.0; self.stride_c * (self.batch - 1) + self.ldc * (self.n - 1) + self.m];
        for p in 0..self.batch {
            let (a0, b0) = (a_offset + p * self.stride_a, b_offset + p * self.stride_b);
            for j in 0..self.n {
                for i in 0..self.m {
                    let mut sum = 0.0;
                    for l in 0..self.k {
                        let a_il = if self.transpose_a { a[a0 + l + i * self.lda] } else { a[a0 + i + l * self.lda] };
                        let b_lj = if self.transpose_b { b[b0 + j + l * self.ldb] } else { b[b0 + l + j * self.ldb] };
                        sum += a_il * b_lj;
                    }
                    c[p * self.stride_c + i + j * self.ldc] = sum;
                }
            }
        }
        c
    }
}

/// A `rows × cols` view with strides `(row_stride, col_stride)` as a matrix cuBLAS reads in
/// place: `(true, ld)` row-major (a column-major `cols × rows` with leading dimension `ld`),
/// `(false, ld)` column-major; `None` for any other layout. A dimension of size 1 takes any
/// stride.
fn matrix_layout(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<(bool, usize)> {
    if (cols == 1 || col_stride == 1) && (rows == 1 || row_stride >= cols) {
        return Some((true, if rows == 1 { cols } else { row_stride }));
    }
    if (rows == 1 || row_stride == 1) && (cols == 1 || col_stride >= rows) {
        return Some((false, if cols == 1 { rows } else { col_stride }));
    }
    None
}

/// The one stride between consecutive matrices of a batch with dimensions `shape`, `strides`
/// (elements): the batch must walk its dimensions as one, each a whole number of the next
/// (dimensions of size 1 take any stride). A batch of one: 0.
fn batch_stride(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let mut walked: Vec<(usize, usize)> = shape.iter().copied().zip(strides.iter().copied()).filter(|&(size, _)| size > 1).collect();
    let Some(&(_, innermost)) = walked.last() else { return Some(0) };
    walked.reverse();
    walked.windows(2).all(|pair| pair[1].1 == pair[0].1 * pair[0].0).then_some(innermost)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strided view over a buffer: the logical `shape`, its `strides` and where it starts.
    struct View {
        shape: Vec<usize>,
        strides: Vec<usize>,
        offset: usize,
    }

    impl View {
        fn at(&self, index: &[usize]) -> usize {
            self.offset + index.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
        }
    }

    /// Every index of `shape`, last dimension fastest.
    fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
        let mut all = vec![vec![]];
        for &size in shape {
            all = all.into_iter().flat_map(|prefix| (0..size).map(move |i| [prefix.clone(), vec![i]].concat())).collect();
        }
        all
    }

    /// A buffer filled with distinct values, large enough for `view`.
    fn buffer_for(view: &View, seed: f64) -> Vec<f64> {
        let last = indices(&view.shape).iter().map(|i| view.at(i)).max().unwrap_or(0);
        (0..=last + 3).map(|i| ((i as f64 + seed) * 0.618_034).fract() - 0.5).collect()
    }

    /// Row-major contiguous strides of `shape`.
    fn contiguous(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        strides
    }

    /// A contiguous tensor of `stored` dimensions, seen with its dimensions in `order` (a
    /// permutation: `swap_dims`, `transpose`), starting `offset` elements in.
    fn permuted(stored: &[usize], order: &[usize], offset: usize) -> View {
        let strides = contiguous(stored);
        View { shape: order.iter().map(|&d| stored[d]).collect(), strides: order.iter().map(|&d| strides[d]).collect(), offset }
    }

    /// `lhs · rhs` of the views by the planned call and its reference loop, against the logical
    /// product; `None` when the planner declines.
    fn planned_against_logical(lhs: &View, rhs: &View) -> Option<f64> {
        let gemm = ColumnMajorGemm::for_row_major_product((&lhs.shape, &lhs.strides), (&rhs.shape, &rhs.strides))?;
        let (lhs_buffer, rhs_buffer) = (buffer_for(lhs, 0.3), buffer_for(rhs, 7.1));
        let c = gemm.reference(&rhs_buffer, rhs.offset, &lhs_buffer, lhs.offset);
        let d = lhs.shape.len();
        let (k, n) = (lhs.shape[d - 1], rhs.shape[d - 1]);
        let out_shape = [&lhs.shape[..d - 1], &[n]].concat();
        let mut worst = 0f64;
        for (flat, index) in indices(&out_shape).into_iter().enumerate() {
            let expected: f64 = (0..k)
                .map(|l| {
                    let (mut li, mut ri) = (index.clone(), index.clone());
                    li[d - 1] = l;
                    ri[d - 2] = l;
                    lhs_buffer[lhs.at(&li)] * rhs_buffer[rhs.at(&ri)]
                })
                .sum();
            worst = worst.max((c[flat] - expected).abs());
        }
        assert_eq!(gemm.output_len(), indices(&out_shape).len());
        Some(worst)
    }

    #[test]
    fn every_layout_a_product_meets_maps_onto_one_column_major_call() {
        // (lhs, rhs, what the planner should do)
        let cases: Vec<(&str, View, View)> = vec![
            ("2-D, both row-major", permuted(&[5, 3], &[0, 1], 0), permuted(&[3, 4], &[0, 1], 0)),
            // x Wᵀ with W stored [out, in]: the projections' product.
            ("2-D, transposed weight", permuted(&[6, 3], &[0, 1], 0), permuted(&[4, 3], &[1, 0], 0)),
            // ∂W = ∂yᵀ x.
            ("2-D, transposed left operand", permuted(&[3, 5], &[1, 0], 0), permuted(&[3, 4], &[0, 1], 0)),
            ("2-D, both transposed", permuted(&[3, 5], &[1, 0], 2), permuted(&[4, 3], &[1, 0], 1)),
            ("vector times matrix", permuted(&[1, 3], &[0, 1], 0), permuted(&[3, 4], &[0, 1], 0)),
            ("matrix times column", permuted(&[5, 3], &[0, 1], 0), permuted(&[3, 1], &[0, 1], 0)),
            ("inner dimension of one", permuted(&[5, 1], &[0, 1], 0), permuted(&[1, 4], &[0, 1], 0)),
            // Attention's scores and outputs: [b, h, t, d] · [b, h, d, t], contiguous heads.
            ("4-D batch, k transposed", permuted(&[2, 3, 5, 4], &[0, 1, 2, 3], 0), permuted(&[2, 3, 5, 4], &[0, 1, 3, 2], 0)),
            ("4-D batch, row-major", permuted(&[2, 3, 5, 4], &[0, 1, 2, 3], 3), permuted(&[2, 3, 4, 6], &[0, 1, 2, 3], 0)),
            ("3-D, both transposed", permuted(&[2, 4, 5], &[0, 2, 1], 0), permuted(&[2, 3, 4], &[0, 2, 1], 0)),
            ("a batch of one", permuted(&[1, 5, 3], &[0, 1, 2], 0), permuted(&[1, 3, 4], &[0, 1, 2], 0)),
        ];
        for (name, lhs, rhs) in &cases {
            let difference = planned_against_logical(lhs, rhs).unwrap_or_else(|| panic!("{name}: no plan"));
            assert!(difference < 1e-12, "{name}: differs by {difference}");
        }
        // Rows of a wider buffer (a narrowed last dimension): a leading dimension beyond the width.
        let narrowed = View { shape: vec![4, 3], strides: vec![7, 1], offset: 2 };
        let difference = planned_against_logical(&narrowed, &permuted(&[3, 2], &[0, 1], 0)).expect("a plan with ld 7");
        assert!(difference < 1e-12, "narrowed rows differ by {difference}");
        // Batches a padding apart: one stride larger than the matrix.
        let padded = View { shape: vec![3, 2, 2], strides: vec![9, 2, 1], offset: 1 };
        let difference = planned_against_logical(&padded, &permuted(&[3, 2, 4], &[0, 1, 2], 0)).expect("a plan with stride 9");
        assert!(difference < 1e-12, "padded batch differs by {difference}");
    }

    #[test]
    fn layouts_one_call_cannot_read_are_declined() {
        let declined = |name: &str, lhs: View, rhs: View| {
            assert_eq!(planned_against_logical(&lhs, &rhs), None, "{name} should be declined");
        };
        // q from [b, t, h, d] seen as [b, h, t, d]: the batch (b, h) is not one stride apart.
        declined("heads swapped with positions", permuted(&[2, 5, 3, 4], &[0, 2, 1, 3], 0), permuted(&[2, 3, 4, 6], &[0, 1, 2, 3], 0));
        // Neither dimension of the matrix is unit-stride.
        declined("a strided matrix", View { shape: vec![3, 2], strides: vec![4, 2], offset: 0 }, permuted(&[2, 2], &[0, 1], 0));
        declined("a broadcast batch", permuted(&[1, 3, 2], &[0, 1, 2], 0), permuted(&[4, 2, 5], &[0, 1, 2], 0));
        declined("an empty dimension", permuted(&[0, 3], &[0, 1], 0), permuted(&[3, 2], &[0, 1], 0));
        declined("a mismatched inner dimension", permuted(&[2, 3], &[0, 1], 0), permuted(&[4, 2], &[0, 1], 0));
    }

    #[test]
    fn batch_strides_walk_the_dimensions_as_one() {
        assert_eq!(batch_stride(&[], &[]), Some(0));
        assert_eq!(batch_stride(&[2, 3], &[60, 20]), Some(20));
        assert_eq!(batch_stride(&[2, 1, 3], &[60, 999, 20]), Some(20), "a size-1 dimension takes any stride");
        assert_eq!(batch_stride(&[2, 3], &[20, 60]), None);
        assert_eq!(matrix_layout(4, 3, 3, 1), Some((true, 3)));
        assert_eq!(matrix_layout(4, 3, 1, 4), Some((false, 4)));
        assert_eq!(matrix_layout(4, 3, 1, 3), None, "a column-major leading dimension below the rows");
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn the_recorded_product_equals_burns_matmul_with_its_gradients() {
        use crate::backend::CpuAutodiff;
        use burn::tensor::{Distribution, Tolerance};
        let device = Default::default();
        let random = |dims: [usize; 4]| Tensor::<CpuAutodiff, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        // rhs stored [2, 3, 6, 4] and read transposed, as attention's scores read k.
        let (lhs, rhs) = (random([2, 3, 5, 4]), random([2, 3, 6, 4]));
        let weights = random([2, 3, 5, 6]);
        let mut compared = 0;
        for (track_lhs, track_rhs) in [(true, true), (true, false), (false, true)] {
            let run = |recorded: bool| {
                let lhs = if track_lhs { lhs.clone().require_grad() } else { lhs.clone() };
                let rhs = if track_rhs { rhs.clone().require_grad() } else { rhs.clone() };
                let rhs_seen = rhs.clone().swap_dims(2, 3);
                let product = if recorded {
                    record(lhs.clone(), rhs_seen).unwrap_or_else(|_| panic!("the CPU's autodiff records"))
                } else {
                    lhs.clone().matmul(rhs_seen)
                };
                let grads = (product.clone() * weights.clone()).sum().backward();
                (product.inner(), lhs.grad(&grads), rhs.grad(&grads))
            };
            let (product, d_lhs, d_rhs) = run(true);
            let (expected, d_lhs_ref, d_rhs_ref) = run(false);
            product.into_data().assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
            assert_eq!((d_lhs.is_some(), d_rhs.is_some()), (track_lhs, track_rhs), "a gradient exactly for each tracked operand");
            for (got, want) in [(d_lhs, d_lhs_ref), (d_rhs, d_rhs_ref)] {
                if let (Some(got), Some(want)) = (got, want) {
                    got.into_data().assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 4);
        // Batches that burn broadcasts are not recorded here.
        assert!(record(random([1, 3, 5, 4]), random([2, 3, 4, 6])).is_err());
    }
}
