//! QLoRA's product with its frozen 4-bit base under mixed precision, `x Wᵀ` with `W` dequantized
//! into the half type, as one recorded step of burn's autodiff that keeps the quantized weight
//! rather than the dense one:
//!
//! ```text
//! forward:   W = dequantize(q) as half;  y = (x as half) · Wᵀ;  drop W      [y as the model's float type unless kept half]
//! backward:  W = dequantize(q) as half;  ∂x = (∂y as half) · W  as x's type;  drop W
//! ```
//!
//! burn's matmul keeps its operands for the backward pass, so a dense weight computed for a
//! product lived until that product's backward step: with gradient checkpointing (always on for
//! a 4-bit base) every weight of the layer being recomputed at once, 7 of them, 0.41 GiB in bf16
//! for Mistral-7B. bitsandbytes' `MatMul4Bit` keeps the quantized weight and dequantizes it again
//! in its backward pass; so does this step, at one more dequantization per weight and step. The
//! weight is frozen, so there is no `∂W` and the input is not kept either. The values are burn's
//! operations' (the same casts, dequantization and products), which
//! `ALIGNMENT_QUANTIZED_PRODUCT_STEP=0` runs instead, for measuring.

use crate::half_product::{cast, rows};
use crate::quantized::QuantizedWeight;
use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::gemm::float_matmul;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive};

/// `x Wᵀ` for `x: [batch, seq, in]` and the quantized `W: [out, in]`, computed in `half`, the
/// result left in `half` when `keep_half`, else in the model's float type: one recorded step when
/// `B` is the autodiff of a backend built into this crate and `half` is narrower than its float
/// type (mixed precision); the input back otherwise (and with the switch off).
pub(crate) fn project_quantized<B: Backend>(
    x: Tensor<B, 3>,
    weight: &QuantizedWeight<B>,
    half: FloatDType,
    keep_half: bool,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    static STEP: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_QUANTIZED_PRODUCT_STEP");
    if alignment_core::precision::float_type::<B>() == half || !STEP.is_on() {
        return Err(x);
    }
    visit_autodiff::<B, _>(Recorded { x, weight: weight.clone(), half, keep_half }).map_err(|r| r.x)
}

/// The step's inputs on the caller's backend `B`.
struct Recorded<B: Backend> {
    x: Tensor<B, 3>,
    weight: QuantizedWeight<B>,
    half: FloatDType,
    keep_half: bool,
}

impl<B: Backend> AutodiffVisitor for Recorded<B> {
    type Output = Tensor<B, 3>;

    fn visit<I: Backend>(self) -> Tensor<B, 3> {
        let x = retype::<_, Tensor<Autodiff<I>, 3>>(self.x).into_primitive().tensor();
        // The weight's tensors on the inner backend (frozen: nothing of it is tracked).
        let weight: QuantizedWeight<I> = retype::<_, QuantizedWeight<Autodiff<I>>>(self.weight).valid();
        let [batch, seq, _] = x.primitive.shape().dims::<3>();
        let x_type: FloatDType = x.primitive.dtype().into();
        let out_type = if self.keep_half { self.half } else { alignment_core::precision::float_type::<I>() };
        let half = self.half;
        let forward = |x: FloatTensor<I>, weight: &QuantizedWeight<I>| {
            let y = float_matmul::<I>(rows::<I>(cast::<I>(x, half)), I::float_transpose(dense::<I>(weight, half)));
            cast::<I>(I::float_reshape(y, Shape::new([batch, seq, weight.dims[0]])), out_type)
        };
        // The input stays held until the step is registered: a backward pass on any thread frees
        // the graph's nodes that no tensor holds.
        let held = x.rc.clone();
        let prepared = <QuantizedProductBackward as Backward<I, 1>>::prepare::<NoCheckpointing>(QuantizedProductBackward, [x.node.clone()]);
        let y = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = forward(x.primitive, &weight);
                prep.finish(QuantizedProductState { weight, x_shape: [batch, seq], half, x_type }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, &weight)),
        };
        drop(held);
        retype(Tensor::<Autodiff<I>, 3>::from_primitive(TensorPrimitive::Float(y)))
    }
}

/// The dense weight in `half`, as [`crate::layers::Linear`]'s products dequantize it.
fn dense<I: Backend>(weight: &QuantizedWeight<I>, half: FloatDType) -> FloatTensor<I> {
    weight.dequantize_as(half).into_primitive().tensor()
}

/// What the backward pass keeps: the quantized weight (handles to the model's own tensors), the
/// input's `[batch, seq]`, the half type and the type of the input's gradient.
#[derive(Clone, Debug)]
struct QuantizedProductState<I: Backend> {
    weight: QuantizedWeight<I>,
    x_shape: [usize; 2],
    half: FloatDType,
    x_type: FloatDType,
}

#[derive(Debug)]
struct QuantizedProductBackward;

