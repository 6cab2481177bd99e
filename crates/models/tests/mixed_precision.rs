//! The gated MLP under mixed precision (`alignment_core::precision`): the gate and up
//! projections, the activation and their product stay in the products' type, as autocast leaves
//! them, and the MLP's output and every gradient come back in the weights' type. On the CPU
//! backend, which has no half type, f64 stands for it (the casts and their backward steps are the
//! same path), so the values equal the f32 MLP's to f32 rounding, adapters included.

use alignment_core::backend::CpuAutodiff as B;
use alignment_models::config::Activation;
use alignment_models::layers::{Linear, LoraAdapter};
use alignment_models::model::Mlp;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, FloatDType, Tensor};

const HIDDEN: usize = 8;
const INTERMEDIATE: usize = 20;

/// burn's random generator is one for the process, and the tests run on threads side by side: a
/// test seeding it and drawing holds this, so that another's draw never comes in between.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The same values for the same `shape` and `seed`, whatever else runs.
fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    let _drawing = GLOBAL_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(&Default::default(), seed);
    Tensor::random(shape, Distribution::Normal(0.0, 0.5), &Default::default())
}

fn linear(out: usize, inner: usize, seed: u64, dtype: Option<FloatDType>) -> Linear<B> {
    Linear { matmul_dtype: dtype, ..Linear::new(random([out, inner], seed)) }
}

/// An MLP with a LoRA adapter on its gate (non-zero `B`, so that it contributes), products in
/// `dtype`.
fn mlp(dtype: Option<FloatDType>, activation: Activation) -> Mlp<B> {
    let mut gate_proj = linear(INTERMEDIATE, HIDDEN, 1, dtype);
    gate_proj.lora = Some(LoraAdapter {
        a: Param::from_tensor(random([4, HIDDEN], 4)),
        b: Param::from_tensor(random([INTERMEDIATE, 4], 5)),
        scaling: 2.0,
        dropout: 0.0,
        force_dropout: false,
        magnitude: None,
    });
    Mlp { gate_proj, up_proj: linear(INTERMEDIATE, HIDDEN, 2, dtype), down_proj: linear(HIDDEN, INTERMEDIATE, 3, dtype), activation }
}

fn values<const D: usize>(t: Tensor<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn assert_close(what: &str, ours: &[f32], theirs: &[f32]) {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = ours.iter().zip(theirs).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 1e-5 * scale, "{what}: differs by {worst} (scale {scale})");
}

#[test]
fn a_linear_layer_can_leave_its_product_in_the_half_type_and_take_it_back() {
    let half = Some(FloatDType::F64);
    let x = random::<3>([2, 3, HIDDEN], 7);
    let up = linear(INTERMEDIATE, HIDDEN, 2, half);
    let kept = up.forward_in_product_type(x.clone());
    assert_eq!(kept.dtype(), DType::F64, "the product stays in the half type");
    let plain = linear(INTERMEDIATE, HIDDEN, 2, None).forward(x);
    assert_close("product", &values(kept.clone().inner()), &values(plain.inner()));
    // A layer reading a half-type input multiplies in it and returns the weights' type.
    let down = linear(HIDDEN, INTERMEDIATE, 3, half);
    assert_eq!(down.forward(kept).dtype(), DType::F32);
}

#[test]
fn the_mixed_precision_mlp_equals_the_f32_one_with_f32_gradients() {
    for activation in [Activation::Silu, Activation::GeluTanh] {
        let x = random::<3>([2, 3, HIDDEN], 9).require_grad();
        let mut results = Vec::new();
        for dtype in [None, Some(FloatDType::F64)] {
            let mlp = mlp(dtype, activation);
            let out = mlp.forward(x.clone());
            assert_eq!(out.dtype(), DType::F32, "{activation:?} {dtype:?}: the output is in the weights' type");
            let grads = (out.clone() * random::<3>([2, 3, HIDDEN], 11)).sum().backward();
            let weight_grads = [&mlp.gate_proj.weight, &mlp.up_proj.weight, &mlp.down_proj.weight].map(|w| w.grad(&grads).unwrap());
            let lora = mlp.gate_proj.lora.as_ref().unwrap();
            let lora_grads = [&lora.a, &lora.b].map(|p| p.grad(&grads).unwrap());
            for g in weight_grads.iter().chain(&lora_grads) {
                assert_eq!(g.dtype(), DType::F32, "{activation:?} {dtype:?}: gradients in the parameters' type");
            }
            let x_grad = x.grad(&grads).unwrap();
            let mut all = vec![values(out.inner()), values(x_grad)];
            all.extend(weight_grads.into_iter().chain(lora_grads).map(values));
            results.push(all);
        }
        let names = ["output", "∂x", "∂gate", "∂up", "∂down", "∂lora.a", "∂lora.b"];
        for (i, name) in names.iter().enumerate() {
            assert_close(&format!("{activation:?} {name}"), &results[1][i], &results[0][i]);
        }
    }
}
