//! The CPU backend's (burn-ndarray, f32) linear map without burn's copies, for inference.
//!
//! burn-ndarray 0.21's `matmul` reshapes both operands to 3-D, and its `reshape` copies a shared
//! array even when the layout already fits (`to_shape(..).into_shared()` on a borrowed view). For
//! `x Wᵀ` that is a full copy of `W` on every call — 540 MB of copies (and page faults for fresh
//! buffers) per generated token of a 135M model, whose tied 49152 × 576 head alone took 175 ms
//! a call. Here `W` is read in place:
//! - few rows (decoding: one token per sequence, up to 8): each row of `W` is multiplied with
//!   every input row while in L1 (eight-lane partial sums, one AVX2 register per input row with
//!   the row count a constant, FMA when the CPU has it, `W` prefetched 16 KiB ahead), output
//!   features split across threads — `W` streams through memory once, unpacked; maps that read
//!   the same input (q, k, v; gate, up) share one threaded pass ([`project_many`]). Every output
//!   sums in the same order whatever the number of rows, so a prompt decodes to the same bits
//!   alone or in a batch of up to eight;
//! - more rows (prefill, scoring): `matrixmultiply`'s GEMM (what burn calls) on views.
//!
//! Only for `NdArray<f32>` itself: under `Autodiff` (training) the tensors are not NdArray's and
//! burn's matmul runs, recording its backward step.

use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use ndarray::{linalg::general_mat_mul, Array2, ArrayView2, Ix2};
use rayon::prelude::*;

/// Rows up to which the dot-product path runs (above, the GEMM is faster).
const DOT_ROWS: usize = 8;

type Cpu = NdArray<f32>;

pub(crate) use alignment_core::backend::retype;

pub(crate) use alignment_core::cpu_storage::f32_values;

/// Lanes of the dot products: eight independent partial sums per (row of `W`, input row), so
/// each is one AVX register, summed in order at the end.
const LANES: usize = 8;

/// `out[r] = Σ_k w[k] x[r][k]` for one row `w` of `W` and the `R` rows of `x` (`R · w.len()`
/// values): eight lanes of partial sums per output, summed in order, then the remainder.
fn row_dots_plain<const R: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
    let inner = w.len();
    let mut acc = [[0f32; LANES]; R];
    let whole = inner / LANES * LANES;
    for k in (0..whole).step_by(LANES) {
        let wk = &w[k..k + LANES];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (j, a) in acc.iter_mut().enumerate() {
                *a += wk[j] * x[r * inner + k + j];
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let mut sum = acc.iter().sum::<f32>();
        for k in whole..inner {
            sum += w[k] * x[r * inner + k];
        }
        out[r] = sum;
    }
}

/// `Σ a[i] b[i]` with eight partial sums ([`row_dots_plain`] for one row): the attention scores
/// of the decoding step (`cpu_decode`), summed as the projections sum.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0f32];
    row_dots_plain::<1>(a, b, &mut out);
    out[0]
}

/// How far ahead of the row being multiplied [`row_dots_fma`] asks for `W` (in f32 values,
/// 16 KiB): the rows of one task lie back to back, so this fetches the rows that come next. The
/// hardware prefetcher alone left the kernel at ≈ 17–28 GB/s on two cores, waiting on `W`,
/// worst on `down_proj` (its inputs fill L1); 8–16 KiB ahead measured 27–44 GB/s (1 KiB ahead
/// had gained nothing).
const PREFETCH_AHEAD: usize = 4096;

/// [`row_dots_plain`] with AVX2 FMA intrinsics: one register per input row, each lane one fused
/// multiply-add per step (as `f32::mul_add`). `R` is a constant so that the `R` accumulators stay
/// in registers — written as plain Rust over `[[f32; 8]; R]`, LLVM left it scalar, with spills.
/// Each 64-byte line of `W` is prefetched [`PREFETCH_AHEAD`] values ahead.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dots_fma<const R: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::{__m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps, _mm_prefetch, _MM_HINT_T0};
    let inner = w.len();
    assert!(x.len() >= R * inner && out.len() >= R, "row_dots_fma: operand sizes");
    let mut acc: [__m256; R] = [_mm256_setzero_ps(); R];
    let whole = inner / LANES * LANES;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    for k in (0..whole).step_by(LANES) {
        if k % (2 * LANES) == 0 {
            // A hint, never a load: an address past the end of `w` does not fault.
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(k + PREFETCH_AHEAD).cast());
        }
        // SAFETY: k + LANES ≤ inner, so every load stays inside `w` and the rows of `x`.
        let wk = unsafe { _mm256_loadu_ps(wp.add(k)) };
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(wk, unsafe { _mm256_loadu_ps(xp.add(r * inner + k)) }, *a);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *acc) };
        let mut sum = lanes.iter().sum::<f32>();
        for k in whole..inner {
            sum += w[k] * x[r * inner + k];
        }
        out[r] = sum;
    }
}

