//! The training step's tensor operations one at a time, on a backend against the CPU's: the check
//! that names which operation a GPU backend gets wrong when the whole step's check
//! ([`crate::step_check`]) fails without saying where.
//!
//! Why: on the first device session (issue #12) burn-cuda's step differed from the CPU's by
//! 1e0–1e3 in f32 and gave non-finite values in bf16, while the same CubeCL kernels pass on
//! `wgpu` in CI. `device_run.sh cuda-bisect` switches this project's own GPU paths off one at a
//! time; this check goes one level lower, through burn's operations as the step uses them:
//! element-wise arithmetic and its broadcasting, casts, reductions along every axis, softmax,
//! layout changes (the heads' `swap_dims`, the rotation's slices and concatenation, GQA's
//! repetition), indexing (the embedding's `select`, the loss's `gather`, their backward
//! `select_assign` and `scatter`), matrix products of the step's kinds (odd sizes included, as
//! CubeCL picks kernels by size) through the route the step's products take (`core::gemm`:
//! cuBLAS on `cuda` unless `ALIGNMENT_CUBLAS=0` gives CubeCL's matmul back, its stand-in kernel
//! on `wgpu`), the backward pass of each composite the model builds, and the
//! optimizer's arithmetic as burn fuses it. Then this project's own paths through the entry
//! points the model and the losses call (the products, the half-type products, RMSNorm, the
//! rotation, attention causal and padded, the gated MLP, the loss's passes over the logits, and
//! `bf16: true`'s forms of them: attention and the MLP in the half type, the loss over half-type
//! logits, the chunked head of `use_liger_kernel` over a half-type weight), which take each
//! backend's own route: cuBLAS and CubeCL kernels on `cuda`, torch's calls on `tch`. Each
//! operation runs on its own, its values read back before the next, a panic or an execution
//! error recorded as that operation's failure.
//!
//! Inputs are drawn from a fixed generator per operation (the same on every backend); values
//! are the outputs, then the gradients, flattened. `half` casts every input of burn's operations
//! to that type first (the products and element-wise kernels of `bf16: true` on CUDA), compared
//! with the CPU's f32 values within [`HALF_TOLERANCE`]; this project's paths take the types the
//! step gives them (f32 inputs, the half type inside where the step casts), so they run in the
//! f32 pass only.

use crate::core::gemm::matmul;
use burn::tensor::activation;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Largest relative difference accepted in f32 (as the step's check).
pub const OP_TOLERANCE: f64 = 1e-4;

/// Largest relative difference accepted with half-precision inputs, against f32 values.
pub const HALF_TOLERANCE: f64 = 2e-2;

/// The passes of a check on a backend whose mixed precision computes in `half`: f32 inputs
/// within [`OP_TOLERANCE`], then, with `half`, inputs of that type within [`HALF_TOLERANCE`].
pub fn passes(half: Option<FloatDType>) -> Vec<(Option<FloatDType>, f64)> {
    let mut passes = vec![(None, OP_TOLERANCE)];
    passes.extend(half.map(|dtype| (Some(dtype), HALF_TOLERANCE)));
    passes
}

/// What one operation gave: its outputs then its gradients, flattened, or why it failed.
pub type OpOutcome = Result<Vec<f32>, String>;

/// One operation as it ran on a backend.
#[derive(Debug, Clone)]
pub struct OpRun {
    pub name: &'static str,
    /// The operation's own tolerance where rounding is its point (the casts), over the default.
    pub tolerance: Option<f64>,
    pub outcome: OpOutcome,
}

/// Draws one operation's inputs: uniform values in `[-1, 1)` from splitmix64, the same sequence
/// on every backend, cast to `half` when given.
struct Inputs<'a, B: Backend> {
    device: &'a B::Device,
    half: Option<FloatDType>,
    state: u64,
}

