//! Base weights held in a compact form and expanded only while a product needs them: ZeRO-3's
//! weights partitioned across ranks (each rank holds 1/N on its device; expanding is an
//! all-gather of device buffers).
//!
//! A [`crate::layers::Linear`] (or the embedding) may keep its base weight as a
//! [`CompressedWeight`] instead of a dense tensor. The projection `y = x Wᵀ` then expands `W`
//! for the product and drops it right after, in the forward pass *and* in the backward pass:
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
//! matmul would save as well). That step is written for burn's `Autodiff<I>` with any inner
//! backend `I`; the weight, which knows the backend it is held on, hands the step for its own
//! `I` to the model's generic code ([`CompressedWeight::recorded_steps`], [`RecordedSteps::of`]).
//! On any other backend the plain matmul is used, which keeps `W` and gives no gradient to a
//! trainable weight.
//!
//! Everything stays on the backend's device: the weight expands to a backend tensor and
//! receives its gradient as one ([`CompressedWeight::expand_for`],
//! [`CompressedWeight::accumulate_gradient`]), so no value goes through the host.

use alignment_core::backend::transposes_activations_in_products;
use alignment_core::gemm::{float_matmul, matmul};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive};
use std::any::{Any, TypeId};
use std::fmt::Debug;
use std::sync::Arc;

/// An `[out, in]` weight in a compact storage format, expandable to a dense tensor. Implemented
/// by `alignment-trainer`'s ZeRO-3 shards (trainable, or frozen under a LoRA adapter).
///
/// Tensors cross this trait boxed (`Box<dyn Any>`) because the trait object is shared by a
/// model and its inner-backend copy (`AutodiffModule::valid`), which differ in backend type.
pub trait CompressedWeight: Debug + Send + Sync {
    /// `[out_features, in_features]`.
    fn dims(&self) -> [usize; 2];
    /// The dense weight as a boxed `Tensor<B, 2>` on the weight's device, for the backend `B`
    /// whose `TypeId` is `backend`; `None` for a backend the weight is not held for (the
    /// callers then build it from [`CompressedWeight::expand_on_host`]).
    fn expand_for(&self, backend: TypeId) -> Option<Box<dyn Any>>;
    /// The dense values, row-major `[out, in]` (freshly allocated; the caller drops them).
    fn expand_on_host(&self) -> Vec<f32>;
    /// Bytes the compressed form occupies.
    fn storage_bytes(&self) -> usize;
    /// Whether the weight is trained where it is stored: the backward pass then computes `∂W`
    /// and hands it to [`CompressedWeight::accumulate_gradient`]. `false` (frozen) by default.
    fn is_trainable(&self) -> bool {
        false
    }
    /// Receives `∂L/∂W` (`[out, in]`) of one backward pass through one product, as a boxed
    /// `Tensor<I, 2>` of the inner backend `I` of [`CompressedWeight::recorded_steps`]; called
    /// only when [`CompressedWeight::is_trainable`].
    fn accumulate_gradient(&self, _grad: Box<dyn Any>) {}
    /// The recorded autodiff steps of the one autodiff backend the weight is held for, which keep
    /// only the compact weight for the backward pass (and give a trainable one its gradient).
    /// `None`: the plain product runs everywhere.
    fn recorded_steps(&self) -> Option<RecordedSteps> {
        None
    }
}

/// Boxed input → boxed output of one recorded step.
type Step = fn(Box<dyn Any>, &Arc<dyn CompressedWeight>) -> Box<dyn Any>;

/// The recorded steps ([`project_compressed`]'s matmul, [`embed_compressed`]'s lookup) of one
/// autodiff backend `Autodiff<I>`, as function pointers: how a weight that knows its backend
/// hands them to the model's code, which is generic over every backend.
#[derive(Clone, Copy)]
pub struct RecordedSteps {
    /// `TypeId` of `Autodiff<I>`.
    autodiff: TypeId,
    /// `x: Tensor<Autodiff<I>, 2>` → `x Wᵀ`.
    matmul: Step,
    /// `ids: Tensor<Autodiff<I>, 2, Int>` → `W[ids]: Tensor<Autodiff<I>, 3>`.
    embedding: Step,
}

impl Debug for RecordedSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordedSteps")
    }
}

impl RecordedSteps {
    /// The steps of `Autodiff<I>`.
    pub fn of<I: Backend>() -> Self {
        Self {
            autodiff: TypeId::of::<Autodiff<I>>(),
            matmul: |x, weight| Box::new(recorded_matmul::<I>(unbox(x), weight)) as Box<dyn Any>,
            embedding: |ids, weight| Box::new(recorded_embedding::<I>(unbox(ids), weight)) as Box<dyn Any>,
        }
    }

    /// Whether these are the steps of the backend `B`.
    pub fn records<B: Backend>(&self) -> bool {
        self.autodiff == TypeId::of::<B>()
    }
}

/// The value in `boxed`, known by its `TypeId` to be a `T`.
fn unbox<T: 'static>(boxed: Box<dyn Any>) -> T {
    *boxed.downcast::<T>().unwrap_or_else(|_| unreachable!("the backend type was checked"))
}

/// `weight`'s recorded steps when they are those of `B`.
fn steps_for<B: Backend>(weight: &Arc<dyn CompressedWeight>) -> Option<RecordedSteps> {
    weight.recorded_steps().filter(RecordedSteps::records::<B>)
}

