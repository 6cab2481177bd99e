//! Base weights held in a compact form and expanded only while a matmul needs them: QLoRA's
//! frozen 4-bit NF4 weights, and ZeRO-3's weights partitioned across ranks (each rank holds
//! 1/N; expanding is an all-gather).
//!
//! A [`crate::layers::Linear`] may keep its base weight as a [`CompressedWeight`] instead of a
//! dense tensor. The projection `y = x Wᵀ` then expands `W` for the product and drops it right
//! after, in the forward pass *and* in the backward pass:
//!
//! ```text
//! forward:   W = expand(q);  y = x Wᵀ;  drop W        (q: the compact weight)
//! backward:  W = expand(q);  ∂x = ∂y W;  drop W
//!            trainable q only: ∂W = ∂yᵀ x, handed to q.accumulate_gradient (ZeRO-3: reduce-scattered)
//! ```
//!
//! burn's own matmul would keep `W` alive in the autodiff graph until the backward pass (it
//! saves both operands), so every layer's dense weight would be resident at once and the memory
//! saving would be lost. [`project_compressed`] therefore records its own autodiff step, whose
//! saved state is the compact weight (and, for a trainable one, the input `x`, which burn's
//! matmul would save as well). That step is written for burn's `Autodiff<I>` and selected at run
//! time for the backends this crate is built with (`ndarray`, `cuda`, `wgpu` features); on any other
//! backend the plain matmul is used, which keeps `W` and gives no gradient to a trainable `q`.

use alignment_core::backend::downcast as cast;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive};
use std::fmt::Debug;
use std::sync::Arc;

/// An `[out, in]` weight in a compact storage format, expandable to dense f32 values.
/// Implemented by `alignment-peft`'s NF4 weights (frozen) and `alignment-trainer`'s ZeRO-3
/// shards (trainable).
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
    /// Whether the weight is trained where it is stored: the backward pass then computes `∂W`
    /// and hands it to [`CompressedWeight::accumulate_gradient`]. `false` (frozen) by default.
    fn is_trainable(&self) -> bool {
        false
    }
    /// Receives `∂L/∂W` (row-major `[out, in]`) of one backward pass through one matmul; called
    /// only when [`CompressedWeight::is_trainable`].
    fn accumulate_gradient(&self, _grad: Vec<f32>) {}
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

/// Returns from the enclosing function with `$op::<B, I>(value, args..)`'s result when `B` is
/// `Autodiff<I>` for a backend `I` of the enabled features; otherwise evaluates to `value`.
macro_rules! on_recording_backends {
    ($op:ident, $value:expr $(, $arg:expr)*) => {{
        let value = $value;
        #[cfg(feature = "ndarray")]
        let value = match $op::<B, burn::backend::NdArray<f32>>(value $(, $arg)*) {
            Ok(y) => return y,
            Err(value) => value,
        };
        #[cfg(feature = "cuda")]
        let value = match $op::<B, burn::backend::Cuda<f32, i32>>(value $(, $arg)*) {
            Ok(y) => return y,
            Err(value) => value,
        };
        #[cfg(feature = "cuda")]
        let value = match $op::<B, burn::backend::Cuda<burn::tensor::bf16, i32>>(value $(, $arg)*) {
            Ok(y) => return y,
            Err(value) => value,
        };
        #[cfg(feature = "wgpu")]
        let value = match $op::<B, burn::backend::Wgpu<f32, i32>>(value $(, $arg)*) {
            Ok(y) => return y,
            Err(value) => value,
        };
        #[cfg(feature = "tch")]
        let value = match $op::<B, burn::backend::LibTorch<f32>>(value $(, $arg)*) {
            Ok(y) => return y,
            Err(value) => value,
        };
        #[cfg(feature = "tch")]
        let value = match $op::<B, burn::backend::LibTorch<burn::tensor::bf16>>(value $(, $arg)*) {
            Ok(y) => return y,
            Err(value) => value,
        };
        value
    }};
}