impl<'a, B: Backend> Inputs<'a, B> {
    fn new(device: &'a B::Device, half: Option<FloatDType>, seed: u64) -> Self {
        Self { device, half, state: seed.wrapping_mul(0x2545_F491_4F6C_DD1D) }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float tensor of `shape`, values in `[-1, 1)` (cast to the half type if any).
    fn float<const D: usize>(&mut self, shape: [usize; D]) -> Tensor<B, D> {
        let values: Vec<f32> = (0..shape.iter().product()).map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect();
        let tensor = Tensor::<B, D>::from_data(TensorData::new(values, shape), self.device);
        match self.half {
            Some(dtype) => tensor.cast(dtype),
            None => tensor,
        }
    }

    /// An integer tensor of `shape`, values in `0..bound`.
    fn ints<const D: usize>(&mut self, shape: [usize; D], bound: usize) -> Tensor<B, D, Int> {
        let values: Vec<i32> = (0..shape.iter().product()).map(|_| (self.next() % bound as u64) as i32).collect();
        Tensor::<B, D, Int>::from_data(TensorData::new(values, shape), self.device)
    }

    /// The causal mask of `t` positions: `true` where a query would see a later key.
    fn causal_mask(&self, t: usize) -> Tensor<B, 2, Bool> {
        let positions = Tensor::<B, 1, Int>::arange(0..t as i64, self.device);
        let rows = positions.clone().reshape([t, 1]).expand([t, t]);
        let cols = positions.reshape([1, t]).expand([t, t]);
        rows.lower(cols)
    }
}

/// A tensor's values on the host, as f32 (an execution error becomes the operation's failure).
fn read<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> OpOutcome {
    let data = tensor.try_into_data().map_err(|e| format!("reading the result: {e:?}"))?;
    data.convert::<f32>().into_vec::<f32>().map_err(|e| format!("reading the result: {e:?}"))
}

/// The output's values, and the gradients of `Σ output · weights` (random weights in the
/// output's type, so that every element's gradient matters).
fn backward<B: AutodiffBackend, const D: usize>(
    inputs: &mut Inputs<'_, B>,
    output: Tensor<B, D>,
) -> Result<(Vec<f32>, B::Gradients), String> {
    let weights = crate::core::precision::cast_to(inputs.float(output.dims()), output.dtype().into());
    let values = read(output.clone())?;
    Ok((values, (output * weights).sum().backward()))
}

/// The gradient `grads` holds for `x`.
fn gradient<B: AutodiffBackend, const D: usize>(x: &Tensor<B, D>, grads: &B::Gradients) -> OpOutcome {
    read(x.grad(grads).ok_or("an input got no gradient")?)
}

/// The output's values, then [`backward`]'s gradient with respect to each input.
fn with_gradients<B: AutodiffBackend, const D: usize, const E: usize>(
    inputs: &mut Inputs<'_, B>,
    output: Tensor<B, D>,
    wrt: &[Tensor<B, E>],
) -> OpOutcome {
    let (mut values, grads) = backward(inputs, output)?;
    for x in wrt {
        values.extend(gradient(x, &grads)?);
    }
    Ok(values)
}

/// RMSNorm as the model composes it when no fused step applies.
fn rms_norm<B: Backend>(x: Tensor<B, 3>, scale: Tensor<B, 1>) -> Tensor<B, 3> {
    let rms = (x.clone() * x.clone()).mean_dim(2).add_scalar(1e-5).sqrt();
    x / rms * scale.unsqueeze::<3>()
}

/// `rotate_half` of the rotary embedding: the halves of the last axis swapped, the first negated.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let first = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let second = x.slice([0..b, 0..h, 0..t, d / 2..d]);
    Tensor::cat(vec![second.neg(), first], 3)
}

/// One operation: its name, its own tolerance if any, and what it computes from the inputs it
/// draws.
struct Op<B: Backend> {
    name: &'static str,
    tolerance: Option<f64>,
    run: Box<OpFn<B>>,
}

/// What an operation computes from the inputs it draws.
type OpFn<B> = dyn Fn(&mut Inputs<'_, B>) -> OpOutcome;

fn op<B: Backend>(name: &'static str, run: impl Fn(&mut Inputs<'_, B>) -> OpOutcome + 'static) -> Op<B> {
    Op { name, tolerance: None, run: Box::new(run) }
}

/// A round trip through `dtype` and back to f32, against the input itself: within the type's
/// unit roundoff (`2^-precision`, the precision counting the implicit bit) and finite. A backend
/// that does not hold `dtype` (the CPU's, and `wgpu` for bf16) returns the input unchanged, the
/// reference.
fn round_trip<B: Backend>(name: &'static str, dtype: FloatDType, precision: i32) -> Op<B> {
    Op {
        name,
        tolerance: Some(2f64.powi(-precision)),
        run: Box::new(move |g| {
            let x = g.float([2, 7, 64]);
            if crate::core::precision::supported::<B>(dtype, g.device) {
                read(x.cast(dtype).cast(FloatDType::F32))
            } else {
                read(x)
            }
        }),
    }
}

