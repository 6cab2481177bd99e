//! The CPU backend's (burn-ndarray, f32) linear map without burn's copies, for inference.
//!
//! burn-ndarray 0.21's `matmul` reshapes both operands to 3-D, and its `reshape` copies a shared
//! array even when the layout already fits (`to_shape(..).into_shared()` on a borrowed view). For
//! `x Wᵀ` that is a full copy of `W` on every call — 540 MB of copies (and page faults for fresh
//! buffers) per generated token of a 135M model, whose tied 49152 × 576 head alone took 175 ms
//! a call. Here `W` is read in place:
//! - few rows (decoding: one token per sequence, up to 8): each row of `W` is multiplied with
//!   every input row while in L1 (eight-lane partial sums, AVX2 + FMA when the CPU has them),
//!   output features split across threads — `W` streams through memory once, unpacked;
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

pub(crate) use alignment_core::backend::downcast as cast;

/// Lanes of the dot products: eight independent partial sums per input row, so the compiler
/// vectorizes them (one AVX register each) without reordering a float reduction.
const LANES: usize = 8;

macro_rules! row_dots {
    ($name:ident, $fma:expr $(, #[$attr:meta])?) => {
        /// `out[r] = Σ_k w[k] x[r][k]` for the rows of `x` (`rows` rows of `w.len()` values).
        $(#[$attr])?
        unsafe fn $name(w: &[f32], x: &[f32], out: &mut [f32]) {
            let inner = w.len();
            let rows = out.len();
            let mut acc = [[0f32; LANES]; DOT_ROWS];
            let whole = inner / LANES * LANES;
            let mut k = 0;
            while k < whole {
                let wk = &w[k..k + LANES];
                for r in 0..rows {
                    let xk = &x[r * inner + k..r * inner + k + LANES];
                    for j in 0..LANES {
                        acc[r][j] = $fma(wk[j], xk[j], acc[r][j]);
                    }
                }
                k += LANES;
            }
            for r in 0..rows {
                let mut sum = acc[r].iter().sum::<f32>();
                for k in whole..inner {
                    sum += w[k] * x[r * inner + k];
                }
                out[r] = sum;
            }
        }
    };
}

row_dots!(row_dots_plain, |a: f32, b: f32, c: f32| a * b + c);
#[cfg(target_arch = "x86_64")]
row_dots!(row_dots_fma, |a: f32, b: f32, c: f32| a.mul_add(b, c), #[target_feature(enable = "avx2,fma")]);

/// `x Wᵀ` for `x: [rows, in]` and `W: [out, in]` (views), as a new `[rows, out]` array.
fn multiply(x: ArrayView2<f32>, w: ArrayView2<f32>) -> Array2<f32> {
    let (rows, out) = (x.nrows(), w.nrows());
    let (Some(w_slice), true) = (w.as_slice(), rows <= DOT_ROWS) else {
        let mut y = Array2::<f32>::zeros((rows, out));
        general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y);
        return y;
    };
    let x = x.as_standard_layout();
    let x_slice = x.as_slice().expect("standard layout");
    let inner = w.ncols();
    #[cfg(target_arch = "x86_64")]
    let fma = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let fma = false;
    // y is [out, rows] while filled (one row of W per output row), then transposed.
    let mut yt = vec![0f32; out * rows];
    let chunk = out.div_ceil(rayon::current_num_threads().max(1) * 4).max(64);
    yt.par_chunks_mut(chunk * rows).enumerate().for_each(|(c, block)| {
        for (i, y) in block.chunks_mut(rows).enumerate() {
            let o = c * chunk + i;
            let w_row = &w_slice[o * inner..(o + 1) * inner];
            // SAFETY: the FMA variant runs only where the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            if fma {
                unsafe { row_dots_fma(w_row, x_slice, y) };
                continue;
            }
            unsafe { row_dots_plain(w_row, x_slice, y) };
        }
    });
    let _ = fma;
    Array2::from_shape_vec((out, rows), yt).expect("out × rows values").reversed_axes().as_standard_layout().into_owned()
}

/// `x Wᵀ` on `NdArray<f32>` without copying `W`; gives the tensors back on any other backend (or
/// an unexpected storage) for burn's matmul.
#[allow(clippy::type_complexity)]
pub(crate) fn project<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)> {
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<Cpu>() {
        return Err((x, w));
    }
    let x: Tensor<Cpu, 3> = cast(x).unwrap_or_else(|_| unreachable!("B is NdArray<f32>"));
    let w: Tensor<Cpu, 2> = cast(w).unwrap_or_else(|_| unreachable!("B is NdArray<f32>"));
    let give_back = |x: Tensor<Cpu, 3>, w: Tensor<Cpu, 2>| {
        Err((cast(x).unwrap_or_else(|_| unreachable!("B is NdArray<f32>")), cast(w).unwrap_or_else(|_| unreachable!("B is NdArray<f32>"))))
    };
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
    let y = multiply(x2.view(), w_view);
    let out = y.ncols();
    let y = y.into_shape_with_order((batch, seq, out)).expect("a standard-layout [batch * seq, out] array");
    let y = NdArrayTensor::from(y.into_dyn().into_shared());
    Ok(cast(Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(y))).unwrap_or_else(|_| unreachable!("B is NdArray<f32>")))
}
