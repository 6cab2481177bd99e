//! The CPU backend's recorded linear map (`cpu_autodiff`, what `layers::project` runs under
//! `Autodiff<NdArray<f32>>`) against burn's own autodiff matmul on the same backend: the same
//! output, `∂x` and `∂W` (up to the GEMM's summation order), whichever inputs are tracked, for
//! strided inputs, and for a weight used twice in one graph (a tied head). Likewise the gated
//! MLP's fused `silu(g) · u` (`cpu_gate`) against burn's `silu` and product.

use alignment_core::backend::CpuAutodiff as B;
use alignment_models::layers::project;
use burn::tensor::{Distribution, Tensor};

/// burn's random generator is one for the process, and the tests run on threads side by side: a
/// test seeding it and drawing holds this, so that another's draw never comes in between.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The same values for the same `shape` and `seed`, whatever else runs.
fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    use burn::tensor::backend::Backend;
    let _drawing = GLOBAL_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(&Default::default(), seed);
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn assert_close<const D: usize>(what: &str, ours: Tensor<B, D>, theirs: Tensor<B, D>) {
    assert_eq!(ours.dims(), theirs.dims(), "{what}: shapes");
    let (a, b) = (ours.into_data().to_vec::<f32>().unwrap(), theirs.into_data().to_vec::<f32>().unwrap());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
    }
}

/// Runs `loss = Σ (project(x, W) ⊙ g)` both ways and compares the output and the gradients of the
/// tracked inputs.
fn check(x: Tensor<B, 3>, w: Tensor<B, 2>, track_x: bool, track_w: bool) {
    let [batch, seq, _] = x.dims();
    let out = w.dims()[0];
    let g = random([batch, seq, out], 7).inner();
    let run = |f: &dyn Fn(Tensor<B, 3>, Tensor<B, 2>) -> Tensor<B, 3>| {
        let x = if track_x { Tensor::from_inner(x.clone().inner()).require_grad() } else { Tensor::from_inner(x.clone().inner()) };
        let w = if track_w { Tensor::from_inner(w.clone().inner()).require_grad() } else { Tensor::from_inner(w.clone().inner()) };
        let y = f(x.clone(), w.clone());
        let loss = (y.clone() * Tensor::from_inner(g.clone())).sum();
        let grads = loss.backward();
        (y.inner(), x.grad(&grads), w.grad(&grads))
    };
    let (y, gx, gw) = run(&|x, w| project(x, w));
    let (y_ref, gx_ref, gw_ref) = run(&|x, w| {
        let [batch, seq, inner] = x.dims();
        let out = w.dims()[0];
        x.reshape([batch * seq, inner]).matmul(w.transpose()).reshape([batch, seq, out])
    });
    assert_close("y", Tensor::<B, 3>::from_inner(y), Tensor::from_inner(y_ref));
    assert_eq!(gx.is_some(), track_x, "∂x exists exactly when x is tracked");
    assert_eq!(gw.is_some(), track_w, "∂W exists exactly when W is tracked");
    if let (Some(a), Some(b)) = (gx, gx_ref) {
        assert_close("∂x", Tensor::<B, 3>::from_inner(a), Tensor::from_inner(b));
    }
    if let (Some(a), Some(b)) = (gw, gw_ref) {
        assert_close("∂W", Tensor::<B, 2>::from_inner(a), Tensor::from_inner(b));
    }
}

#[test]
fn recorded_projection_equals_burns_matmul_for_every_tracking() {
    let (x, w) = (random([2, 5, 12], 1), random([7, 12], 2));
    for (track_x, track_w) in [(true, true), (true, false), (false, true)] {
        check(x.clone(), w.clone(), track_x, track_w);
    }
}

#[test]
fn recorded_projection_reads_strided_inputs() {
    // x as a transposed view ([seq, batch, in] swapped), W as a transposed [in, out] matrix.
    let x = random([5, 2, 12], 3).swap_dims(0, 1);
    let w = random([12, 7], 4).transpose();
    check(x, w, true, true);
}

#[test]
fn recorded_projection_accumulates_a_weight_used_twice() {
    // A tied head: the same W projects two activations; ∂W is the sum of both steps.
    let w = random([6, 8], 5).require_grad();
    let (a, b) = (random([1, 3, 8], 6), random([2, 2, 8], 7));
    let loss = project(a.clone(), w.clone()).sum() + project(b.clone(), w.clone()).powf_scalar(2.0).sum();
    let grads = loss.backward();
    let ours = w.grad(&grads).unwrap();
    let w_ref = Tensor::<B, 2>::from_inner(w.clone().inner()).require_grad();
    let plain = |x: Tensor<B, 3>| {
        let [batch, seq, inner] = x.dims();
        x.reshape([batch * seq, inner]).matmul(w_ref.clone().transpose()).reshape([batch, seq, 6])
    };
    let loss = plain(a).sum() + plain(b).powf_scalar(2.0).sum();
    let grads = loss.backward();
    assert_close("∂W", Tensor::<B, 2>::from_inner(ours), Tensor::from_inner(w_ref.grad(&grads).unwrap()));
}

/// `silu(g) · u` fused (`model::silu_times`) against burn's `silu(g) * u`: output, `∂g`, `∂u`
/// under autodiff, whichever inputs are tracked; the forward pass alone on the inner backend;
/// a strided input; more elements than one thread's chunk.
#[test]
fn fused_silu_gate_equals_burns_operations() {
    use alignment_models::model::silu_times;
    use burn::tensor::activation::silu;
    for (shape, strided) in [([2, 3, 5], false), ([2, 40, 600], false), ([3, 4, 6], true)] {
        // Strided: `g` a transposed view of a [seq, batch, width] tensor.
        let g = if strided { random([shape[1], shape[0], shape[2]], 11).swap_dims(0, 1) } else { random(shape, 11) };
        let u = random(shape, 12) * 2.0;
        let weights = random(shape, 14).inner();
        for (track_g, track_u) in [(true, true), (true, false), (false, true)] {
            let run = |f: &dyn Fn(Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3>| {
                let leaf = |t: &Tensor<B, 3>, track: bool| {
                    let t = Tensor::<B, 3>::from_inner(t.clone().inner());
                    if track {
                        t.require_grad()
                    } else {
                        t
                    }
                };
                let (g, u) = (leaf(&g, track_g), leaf(&u, track_u));
                let h = f(g.clone(), u.clone());
                let grads = (h.clone() * Tensor::from_inner(weights.clone())).sum().backward();
                (h.inner(), g.grad(&grads), u.grad(&grads))
            };
            let (h, dg, du) = run(&|g, u| silu_times(g, u));
            let (h_ref, dg_ref, du_ref) = run(&|g, u| silu(g) * u);
            assert_close("h", Tensor::<B, 3>::from_inner(h), Tensor::from_inner(h_ref));
            assert_eq!((dg.is_some(), du.is_some()), (track_g, track_u), "gradients exactly for the tracked inputs");
            if let (Some(a), Some(b)) = (dg, dg_ref) {
                assert_close("∂g", Tensor::<B, 3>::from_inner(a), Tensor::from_inner(b));
            }
            if let (Some(a), Some(b)) = (du, du_ref) {
                assert_close("∂u", Tensor::<B, 3>::from_inner(a), Tensor::from_inner(b));
            }
        }
        // The inference backend: forward only.
        let (gi, ui) = (g.clone().inner(), u.clone().inner());
        let fused = silu_times(gi.clone(), ui.clone());
        assert_close("h (inner backend)", Tensor::<B, 3>::from_inner(fused), Tensor::from_inner(silu(gi) * ui));
    }
}