/// Every operation of the check, in the order it runs.
fn operations<B: AutodiffBackend>() -> Vec<Op<B>> {
    // Sizes as in the tiny fixture's step (batch 2, 7 tokens: odd, hidden 64, 4 query heads of 16
    // over 2 key/value heads, vocabulary 128) and larger rows where CubeCL changes its kernels.
    vec![
        op("add, sub, mul, div, broadcast over rows and columns", |g| {
            let (a, row, col, d) = (g.float([2, 7, 64]), g.float([64]), g.float([2, 7, 1]), g.float([2, 7, 64]));
            read((a + row.unsqueeze::<3>() - col.clone()) * d.clone() / (d.abs().add_scalar(1.0)) + col.mul_scalar(0.5))
        }),
        op("exp, log, sqrt, recip, powf, tanh", |g| {
            let a = g.float([2, 7, 64]);
            let positive = a.clone().abs().add_scalar(0.5);
            read(
                a.clone().exp()
                    + positive.clone().log()
                    + positive.clone().sqrt()
                    + positive.clone().recip()
                    + positive.powf_scalar(1.5)
                    + a.tanh(),
            )
        }),
        op("sigmoid, silu, log_sigmoid", |g| {
            let a = g.float([2, 7, 64]).mul_scalar(4.0);
            read(activation::sigmoid(a.clone()) + activation::silu(a.clone()) + activation::log_sigmoid(a))
        }),
        op("clamp, max_pair, abs, neg", |g| {
            let (a, b) = (g.float([3, 13]), g.float([3, 13]));
            read(a.clone().clamp(-0.5, 0.25) + a.clone().max_pair(b.clone()) + a.abs() + b.neg())
        }),
        op("comparison, mask_fill, mask_where, bool to float", |g| {
            let (a, b) = (g.float([2, 7, 64]), g.float([2, 7, 64]));
            let mask = a.clone().greater_elem(0.2);
            Ok([read(a.clone().mask_fill(mask.clone(), -1e4).clamp_min(-10.0) + a.mask_where(mask.clone(), b))?, read(mask.float())?]
                .concat())
        }),
        op("causal mask from arange, expand and lower", |g| {
            let scores = g.float([2, 4, 7, 7]);
            let mask = g.causal_mask(7).unsqueeze::<4>().expand([2, 4, 7, 7]);
            read(scores.mask_fill(mask, -1e4))
        }),
        op("labels: not_equal_elem, int to float, argmax", |g| {
            let labels = g.ints([2, 7], 5).sub_scalar(1);
            let logits = g.float([2, 7, 128]);
            let kept = labels.not_equal_elem(-1).float();
            let argmax = logits.argmax(2).float().reshape([2, 7]);
            Ok([read(kept)?, read(argmax)?].concat())
        }),
        round_trip("cast to bf16 and back", FloatDType::BF16, 8),
        round_trip("cast to f16 and back", FloatDType::F16, 11),
        op("sum_dim over each axis", |g| {
            let a = g.float([2, 7, 64]);
            Ok([read(a.clone().sum_dim(0))?, read(a.clone().sum_dim(1))?, read(a.sum_dim(2))?].concat())
        }),
        op("mean_dim, max_dim, min_dim", |g| {
            let a = g.float([2, 7, 64]);
            Ok([read(a.clone().mean_dim(2))?, read(a.clone().max_dim(2))?, read(a.clone().min_dim(1))?, read(a.max_dim(0))?].concat())
        }),
        op("sum of everything, 4 × 4096 and 2 × 7 × 128", |g| {
            Ok([read(g.float([4, 4096]).sum())?, read(g.float([2, 7, 128]).sum())?].concat())
        }),
        op("sum_dim over rows of 4096 and 50257", |g| {
            Ok([read(g.float([4, 4096]).sum_dim(1))?, read(g.float([3, 50257]).sum_dim(1))?, read(g.float([4096, 4]).sum_dim(0))?].concat())
        }),
        op("cumsum", |g| read(g.float([2, 7, 64]).cumsum(1))),
        op("softmax over 7, 128 and 4096", |g| {
            Ok([
                read(activation::softmax(g.float([2, 4, 7, 7]).mul_scalar(8.0), 3))?,
                read(activation::softmax(g.float([2, 7, 128]).mul_scalar(8.0), 2))?,
                read(activation::softmax(g.float([4, 4096]).mul_scalar(8.0), 1))?,
            ]
            .concat())
        }),
        op("log_softmax over the vocabulary", |g| read(activation::log_softmax(g.float([2, 7, 128]).mul_scalar(8.0), 2))),
        op("swap_dims and reshape (heads)", |g| {
            let x = g.float([2, 7, 64]);
            let heads = x.reshape([2, 7, 4, 16]).swap_dims(1, 2);
            Ok([read(heads.clone())?, read(heads.swap_dims(1, 2).reshape([2, 7, 64]).mul_scalar(2.0))?].concat())
        }),
        op("transpose, then element-wise", |g| {
            let (a, b) = (g.float([64, 96]), g.float([96, 64]));
            read(a.transpose() + b)
        }),
        op("slice and cat (rotate_half)", |g| read(rotate_half(g.float([2, 4, 7, 16])))),
        op("slice_assign", |g| {
            let (a, b) = (g.float([2, 7, 64]), g.float([2, 3, 16]));
            read(a.slice_assign([0..2, 2..5, 8..24], b))
        }),
        op("flip", |g| read(g.float([2, 7, 64]).flip([1, 2]))),
        op("repeat_dim and expand (GQA)", |g| {
            let kv = g.float([2, 2, 7, 16]);
            let repeated = kv.clone().unsqueeze_dim::<5>(2).expand([2, 2, 2, 7, 16]).reshape([2, 4, 7, 16]);
            Ok([read(repeated)?, read(kv.repeat_dim(1, 2))?].concat())
        }),
        op("gather along the vocabulary", |g| {
            let (logits, targets) = (g.float([2, 7, 128]), g.ints([2, 7, 1], 128));
            read(logits.gather(2, targets))
        }),
        op("select rows (embedding)", |g| {
            let (table, ids) = (g.float([128, 64]), g.ints([14], 128));
            read(table.select(0, ids))
        }),
        op("select_assign with repeated rows (embedding's backward)", |g| {
            let (table, values) = (g.float([16, 64]), g.float([14, 64]));
            let ids = g.ints([14], 8);
            read(table.select_assign(0, ids, values, IndexingUpdateOp::Add))
        }),
        op("scatter add (gather's backward)", |g| {
            let (zeros, values, targets) = (g.float([2, 7, 128]).mul_scalar(0.0), g.float([2, 7, 1]), g.ints([2, 7, 1], 128));
            read(zeros.scatter(2, targets, values, IndexingUpdateOp::Add))
        }),
        op("matmul, linear x·Wᵀ (2 × 7 × 64 by 96 × 64)", |g| {
            let (x, w) = (g.float([2, 7, 64]), g.float([96, 64]));
            read(matmul(x, w.transpose().unsqueeze::<3>()))
        }),
        op("matmul, batched q·kᵀ (2 × 4 × 7 × 16)", |g| {
            let (q, k) = (g.float([2, 4, 7, 16]), g.float([2, 4, 7, 16]));
            read(matmul(q, k.transpose()))
        }),
        op("matmul, odd sizes (3 × 13 by 13 × 5)", |g| read(matmul(g.float([3, 13]), g.float([13, 5])))),
        op("matmul, 256 × 320 by 320 × 192", |g| read(matmul(g.float([256, 320]), g.float([320, 192])))),
        op("matmul, 512 × 2048 by 2048 × 256 (a long inner axis)", |g| read(matmul(g.float([512, 2048]), g.float([2048, 256])))),
        op("matmul, Wᵀ-shaped gradient (64 × 14 by 14 × 96)", |g| {
            let (x, dy) = (g.float([14, 64]), g.float([14, 96]));
            read(matmul(x.transpose(), dy))
        }),
        op("∂ linear, the weight broadcast over the batch", |g| {
            let (x, w) = (g.float([2, 7, 64]).require_grad(), g.float([1, 96, 64]).require_grad());
            with_gradients(g, matmul(x.clone(), w.clone().swap_dims(1, 2)), &[x, w])
        }),
        op("∂ softmax", |g| {
            let x = g.float([2, 4, 7, 7]).mul_scalar(4.0).require_grad();
            with_gradients(g, activation::softmax(x.clone(), 3), &[x])
        }),
        op("∂ log_softmax and gather (cross-entropy)", |g| {
            let (logits, targets) = (g.float([2, 7, 128]).mul_scalar(4.0).require_grad(), g.ints([2, 7, 1], 128));
            let picked = activation::log_softmax(logits.clone(), 2).gather(2, targets);
            with_gradients(g, picked, &[logits])
        }),
        op("∂ RMSNorm (composed)", |g| {
            let (x, scale) = (g.float([2, 7, 64]).require_grad(), g.float([64]).require_grad());
            let (mut values, grads) = backward(g, rms_norm(x.clone(), scale.clone()))?;
            values.extend(gradient(&x, &grads)?);
            values.extend(gradient(&scale, &grads)?);
            Ok(values)
        }),
        op("∂ gated MLP, silu(g)·u", |g| {
            let (gate, up) = (g.float([2, 7, 64]).mul_scalar(3.0).require_grad(), g.float([2, 7, 64]).require_grad());
            let h = activation::silu(gate.clone()) * up.clone();
            with_gradients(g, h, &[gate, up])
        }),
        op("∂ attention composed (GQA, causal mask, softmax)", |g| {
            let (q, k, v) =
                (g.float([2, 4, 7, 16]).require_grad(), g.float([2, 2, 7, 16]).require_grad(), g.float([2, 2, 7, 16]).require_grad());
            let mask = g.causal_mask(7).unsqueeze::<4>().expand([2, 4, 7, 7]);
            let (kr, vr) = (k.clone().repeat_dim(1, 2), v.clone().repeat_dim(1, 2));
            let scores = matmul(q.clone(), kr.transpose()).mul_scalar(0.25).mask_fill(mask, -1e9);
            let out = matmul(activation::softmax(scores, 3), vr).swap_dims(1, 2).reshape([2, 7, 64]);
            with_gradients(g, out.reshape([2, 7, 4, 16]), &[q, k, v])
        }),
        op("∂ rotary embedding (rotate_half, cos, sin)", |g| {
            let (x, cos, sin) = (g.float([2, 4, 7, 16]).require_grad(), g.float([1, 1, 7, 16]), g.float([1, 1, 7, 16]));
            let y = x.clone() * cos + rotate_half(x.clone()) * sin;
            with_gradients(g, y, &[x])
        }),
        op("∂ embedding select", |g| {
            let (table, ids) = (g.float([128, 64]).require_grad(), g.ints([14], 16));
            with_gradients(g, table.clone().select(0, ids), &[table])
        }),
        op("∂ swap_dims, reshape, slice", |g| {
            let x = g.float([2, 7, 64]).require_grad();
            let y = x.clone().reshape([2, 7, 4, 16]).swap_dims(1, 2).slice([0..2, 1..3, 0..7, 0..16]);
            with_gradients(g, y, &[x])
        }),
        op("∂ max_dim and mean_dim", |g| {
            let x = g.float([2, 7, 64]).require_grad();
            with_gradients(g, x.clone().max_dim(2) + x.clone().mean_dim(2), &[x])
        }),
        op("AdamW update (fused element-wise)", |g| {
            let (p, grad, m, v) = (g.float([96, 64]), g.float([96, 64]), g.float([96, 64]), g.float([96, 64]).abs());
            let (lr, beta1, beta2, eps, decay, t) = (1e-2f32, 0.9f32, 0.999f32, 1e-8f32, 0.01f32, 3);
            let m = m.mul_scalar(beta1) + grad.clone().mul_scalar(1.0 - beta1);
            let v = v.mul_scalar(beta2) + (grad.clone() * grad).mul_scalar(1.0 - beta2);
            let m_hat = m.clone().div_scalar(1.0 - beta1.powi(t));
            let v_hat = v.clone().div_scalar(1.0 - beta2.powi(t));
            let p = p.clone().mul_scalar(1.0 - lr * decay) - m_hat / v_hat.sqrt().add_scalar(eps) * lr;
            Ok([read(p)?, read(m)?, read(v)?].concat())
        }),
        op("global norm and clipping", |g| {
            let grads = [g.float([96, 64]), g.float([1, 64]), g.float([128, 64])];
            let squares: Vec<Tensor<B, 1>> = grads.iter().map(|x| (x.clone() * x.clone()).sum()).collect();
            let norm = Tensor::cat(squares, 0).sum().sqrt();
            let coef = norm.clone().add_scalar(1e-6).recip().clamp_max(1.0);
            let clipped = grads[0].clone() * coef.unsqueeze::<2>();
            Ok([read(norm)?, read(clipped)?].concat())
        }),
    ]
}

