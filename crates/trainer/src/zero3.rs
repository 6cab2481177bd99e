//! ZeRO-3's parameter partitioning, layer by layer: the embedding, each decoder projection and an
//! untied `lm_head` live on every rank as 1/N shards, are all-gathered for each use in the
//! forward and backward pass (a lookup, a matmul) and dropped after it, and their gradients are
//! reduce-scattered inside the backward pass into the owning rank's shard.
//!
//! ```text
//! forward,  per projection:  W = all_gather(shards);  y = x Wᵀ;  drop W
//! backward, per projection:  W = all_gather(shards);  ∂x = ∂y W;  drop W
//!                            ∂W = ∂yᵀ x;  own ∂W shard += reduce_scatter(∂W);  drop ∂W
//! optimizer step:            AdamW on the own shard; nothing is gathered
//! ```
//!
//! The mechanism is `alignment_models::compressed` (expand per product, with its own recorded
//! backward step): a [`ShardedWeight`] is a [`CompressedWeight`] whose expansion is an
//! all-gather and which is trainable (unless its parameter was frozen, as a LoRA base is: then
//! it is only gathered). Shards, gradients and the gathered weights are tensors of the model's
//! inner backend on its device; the collectives run on them through
//! [`crate::tensor_collectives`] (NCCL on the device buffers in a `cuda` build, the identity in
//! a world of one, the host for TCP). Collectives inside the passes require every rank to run
//! the same forward and backward passes in the same order (the loop gives a rank without
//! examples a zero-weighted pass); each gradient reduction first checks that all ranks are at the
//! same weight, so a divergence is an error, not a silent mix-up.
//!
//! The norms (one `hidden`-sized vector each, ~0.003 % of a 7B model) stay whole in the model
//! and are partitioned as ZeRO-2 does (gradient and optimizer state), as DeepSpeed keeps
//! parameters below its persistence threshold whole. QLoRA's NF4 base is not partitioned.

use crate::tensor_collectives;
use crate::TrainError;
use alignment_distributed::{Communicator, DistError, ShardLayout};
use alignment_models::compressed::{self, CompressedWeight, RecordedSteps};
use alignment_models::layers::Linear;
use alignment_models::CausalLm;
use alignment_peft::lora::linear_layers_mut;
use burn::backend::Autodiff;
use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex, MutexGuard};

/// A communicator shared by the loop and the sharded weights, which call collectives from
/// inside the forward and backward passes, where errors cannot be returned: the first failure
/// is kept here and reported by [`Group::check`] after the pass.
pub struct Group {
    comm: Mutex<Box<dyn Communicator>>,
    failure: Mutex<Option<DistError>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let comm = self.lock();
        write!(f, "Group {{ rank {}/{} }}", comm.rank(), comm.world_size())
    }
}

