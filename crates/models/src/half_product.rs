//! Mixed precision's product with a parameter, `x Wᵀ` in the half type, as one recorded step of
//! burn's autodiff: the backward pass casts the parameter again instead of keeping a half-type
//! copy of it.
//!
//! ```text
//! forward:   y  = (x as half) · (W as half)ᵀ                [as the model's float type unless kept half]
//! backward:  ∂x = (∂y as half) · (W as half)   as x's type
//!            ∂W = (∂y as half)ᵀ · (x as half)  as W's type
//! ```
//!
//! The result is in the model's float type (the backend's own, f32 under mixed precision, the
//! residual stream's), whatever the parameter's: a frozen weight may be stored in the half type
//! itself (`CausalLm::store_frozen_weights_in_product_type`), where its cast is a no-op.
//!
//! burn's operations (cast, cast, matmul) keep both half-type operands for the backward pass,
//! as autocast does (its cache of cast weights lives until the backward pass): a bf16 copy of
//! every weight, 2 bytes a parameter, alive at the end of the forward pass where memory peaks —
//! 2.3 GiB for Llama-3.2-1B. Here the step keeps the half-type input (only for a trainable
//! parameter: a frozen base under LoRA needs none) and a handle to the parameter itself, which
//! the model holds anyway, and pays one cast of each weight more in the backward pass. For
//! parameters only: a weight computed per product (QLoRA's dequantized base) would be kept in
//! its full type, so those products keep burn's operations.
//!
//! Maps that read one input (q, k and v; gate and up) share one half-type copy of it
//! ([`project_param_from_half`]): each product registers its input gradient in the input's own
//! wide type, so the gradients of the copy are summed in f32, as autocast sums the gradients of
//! its per-product casts, and the copy is kept once for the backward pass instead of once per map.

use alignment_core::backend::{retype, visit_autodiff, AutodiffVisitor};
use alignment_core::gemm::float_matmul;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, DType, FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive};

/// `x Wᵀ` for `x: [batch, seq, in]` and the parameter `W: [out, in]`, computed in `half`, the
/// result left in `half` when `keep_half`, else in the model's float type: one recorded step
/// when `B` is the autodiff of a backend built into this crate; the tensors back on any other
/// backend.
#[allow(clippy::type_complexity)]
pub(crate) fn project_param<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    half: FloatDType,
    keep_half: bool,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)> {
    record(Recorded { x, weight, half, keep_half, x_grad_type: None })
}

/// [`project_param`] for an input already cast to the half type and shared by several products
/// (see the module doc): the input's gradient is registered in `x_grad_type`, the type the
/// input was cast from, so that the shared copy's gradients add up there. The tensors back where
/// [`project_param`] gives them back.
#[allow(clippy::type_complexity)]
pub(crate) fn project_param_from_half<B: Backend>(
    x_half: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    keep_half: bool,
    x_grad_type: FloatDType,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)> {
    let half: FloatDType = x_half.dtype().into();
    record(Recorded { x: x_half, weight, half, keep_half, x_grad_type: Some(x_grad_type) })
}

/// Runs `step` as one recorded step, or gives its tensors back: when the backend's own float
/// type is the half type (nothing is mixed: every tensor is of it), or when `B` records nothing
/// here. A weight stored in the half type (frozen, see the module doc) is recorded too: its
/// input's gradient must still be registered in the wide type, where a shared copy's add up.
#[allow(clippy::type_complexity)]
fn record<B: Backend>(step: Recorded<B>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>)> {
    if alignment_core::precision::float_type::<B>() == step.half {
        return Err((step.x, step.weight));
    }
    visit_autodiff::<B, _>(step).map_err(|r| (r.x, r.weight))
}

/// Whether `B` is the autodiff of a backend the products above record on: where a shared
/// half-type input gets its gradients summed in the wide type.
pub(crate) fn records_on<B: Backend>() -> bool {
    struct Probe;
    impl AutodiffVisitor for Probe {
        type Output = ();
        fn visit<I: Backend>(self) {}
    }
    visit_autodiff::<B, _>(Probe).is_ok()
}

/// The recorded step, run on the autodiff backend's inner backend.
struct Recorded<B: Backend> {
    x: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    half: FloatDType,
    keep_half: bool,
    /// The type `∂x` is registered in; `None`: `x`'s own.
    x_grad_type: Option<FloatDType>,
}

impl<B: Backend> AutodiffVisitor for Recorded<B> {
    type Output = Tensor<B, 3>;