/// This project's own paths, through the entry points the model and the losses call, which take
/// a backend's own route where it has one (cuBLAS products and CubeCL kernels on `cuda`, torch's
/// fused calls on `tch`, the recorded steps under autodiff) and burn's operations on the CPU.
fn project_paths<B: AutodiffBackend>() -> Vec<Op<B>> {
    use crate::models::attention::{Attention, AttentionMask, MaskSpec};
    use crate::models::config::Activation;
    use crate::models::layers::{project, project_in, Linear, RmsNorm};
    use crate::models::model::Mlp;
    use crate::objectives::{
        causal_lm_loss, chunked_logps_and_backward, chunked_logps_backward, chunked_sequence_logps_with, sequence_logps,
        sequence_logps_with, ExtraStats, Reduction, SequenceLogps, IGNORE_INDEX,
    };
    use burn::module::Param;

    /// The half type of `bf16: true` on this backend (`None` on the CPU's, which computes in f32).
    fn half_of<B: Backend>(g: &Inputs<'_, B>) -> Option<FloatDType> {
        crate::core::precision::half_type::<B>(g.device)
    }

    /// The tiny fixture's attention (4 query heads of 16 over 2 key/value heads), random weights,
    /// its products in `half` when given (mixed precision); the gradient with respect to its input.
    fn attention<B: AutodiffBackend>(g: &mut Inputs<'_, B>, padded: bool, half: Option<FloatDType>) -> OpOutcome {
        let mut linear = |rows, cols| Linear { matmul_dtype: half, ..Linear::new(g.float([rows, cols]).mul_scalar(0.25)) };
        let (q_proj, k_proj, v_proj, o_proj) = (linear(64, 64), linear(32, 64), linear(32, 64), linear(64, 64));
        let layer = Attention { q_proj, k_proj, v_proj, o_proj, num_heads: 4, num_kv_heads: 2, head_dim: 16, matmul_dtype: half };
        let (x, cos, sin) = (g.float([2, 7, 64]).require_grad(), g.float([2, 1, 7, 16]), g.float([2, 1, 7, 16]));
        let padding = [vec![true; 7], [vec![true; 5], vec![false; 2]].concat()];
        let spec = MaskSpec { key_is_token: padded.then_some(&padding[..]), ..Default::default() };
        let mask = AttentionMask::new(2, 0, 7, &spec, g.device);
        let y = layer.forward(x.clone(), &cos, &sin, &mask, None);
        with_gradients(g, y, &[x])
    }

    /// The tiny fixture's gated MLP (64 → 128 → 64, SiLU), random weights, its products in
    /// `half` when given (then, under autodiff, the gate and down projection one recorded step:
    /// `gated_down`); the gradients of its input and its three weights.
    fn mlp<B: AutodiffBackend>(g: &mut Inputs<'_, B>, half: Option<FloatDType>) -> OpOutcome {
        let mut linear = |rows, cols| Linear { matmul_dtype: half, ..Linear::new(g.float([rows, cols]).mul_scalar(0.25)) };
        let (gate_proj, up_proj, down_proj) = (linear(128, 64), linear(128, 64), linear(64, 128));
        let mlp = Mlp { gate_proj, up_proj, down_proj, activation: Activation::Silu };
        let x = g.float([2, 7, 64]).require_grad();
        let (mut values, grads) = backward(g, mlp.forward(x.clone()))?;
        values.extend(gradient(&x, &grads)?);
        for linear in [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj] {
            values.extend(gradient(&linear.weight.val(), &grads)?);
        }
        Ok(values)
    }

    /// Labels over a vocabulary of 128 with about a third ignored, as prompts and padding are.
    fn labels<B: Backend>(g: &mut Inputs<'_, B>) -> Tensor<B, 2, Int> {
        let ignored = g.ints([2, 7], 3).equal_elem(0);
        g.ints([2, 7], 128).mask_fill(ignored, IGNORE_INDEX)
    }

    /// Every statistic of `logps`, sums first.
    fn statistics<B: Backend>(logps: &SequenceLogps<B>) -> OpOutcome {
        let mut values = Vec::new();
        for stat in [&logps.sum, &logps.num_tokens, &logps.entropy_sum, &logps.num_correct, &logps.mean_logits, &logps.mean_logits_all] {
            values.extend(read(stat.clone())?);
        }
        Ok(values)
    }

    /// The head of the lean step (`use_liger_kernel`): hidden states `[2, 7, 64]` against a
    /// `[128, 64]` head weight in `half` when given (the products' type under mixed precision),
    /// 5 tokens a chunk so that chunks straddle rows; the label sets' log-probabilities and the
    /// gradients of the hidden states and the weight, by the one walk SFT takes (`one_walk`:
    /// `∂loss/∂sum` given up front) or the two passes DPO takes.
    fn chunked_head<B: AutodiffBackend>(g: &mut Inputs<'_, B>, one_walk: bool) -> OpOutcome {
        let half = half_of(g);
        let hidden = g.float([2, 7, 64]).inner();
        let weight = g.float([128, 64]).mul_scalar(0.25).inner();
        let weight = half.map_or(weight.clone(), |dtype| crate::core::precision::cast_to(weight, dtype));
        let label_sets = vec![labels(g).inner(), labels(g).inner()];
        let upstream: Vec<_> = (0..2).map(|_| g.float([2]).inner()).collect();
        let (logps, head) = if one_walk {
            chunked_logps_and_backward(hidden, weight, true, label_sets, upstream, 5, ExtraStats::default())
        } else {
            let logps = chunked_sequence_logps_with(hidden.clone(), weight.clone(), label_sets.clone(), 5, ExtraStats::default());
            (logps, chunked_logps_backward(hidden, weight, true, label_sets, upstream, 5))
        };
        let mut values = Vec::new();
        for set in &logps {
            values.extend(statistics(set)?);
        }
        values.extend(read(head.hidden)?);
        values.extend(read(head.weight.ok_or("no weight gradient")?)?);
        Ok(values)
    }

    /// An operation computing in the half type of `bf16: true` where the backend has one, so
    /// compared within [`HALF_TOLERANCE`] (on the CPU backend it computes in f32).
    fn mixed<B: Backend>(name: &'static str, run: impl Fn(&mut Inputs<'_, B>) -> OpOutcome + 'static) -> Op<B> {
        Op { name, tolerance: Some(HALF_TOLERANCE), run: Box::new(run) }
    }

    vec![
        op("∂ layers::project (the model's products)", |g| {
            let (x, w) = (g.float([2, 7, 64]).require_grad(), g.float([96, 64]).require_grad());
            let (mut values, grads) = backward(g, project(x.clone(), w.clone()))?;
            values.extend(gradient(&x, &grads)?);
            values.extend(gradient(&w, &grads)?);
            Ok(values)
        }),
        Op {
            name: "∂ layers::project_in the half type (mixed precision's products)",
            tolerance: Some(HALF_TOLERANCE),
            run: Box::new(|g| {
                let half = crate::core::precision::half_type::<B>(g.device);
                let (x, w) = (g.float([2, 7, 64]).require_grad(), g.float([96, 64]).require_grad());
                let (mut values, grads) = backward(g, project_in(x.clone(), w.clone(), half))?;
                values.extend(gradient(&x, &grads)?);
                values.extend(gradient(&w, &grads)?);
                Ok(values)
            }),
        },
        op("∂ RmsNorm::forward (fused or recorded norm)", |g| {
            let (x, scale) = (g.float([2, 7, 64]).require_grad(), g.float([64]));
            let norm = RmsNorm { weight: Param::from_tensor(scale), eps: 1e-5, unit_offset: false };
            let (mut values, grads) = backward(g, norm.forward(x.clone()))?;
            values.extend(gradient(&x, &grads)?);
            values.extend(gradient(&norm.weight.val(), &grads)?);
            Ok(values)
        }),
        op("∂ rope::apply", |g| {
            let (x, cos, sin) = (g.float([2, 4, 7, 16]).require_grad(), g.float([2, 1, 7, 16]), g.float([2, 1, 7, 16]));
            with_gradients(g, crate::models::rope::apply(x.clone(), &cos, &sin), &[x])
        }),
        op("∂ Attention::forward, causal (GQA)", |g| attention(g, false, None)),
        op("∂ Attention::forward, padded keys", |g| attention(g, true, None)),
        mixed("∂ Attention::forward in the half type, padded keys (mixed precision)", |g| {
            let half = half_of(g);
            attention(g, true, half)
        }),
        op("∂ Mlp::forward (gate, up, SiLU, down)", |g| mlp(g, None)),
        mixed("∂ Mlp::forward in the half type (mixed precision: gated_down's recorded step)", |g| {
            let half = half_of(g);
            mlp(g, half)
        }),
        op("∂ causal_lm_loss (the loss's passes over the logits)", |g| {
            let logits = g.float([2, 7, 128]).mul_scalar(4.0).require_grad();
            let labels = labels(g);
            with_gradients(g, causal_lm_loss(logits.clone(), labels, Reduction::Mean), &[logits])
        }),
        op("sequence_logps: sums, counts, entropy, accuracy; ∂ sums", |g| {
            let logits = g.float([2, 7, 128]).mul_scalar(4.0).require_grad();
            let labels = labels(g);
            let logps = sequence_logps(logits.clone(), labels);
            let stats = [logps.num_tokens.clone(), logps.entropy_sum.clone(), logps.num_correct.clone(), logps.mean_logits_all.clone()];
            let mut values = Vec::new();
            for stat in stats {
                values.extend(read(stat)?);
            }
            values.extend(with_gradients(g, logps.sum, &[logits])?);
            Ok(values)
        }),
        mixed("sequence_logps_with of half-type logits, two label sets (mixed precision's loss); ∂ sums", |g| {
            let logits = g.float([2, 7, 128]).mul_scalar(4.0).require_grad();
            let label_sets = vec![labels(g), labels(g)];
            let read_in = match half_of(g) {
                Some(dtype) => crate::core::precision::cast_to(logits.clone(), dtype),
                None => logits.clone(),
            };
            let logps = sequence_logps_with(read_in, label_sets, ExtraStats::default());
            let mut values = Vec::new();
            for set in &logps {
                values.extend(statistics(set)?);
            }
            let total = logps.into_iter().map(|l| l.sum).reduce(|a, b| a + b).expect("two sets");
            values.extend(with_gradients(g, total, &[logits])?);
            Ok(values)
        }),
        mixed("chunked head, one walk (SFT's use_liger_kernel): log-probs, ∂hidden, ∂weight", |g| chunked_head(g, true)),
        mixed("chunked head, two passes (DPO's use_liger_kernel): log-probs, ∂hidden, ∂weight", |g| chunked_head(g, false)),
    ]
}