impl Group {
    /// A group over `comm`.
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        Self { comm: Mutex::new(comm), failure: Mutex::new(None) }
    }

    /// The communicator, for collectives whose errors the caller returns.
    pub fn lock(&self) -> MutexGuard<'_, Box<dyn Communicator>> {
        self.comm.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `collective` for a caller that cannot return errors: `None` after a failure (this
    /// one, kept for [`Group::check`], or an earlier one).
    fn run<T>(&self, collective: impl FnOnce(&mut dyn Communicator) -> Result<T, DistError>) -> Option<T> {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_some() {
            return None;
        }
        match collective(&mut **self.lock()) {
            Ok(value) => Some(value),
            Err(e) => {
                *failure = Some(e);
                None
            }
        }
    }

    /// The first failure of a collective run inside a forward or backward pass, if any.
    pub fn check(&self) -> Result<(), DistError> {
        match self.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One `[out, in]` weight partitioned over the ranks: this rank's contiguous range of its
/// row-major values and the summed gradient of that range since the last optimizer step, both
/// tensors of the inner backend `I` on the model's device.
#[derive(Debug)]
pub struct ShardedWeight<I: Backend> {
    /// The parameter's path (`layers.0.self_attn.q_proj.weight`): optimizer state key.
    pub path: String,
    /// Position among the model's sharded weights: what the ranks compare before reducing.
    index: usize,
    dims: [usize; 2],
    layout: ShardLayout,
    rank: usize,
    /// Frozen weights (a LoRA base) are only gathered, never given a gradient.
    trainable: bool,
    group: Arc<Group>,
    /// `[layout.range(rank).len()]`; `None` only while [`ShardedWeight::update_values`] runs.
    values: Mutex<Option<Tensor<I, 1>>>,
    /// The summed gradient of the shard; `None` while it is zero.
    grad: Mutex<Option<Tensor<I, 1>>>,
}

impl<I: Backend> ShardedWeight<I> {
    /// This rank's shard of `dense` (`[out, in]`).
    fn new(path: String, index: usize, dense: Tensor<I, 2>, trainable: bool, group: Arc<Group>) -> Self {
        let dims = dense.dims();
        let (rank, world) = {
            let comm = group.lock();
            (comm.rank(), comm.world_size())
        };
        let layout = ShardLayout::new(dims[0] * dims[1], world);
        let range = layout.range(rank);
        let flat = dense.reshape([layout.len()]);
        let values = if range.len() == layout.len() { flat } else { copy_of_range(flat, &range) };
        Self { path, index, dims, layout, rank, trainable, group, values: Mutex::new(Some(values)), grad: Mutex::new(None) }
    }

    /// Offset of this rank's shard in the flattened weight.
    pub fn owned_start(&self) -> usize {
        self.layout.range(self.rank).start
    }

    /// Number of values in this rank's shard.
    pub fn owned_len(&self) -> usize {
        self.layout.range(self.rank).len()
    }

    /// This rank's values.
    pub fn values(&self) -> Tensor<I, 1> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.clone().unwrap_or_else(|| panic!("{}: the shard is being updated", self.path))
    }

    /// Replaces this rank's values by `update` of them (an optimizer step). They are moved into
    /// `update`, not copied, so that a backend can update their buffer in place.
    pub fn update_values(&self, update: impl FnOnce(Tensor<I, 1>) -> Tensor<I, 1>) {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let current = values.take().unwrap_or_else(|| panic!("{}: the shard is being updated", self.path));
        let updated = update(current);
        assert_eq!(updated.dims(), [self.owned_len()], "{}: a shard update of another size", self.path);
        *values = Some(updated);
    }

    /// The summed gradient of this rank's shard since the last call (zeros if none came), reset
    /// to zero.
    pub fn take_gradient(&self) -> Tensor<I, 1> {
        let taken = self.grad.lock().unwrap_or_else(|p| p.into_inner()).take();
        taken.unwrap_or_else(|| Tensor::zeros([if self.trainable { self.owned_len() } else { 0 }], &self.values().device()))
    }

    /// The whole layout of the flattened weight.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The dense weight (a collective: every rank's shard gathered); zeros after a failed
    /// collective, which the loop reports through [`Group::check`].
    fn whole(&self) -> Tensor<I, 2> {
        let values = self.values();
        let device = values.device();
        let whole = self.group.run(|comm| tensor_collectives::all_gather(comm, values, &self.layout));
        whole.unwrap_or_else(|| Tensor::zeros([self.layout.len()], &device)).reshape(self.dims)
    }
}

impl<I: Backend> CompressedWeight for ShardedWeight<I> {
    fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// All-gathers the shards on the device, for `I` or `Autodiff<I>`.
    fn expand_for(&self, backend: TypeId) -> Option<Box<dyn Any>> {
        if backend == TypeId::of::<I>() {
            Some(Box::new(self.whole()))
        } else if backend == TypeId::of::<Autodiff<I>>() {
            Some(Box::new(Tensor::<Autodiff<I>, 2>::from_inner(self.whole())))
        } else {
            None
        }
    }

    fn expand_on_host(&self) -> Vec<f32> {
        self.whole().into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert")
    }

    fn storage_bytes(&self) -> usize {
        self.owned_len() * self.values().dtype().size()
    }

    fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Reduce-scatters `grad` (a `Tensor<I, 2>`) and adds this rank's part to the shard's
    /// gradient, after checking that every rank is reducing this same weight.
    fn accumulate_gradient(&self, grad: Box<dyn Any>) {
        let grad = grad.downcast::<Tensor<I, 2>>().unwrap_or_else(|_| panic!("{}: a gradient of another backend", self.path));
        let flat = grad.reshape([self.layout.len()]);
        let index = self.index;
        let summed = self.group.run(|comm| {
            let world = comm.world_size();
            let mut at = [index as f32];
            comm.all_reduce_sum(&mut at)?;
            if at[0] != (index * world) as f32 {
                return Err(DistError::Diverged {
                    rank: comm.rank(),
                    detail: format!(
                        "ranks reduce different weights in the backward pass (this rank: {}, #{index}): their forward passes differed",
                        self.path
                    ),
                });
            }
            tensor_collectives::reduce_scatter_sum(comm, flat, &self.layout)
        });
        if let Some(part) = summed {
            let mut own = self.grad.lock().unwrap_or_else(|p| p.into_inner());
            *own = Some(match own.take() {
                Some(sum) => sum + part,
                None => part,
            });
        }
    }

    fn recorded_steps(&self) -> Option<RecordedSteps> {
        Some(RecordedSteps::of::<I>())
    }
}

/// A new tensor holding `t[range]`, not a view: a view would keep all of `t`'s buffer alive.
pub(crate) fn copy_of_range<B: Backend>(t: Tensor<B, 1>, range: &std::ops::Range<usize>) -> Tensor<B, 1> {
    let device = t.device();
    t.select(0, Tensor::<B, 1, Int>::arange(range.start as i64..range.end as i64, &device))
}

/// The linear maps ZeRO-3 partitions, with their parameter paths: every dense projection of
/// the decoder layers and an untied `lm_head`, in module order (not QLoRA's NF4 weights, which
/// are compact already).
fn partitionable<B: Backend>(model: &mut CausalLm<B>) -> Vec<(String, &mut Linear<B>)> {
    // PEFT's module paths (`model.layers.0.self_attn.q_proj`, `lm_head`) → parameter paths.
    let parameter_path = |peft: String| format!("{}.weight", peft.strip_prefix("model.").unwrap_or(&peft));
    linear_layers_mut(model)
        .into_iter()
        .filter(|(_, linear)| linear.compressed.is_none() && linear.quantized.is_none())
        .map(|(path, linear)| (parameter_path(path), linear))
        .collect()
}

/// This rank's shard of a dense `weight` parameter, and the empty placeholder that replaces it.
fn shard_of<B: AutodiffBackend>(
    weight: &Param<Tensor<B, 2>>,
    path: String,
    index: usize,
    group: &Arc<Group>,
) -> (Arc<ShardedWeight<B::InnerBackend>>, Param<Tensor<B, 2>>) {
    let sharded = Arc::new(ShardedWeight::new(path, index, weight.val().inner(), weight.is_require_grad(), group.clone()));
    (sharded, Param::from_tensor(Tensor::zeros([0, 0], &weight.device())).set_require_grad(false))
}

/// The weights [`partition`] gives each rank: its shard of each, in module order.
pub type Shards<B> = Vec<Arc<ShardedWeight<<B as AutodiffBackend>::InnerBackend>>>;

/// Replaces the embedding and each dense projection of `model` by this rank's shard of it
/// (trainable or frozen, as the parameter was; adapters are kept). Returns the model and its
/// sharded weights in module order (embedding first). Fails on an autodiff backend other than
/// burn's `Autodiff<I>`, whose backward pass would not compute the shards' gradients (see
/// `compressed::RecordedSteps`).
pub fn partition<B: AutodiffBackend>(mut model: CausalLm<B>, group: &Arc<Group>) -> Result<(CausalLm<B>, Shards<B>), TrainError> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<B::InnerBackend>>() {
        return Err(TrainError::Config {
            key: "zero_stage".into(),
            message: format!(
                "ZeRO-3 partitions weights on burn's `Autodiff<_>` backends, whose backward pass records the shards' steps, not on {}",
                std::any::type_name::<B>()
            ),
        });
    }
    let mut sharded = Vec::new();
    if model.embed_compressed.is_none() {
        let (weight, placeholder) = shard_of(&model.embed_tokens, "embed_tokens".into(), 0, group);
        model.embed_tokens = placeholder;
        model.embed_compressed = Some(weight.clone());
        sharded.push(weight);
    }
    let first = sharded.len();
    for (index, (path, linear)) in partitionable(&mut model).into_iter().enumerate() {
        let (weight, placeholder) = shard_of(&linear.weight, path, first + index, group);
        linear.weight = placeholder;
        linear.compressed = Some(weight.clone());
        sharded.push(weight);
    }
    Ok((model, sharded))
}