/// Whether `B` is an autodiff backend with the recorded step (those of the enabled `ndarray` /
/// `cuda` / `wgpu` / `tch` features). Elsewhere the plain matmul runs, which gives a trainable compressed weight
/// no gradient, so its users (ZeRO-3) check this first.
pub fn records_backward<B: Backend>() -> bool {
    on_recording_backends!(is_autodiff_of, ());
    false
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
/// `Ok(true)` when `B` is `Autodiff<I>` (for [`records_backward`]).
fn is_autodiff_of<B: Backend, I: Backend>(_: ()) -> Result<bool, ()> {
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<I>>() {
        Ok(true)
    } else {
        Err(())
    }
}

/// Picks the recorded-step implementation when `B` is an autodiff backend this crate knows.
fn matmul_dispatch<B: Backend>(x: Tensor<B, 2>, weight: &Arc<dyn CompressedWeight>) -> Tensor<B, 2> {
    let x = on_recording_backends!(matmul_on_autodiff, x, weight);
    // Inference backends (nothing is recorded) and backends without a recorded step.
    let w = expand::<B>(weight.as_ref(), &x.device());
    w.matmul(x.transpose()).transpose()
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
/// Runs [`recorded_matmul`] when `B` is `Autodiff<I>`; gives `x` back otherwise.
fn matmul_on_autodiff<B: Backend, I: Backend>(x: Tensor<B, 2>, weight: &Arc<dyn CompressedWeight>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let x = cast::<_, Tensor<Autodiff<I>, 2>>(x)?;
    Ok(cast(recorded_matmul::<I>(x, weight)).expect("B is Autodiff<I>"))
}

/// The rows of a compact embedding `W: [vocab, hidden]` for token `ids: [batch, seq]`, giving
/// `[batch, seq, hidden]`. A trainable `W` receives `∂W` (the output gradient's rows summed per
/// token id) through a recorded step; a frozen one is just expanded and indexed.
pub fn embed_compressed<B: Backend>(ids: Tensor<B, 2, Int>, weight: &Arc<dyn CompressedWeight>) -> Tensor<B, 3> {
    let ids = if weight.is_trainable() { on_recording_backends!(embedding_on_autodiff, ids, weight) } else { ids };
    let [batch, seq] = ids.dims();
    let [_, hidden] = weight.dims();
    let w = expand::<B>(weight.as_ref(), &ids.device());
    w.select(0, ids.reshape([batch * seq])).reshape([batch, seq, hidden])
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
/// Runs [`recorded_embedding`] when `B` is `Autodiff<I>`; gives `ids` back otherwise.
fn embedding_on_autodiff<B: Backend, I: Backend>(
    ids: Tensor<B, 2, Int>,
    weight: &Arc<dyn CompressedWeight>,
) -> Result<Tensor<B, 3>, Tensor<B, 2, Int>> {
    let ids = cast::<_, Tensor<Autodiff<I>, 2, Int>>(ids)?;
    Ok(cast(recorded_embedding::<I>(ids, weight)).expect("B is Autodiff<I>"))
}

/// The backward step of an embedding lookup in a trainable compact `W`: `∂W` is the output
/// gradient's rows added at their token ids, handed to `W`.
#[derive(Debug)]
#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
struct CompressedEmbeddingBackward;

impl<I: Backend> Backward<I, 1> for CompressedEmbeddingBackward {
    /// The weight and the flattened token ids.
    type State = (Arc<dyn CompressedWeight>, I::IntTensorPrimitive);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (weight, ids) = ops.state;
        let ids = Tensor::<I, 1, Int>::from_primitive(ids);
        let [vocab, hidden] = weight.dims();
        let grad_y = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let rows = grad_y.reshape([ids.dims()[0], hidden]);
        let grad_w = Tensor::<I, 2>::zeros([vocab, hidden], &rows.device()).select_assign(0, ids, rows, IndexingUpdateOp::Add);
        weight.accumulate_gradient(grad_w.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert"));
        // The parent is the anchor of `recorded_embedding`: it gets no gradient.
    }
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
/// The embedding lookup on `Autodiff<I>`, recording [`CompressedEmbeddingBackward`]. Token ids
/// carry no gradient, so the step hangs off a fresh one-value leaf (the anchor) that makes it
/// part of the graph.
fn recorded_embedding<I: Backend>(ids: Tensor<Autodiff<I>, 2, Int>, weight: &Arc<dyn CompressedWeight>) -> Tensor<Autodiff<I>, 3> {
    let [batch, seq] = ids.dims();
    let [_, hidden] = weight.dims();
    let ids = ids.inner().reshape([batch * seq]);
    let device = ids.device();
    let w = expand::<I>(weight.as_ref(), &device);
    let y = w.select(0, ids.clone()).reshape([batch, seq, hidden]).into_primitive().tensor();
    let anchor = Tensor::<Autodiff<I>, 1>::zeros([1], &device).require_grad().into_primitive().tensor();
    let y = match <CompressedEmbeddingBackward as Backward<I, 1>>::prepare::<NoCheckpointing>(
        CompressedEmbeddingBackward,
        [anchor.node.clone()],
    )
    .compute_bound()
    .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((weight.clone(), ids.into_primitive()), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// The backward step of `y = x Wᵀ` with a compact `W`: `∂x = ∂y W`, expanding `W` again from
/// its compact state, and for a trainable `W` also `∂W = ∂yᵀ x` (from the saved `x`).
#[derive(Debug)]
#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
struct CompressedMatmulBackward;

impl<I: Backend> Backward<I, 1> for CompressedMatmulBackward {
    /// The weight, the device, and `x` when the weight is trainable.
    type State = (Arc<dyn CompressedWeight>, I::Device, Option<I::FloatTensorPrimitive>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (weight, device, x) = ops.state;
        let [parent] = ops.parents;
        let grad_y = grads.consume::<I>(&ops.node);
        if let Some(x) = x {
            let grad_w = I::float_matmul(I::float_transpose(grad_y.clone()), x);
            let values = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grad_w)).into_data().convert::<f32>();
            weight.accumulate_gradient(values.into_vec::<f32>().expect("f32 after convert"));
        }
        if let Some(parent) = parent {
            let w = expand::<I>(weight.as_ref(), &device).into_primitive().tensor();
            grads.register::<I>(parent.id, I::float_matmul(grad_y, w));
        }
    }
}

#[cfg_attr(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu", feature = "tch")), allow(dead_code))]
/// `x Wᵀ` on `Autodiff<I>`, recording [`CompressedMatmulBackward`] (state: the compact `W`, and
/// `x` when `W` is trainable; an untracked `x` is then tracked so that the step runs).
fn recorded_matmul<I: Backend>(x: Tensor<Autodiff<I>, 2>, weight: &Arc<dyn CompressedWeight>) -> Tensor<Autodiff<I>, 2> {
    let mut x = x.into_primitive().tensor();
    if weight.is_trainable() && !x.is_tracked() {
        x = x.require_grad();
    }
    let device = I::float_device(&x.primitive);
    let w = expand::<I>(weight.as_ref(), &device).into_primitive().tensor();
    // (W xᵀ)ᵀ rather than x Wᵀ: only the activations are transposed (see layers::project).
    let y = I::float_transpose(I::float_matmul(w, I::float_transpose(x.primitive.clone())));
    let y = match <CompressedMatmulBackward as Backward<I, 1>>::prepare::<NoCheckpointing>(CompressedMatmulBackward, [x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved_x = weight.is_trainable().then(|| x.primitive.clone());
            prep.finish((weight.clone(), device, saved_x), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}