/// `y[o · R + r]` for every row `o` of `w` (`y.len() / R` rows of `inner` values) and the `R` rows
/// of `x`, one row of `W` at a time (several at once measured slower: the rows of `W` then
/// stream in parallel).
fn rows_times<const R: usize>(w: &[f32], x: &[f32], inner: usize, y: &mut [f32], fma: bool) {
    for (o, out) in y.chunks_exact_mut(R).enumerate() {
        let w_row = &w[o * inner..(o + 1) * inner];
        // SAFETY: the FMA variant runs only where the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        if fma {
            unsafe { row_dots_fma::<R>(w_row, x, out) };
            continue;
        }
        row_dots_plain::<R>(w_row, x, out);
    }
    let _ = fma;
}

/// [`rows_times`] for `rows` input rows (1 to [`DOT_ROWS`]).
fn dots_for_rows(rows: usize, w: &[f32], x: &[f32], inner: usize, y: &mut [f32], fma: bool) {
    match rows {
        1 => rows_times::<1>(w, x, inner, y, fma),
        2 => rows_times::<2>(w, x, inner, y, fma),
        3 => rows_times::<3>(w, x, inner, y, fma),
        4 => rows_times::<4>(w, x, inner, y, fma),
        5 => rows_times::<5>(w, x, inner, y, fma),
        6 => rows_times::<6>(w, x, inner, y, fma),
        7 => rows_times::<7>(w, x, inner, y, fma),
        _ => rows_times::<8>(w, x, inner, y, fma),
    }
}

/// `x Wᵢᵀ` for each weight `Wᵢ: [outᵢ, inner]` (row-major values) and the `rows` rows of `x`
/// (1 to [`DOT_ROWS`]), as `[rows, outᵢ]` arrays, in one threaded pass: the threads take chunks
/// of output features of every weight, so maps that read the same input (q, k and v; gate and
/// up) pay one fork and join, and a small one (k, v) does not leave a core idle.
fn dots_many(x: &[f32], rows: usize, inner: usize, weights: &[&[f32]]) -> Vec<Array2<f32>> {
    #[cfg(target_arch = "x86_64")]
    let fma = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let fma = false;
    // Each y is [out, rows] while filled (one row of W per output row), then transposed.
    let mut yts: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; w.len() / inner * rows]).collect();
    let total: usize = weights.iter().map(|w| w.len() / inner).sum();
    let chunk = total.div_ceil(rayon::current_num_threads().max(1) * 4).max(64);
    let tasks: Vec<(&[f32], &mut [f32])> = weights
        .iter()
        .zip(yts.iter_mut())
        .flat_map(|(w, yt)| {
            yt.chunks_mut(chunk * rows).enumerate().map(move |(c, y)| (&w[c * chunk * inner..][..y.len() / rows * inner], y))
        })
        .collect();
    tasks.into_par_iter().for_each(|(w_rows, y)| dots_for_rows(rows, w_rows, x, inner, y, fma));
    yts.into_iter()
        .map(|yt| {
            let out = yt.len() / rows;
            Array2::from_shape_vec((out, rows), yt).expect("out × rows values").reversed_axes().as_standard_layout().into_owned()
        })
        .collect()
}

/// `x Wᵀ` for `x: [rows, in]` and `W: [out, in]` (views), as a new `[rows, out]` array.
fn multiply(x: ArrayView2<f32>, w: ArrayView2<f32>) -> Array2<f32> {
    let (rows, out) = (x.nrows(), w.nrows());
    let (Some(w_slice), true) = (w.as_slice(), (1..=DOT_ROWS).contains(&rows)) else {
        let mut y = Array2::<f32>::zeros((rows, out));
        general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y);
        return y;
    };
    let x = x.as_standard_layout();
    let x_slice = x.as_slice().expect("standard layout");
    dots_many(x_slice, rows, w.ncols(), &[w_slice]).pop().expect("one product per weight")
}