    fn visit<I: Backend>(self) -> Tensor<B, 3> {
        let (x, weight): (Tensor<Autodiff<I>, 3>, Tensor<Autodiff<I>, 2>) = (retype(self.x), retype(self.weight));
        let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
        let y = record_primitives::<I>(x, weight, self.half, self.keep_half, self.x_grad_type);
        retype(Tensor::<Autodiff<I>, 3>::from_primitive(TensorPrimitive::Float(y)))
    }
}

/// `t` in `dtype`, unchanged when already of it.
pub(crate) fn cast<I: Backend>(t: FloatTensor<I>, dtype: FloatDType) -> FloatTensor<I> {
    if t.dtype() == DType::from(dtype) {
        t
    } else {
        I::float_cast(t, dtype)
    }
}

/// `[batch, seq, n]` as `[batch · seq, n]`.
pub(crate) fn rows<I: Backend>(t: FloatTensor<I>) -> FloatTensor<I> {
    let dims = t.shape().dims::<3>();
    I::float_reshape(t, Shape::new([dims[0] * dims[1], dims[2]]))
}

/// [`record`] on burn's primitives.
fn record_primitives<I: Backend>(
    x: FloatTensor<Autodiff<I>>,
    weight: FloatTensor<Autodiff<I>>,
    half: FloatDType,
    keep_half: bool,
    x_grad_type: Option<FloatDType>,
) -> FloatTensor<Autodiff<I>> {
    let [batch, seq, _] = x.primitive.shape().dims::<3>();
    let out_features = weight.primitive.shape().dims::<2>()[0];
    let x_type: FloatDType = x_grad_type.unwrap_or_else(|| x.primitive.dtype().into());
    let out_type: FloatDType = if keep_half { half } else { alignment_core::precision::float_type::<I>() };
    let x_half = cast::<I>(x.primitive, half);
    let forward = |x_half: FloatTensor<I>, weight: FloatTensor<I>| {
        let w_half = cast::<I>(weight, half);
        let y = float_matmul::<I>(rows::<I>(x_half), I::float_transpose(w_half));
        cast::<I>(I::float_reshape(y, Shape::new([batch, seq, out_features])), out_type)
    };
    // The input is needed only for a trainable weight's gradient (a frozen base under LoRA
    // keeps none).
    let weight_tracked = !weight.node.requirement.is_none();
    let prepared =
        <HalfProductBackward as Backward<I, 2>>::prepare::<NoCheckpointing>(HalfProductBackward, [x.node.clone(), weight.node.clone()]);
    match prepared.compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = forward(x_half.clone(), weight.primitive.clone());
            let x_shape = [batch, seq];
            prep.finish(HalfProductState { x_half: weight_tracked.then_some(x_half), x_shape, weight: weight.primitive, half, x_type }, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x_half, weight.primitive)),
    }
}

/// What the backward pass of [`project_param`] needs: the half-type input when the parameter is
/// trainable, the input's `[batch, seq]`, the parameter (a handle to the model's own tensor), the
/// half type and the type of the input's gradient.
#[derive(Clone, Debug)]
struct HalfProductState<I: Backend> {
    x_half: Option<FloatTensor<I>>,
    x_shape: [usize; 2],
    weight: FloatTensor<I>,
    half: FloatDType,
    x_type: FloatDType,
}

#[derive(Debug)]
struct HalfProductBackward;

impl<I: Backend> Backward<I, 2> for HalfProductBackward {
    type State = HalfProductState<I>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let HalfProductState { x_half, x_shape: [batch, seq], weight, half, x_type } = ops.state;
        let [x_node, w_node] = ops.parents;
        let in_features = weight.shape().dims::<2>()[1];
        let weight_type: FloatDType = weight.dtype().into();
        let dy = rows::<I>(cast::<I>(grads.consume::<I>(&ops.node), half));
        if let Some(node) = x_node {
            let dx = float_matmul::<I>(dy.clone(), cast::<I>(weight, half));
            let dx = I::float_reshape(dx, Shape::new([batch, seq, in_features]));
            grads.register::<I>(node.id, cast::<I>(dx, x_type));
        }
        if let Some(node) = w_node {
            let x_half = x_half.expect("kept for a tracked weight");
            let dw = float_matmul::<I>(I::float_transpose(dy), rows::<I>(x_half));
            grads.register::<I>(node.id, cast::<I>(dw, weight_type));
        }
    }
}