/// The one of `sharded` that `weight` is, if any.
fn find<'a, W: CompressedWeight + ?Sized>(weight: &Option<Arc<dyn CompressedWeight>>, sharded: &'a [Arc<W>]) -> Option<&'a Arc<W>> {
    let weight = weight.as_ref()?;
    sharded.iter().find(|s| std::ptr::addr_eq(Arc::as_ptr(weight), Arc::as_ptr(s)))
}

/// The dense parameter for a gathered weight (trainable as the weight was).
fn dense_param<B: Backend, W: CompressedWeight + ?Sized>(weight: &W, device: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(compressed::expand::<B, _>(weight, device)).set_require_grad(weight.is_trainable())
}

/// `model` with its `sharded` weights (as [`partition`] returned them) gathered back into dense
/// parameters (a collective of `group`: every rank calls it), e.g. to save the model.
pub fn gathered<B: Backend, W: CompressedWeight + ?Sized>(
    model: &CausalLm<B>,
    sharded: &[Arc<W>],
    group: &Group,
) -> Result<CausalLm<B>, DistError> {
    let mut model = model.clone();
    if let Some(weight) = find(&model.embed_compressed, sharded) {
        model.embed_tokens = dense_param(weight.as_ref(), &model.embed_tokens.device());
        model.embed_compressed = None;
    }
    for (_, linear) in linear_layers_mut(&mut model) {
        // A QLoRA base is not one of them: it is the same on every rank and stays compact.
        if let Some(weight) = find(&linear.compressed, sharded) {
            linear.weight = dense_param(weight.as_ref(), &linear.weight.device());
            linear.compressed = None;
        }
    }
    group.check()?; // a failed gather gave zeros: report it rather than hand them on
    Ok(model)
}
