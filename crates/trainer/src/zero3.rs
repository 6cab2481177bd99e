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
//! The mechanism is `alignment_models::compressed` (QLoRA's expand-per-matmul with its own
//! recorded backward step): a [`ShardedWeight`] is a [`CompressedWeight`] whose expansion is an
//! all-gather and which is trainable (unless its parameter was frozen, as a LoRA base is: then
//! it is only gathered). Collectives inside the passes require every rank to run
//! the same forward and backward passes in the same order (the loop gives a rank without
//! examples a zero-weighted pass); each gradient reduction first checks that all ranks are at the
//! same weight, so a divergence is an error, not a silent mix-up.
//!
//! The norms (one `hidden`-sized vector each, ~0.003 % of a 7B model) stay whole in the model
//! and are partitioned as ZeRO-2 does (gradient and optimizer state), as DeepSpeed keeps
//! parameters below its persistence threshold whole. QLoRA's NF4 base is not partitioned.

use crate::TrainError;
use alignment_distributed::{Communicator, DistError, ShardLayout};
use alignment_models::compressed::{self, CompressedWeight};
use alignment_models::layers::Linear;
use alignment_models::CausalLm;
use alignment_peft::lora::linear_layers_mut;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
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
/// row-major values, and the summed gradient of that range since the last optimizer step.
#[derive(Debug)]
pub struct ShardedWeight {
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
    values: Mutex<Vec<f32>>,
    grad: Mutex<Vec<f32>>,
}

impl ShardedWeight {
    /// This rank's shard of `dense` (`[out, in]`, row-major).
    fn new(path: String, index: usize, dims: [usize; 2], dense: &[f32], trainable: bool, group: Arc<Group>) -> Self {
        let (rank, world) = {
            let comm = group.lock();
            (comm.rank(), comm.world_size())
        };
        let layout = ShardLayout::new(dims[0] * dims[1], world);
        let range = layout.range(rank);
        let grad = vec![0.0; if trainable { range.len() } else { 0 }];
        Self { path, index, dims, layout, rank, trainable, group, values: Mutex::new(dense[range].to_vec()), grad: Mutex::new(grad) }
    }

    /// Offset of this rank's shard in the flattened weight.
    pub fn owned_start(&self) -> usize {
        self.layout.range(self.rank).start
    }

    /// This rank's values, to update in place.
    pub fn values(&self) -> MutexGuard<'_, Vec<f32>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The summed gradient of this rank's shard since the last call, reset to zero.
    pub fn take_gradient(&self) -> Vec<f32> {
        let mut grad = self.grad.lock().unwrap_or_else(|p| p.into_inner());
        let zeros = vec![0.0; grad.len()];
        std::mem::replace(&mut *grad, zeros)
    }

    /// The whole weight on every rank (a collective).
    pub fn gather(&self) -> Result<Vec<f32>, DistError> {
        let values = self.values();
        self.group.lock().all_gather(&values, &self.layout)
    }

    /// The whole layout of the flattened weight.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }
}

impl CompressedWeight for ShardedWeight {
    fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// All-gathers the shards; zeros after a failed collective (the loop reports the failure).
    fn expand(&self) -> Vec<f32> {
        let values = self.values();
        self.group.run(|comm| comm.all_gather(&values, &self.layout)).unwrap_or_else(|| vec![0.0; self.layout.len()])
    }

    fn storage_bytes(&self) -> usize {
        4 * self.layout.range(self.rank).len()
    }

    fn recompress(&self, values: &[f32]) -> Arc<dyn CompressedWeight> {
        Arc::new(Self::new(self.path.clone(), self.index, self.dims, values, self.trainable, self.group.clone()))
    }

    fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Reduce-scatters `grad` and adds this rank's part to the shard's gradient, after checking
    /// that every rank is reducing this same weight.
    fn accumulate_gradient(&self, grad: Vec<f32>) {
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
            comm.reduce_scatter_sum(&grad, &self.layout)
        });
        if let Some(part) = summed {
            let mut own = self.grad.lock().unwrap_or_else(|p| p.into_inner());
            own.iter_mut().zip(part).for_each(|(g, p)| *g += p);
        }
    }
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
fn shard_of<B: Backend>(
    weight: &Param<Tensor<B, 2>>,
    path: String,
    index: usize,
    group: &Arc<Group>,
) -> (Arc<ShardedWeight>, Param<Tensor<B, 2>>) {
    let dense = weight.val().into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
    let sharded = Arc::new(ShardedWeight::new(path, index, weight.dims(), &dense, weight.is_require_grad(), group.clone()));
    (sharded, Param::from_tensor(Tensor::zeros([0, 0], &weight.device())).set_require_grad(false))
}

/// Replaces the embedding and each dense projection of `model` by this rank's shard of it
/// (trainable or frozen, as the parameter was; adapters are kept). Returns the model and its
/// sharded weights in module order (embedding first). Fails on a backend whose backward pass
/// would not compute the shards' gradients (see `compressed::records_backward`).
pub fn partition<B: Backend>(mut model: CausalLm<B>, group: &Arc<Group>) -> Result<(CausalLm<B>, Vec<Arc<ShardedWeight>>), TrainError> {
    if !compressed::records_backward::<B>() {
        return Err(TrainError::Config {
            key: "zero_stage".into(),
            message: format!(
                "ZeRO-3 partitions weights only on the autodiff backends alignment-models is built for (features `ndarray`, `cuda`), not on {}",
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
fn find<'a>(weight: &Option<Arc<dyn CompressedWeight>>, sharded: &'a [Arc<ShardedWeight>]) -> Option<&'a Arc<ShardedWeight>> {
    let weight = weight.as_ref()?;
    sharded.iter().find(|s| std::ptr::addr_eq(Arc::as_ptr(weight), Arc::as_ptr(s)))
}

/// The dense parameter for a gathered weight (trainable as the weight was).
fn dense_param<B: Backend>(weight: &ShardedWeight, device: &B::Device) -> Result<Param<Tensor<B, 2>>, DistError> {
    let tensor = Tensor::<B, 2>::from_data(TensorData::new(weight.gather()?, weight.dims), device);
    Ok(Param::from_tensor(tensor).set_require_grad(weight.trainable))
}

/// `model` with its `sharded` weights (as [`partition`] returned them) gathered back into dense
/// parameters (a collective: every rank calls it), e.g. to save the model.
pub fn gathered<B: Backend>(model: &CausalLm<B>, sharded: &[Arc<ShardedWeight>]) -> Result<CausalLm<B>, DistError> {
    let mut model = model.clone();
    if let Some(weight) = find(&model.embed_compressed, sharded) {
        model.embed_tokens = dense_param(weight, &model.embed_tokens.device())?;
        model.embed_compressed = None;
    }
    for (_, linear) in linear_layers_mut(&mut model) {
        // A QLoRA base is not one of them: it is the same on every rank and stays compact.
        if let Some(weight) = find(&linear.compressed, sharded) {
            linear.weight = dense_param(weight, &linear.weight.device())?;
            linear.compressed = None;
        }
    }
    Ok(model)
}