impl<I: Backend> Backward<I, 1> for QuantizedProductBackward {
    type State = QuantizedProductState<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let QuantizedProductState { weight, x_shape: [batch, seq], half, x_type } = ops.state;
        let [x_node] = ops.parents;
        let dy = rows::<I>(cast::<I>(grads.consume::<I>(&ops.node), half));
        if let Some(node) = x_node {
            let dx = float_matmul::<I>(dy, dense::<I>(&weight, half));
            let dx = I::float_reshape(dx, Shape::new([batch, seq, weight.dims[1]]));
            grads.register::<I>(node.id, cast::<I>(dx, x_type));
        }
    }
}

// The checks run on the CPU backend and on torch's CPU.
#[cfg(all(test, any(feature = "ndarray", feature = "tch")))]
mod tests {
    use super::*;
    use crate::layers::project_as;
    use crate::quantized::{QuantizedParts, ScaleParts};
    use alignment_core::precision::cast_to;
    use burn::tensor::{DType, Distribution};

    type T3<I> = Tensor<Autodiff<I>, 3>;

    /// A `[6, 128]` NF4-layout weight with double-quantized scales in blocks of 64.
    fn weight<I: Backend>(device: &I::Device) -> QuantizedWeight<Autodiff<I>> {
        let (out, inp, block_size) = (6, 128, 64);
        let blocks = out * inp / block_size;
        let parts = QuantizedParts {
            dims: [out, inp],
            packed_bytes: (0..out * inp / 2).map(|i| (i * 37 + 11) as u8).collect(),
            code_book: (0..16).map(|i| (i as f32 - 7.5) / 7.5).collect(),
            block_size,
            scales: ScaleParts::Nested {
                indices: (0..blocks).map(|j| (j * 97 + 200) as u8).collect(),
                code_book: (0..256).map(|i| i as f32 / 300.0).collect(),
                scales: vec![1.0, 1.25, 1.5],
                offset: 0.125,
                block_size: 5,
            },
        };
        QuantizedWeight::from_parts(&parts, device)
    }

    /// Output and input gradient of `Σ y ⊙ r` for the recorded product against burn's operations
    /// (what `Linear` ran before: the dense weight dequantized in `half`, cast and matmul), for a
    /// wide input and one already in `half`, each result type; the largest relative difference.
    /// Every result's and gradient's type is checked equal.
    fn against_burns_operations<I: Backend>(device: &I::Device, half: FloatDType) -> f32 {
        let q = weight::<I>(device);
        let x = T3::<I>::random([2, 3, 128], Distribution::Normal(0.0, 1.0), device);
        let relative = crate::test_support::max_relative_difference::<I, 3>;
        let mut worst = 0f32;
        for input_in_half in [false, true] {
            for keep_half in [false, true] {
                let r = T3::<I>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), device);
                let run = |f: &dyn Fn(T3<I>) -> T3<I>| {
                    let x = x.clone().require_grad();
                    // An input already in the half type, as the MLP's down projection gets it.
                    let input = if input_in_half { x.clone().cast(half) } else { x.clone() };
                    let y = f(input);
                    let grads = (y.clone().cast(FloatDType::F32) * r.clone()).sum().backward();
                    (y.inner(), x.grad(&grads).expect("the input is tracked"))
                };
                let (y, dx) =
                    run(&|x| project_quantized(x, &q, half, keep_half).unwrap_or_else(|_| panic!("autodiff takes the recorded step")));
                let (y_ref, dx_ref) = run(&|x| {
                    let y = project_as(x, q.dequantize_as(half), half);
                    if keep_half {
                        y
                    } else {
                        cast_to(y, FloatDType::F32)
                    }
                });
                assert_eq!(y.dtype(), y_ref.dtype(), "the result's type");
                assert_eq!(y.dtype(), DType::from(if keep_half { half } else { FloatDType::F32 }));
                assert_eq!(dx.dtype(), DType::F32, "∂x in x's type");
                worst = worst.max(relative(y, y_ref)).max(relative(dx, dx_ref));
            }
        }
        worst
    }

    /// The generic path (the one CUDA and wgpu take) on the CPU backend, f64 standing for the
    /// half type (the CPU backend has no bf16; the casts and their gradients are the same path).
    #[cfg(feature = "ndarray")]
    #[test]
    fn the_recorded_quantized_product_equals_burns_operations_on_any_backend() {
        type I = burn::backend::NdArray<f32>;
        let difference = against_burns_operations::<I>(&Default::default(), FloatDType::F64);
        assert!(difference <= 1e-6, "differs by {difference}");
    }

    /// On torch in bf16, the route QLoRA takes under `bf16: true` on libtorch: the same torch
    /// calls as burn's operations make, so the same bits.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_recorded_quantized_product_gives_burns_operations_bits_in_bf16() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert_eq!(against_burns_operations::<I>(&device, FloatDType::BF16), 0.0);
    }

    /// Without mixed precision (the half type the backend's own) the step is not taken.
    #[cfg(feature = "ndarray")]
    #[test]
    fn the_step_is_taken_only_under_mixed_precision() {
        type I = burn::backend::NdArray<f32>;
        let device = Default::default();
        let x = T3::<I>::random([1, 2, 128], Distribution::Normal(0.0, 1.0), &device);
        assert!(project_quantized(x, &weight::<I>(&device), FloatDType::F32, false).is_err());
    }
}
