//! Frozen base weights held compressed (QLoRA's 4-bit NF4) and expanded only while a matmul
//! needs them.
//!
//! A [`crate::layers::Linear`] whose base weight is frozen may keep it as a
//! [`CompressedWeight`] instead of a dense tensor. The projection `y = x Wᵀ` then expands `W`
//! for the product and drops it right after, in the forward pass *and* in the backward pass:
//!
//! ```text
//! forward:   W = expand(q);  y = x Wᵀ;  drop W        (q: the compressed weight, ~0.28× bf16)
//! backward:  W = expand(q);  ∂x = ∂y W;  drop W        (no ∂W: the base is frozen)
//! ```
//!
//! burn's own matmul would keep `W` alive in the autodiff graph until the backward pass (it
//! saves both operands), so every layer's dense weight would be resident at once and the memory
//! saving would be lost. [`project_compressed`] therefore records its own autodiff step, whose
//! saved state is the compressed weight. That step is written for burn's `Autodiff<I>` and
//! selected at run time for the backends this crate is built with (`ndarray`, `cuda` features);
//! on any other backend the plain (memory-hungry but correct) matmul is used.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

/// A frozen `[out, in]` weight in a compact storage format, expandable to dense f32 values.
/// Implemented by `alignment-peft`'s NF4 weights.
pub trait CompressedWeight: Debug + Send + Sync {
    /// `[out_features, in_features]`.
    fn dims(&self) -> [usize; 2];
    /// The dense values, row-major `[out, in]` (freshly allocated; the caller drops them).
    fn expand(&self) -> Vec<f32>;
    /// Bytes the compressed form occupies (codes and statistics).
    fn storage_bytes(&self) -> usize;
    /// `values` (`[out, in]`, row-major) compressed in the same format, e.g. to store a merged
    /// weight again as compactly as the original.
    fn recompress(&self, values: &[f32]) -> Arc<dyn CompressedWeight>;
}

/// The dense `[out, in]` tensor `weight` stands for, on `device`.
pub fn expand<B: Backend>(weight: &dyn CompressedWeight, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(weight.expand(), weight.dims()), device)
}

/// `x Wᵀ` for `x: [batch, seq, in]` and a compressed `W: [out, in]`, giving `[batch, seq, out]`,
/// without keeping the dense `W` for the backward pass (see the module documentation).
pub fn project_compressed<B: Backend>(x: Tensor<B, 3>, weight: &Arc<dyn CompressedWeight>) -> Tensor<B, 3> {
    let [batch, seq, inner] = x.dims();
    let [out, _] = weight.dims();
    let rows = x.reshape([batch * seq, inner]);
    matmul_dispatch(rows, weight).reshape([batch, seq, out])
}

/// Picks the recorded-step implementation when `B` is an autodiff backend this crate knows.
fn matmul_dispatch<B: Backend>(x: Tensor<B, 2>, weight: &Arc<dyn CompressedWeight>) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    let x = match on_autodiff::<B, burn::backend::NdArray<f32>>(x, weight) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "cuda")]
    let x = match on_autodiff::<B, burn::backend::Cuda<f32, i32>>(x, weight) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "cuda")]
    let x = match on_autodiff::<B, burn::backend::Cuda<burn::tensor::bf16, i32>>(x, weight) {
        Ok(y) => return y,
        Err(x) => x,
    };
    // Inference backends (nothing is recorded) and backends without a recorded step.
    let w = expand::<B>(weight.as_ref(), &x.device());
    w.matmul(x.transpose()).transpose()
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda")), allow(dead_code))]
/// Runs [`recorded_matmul`] when `B` is `Autodiff<I>`; gives `x` back otherwise.
fn on_autodiff<B: Backend, I: Backend>(x: Tensor<B, 2>, weight: &Arc<dyn CompressedWeight>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<Tensor<Autodiff<I>, 2>>() {
        Ok(x) => {
            let y: Box<dyn Any> = Box::new(recorded_matmul::<I>(*x, weight));
            Ok(*y.downcast::<Tensor<B, 2>>().expect("B is Autodiff<I>"))
        }
        Err(boxed) => Err(*boxed.downcast::<Tensor<B, 2>>().expect("the value boxed above")),
    }
}

/// The backward step of `y = x Wᵀ` with a frozen compressed `W`: `∂x = ∂y W`, expanding `W`
/// again from its compressed state.
#[derive(Debug)]
#[cfg_attr(not(any(feature = "ndarray", feature = "cuda")), allow(dead_code))]
struct CompressedMatmulBackward;

impl<I: Backend> Backward<I, 1> for CompressedMatmulBackward {
    type State = (Arc<dyn CompressedWeight>, I::Device);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (weight, device) = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |grad_y| {
            let w = expand::<I>(weight.as_ref(), &device).into_primitive().tensor();
            I::float_matmul(grad_y, w)
        });
    }
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda")), allow(dead_code))]
/// `x Wᵀ` on `Autodiff<I>`, recording [`CompressedMatmulBackward`] (state: the compressed `W`).
fn recorded_matmul<I: Backend>(x: Tensor<Autodiff<I>, 2>, weight: &Arc<dyn CompressedWeight>) -> Tensor<Autodiff<I>, 2> {
    let x = x.into_primitive().tensor();
    let device = I::float_device(&x.primitive);
    let w = expand::<I>(weight.as_ref(), &device).into_primitive().tensor();
    // (W xᵀ)ᵀ rather than x Wᵀ: only the activations are transposed (see layers::project).
    let y = I::float_transpose(I::float_matmul(w, I::float_transpose(x.primitive.clone())));
    let y = match <CompressedMatmulBackward as Backward<I, 1>>::prepare::<NoCheckpointing>(CompressedMatmulBackward, [x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((weight.clone(), device), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}