/// Runs every operation on `B`, one at a time: burn's operations (each input cast to `half` when
/// given), then, without `half`, this project's paths.
pub fn run_ops<B: AutodiffBackend>(device: &B::Device, half: Option<FloatDType>) -> Vec<OpRun> {
    operations::<B>()
        .into_iter()
        // This project's paths take the types the step gives them (f32, and the half type where
        // the step casts), so they run once, in the f32 pass.
        .chain(if half.is_none() { project_paths::<B>() } else { Vec::new() })
        .enumerate()
        .map(|(i, op)| {
            let mut inputs = Inputs::<B>::new(device, half, i as u64 + 1);
            let outcome = catch_unwind(AssertUnwindSafe(|| (op.run)(&mut inputs))).unwrap_or_else(|panic| {
                let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(format!("panicked: {}", message.unwrap_or_else(|| "(no message)".into())))
            });
            OpRun { name: op.name, tolerance: op.tolerance, outcome }
        })
        .collect()
}

/// How one operation's values differ from the reference's.
#[derive(Debug, Clone)]
pub struct OpDifference {
    pub name: &'static str,
    /// `‖got − expected‖ / ‖expected‖` (infinite when a value is not finite where the reference
    /// is, when the counts differ, or when the operation failed).
    pub relative: f64,
    /// The tolerance it is held to: the run's, or the operation's own where larger.
    pub tolerance: f64,
    /// Why it could not be compared: the operation's failure, or different value counts.
    pub error: Option<String>,
}