/// `[x W₁ᵀ, x W₂ᵀ, ..]` on `NdArray<f32>` for `x: [batch, seq, in]` of at most [`DOT_ROWS`]
/// rows (decoding) and row-major weights, in one threaded pass ([`dots_many`]); gives the
/// tensors back otherwise (more rows take [`project`] one weight at a time: a GEMM each).
#[allow(clippy::type_complexity)]
pub(crate) fn project_many<B: Backend>(
    x: Tensor<B, 3>,
    ws: Vec<Tensor<B, 2>>,
) -> Result<Vec<Tensor<B, 3>>, (Tensor<B, 3>, Vec<Tensor<B, 2>>)> {
    let [batch, seq, inner] = x.dims();
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<Cpu>() || batch * seq > DOT_ROWS {
        return Err((x, ws));
    }
    let x: Tensor<Cpu, 3> = retype(x);
    let ws: Vec<Tensor<Cpu, 2>> = ws.into_iter().map(retype).collect();
    let give_back = |x: Tensor<Cpu, 3>, ws: Vec<Tensor<Cpu, 2>>| Err((retype(x), ws.into_iter().map(retype).collect()));
    let primitives: Vec<_> = ws.iter().map(|w| w.clone().into_primitive()).collect();
    let mut weights = Vec::with_capacity(ws.len());
    for p in &primitives {
        match p {
            TensorPrimitive::Float(NdArrayTensor::F32(w)) if w.ndim() == 2 && w.shape()[1] == inner => match w.view().to_slice() {
                Some(values) => weights.push(values),
                None => return give_back(x, ws),
            },
            _ => return give_back(x, ws),
        }
    }
    let TensorPrimitive::Float(NdArrayTensor::F32(xs)) = x.clone().into_primitive() else {
        return give_back(x, ws);
    };
    let x_view = xs.view();
    let x2 = x_view.to_shape((batch * seq, inner)).expect("[batch, seq, in] flattens to [batch * seq, in]");
    let x2 = x2.as_standard_layout();
    let x_slice = x2.as_slice().expect("standard layout");
    Ok(dots_many(x_slice, batch * seq, inner, &weights).into_iter().map(|y| tensor3(y, batch, seq)).collect())
}

/// `y: [batch · seq, out]` as the tensor `[batch, seq, out]` of backend `B` (which is [`Cpu`]).
fn tensor3<B: Backend>(y: Array2<f32>, batch: usize, seq: usize) -> Tensor<B, 3> {
    let out = y.ncols();
    let y = y.into_shape_with_order((batch, seq, out)).expect("a standard-layout [batch * seq, out] array");
    retype(Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(y.into_dyn().into_shared()))))
}

/// `x Wᵀ` on `NdArray<f32>` without copying `W`; gives the tensors back on any other backend (or
/// an unexpected storage) for burn's matmul.
#[allow(clippy::type_complexity)]
pub(crate) fn project<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)> {
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<Cpu>() {
        return Err((x, w));
    }
    let x: Tensor<Cpu, 3> = retype(x);
    let w: Tensor<Cpu, 2> = retype(w);
    let give_back = |x: Tensor<Cpu, 3>, w: Tensor<Cpu, 2>| Err((retype(x), retype(w)));
    let [batch, seq, inner] = x.dims();
    let (TensorPrimitive::Float(xp), TensorPrimitive::Float(wp)) = (x.clone().into_primitive(), w.clone().into_primitive()) else {
        return give_back(x, w);
    };
    let (NdArrayTensor::F32(xs), NdArrayTensor::F32(ws)) = (&xp, &wp) else {
        return give_back(x, w);
    };
    let (x_view, w_view) = (xs.view(), ws.view());
    let Ok(w_view) = w_view.into_dimensionality::<Ix2>() else {
        return give_back(x, w);
    };
    let x2 = x_view.to_shape((batch * seq, inner)).expect("[batch, seq, in] flattens to [batch * seq, in]");
    Ok(tensor3(multiply(x2.view(), w_view), batch, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use burn::tensor::Distribution;

    /// The shared pass gives each map's own product bit for bit (the same kernel per output),
    /// at every decoding row count, for maps of unequal sizes (q, k, v); more rows than the
    /// dot-product path takes fall back to one product per map.
    #[test]
    fn maps_sharing_an_input_equal_their_own_products() {
        let device = Default::default();
        Cpu::seed(&device, 7);
        let linears: Vec<Linear<Cpu>> =
            [100, 20, 20].iter().map(|&out| Linear::new(Tensor::random([out, 72], Distribution::Normal(0.0, 1.0), &device))).collect();
        for rows in [1, 3, 8, 9] {
            let x = Tensor::<Cpu, 3>::random([rows, 1, 72], Distribution::Normal(0.0, 1.0), &device);
            let shared = Linear::forward_many([&linears[0], &linears[1], &linears[2]], x.clone());
            for (linear, y) in linears.iter().zip(shared) {
                let own = linear.forward(x.clone());
                assert_eq!(y.dims(), own.dims());
                assert_eq!(y.into_data().to_vec::<f32>().unwrap(), own.into_data().to_vec::<f32>().unwrap(), "{rows} rows");
            }
            let weights = linears.iter().map(|l| l.weight.val()).collect();
            assert_eq!(project_many(x, weights).is_ok(), rows <= DOT_ROWS, "{rows} rows");
        }
    }
}