/// The dense `[out, in]` tensor `weight` stands for, on `device`: expanded on the backend when
/// the weight is held for `B` (or for its inner backend), through the host otherwise.
pub fn expand<B: Backend, W: CompressedWeight + ?Sized>(weight: &W, device: &B::Device) -> Tensor<B, 2> {
    match weight.expand_for(TypeId::of::<B>()) {
        Some(dense) => unbox::<Tensor<B, 2>>(dense).to_device(device),
        None => Tensor::from_data(TensorData::new(weight.expand_on_host(), weight.dims()), device),
    }
}

/// `x Wᵀ` for `x: [batch, seq, in]` and a compressed `W: [out, in]`, giving `[batch, seq, out]`,
/// without keeping the dense `W` for the backward pass (see the module documentation).
pub fn project_compressed<B: Backend>(x: Tensor<B, 3>, weight: &Arc<dyn CompressedWeight>) -> Tensor<B, 3> {
    let [batch, seq, inner] = x.dims();
    let [out, _] = weight.dims();
    let rows = x.reshape([batch * seq, inner]);
    let y = match steps_for::<B>(weight) {
        Some(steps) => unbox::<Tensor<B, 2>>((steps.matmul)(Box::new(rows), weight)),
        // Inference backends (nothing is recorded) and weights without recorded steps.
        None => {
            let w = expand::<B, _>(weight.as_ref(), &rows.device());
            if transposes_activations_in_products::<B>() {
                matmul(w, rows.transpose()).transpose()
            } else {
                matmul(rows, w.transpose())
            }
        }
    };
    y.reshape([batch, seq, out])
}

/// The rows of a compact embedding `W: [vocab, hidden]` for token `ids: [batch, seq]`, giving
/// `[batch, seq, hidden]`. A trainable `W` receives `∂W` (the output gradient's rows summed per
/// token id) through a recorded step; a frozen one is just expanded and indexed.
pub fn embed_compressed<B: Backend>(ids: Tensor<B, 2, Int>, weight: &Arc<dyn CompressedWeight>) -> Tensor<B, 3> {
    if weight.is_trainable() {
        if let Some(steps) = steps_for::<B>(weight) {
            return unbox((steps.embedding)(Box::new(ids), weight));
        }
    }
    let [batch, seq] = ids.dims();
    let [_, hidden] = weight.dims();
    let w = expand::<B, _>(weight.as_ref(), &ids.device());
    w.select(0, ids.reshape([batch * seq])).reshape([batch, seq, hidden])
}

/// The backward step of an embedding lookup in a trainable compact `W`: `∂W` is the output
/// gradient's rows added at their token ids, handed to `W`.
#[derive(Debug)]
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
        weight.accumulate_gradient(Box::new(grad_w));
        // The parent is the anchor of `recorded_embedding`: it gets no gradient.
    }
}

/// The embedding lookup on `Autodiff<I>`, recording [`CompressedEmbeddingBackward`]. Token ids
/// carry no gradient, so the step hangs off a fresh one-value leaf (the anchor) that makes it
/// part of the graph.
fn recorded_embedding<I: Backend>(ids: Tensor<Autodiff<I>, 2, Int>, weight: &Arc<dyn CompressedWeight>) -> Tensor<Autodiff<I>, 3> {
    let [batch, seq] = ids.dims();
    let [_, hidden] = weight.dims();
    let ids = ids.inner().reshape([batch * seq]);
    let device = ids.device();
    let w = expand::<I, _>(weight.as_ref(), &device);
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
struct CompressedMatmulBackward;

impl<I: Backend> Backward<I, 1> for CompressedMatmulBackward {
    /// The weight, the device, and `x` when the weight is trainable.
    type State = (Arc<dyn CompressedWeight>, I::Device, Option<I::FloatTensorPrimitive>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (weight, device, x) = ops.state;
        let [parent] = ops.parents;
        let grad_y = grads.consume::<I>(&ops.node);
        if let Some(x) = x {
            // Summed in the order burn's autodiff sums a dense weight's gradient, so that a
            // compressed weight's equals it bit for bit: `∂yᵀ x` for `(W xᵀ)ᵀ`, `(xᵀ ∂y)ᵀ` for `x Wᵀ`.
            let grad_w = if transposes_activations_in_products::<I>() {
                float_matmul::<I>(I::float_transpose(grad_y.clone()), x)
            } else {
                I::float_transpose(float_matmul::<I>(I::float_transpose(x), grad_y.clone()))
            };
            weight.accumulate_gradient(Box::new(Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grad_w))));
        }
        if let Some(parent) = parent {
            let w = expand::<I, _>(weight.as_ref(), &device).into_primitive().tensor();
            grads.register::<I>(parent.id, float_matmul::<I>(grad_y, w));
        }
    }
}

/// `x Wᵀ` on `Autodiff<I>`, recording [`CompressedMatmulBackward`] (state: the compact `W`, and
/// `x` when `W` is trainable; an untracked `x` is then tracked so that the step runs).
fn recorded_matmul<I: Backend>(x: Tensor<Autodiff<I>, 2>, weight: &Arc<dyn CompressedWeight>) -> Tensor<Autodiff<I>, 2> {
    let mut x = x.into_primitive().tensor();
    if weight.is_trainable() && !x.is_tracked() {
        x = x.require_grad();
    }
    let device = I::float_device(&x.primitive);
    let w = expand::<I, _>(weight.as_ref(), &device).into_primitive().tensor();
    // Arranged for I's matmul (see transposes_activations_in_products).
    let y = if transposes_activations_in_products::<I>() {
        I::float_transpose(float_matmul::<I>(w, I::float_transpose(x.primitive.clone())))
    } else {
        float_matmul::<I>(x.primitive.clone(), I::float_transpose(w))
    };
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