impl OpDifference {
    /// Whether the operation ran and its values are within its tolerance.
    pub fn pass(&self) -> bool {
        self.error.is_none() && self.relative <= self.tolerance
    }
}

/// Compares each operation of `got` with the same operation of `expected` (the CPU's values),
/// within `tolerance` ([`OP_TOLERANCE`], or [`HALF_TOLERANCE`] for half-precision inputs).
pub fn compare_ops(got: &[OpRun], expected: &[OpRun], tolerance: f64) -> Vec<OpDifference> {
    got.iter()
        .map(|run| {
            let name = run.name;
            let tolerance = run.tolerance.map_or(tolerance, |own| own.max(tolerance));
            let reference = expected.iter().find(|r| r.name == name).map(|r| &r.outcome);
            let failed = |error: String| OpDifference { name, relative: f64::INFINITY, tolerance, error: Some(error) };
            match (&run.outcome, reference) {
                (Err(e), _) => failed(e.clone()),
                (_, None) => failed("not in the reference".into()),
                (_, Some(Err(e))) => failed(format!("the reference failed: {e}")),
                (Ok(g), Some(Ok(e))) if g.len() != e.len() => failed(format!("{} values, the reference has {}", g.len(), e.len())),
                (Ok(g), Some(Ok(e))) => OpDifference { name, relative: relative_difference(g, e), tolerance, error: None },
            }
        })
        .collect()
}