// The checks run on the CPU backend and on torch's CPU.
#[cfg(all(test, any(feature = "ndarray", feature = "tch")))]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type T3<I> = Tensor<Autodiff<I>, 3>;
    type T2<I> = Tensor<Autodiff<I>, 2>;

    /// Output and gradients of `Σ y ⊙ r` for the recorded product against burn's operations (the
    /// casts and `matmul` mixed precision ran before), for an input in the weight's type and one
    /// already in `half`, each result type, and every combination of tracked operands; the
    /// largest relative difference.
    fn against_burns_operations<I: Backend>(device: &I::Device, half: FloatDType, recorded: impl Fn(T3<I>, T2<I>, bool) -> T3<I>) -> f32 {
        let x = T3::<I>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), device);
        let weight = T2::<I>::random([5, 8], Distribution::Normal(0.0, 1.0), device);
        let relative = crate::test_support::max_relative_difference::<I, 3>;
        let mut worst = 0f32;
        for input_in_half in [false, true] {
            for keep_half in [false, true] {
                for (track_x, track_w) in [(true, true), (true, false), (false, true)] {
                    let r = T3::<I>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), device);
                    let run = |f: &dyn Fn(T3<I>, T2<I>) -> T3<I>| {
                        let x = if track_x { x.clone().require_grad() } else { x.clone() };
                        let w = if track_w { weight.clone().require_grad() } else { weight.clone() };
                        // An input already in the half type, as the MLP's down projection gets it.
                        let input = if input_in_half { x.clone().cast(half) } else { x.clone() };
                        let y = f(input, w.clone());
                        let grads = (y.clone().cast(FloatDType::F32) * r.clone()).sum().backward();
                        (y.inner(), x.grad(&grads), w.grad(&grads))
                    };
                    let (y, dx, dw) = run(&|x, w| recorded(x, w, keep_half));
                    let (y_ref, dx_ref, dw_ref) = run(&|x, w| {
                        let y = x.cast(half).matmul(w.clone().cast(half).transpose().unsqueeze::<3>());
                        if keep_half {
                            y
                        } else {
                            y.cast(FloatDType::from(w.dtype()))
                        }
                    });
                    assert_eq!(y.dtype(), y_ref.dtype(), "the result's type");
                    assert_eq!((dx.is_some(), dw.is_some()), (track_x, track_w), "a gradient exactly for each tracked operand");
                    worst = worst.max(relative(y, y_ref));
                    if let (Some(a), Some(b)) = (dx, dx_ref) {
                        assert_eq!(a.dtype(), DType::F32, "∂x in x's type");
                        worst = worst.max(relative(a, b));
                    }
                    if let (Some(a), Some(b)) = (dw, dw_ref) {
                        assert_eq!(a.dtype(), DType::F32, "∂W in W's type");
                        worst = worst.max(relative(a.unsqueeze(), b.unsqueeze()));
                    }
                }
            }
        }
        worst
    }

    /// Maps reading one input through [`crate::layers::Linear::forward_many`] (one shared
    /// half-type copy of the input) against each map's own [`crate::layers::Linear::forward`]
    /// (a cast per map, as autocast): outputs and gradients equal bit for bit, in both result
    /// types, with the input tracked or not. Returns how many comparisons ran.
    fn sharing_the_cast_equals_a_cast_per_map<I: Backend>(device: &I::Device, half: FloatDType) -> usize {
        use crate::layers::Linear;
        let x = T3::<I>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), device);
        let maps: [Linear<Autodiff<I>>; 3] = [5, 3, 3].map(|out| {
            let mut map = Linear::new(T2::<I>::random([out, 8], Distribution::Normal(0.0, 1.0), device));
            map.matmul_dtype = Some(half);
            map
        });
        let weights: Vec<_> = [5, 3, 3].map(|out| T3::<I>::random([2, 3, out], Distribution::Normal(0.0, 1.0), device)).into();
        let mut compared = 0;
        for keep_half in [false, true] {
            for track_x in [true, false] {
                let run = |shared: bool| {
                    let x = if track_x { x.clone().require_grad() } else { x.clone() };
                    let ys: [T3<I>; 3] = match (shared, keep_half) {
                        (true, false) => Linear::forward_many([&maps[0], &maps[1], &maps[2]], x.clone()),
                        (true, true) => Linear::forward_many_in_product_type([&maps[0], &maps[1], &maps[2]], x.clone()),
                        (false, false) => [0, 1, 2].map(|i| maps[i].forward(x.clone())),
                        (false, true) => [0, 1, 2].map(|i| maps[i].forward_in_product_type(x.clone())),
                    };
                    let loss = ys
                        .iter()
                        .zip(&weights)
                        .map(|(y, r)| (y.clone().cast(FloatDType::F32) * r.clone()).sum())
                        .reduce(|a, b| a + b)
                        .expect("three maps");
                    let grads = loss.backward();
                    let dws: Vec<_> = maps.iter().map(|m| m.weight.grad(&grads).expect("every weight is tracked")).collect();
                    (ys.map(|y| y.inner()), x.grad(&grads), dws)
                };
                let (ys, dx, dws) = run(true);
                let (ys_ref, dx_ref, dws_ref) = run(false);
                for (y, y_ref) in ys.into_iter().zip(ys_ref) {
                    assert_eq!(y.dtype(), y_ref.dtype(), "the result's type");
                    y.into_data().assert_eq(&y_ref.into_data(), true);
                    compared += 1;
                }
                assert_eq!(dx.is_some(), track_x, "∂x exactly when x is tracked");
                if let (Some(a), Some(b)) = (dx, dx_ref) {
                    assert_eq!(a.dtype(), DType::F32, "∂x in x's type");
                    a.into_data().assert_eq(&b.into_data(), true);
                    compared += 1;
                }
                for (a, b) in dws.into_iter().zip(dws_ref) {
                    a.into_data().assert_eq(&b.into_data(), true);
                    compared += 1;
                }
            }
        }
        compared
    }

    /// Maps with LoRA adapters reading one input through [`crate::layers::Linear::forward_many`]
    /// against one cast per product (what `Linear::forward` ran before adapters shared the copy:
    /// `project_param_in` and `LoraAdapter::forward_in`, or their half-type forms). With the
    /// adapters' dropout off, the bases and the adapters' first products read the shared copy:
    /// outputs and the gradients of the input, the weights and both adapter factors agree within
    /// 1e-6 relative (the input's gradient adds its terms in another order). With it on, each
    /// adapter drops its own input: every output differs from the maps' without dropout (the
    /// masks come from the backend's generator, which other threads' tests draw from too, so the
    /// two sides cannot be given the same masks here). Returns how many comparisons ran.
    fn adapters_sharing_the_cast_equal_a_cast_per_product<I: Backend>(device: &I::Device, half: FloatDType) -> usize {
        use crate::layers::{project_param_as, project_param_in, Linear, LoraAdapter};
        use crate::test_support::max_relative_difference as relative;
        use burn::module::Param;
        let x = T3::<I>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), device);
        let weights: Vec<_> = [5, 3, 3].map(|out| T3::<I>::random([2, 3, out], Distribution::Normal(0.0, 1.0), device)).into();
        let mut compared = 0;
        {
            let dropout = 0.0;
            let maps: [Linear<Autodiff<I>>; 3] = [5, 3, 3].map(|out| {
                let mut map = Linear::new(T2::<I>::random([out, 8], Distribution::Normal(0.0, 1.0), device));
                map.matmul_dtype = Some(half);
                map.lora = Some(LoraAdapter {
                    a: Param::from_tensor(T2::<I>::random([2, 8], Distribution::Normal(0.0, 1.0), device)),
                    b: Param::from_tensor(T2::<I>::random([out, 2], Distribution::Normal(0.0, 1.0), device)),
                    scaling: 0.5,
                    dropout,
                    force_dropout: false,
                    magnitude: None,
                });
                map
            });
            for keep_half in [false, true] {
                let run = |shared: bool| {
                    <Autodiff<I> as Backend>::seed(device, 17);
                    let x = x.clone().require_grad();
                    let separate = |map: &Linear<Autodiff<I>>| {
                        let adapter = map.lora.as_ref().expect("every map has an adapter");
                        match keep_half {
                            false => project_param_in(x.clone(), map.weight.val(), Some(half)) + adapter.forward_in(x.clone(), Some(half)),
                            true => project_param_as(x.clone(), map.weight.val(), half) + adapter.forward_as(x.clone(), half),
                        }
                    };
                    let ys: [T3<I>; 3] = match (shared, keep_half) {
                        (true, false) => Linear::forward_many([&maps[0], &maps[1], &maps[2]], x.clone()),
                        (true, true) => Linear::forward_many_in_product_type([&maps[0], &maps[1], &maps[2]], x.clone()),
                        (false, _) => [0, 1, 2].map(|i| separate(&maps[i])),
                    };
                    let loss = ys
                        .iter()
                        .zip(&weights)
                        .map(|(y, r)| (y.clone().cast(FloatDType::F32) * r.clone()).sum())
                        .reduce(|a, b| a + b)
                        .expect("three maps");
                    let grads = loss.backward();
                    let parameter_grads: Vec<Tensor<I, 2>> = maps
                        .iter()
                        .flat_map(|m| {
                            let adapter = m.lora.as_ref().expect("every map has an adapter");
                            [m.weight.grad(&grads), adapter.a.grad(&grads), adapter.b.grad(&grads)]
                                .map(|g| g.expect("every parameter is tracked"))
                        })
                        .collect();
                    (ys.map(|y| y.inner()), x.grad(&grads).expect("x is tracked"), parameter_grads)
                };
                let (ys, dx, dps) = run(true);
                let (ys_ref, dx_ref, dps_ref) = run(false);
                let case = format!("dropout {dropout}, keep_half {keep_half}");
                for (y, y_ref) in ys.into_iter().zip(ys_ref) {
                    assert_eq!(y.dtype(), y_ref.dtype(), "{case}: the result's type");
                    assert!(relative(y, y_ref) < 1e-6, "{case}: outputs differ");
                    compared += 1;
                }
                assert_eq!(dx.dtype(), DType::F32, "{case}: ∂x in x's type");
                let difference = relative(dx, dx_ref);
                assert!(difference < 1e-6, "{case}: ∂x differs by {difference:e}");
                compared += 1;
                for (i, (a, b)) in dps.into_iter().zip(dps_ref).enumerate() {
                    let difference = relative(a, b);
                    assert!(difference < 1e-6, "{case}: parameter {i}'s gradient differs by {difference:e}");
                    compared += 1;
                }
            }
            let dropping = maps.clone().map(|mut map| {
                map.lora.as_mut().expect("every map has an adapter").dropout = 0.25;
                map
            });
            let dropped = Linear::forward_many([&dropping[0], &dropping[1], &dropping[2]], x.clone().require_grad());
            let kept = Linear::forward_many([&maps[0], &maps[1], &maps[2]], x.clone().require_grad());
            for (a, b) in dropped.into_iter().zip(kept) {
                assert!(relative(a.inner(), b.inner()) > 1e-3, "with dropout on, every adapter drops its own input");
                compared += 1;
            }
        }
        compared
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn adapters_sharing_one_half_type_input_equal_a_cast_per_product() {
        type I = burn::backend::NdArray<f32>;
        assert_eq!(adapters_sharing_the_cast_equal_a_cast_per_product::<I>(&Default::default(), FloatDType::F64), 29);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn tch_adapters_sharing_one_half_type_input_equal_a_cast_per_product() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert_eq!(adapters_sharing_the_cast_equal_a_cast_per_product::<I>(&device, FloatDType::BF16), 29);
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn maps_sharing_one_half_type_input_equal_a_cast_per_map() {
        type I = burn::backend::NdArray<f32>;
        assert_eq!(sharing_the_cast_equals_a_cast_per_map::<I>(&Default::default(), FloatDType::F64), 26);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn tch_maps_sharing_one_half_type_input_equal_a_cast_per_map() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        assert_eq!(sharing_the_cast_equals_a_cast_per_map::<I>(&device, FloatDType::BF16), 26);
    }

    /// The generic path (the one CUDA and wgpu take) on the CPU backend, f64 standing for the
    /// half type (the CPU backend has no bf16; the casts and their gradients are the same path).
    #[cfg(feature = "ndarray")]
    #[test]
    fn the_recorded_half_product_equals_burns_operations_on_any_backend() {
        type I = burn::backend::NdArray<f32>;
        let difference = against_burns_operations::<I>(&Default::default(), FloatDType::F64, |x, w, keep_half| {
            project_param(x, w, FloatDType::F64, keep_half).unwrap_or_else(|_| panic!("autodiff takes the recorded path"))
        });
        assert!(difference <= 1e-6, "differs by {difference}");
    }

    /// On torch, in bf16 itself, through the dispatch the model takes: the same torch calls as
    /// burn's operations make.
    #[cfg(feature = "tch")]
    #[test]
    fn tch_half_product_equals_burns_operations_in_bf16() {
        type I = burn::backend::LibTorch<f32>;
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let difference = against_burns_operations::<I>(&device, FloatDType::BF16, |x, w, keep_half| {
            project_param(x, w, FloatDType::BF16, keep_half).unwrap_or_else(|_| panic!("libtorch takes the recorded path"))
        });
        assert!(difference <= 1e-2, "differs by {difference}");
    }
}