fn relative_difference(got: &[f32], expected: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &e) in got.iter().zip(expected) {
        if !g.is_finite() && e.is_finite() {
            return f64::INFINITY;
        }
        if g.is_finite() {
            diff += (f64::from(g) - f64::from(e)).powi(2);
            norm += f64::from(e).powi(2);
        }
    }
    diff.sqrt() / norm.sqrt().max(1e-30)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(name: &'static str, values: &[f32]) -> OpRun {
        OpRun { name, tolerance: None, outcome: Ok(values.to_vec()) }
    }

    #[test]
    fn differences_name_each_operation_and_its_failure() {
        let expected = vec![value("a", &[3.0, 4.0]), value("b", &[1.0]), value("c", &[1.0]), value("d", &[1.0, 2.0]), value("e", &[2.0])];
        let mut loose = value("a", &[3.0, 4.05]);
        loose.tolerance = Some(2e-2);
        let got = vec![
            value("a", &[3.0, 4.05]),
            OpRun { name: "b", tolerance: None, outcome: Err("panicked: launch".into()) },
            value("c", &[f32::NAN]),
            value("d", &[1.0]),
            value("e", &[2.0]),
        ];
        let diffs = compare_ops(&got, &expected, 1e-4);
        assert!((diffs[0].relative - 1e-2).abs() < 1e-6 && !diffs[0].pass());
        assert_eq!(diffs[1].error.as_deref(), Some("panicked: launch"));
        assert!(!diffs[1].pass());
        assert!(diffs[2].relative.is_infinite() && !diffs[2].pass());
        assert_eq!(diffs[3].error.as_deref(), Some("1 values, the reference has 2"));
        assert!(diffs[4].relative == 0.0 && diffs[4].pass());
        // An operation's own tolerance widens the run's, never narrows it.
        assert!(compare_ops(&[loose.clone()], &expected, 1e-4)[0].pass());
        loose.tolerance = Some(1e-6);
        assert!(!compare_ops(&[loose], &expected, 1e-4)[0].pass());
        assert!(compare_ops(&[value("a", &[3.0, 4.05])], &expected, 2e-2)[0].pass());
    }
}
