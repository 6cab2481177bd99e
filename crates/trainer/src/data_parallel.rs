//! Data-parallel training across processes — DDP and ZeRO stages 1-3 — on the collectives of
//! `alignment-distributed`: everything the loop does differently when there are N ranks.
//!
//! ```text
//! every rank: the same permutation of the examples; each micro-batch of the global step is
//!             split into N contiguous parts and rank r computes part r (loss ÷ global weight)
//! gradients → one flat buffer, in module order of the trainable parameters
//!   DDP:      all-reduce                 → every rank holds the summed gradient
//!   ZeRO-1:   all-reduce, keep own shard → AdamW moments only for the own shard
//!   ZeRO-2/3: reduce-scatter             → own shard of the gradient and of the moments
//! global gradient norm (partial sums of squares all-reduced) → clip coefficient
//! AdamW on the owned range only; ZeRO-1/2/3: all-gather the updated parameters
//! parameters written back into the model (identical on every rank)
//! ```
//!
//! Where the flat buffers live is the accelerate config's `offload_optimizer_device`:
//! - `none` (or unset, DeepSpeed's default): **on the model's device**. The buffers are device
//!   tensors, the collectives run on them ([`tensor_collectives`]: NCCL on the device buffers
//!   in a `cuda` build, through the host for TCP), and AdamW is the tensor formulation the
//!   one-process step runs on GPUs ([`adamw_on_tensors`], one call over the owned range, its
//!   norms and biases exempt from decay). One value comes back per step: the rank's part of the
//!   squared gradient norm.
//! - `cpu` (DeepSpeed's optimizer offload, DeepSpeed-Chat's `--offload`): **on the host**. The
//!   owned range's f32 master weights (read from the device once) and moments are host vectors
//!   updated by the threaded host pass ([`adamw_on_slices`]); each step the gradient comes to
//!   the host and the updated weights go back in the backend's own float type, so on a bf16
//!   backend the device holds only bf16 weights (`cli.rs` picks that backend for `bf16` with
//!   offload).
//!
//! Both are the same f32 operations in the same order (bit-identical updates from the same
//! gradient and clipping factor); the norms differ in rounding (f64 on the host, f32 on the
//! device), so runs agree to float precision (tests/data_parallel.rs).
//!
//! ZeRO-3 also partitions the weights themselves — the embedding and the decoder projections
//! ([`crate::zero3`]): they are all-gathered per use inside the forward and backward passes,
//! their gradients are reduce-scattered inside the backward pass, and AdamW updates each rank's
//! shard in place, so they are never whole between steps. The flat vector above then holds the
//! rest (norms, adapters).
//!
//! Sums run in rank order on every rank (see `alignment-distributed`), so all ranks hold
//! bit-identical weights and a run's losses match the one-process run with the same global
//! batch up to the reordering of float sums (tests/data_parallel.rs). Checkpoints hold the full,
//! gathered optimizer state in the one-process format, so a run saved by N ranks resumes on M.
//!
//! An update rule without shardable moments (`optim: adamw_bnb_8bit`'s block-wise 8-bit state,
//! `rmsprop`) runs under DDP only, with the optimizer kept whole on every rank
//! ([`DataParallel::keep_optimizer_whole`]): the flat gradient is all-reduced and every rank
//! runs the one-process update ([`AdamW::step`]) on the whole model, so the ranks stay identical
//! and a checkpoint is the optimizer as it is (bitsandbytes under DDP does the same).
//!
//! For the flat vector, burn's backward pass produces every gradient at once, so ZeRO-2 shards
//! the gradient kept after the reduction, not the peak inside the backward pass (ZeRO-3's
//! partitioned weights do reduce inside it). See docs/distributed.md.

use crate::optimizer::{adamw_on_slices, adamw_on_tensors, excluded_from_decay, AdamW, AdamWConfig, AdamWScalars, Moments, StepReport};
use crate::tensor_collectives;
use crate::zero3::{self, Group, ShardedWeight};
use crate::TrainError;
use alignment_distributed::TcpCommunicator;
use alignment_distributed::{AccelerateConfig, Communicator, DistEnv, ShardLayout, ZeroPlan, ZeroStage};
use alignment_models::compressed::CompressedWeight;
use alignment_models::CausalLm;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use std::any::Any;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Summed metrics: (name, Σ value·weight, Σ weight), as `MetricsAccumulator::sums` gives them.
pub type MetricSums = Vec<(String, f64, f64)>;

/// One trainable parameter's place in the flat vectors.
#[derive(Debug, Clone)]
struct Segment {
    path: String,
    id: ParamId,
    offset: usize,
    len: usize,
    decay: bool,
}

/// The sharded optimizer state of this rank.
struct Shards {
    segments: Vec<Segment>,
    plan: ZeroPlan,
    /// AdamW moments of `plan.owned_range()`, and where the update runs.
    state: OwnedState,
}

/// Where the AdamW state of the owned range lives, and so where its update runs.
enum OwnedState {
    /// Host memory, updated by the threaded host pass ([`adamw_on_slices`]): the owned range's
    /// f32 master weights and moments, the updated weights written to the model each step. This
    /// is `offload_optimizer_device: cpu` (DeepSpeed's optimizer offload).
    Host(HostState),
    /// The model's device: a [`DeviceState`] of the inner backend, boxed because the group is
    /// not generic over the backend; `None` until the first step or a resume creates it.
    Device(Option<Box<dyn Any + Send>>),
}

/// An offloaded range's state on the host: its f32 master weights, read from the device once
/// (`None` until the first step), and its AdamW moments. The device then only receives weights:
/// in the backend's own float type, which may be narrower than the master's.
struct HostState {
    master: Option<Vec<f32>>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

impl HostState {
    /// Zero moments for `len` values; the master is read at the first step.
    fn zeros(len: usize) -> Self {
        Self { master: None, exp_avg: vec![0.0; len], exp_avg_sq: vec![0.0; len] }
    }

    /// One AdamW update of the master weights (from `read_master` the first time) with the
    /// range's summed gradient `grads` and the step's clipping factor; `pieces` are the
    /// parameters in a numbering where the range starts at `start` ([`adamw_update`]).
    /// Returns the updated master weights.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        read_master: impl FnOnce() -> Vec<f32>,
        config: &AdamWConfig,
        step: u64,
        lr: f64,
        clip_coef: f64,
        pieces: &[(Range<usize>, bool)],
        start: usize,
        grads: &[f32],
    ) -> &[f32] {
        let master = self.master.get_or_insert_with(read_master);
        adamw_update(config, step, lr, clip_coef, pieces, start, master, grads, &mut self.exp_avg, &mut self.exp_avg_sq);
        master
    }
}

/// An owned range's AdamW state on the model's device.
struct DeviceState<B: Backend> {
    moments: Moments<B>,
    /// The parameters' parts of the range, relative to its start, and whether weight decay
    /// applies to each ([`owned_pieces`]).
    pieces: Vec<(Range<usize>, bool)>,
}

/// A ZeRO-3 weight (of the inner backend `I`) and the AdamW moments of this rank's shard of it.
struct PartitionedParam<I: Backend> {
    weight: Arc<ShardedWeight<I>>,
    /// Where the flat range's are (on the device, or on the host when the optimizer is
    /// offloaded); `None` until the first step or a resume creates them.
    moments: Option<ShardMoments<I>>,
}

/// Where a partitioned weight's moments live, and so where its update runs.
enum ShardMoments<I: Backend> {
    /// `offload_optimizer_device: cpu`: the shard's f32 master weights and moments on the host,
    /// the updated shard written to the device each step.
    Host(HostState),
    /// The shard's device, updated there.
    Device(DeviceState<I>),
}

/// Bytes of training state one rank keeps between steps, by kind (what the stage shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeldState {
    /// Trainable parameters held as this rank's own (ZeRO-3: its shard; else all).
    pub params: usize,
    /// Summed gradients kept after the reduction.
    pub grads: usize,
    /// AdamW moments.
    pub optimizer: usize,
}

/// A data-parallel group seen from one rank: its communicator and ZeRO stage.
pub struct DataParallel {
    group: Arc<Group>,
    stage: ZeroStage,
    shards: Option<Shards>,
    /// ZeRO-3's partitioned weights, in module order (empty before [`DataParallel::partition`]).
    sharded: Vec<Arc<dyn CompressedWeight>>,
    /// The trainable ones among them with their moments: a `Vec<PartitionedParam<I>>` of the
    /// model's inner backend, boxed because the group is not generic over the backend.
    partitioned: Option<Box<dyn Any + Send>>,
    /// Values in this rank's shards of the trainable partitioned weights.
    partitioned_len: usize,
    metric_names: Option<Vec<String>>,
    /// Peak RSS at the end of the training steps ([`DataParallel::note_training_peak`]).
    training_peak: Option<u64>,
    /// The accelerate config's `mixed_precision` (`no`, `bf16`, `fp16`): what the launcher
    /// asked of every rank, on top of the recipe's `bf16`.
    pub mixed_precision: String,
    /// The accelerate config's `deepspeed_config.offload_optimizer_device` (`Some(true)`: cpu,
    /// the owned range's moments and update on the host; otherwise on the model's device).
    /// Read when the first step or a resume builds the state.
    pub offload_optimizer: Option<bool>,
    /// `Some` when the optimizer is kept whole on every rank ([`DataParallel::keep_optimizer_whole`]).
    whole_optimizer: Option<WholeOptimizer>,
}

/// DDP with the one-process optimizer on every rank: what each rank holds, for its closing line.
#[derive(Debug, Clone, Copy, Default)]
struct WholeOptimizer {
    /// Trainable values (each rank holds all of them, and their summed gradient).
    values: usize,
    /// Bytes of the optimizer's state after the last step, in its own format.
    state_bytes: usize,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataParallel {{ rank {}/{}, {:?} }}", self.rank(), self.world_size(), self.stage)
    }
}

/// The NCCL communicator of rank `env.rank` (on GPU `env.local_rank`) when this build's ranks
/// train on GPUs: always in a `cuda` build; in a `tch` build when torch sees CUDA (the rule the
/// command line picks its device by: GPU `LOCAL_RANK`, else torch's CPU). `None` otherwise: the
/// ranks then connect over TCP.
#[cfg(any(feature = "cuda", feature = "tch"))]
fn nccl_when_on_gpus(env: &DistEnv, timeout: std::time::Duration) -> Result<Option<Box<dyn Communicator>>, TrainError> {
    #[cfg(not(feature = "cuda"))]
    if !tch::Cuda::is_available() {
        return Ok(None);
    }
    Ok(Some(Box::new(alignment_distributed::NcclCommunicator::connect(env, timeout)?)))
}

/// Without a GPU build the ranks connect over TCP.
#[cfg(not(any(feature = "cuda", feature = "tch")))]
fn nccl_when_on_gpus(_env: &DistEnv, _timeout: std::time::Duration) -> Result<Option<Box<dyn Communicator>>, TrainError> {
    Ok(None)
}

impl DataParallel {
    /// A group over `comm` with `stage`.
    pub fn new(comm: Box<dyn Communicator>, stage: ZeroStage) -> Self {
        Self {
            group: Arc::new(Group::new(comm)),
            stage,
            shards: None,
            sharded: Vec::new(),
            partitioned: None,
            partitioned_len: 0,
            metric_names: None,
            training_peak: None,
            mixed_precision: "no".into(),
            offload_optimizer: None,
            whole_optimizer: None,
        }
    }

    /// The group the environment describes (torchrun/Slurm variables, the accelerate config
    /// named by `ALIGNMENT_ACCELERATE_CONFIG`; DDP when none), `None` for a single process.
    /// Collectives go through NCCL when the ranks train on GPUs ([`trains_on_gpus`]: each rank
    /// on GPU `LOCAL_RANK`, NVLink between them), through TCP otherwise.
    pub fn from_env() -> Result<Option<Self>, TrainError> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(None);
        };
        let accelerate = AccelerateConfig::from_env()?;
        let stage = accelerate.as_ref().map_or(ZeroStage::Ddp, |c| c.stage);
        let timeout = alignment_distributed::timeout_from_env()?;
        let comm = match nccl_when_on_gpus(&env, timeout)? {
            Some(nccl) => nccl,
            None => Box::new(TcpCommunicator::connect(&env, timeout)?),
        };
        let mut group = Self::new(comm, stage);
        if let Some(config) = accelerate {
            group.mixed_precision = config.mixed_precision;
            group.offload_optimizer = config.offload_optimizer;
        }
        Ok(Some(group))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.group.lock().rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.group.lock().world_size()
    }

    /// The ZeRO stage.
    pub fn stage(&self) -> ZeroStage {
        self.stage
    }

    /// Rank 0 writes logs, checkpoints and the final model.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Waits for every rank (e.g. while rank 0 saves a checkpoint).
    pub fn barrier(&mut self) -> Result<(), TrainError> {
        Ok(self.group.lock().barrier()?)
    }

    /// Keeps the optimizer whole on every rank instead of sharding AdamW's moments: each step
    /// all-reduces the gradient ([`DataParallel::all_reduce_gradients`]) and every rank runs the
    /// one-process update. For update rules whose state the flat shards cannot hold (8-bit
    /// AdamW's blocks, RMSprop); DDP only, as no ZeRO stage then has anything to shard: an error
    /// names the stage otherwise.
    pub fn keep_optimizer_whole(&mut self) -> Result<(), String> {
        self.can_keep_optimizer_whole()?;
        self.whole_optimizer = Some(WholeOptimizer::default());
        Ok(())
    }

    /// Why this group cannot keep the optimizer whole ([`DataParallel::keep_optimizer_whole`]):
    /// a ZeRO stage, which shards AdamW's moments only.
    pub fn can_keep_optimizer_whole(&self) -> Result<(), String> {
        match self.stage {
            ZeroStage::Ddp => Ok(()),
            stage => Err(format!(
                "its state is kept whole, and {stage} shards AdamW's moments only: run it with DDP \
                 (an accelerate config without DeepSpeed, e.g. recipes/accelerate_configs/multi_gpu.yaml) or in one process"
            )),
        }
    }

    /// Whether the optimizer is kept whole on every rank ([`DataParallel::keep_optimizer_whole`]).
    pub fn keeps_optimizer_whole(&self) -> bool {
        self.whole_optimizer.is_some()
    }

    /// The gradients `grads` of this rank's share of the batch summed over the group (DDP's
    /// all-reduce, in rank order: identical on every rank), one per trainable parameter of
    /// `model` (zeros summed in for a parameter this rank gave none, e.g. a rank without rows in
    /// the micro-batch; one no rank gave any would be updated with zeros where one process skips
    /// it, but every trainable parameter of these models takes part in the loss), for the
    /// one-process update of a whole optimizer. Records what the rank holds for
    /// [`DataParallel::held_state`].
    pub fn all_reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        grads: &GradientsParams,
    ) -> Result<GradientsParams, TrainError> {
        let segments = segments(model);
        let values: usize = segments.iter().map(|s| s.len).sum();
        if let Some(whole) = &mut self.whole_optimizer {
            whole.values = values;
        }
        if segments.is_empty() {
            return Ok(GradientsParams::new());
        }
        let flat = flat_tensor(model, &segments, Some(grads));
        let summed = tensor_collectives::all_reduce_sum(&mut **self.group.lock(), flat)?;
        Ok(gradients_from_flat(model, &segments, summed))
    }

    /// Records the bytes of the whole optimizer's state after a step (for the closing line).
    pub fn note_whole_optimizer_bytes(&mut self, bytes: usize) {
        if let Some(whole) = &mut self.whole_optimizer {
            whole.state_bytes = bytes;
        }
    }

    /// ZeRO-3: replaces the model's trainable embedding and projections by this rank's shards
    /// of them (see [`crate::zero3`]); other stages return `model` as it is. Call once, after
    /// [`DataParallel::broadcast_parameters`].
    pub fn partition<B: AutodiffBackend>(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>, TrainError> {
        if self.stage != ZeroStage::Zero3 {
            return Ok(model);
        }
        let (model, sharded) = zero3::partition(model, &self.group)?;
        let trainable: Vec<PartitionedParam<B::InnerBackend>> =
            sharded.iter().filter(|w| w.is_trainable()).map(|w| PartitionedParam { weight: w.clone(), moments: None }).collect();
        self.partitioned_len = trainable.iter().map(|p| p.weight.owned_len()).sum();
        self.partitioned = Some(Box::new(trainable));
        self.sharded = sharded.into_iter().map(|w| w as Arc<dyn CompressedWeight>).collect();
        Ok(model)
    }

    /// Whether every rank must run each forward and backward pass together (ZeRO-3 gathers
    /// weights inside them): a rank without examples then runs a zero-weighted pass.
    pub fn needs_lockstep(&self) -> bool {
        !self.sharded.is_empty()
    }

    /// The first failure of a collective inside the last forward/backward pass (ZeRO-3).
    pub fn check(&self) -> Result<(), TrainError> {
        Ok(self.group.check()?)
    }

    /// The model with every partitioned weight whole again, identical on every rank (a
    /// collective with ZeRO-3; a clone otherwise), e.g. for rank 0 to save.
    pub fn gathered<B: Backend>(&self, model: &CausalLm<B>) -> Result<CausalLm<B>, TrainError> {
        if self.sharded.is_empty() {
            return Ok(model.clone());
        }
        Ok(zero3::gathered(model, &self.sharded, &self.group)?)
    }

    /// This rank's part of a micro-batch of the global step: contiguous, sizes differing by at
    /// most one, earlier ranks taking the extra examples.
    pub fn part<'a, T>(&self, micro_batch: &'a [T]) -> &'a [T] {
        let layout = ShardLayout::new(micro_batch.len(), self.world_size());
        &micro_batch[layout.range(self.rank())]
    }

    /// Makes every rank start from rank 0's trainable parameters, one tensor at a time (so the
    /// transient copy is one tensor, not the whole model), on the device under NCCL
    /// ([`tensor_collectives::broadcast`]).
    pub fn broadcast_parameters<B: AutodiffBackend, M: AutodiffModule<B>>(&mut self, model: M) -> Result<M, TrainError> {
        struct Broadcast<'a> {
            comm: &'a mut dyn Communicator,
            failure: Option<alignment_distributed::DistError>,
        }
        impl<B: AutodiffBackend> ModuleMapper<B> for Broadcast<'_> {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                if !param.is_require_grad() || self.failure.is_some() {
                    return param;
                }
                let (id, tensor, mapper) = param.consume();
                let shape = tensor.shape();
                let flat = tensor.inner().reshape([shape.num_elements()]);
                let flat = tensor_collectives::broadcast(self.comm, flat.clone(), 0).unwrap_or_else(|e| {
                    self.failure = Some(e);
                    flat
                });
                Param::from_mapped_value(id, Tensor::from_inner(flat.reshape(shape)).require_grad(), mapper)
            }
        }
        let mut comm = self.group.lock();
        let mut broadcast = Broadcast { comm: &mut **comm, failure: None };
        let model = model.map(&mut broadcast);
        match broadcast.failure {
            Some(e) => Err(e.into()),
            None => Ok(model),
        }
    }

    /// Sums the step's metric sums over ranks: `local` holds this rank's (name, Σ value·weight,
    /// Σ weight); the result holds the group's. A rank without examples in the step contributes
    /// zeros under the names seen before.
    pub fn reduce_metrics(&mut self, local: MetricSums, tokens: usize) -> Result<(MetricSums, usize), TrainError> {
        let names: Vec<String> = if local.is_empty() {
            self.metric_names.clone().ok_or_else(|| TrainError::Config {
                key: "per_device_train_batch_size".into(),
                message: format!("rank {} got no examples in its first step: use at least as many examples per step as ranks", self.rank()),
            })?
        } else {
            local.iter().map(|(n, _, _)| n.clone()).collect()
        };
        self.metric_names = Some(names.clone());
        let mut flat: Vec<f32> = Vec::with_capacity(2 * names.len() + 1);
        for name in &names {
            let (s, w) = local.iter().find(|(n, _, _)| n == name).map_or((0.0, 0.0), |(_, s, w)| (*s, *w));
            flat.extend([s as f32, w as f32]);
        }
        flat.push(tokens as f32);
        self.group.lock().all_reduce_sum(&mut flat)?;
        let total = names.into_iter().enumerate().map(|(i, n)| (n, flat[2 * i] as f64, flat[2 * i + 1] as f64)).collect();
        Ok((total, *flat.last().expect("token count") as usize))
    }

    /// One synchronized AdamW update with learning rate `lr` from this rank's (already
    /// globally normalised) gradients `grads`: on the model's device, or on the host when the
    /// optimizer is offloaded (module docs).
    pub fn step<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        config: &AdamWConfig,
        optimizer_step: u64,
        lr: f64,
        model: M,
        grads: &GradientsParams,
    ) -> Result<(M, StepReport), TrainError> {
        self.ensure_shards(&model);
        let Self { group, shards, partitioned, .. } = self;
        let mut comm = group.lock();
        let (comm, shards) = (&mut **comm, shards.as_mut().expect("built by ensure_shards"));
        // ZeRO-3's partitioned weights: their gradient shards were summed inside the backward
        // pass; their squares are summed on the device weight by weight, as the one-process step
        // sums each parameter's (in f64 on the host instead, the norm moved by ~1e-7, and the
        // clipping factor with it, enough for AdamW's later steps to show it), and each shard is
        // updated where its moments are.
        let partitioned = partitioned_of::<B::InnerBackend>(partitioned);
        let partitioned_grads: Vec<_> = partitioned.iter().map(|p| p.weight.take_gradient()).collect();
        let partitioned_sq = partitioned_grads.iter().map(|g| g.clone().square().sum()).reduce(|total, sq| total + sq);
        let Shards { segments, plan, state } = shards;
        match state {
            OwnedState::Host(state) => {
                let partitioned_sq = partitioned_sq.map_or(0.0, |sq| sq.into_scalar().elem::<f64>());
                let host_grads: Vec<Vec<f32>> = partitioned_grads.into_iter().map(host).collect();
                let (model, report) = host_step(comm, plan, segments, state, partitioned_sq, config, optimizer_step, lr, model, grads)?;
                for (p, grad) in partitioned.iter_mut().zip(&host_grads) {
                    p.update_on_host(grad, report.clip_coef, config, optimizer_step, lr);
                }
                Ok((model, report))
            }
            OwnedState::Device(state) => {
                let (model, report) = device_step(comm, plan, segments, state, partitioned_sq, config, optimizer_step, lr, model, grads)?;
                for (p, grad) in partitioned.iter_mut().zip(partitioned_grads) {
                    p.update_on_device(grad, report.clip_coef, config, optimizer_step, lr);
                }
                Ok((model, report))
            }
        }
    }

    /// The whole optimizer state in the one-process format (moments gathered from all ranks),
    /// for rank 0 to checkpoint. Every rank must call it (it is a collective).
    pub fn gather_optimizer<B: Backend>(&mut self, config: AdamWConfig, step: u64, device: &B::Device) -> Result<AdamW<B>, TrainError> {
        let mut optimizer = AdamW::new(config);
        optimizer.step = step;
        let Some(shards) = &self.shards else { return Ok(optimizer) };
        let mut comm = self.group.lock();
        for p in partitioned_of::<B>(&mut self.partitioned).iter() {
            let layout = p.weight.layout();
            let tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [layout.len()]), device);
            let moments = match &p.moments {
                Some(ShardMoments::Host(state)) => Moments {
                    exp_avg: tensor(comm.all_gather(&state.exp_avg, layout)?),
                    exp_avg_sq: tensor(comm.all_gather(&state.exp_avg_sq, layout)?),
                },
                Some(ShardMoments::Device(state)) => Moments {
                    exp_avg: tensor_collectives::all_gather(&mut **comm, state.moments.exp_avg.clone(), layout)?,
                    exp_avg_sq: tensor_collectives::all_gather(&mut **comm, state.moments.exp_avg_sq.clone(), layout)?,
                },
                None => Moments::zeros(layout.len(), device),
            };
            optimizer.state.insert(p.weight.path.clone(), moments);
        }
        let (sharded, layout) = (self.stage.shards_optimizer_state(), &shards.plan.layout);
        let (exp_avg, exp_avg_sq) = match &shards.state {
            OwnedState::Host(state) => {
                let (exp_avg, exp_avg_sq) = match sharded {
                    false => (state.exp_avg.clone(), state.exp_avg_sq.clone()),
                    true => (comm.all_gather(&state.exp_avg, layout)?, comm.all_gather(&state.exp_avg_sq, layout)?),
                };
                let len = exp_avg.len();
                let tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [len]), device);
                (tensor(exp_avg), tensor(exp_avg_sq))
            }
            OwnedState::Device(state) => {
                let state = state.as_ref().and_then(|s| s.downcast_ref::<DeviceState<B>>());
                let moments = state.map_or_else(|| Moments::zeros(shards.plan.owned_range().len(), device), |s| s.moments.clone());
                match sharded {
                    false => (moments.exp_avg, moments.exp_avg_sq),
                    true => (
                        tensor_collectives::all_gather(&mut **comm, moments.exp_avg, layout)?,
                        tensor_collectives::all_gather(&mut **comm, moments.exp_avg_sq, layout)?,
                    ),
                }
            }
        };
        for s in &shards.segments {
            let part = |t: &Tensor<B, 1>| t.clone().narrow(0, s.offset, s.len);
            optimizer.state.insert(s.path.clone(), Moments { exp_avg: part(&exp_avg), exp_avg_sq: part(&exp_avg_sq) });
        }
        Ok(optimizer)
    }

    /// Takes this rank's part of a restored one-process optimizer state (resume on any number
    /// of ranks). `model` gives the parameter order; call after [`DataParallel::partition`].
    pub fn restore_optimizer<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        optimizer: &AdamW<B::InnerBackend>,
    ) -> Result<(), TrainError> {
        self.ensure_shards(model);
        let shards = self.shards.as_mut().expect("built by ensure_shards");
        let total: usize = shards.segments.iter().map(|s| s.len).sum();
        let (mut m, mut v) = (vec![0f32; total], vec![0f32; total]);
        for s in &shards.segments {
            let Some(moments) = optimizer.state.get(&s.path) else { continue };
            m[s.offset..s.offset + s.len].copy_from_slice(&host(moments.exp_avg.clone()));
            v[s.offset..s.offset + s.len].copy_from_slice(&host(moments.exp_avg_sq.clone()));
        }
        let range = shards.plan.owned_range();
        let (m, v) = (m[range.clone()].to_vec(), v[range.clone()].to_vec());
        match &mut shards.state {
            // The master weights are read from the resumed model at the first step.
            OwnedState::Host(state) => *state = HostState { master: None, exp_avg: m, exp_avg_sq: v },
            OwnedState::Device(state) => {
                // Uploaded once, to where the parameters are.
                let device = model.devices().into_iter().next().expect("a model with trainable parameters has a device");
                let tensor = |v: Vec<f32>| Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(v, [range.len()]), &device);
                let moments = Moments { exp_avg: tensor(m), exp_avg_sq: tensor(v) };
                *state = Some(Box::new(DeviceState { moments, pieces: owned_pieces(&shards.segments, &range).collect() }));
            }
        }
        let offloaded = matches!(shards.state, OwnedState::Host(_));
        for p in partitioned_of::<B::InnerBackend>(&mut self.partitioned) {
            let Some(moments) = optimizer.state.get(&p.weight.path) else { continue };
            let owned = p.weight.owned_start()..p.weight.owned_start() + p.weight.owned_len();
            p.moments = Some(if offloaded {
                let part = |t: &Tensor<B::InnerBackend, 1>| host(t.clone())[owned.clone()].to_vec();
                ShardMoments::Host(HostState { master: None, exp_avg: part(&moments.exp_avg), exp_avg_sq: part(&moments.exp_avg_sq) })
            } else {
                let part = |t: &Tensor<B::InnerBackend, 1>| zero3::copy_of_range(t.clone(), &owned);
                let moments = Moments { exp_avg: part(&moments.exp_avg), exp_avg_sq: part(&moments.exp_avg_sq) };
                ShardMoments::Device(DeviceState { moments, pieces: p.pieces() })
            });
        }
        Ok(())
    }

    /// Records the process's peak resident memory so far as the training steps' peak (the loop
    /// calls it after its last step, before the final model is gathered and saved).
    pub fn note_training_peak(&mut self) {
        self.training_peak = alignment_core::memory::peak_rss_bytes();
    }

    /// One line for the rank's log: what it keeps between steps and its peak resident memory
    /// during the steps and overall.
    pub fn memory_summary(&self) -> String {
        let held = self.held_state();
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let show = |b: Option<u64>| b.map_or("unknown".to_string(), |b| format!("{:.0} MiB", mib(b as usize)));
        let peak = format!("{} during the steps, {} overall", show(self.training_peak), show(alignment_core::memory::peak_rss_bytes()));
        let (state, place) = match self.shards.as_ref().map(|s| &s.state) {
            _ if self.whole_optimizer.is_some() => ("optimizer state", " (whole on every rank)"),
            Some(OwnedState::Device(_)) => ("AdamW moments", " (on the device)"),
            Some(OwnedState::Host { .. }) => ("AdamW moments", " (on the host)"),
            None => ("AdamW moments", ""),
        };
        // On the libtorch route with a GPU, the device's peak too (the process's so far).
        #[cfg(feature = "tch")]
        let device = crate::tch_device_memory::summary().map_or(String::new(), |line| format!("; {line}"));
        #[cfg(not(feature = "tch"))]
        let device = "";
        format!(
            "rank {}/{} ({:?}): kept between steps: parameters {:.1} MiB, gradients {:.1} MiB, {state} {:.1} MiB{place}; peak RSS {peak}{device}",
            self.rank(),
            self.world_size(),
            self.stage,
            mib(held.params),
            mib(held.grads),
            mib(held.optimizer)
        )
    }

    /// What this rank keeps between steps.
    pub fn held_state(&self) -> HeldState {
        if let Some(whole) = &self.whole_optimizer {
            return HeldState { params: 4 * whole.values, grads: 4 * whole.values, optimizer: whole.state_bytes };
        }
        let Some(s) = &self.shards else { return HeldState::default() };
        let total: usize = s.segments.iter().map(|s| s.len).sum();
        // The summed gradient a reduction leaves: all of it for DDP and ZeRO-1 (all-reduce), the
        // own shard for ZeRO-2/3 (reduce-scatter).
        let grads = if self.stage.shards_gradients() { s.plan.owned_range().len() } else { total };
        // ZeRO-3's partitioned weights: only the own shard of values, gradient and moments.
        let shard = self.partitioned_len;
        HeldState { params: 4 * (total + shard), grads: 4 * (grads + shard), optimizer: 4 * 2 * (s.plan.owned_range().len() + shard) }
    }

    /// Builds the flat layout and moment buffers from `model`'s trainable parameters on first
    /// use.
    fn ensure_shards<B: AutodiffBackend, M: AutodiffModule<B>>(&mut self, model: &M) {
        if self.shards.is_none() {
            let segments = segments(model);
            let total = segments.iter().map(|s| s.len).sum();
            let plan = ZeroPlan::new(self.stage, total, &**self.group.lock());
            let owned = plan.owned_range().len();
            // On the device unless offloaded; a flat buffer smaller than the world (some rank
            // would own nothing) stays on the host, where empty shards are no special case.
            let state = if self.offload_optimizer == Some(true) || total < plan.layout.world_size() {
                OwnedState::Host(HostState::zeros(owned))
            } else {
                OwnedState::Device(None)
            };
            self.shards = Some(Shards { segments, plan, state });
        }
    }
}

/// The AdamW update of `crate::optimizer` ([`adamw_on_slices`], the host pass the one-process
/// CPU step also runs) on flat f32 buffers covering `[start, start + len)` of a numbering in
/// which `pieces` are the parameters (their range, whether weight decay applies).
#[allow(clippy::too_many_arguments)]
fn adamw_update(
    c: &AdamWConfig,
    step: u64,
    lr: f64,
    clip_coef: f64,
    pieces: &[(Range<usize>, bool)],
    start: usize,
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) {
    // `min(1, ·)` is exactly 1 when not clipping; the one-process step multiplies by it, which
    // leaves every gradient's bits unchanged, so skipping it here is the same update.
    let clip = (clip_coef < 1.0).then_some(clip_coef as f32);
    for (piece, decays) in pieces {
        let (lo, hi) = (piece.start.max(start), piece.end.min(start + params.len()));
        if lo >= hi {
            continue;
        }
        let scalars = AdamWScalars::new(c, lr, step as i32, *decays);
        let r = lo - start..hi - start;
        adamw_on_slices(&scalars, clip, &mut params[r.clone()], &grads[r.clone()], &mut exp_avg[r.clone()], &mut exp_avg_sq[r]);
    }
}

/// The flat owned range's update through the host: the gradients and the weights concatenated
/// on the device and each read in one transfer, the gradients reduced by the communicator,
/// AdamW by the threaded host pass on the moments `exp_avg`, `exp_avg_sq`, the updated range
/// gathered, written to the device in one transfer and split back into the parameters there.
#[allow(clippy::too_many_arguments)]
fn host_step<B: AutodiffBackend, M: AutodiffModule<B>>(
    comm: &mut dyn Communicator,
    plan: &ZeroPlan,
    segments: &[Segment],
    state: &mut HostState,
    partitioned_sq: f64,
    config: &AdamWConfig,
    optimizer_step: u64,
    lr: f64,
    model: M,
    grads: &GradientsParams,
) -> Result<(M, StepReport), TrainError> {
    let flat_grads = flat_tensor(&model, segments, Some(grads));
    let device = flat_grads.device();
    let mut flat_grads = host(flat_grads);
    let owned_grads = plan.reduce_gradients(comm, &mut flat_grads)?; // the owned range of the sum
    drop(flat_grads);
    let local_sq: f64 = owned_grads.iter().map(|&g| g as f64 * g as f64).sum();
    let grad_norm = plan.sum_of_owned_parts(comm, local_sq + partitioned_sq)?.sqrt();
    let clip_coef = config.clip_factor(grad_norm);
    let range = plan.owned_range();
    let read_master = || {
        let mut weights = host(flat_tensor(&model, segments, None));
        weights.truncate(range.end);
        weights.drain(..range.start);
        weights
    };
    let pieces: Vec<(Range<usize>, bool)> = segments.iter().map(|s| (s.offset..s.offset + s.len, s.decay)).collect();
    let owned_params = state.update(read_master, config, optimizer_step, lr, clip_coef, &pieces, range.start, &owned_grads);
    let full = if plan.stage.shards_optimizer_state() {
        plan.gather_parameters(comm, owned_params)?
    } else {
        owned_params.to_vec() // every rank updated everything
    };
    let full = Tensor::from_data(TensorData::new(full, [plan.layout.len()]), &device);
    Ok((write_param_tensors(model, segments, full), StepReport { grad_norm, clip_coef }))
}

/// The flat owned range's update on the model's device: gradients concatenated into one device
/// buffer and reduced there ([`tensor_collectives`]), AdamW by the tensor formulation the
/// one-process step uses on GPUs ([`adamw_on_tensors`]), with the moments of `state`, the
/// updated range gathered and split back into the parameters, all device work. One value comes
/// back to the host: this rank's part of the squared gradient norm.
#[allow(clippy::too_many_arguments)]
fn device_step<B: AutodiffBackend, M: AutodiffModule<B>>(
    comm: &mut dyn Communicator,
    plan: &ZeroPlan,
    segments: &[Segment],
    state: &mut Option<Box<dyn Any + Send>>,
    partitioned_sq: Option<Tensor<B::InnerBackend, 1>>,
    config: &AdamWConfig,
    optimizer_step: u64,
    lr: f64,
    model: M,
    grads: &GradientsParams,
) -> Result<(M, StepReport), TrainError> {
    let range = plan.owned_range();
    let flat_grads = flat_tensor(&model, segments, Some(grads));
    let device = flat_grads.device();
    let owned_grads = match plan.stage {
        ZeroStage::Ddp => tensor_collectives::all_reduce_sum(comm, flat_grads)?,
        ZeroStage::Zero1 => tensor_collectives::all_reduce_sum(comm, flat_grads)?.narrow(0, range.start, range.len()),
        ZeroStage::Zero2 | ZeroStage::Zero3 => tensor_collectives::reduce_scatter_sum(comm, flat_grads, &plan.layout)?,
    };
    // Summed parameter by parameter, as the one-process step sums it: one f32 sum over the whole
    // flat buffer (10⁸ values) loses ≈ 1 % to rounding. ZeRO-3's partitioned weights add theirs.
    let local_sq = owned_pieces(segments, &range)
        .map(|(piece, _)| owned_grads.clone().narrow(0, piece.start, piece.len()).square().sum())
        .chain(partitioned_sq)
        .reduce(|total, piece| total + piece)
        .map_or(0.0, |total| total.into_scalar().elem::<f64>());
    let grad_norm = plan.sum_of_owned_parts(comm, local_sq)?.sqrt();
    let clip_coef = config.clip_factor(grad_norm);
    // As the host pass: the gradient is multiplied only when clipping (by 1 it keeps its bits).
    let owned_grads = if clip_coef < 1.0 { owned_grads.mul_scalar(clip_coef as f32) } else { owned_grads };
    let flat_params = flat_tensor(&model, segments, None);
    let owned_params = if range.len() == plan.layout.len() { flat_params } else { flat_params.narrow(0, range.start, range.len()) };
    let owned_state = match state.take() {
        Some(boxed) => *boxed.downcast::<DeviceState<B::InnerBackend>>().unwrap_or_else(|_| panic!("one backend per run")),
        None => DeviceState { moments: Moments::zeros(range.len(), &device), pieces: owned_pieces(segments, &range).collect() },
    };
    let scalars = |decays| AdamWScalars::new(config, lr, optimizer_step as i32, decays);
    let (owned_params, owned_state) = owned_state.update(owned_params, owned_grads, scalars);
    *state = Some(Box::new(owned_state));
    let full = if plan.stage.shards_optimizer_state() {
        tensor_collectives::all_gather(comm, owned_params, &plan.layout)?
    } else {
        owned_params // every rank updated everything
    };
    Ok((write_param_tensors(model, segments, full), StepReport { grad_norm, clip_coef }))
}

impl<B: Backend> DeviceState<B> {
    /// One AdamW update of the range `params` from its clipped gradient `grads`, with
    /// `scalars(decays)`: the tensor formulation, one call with the pieces exempt from weight
    /// decay (norms, biases) passed as ranges, or on the CPU backend, whose device is the host,
    /// its one threaded pass piece by piece (`cpu_adamw`; the same bits).
    fn update(self, params: Tensor<B, 1>, grads: Tensor<B, 1>, scalars: impl Fn(bool) -> AdamWScalars) -> (Tensor<B, 1>, Self) {
        let Self { moments, pieces } = self;
        #[cfg(feature = "ndarray")]
        if crate::cpu_adamw::applies::<B>() {
            let scaled: Vec<_> = pieces.iter().map(|(r, d)| (r.clone(), scalars(*d))).collect();
            let (params, moments) = crate::cpu_adamw::update_pieces(params, grads, moments, &scaled);
            return (params, Self { moments, pieces });
        }
        let decays = pieces.iter().any(|(_, decay)| *decay);
        // Without any decay the exempt ranges make no difference: none are passed.
        let exempt: Vec<_> = pieces.iter().filter(|(_, decay)| decays && !decay).map(|(r, _)| r.clone()).collect();
        let (params, moments) = adamw_on_tensors(params, grads, moments, &scalars(decays), &exempt);
        (params, Self { moments, pieces })
    }
}

impl<I: Backend> PartitionedParam<I> {
    /// The shard as one piece, with its weight decay.
    fn pieces(&self) -> Vec<(Range<usize>, bool)> {
        vec![(0..self.weight.owned_len(), !excluded_from_decay(&self.weight.path))]
    }

    /// One AdamW update of this rank's shard on the host (offloaded) from its summed gradient
    /// `grad`, read there, and the step's clipping factor: the f32 master (read from the shard at
    /// the first step) is updated and written to the shard.
    fn update_on_host(&mut self, grad: &[f32], clip_coef: f64, config: &AdamWConfig, step: u64, lr: f64) {
        let (len, pieces, weight) = (self.weight.owned_len(), self.pieces(), &self.weight);
        let state = match self.moments.get_or_insert_with(|| ShardMoments::Host(HostState::zeros(len))) {
            ShardMoments::Host(state) => state,
            ShardMoments::Device(_) => unreachable!("a shard's moments live where the flat range's do"),
        };
        let master = state.update(|| host(weight.values()), config, step, lr, clip_coef, &pieces, 0, grad);
        weight.update_values(|values| Tensor::from_data(TensorData::new(master.to_vec(), [len]), &values.device()));
    }

    /// One AdamW update of this rank's shard on its device from its summed gradient `grad` and
    /// the step's clipping factor (the flat range's [`DeviceState::update`]).
    fn update_on_device(&mut self, grad: Tensor<I, 1>, clip_coef: f64, config: &AdamWConfig, step: u64, lr: f64) {
        let (len, pieces, device) = (self.weight.owned_len(), self.pieces(), grad.device());
        let state = match self.moments.take() {
            None => DeviceState { moments: Moments::zeros(len, &device), pieces },
            Some(ShardMoments::Device(state)) => state,
            Some(ShardMoments::Host(_)) => unreachable!("a shard's moments live where the flat range's do"),
        };
        // As the flat range: the gradient is multiplied only when clipping.
        let grad = if clip_coef < 1.0 { grad.mul_scalar(clip_coef as f32) } else { grad };
        let mut updated = None;
        self.weight.update_values(|values| {
            let (values, state) = state.update(values, grad, |decays| AdamWScalars::new(config, lr, step as i32, decays));
            updated = Some(state);
            values
        });
        self.moments = updated.map(ShardMoments::Device);
    }
}

/// ZeRO-3's trainable partitioned weights, of the inner backend `I` (none without ZeRO-3).
fn partitioned_of<I: Backend>(partitioned: &mut Option<Box<dyn Any + Send>>) -> &mut [PartitionedParam<I>] {
    match partitioned {
        Some(boxed) => boxed.downcast_mut::<Vec<PartitionedParam<I>>>().unwrap_or_else(|| panic!("one backend per run")),
        None => &mut [],
    }
}

/// The parameters' parts inside the owned `range`: each one's range relative to `range.start`
/// and whether weight decay applies to it.
fn owned_pieces<'a>(segments: &'a [Segment], range: &'a Range<usize>) -> impl Iterator<Item = (Range<usize>, bool)> + 'a {
    segments
        .iter()
        .map(|s| (s.offset.max(range.start), (s.offset + s.len).min(range.end), s.decay))
        .filter(|(lo, hi, _)| lo < hi)
        .map(|(lo, hi, decay)| (lo - range.start..hi - range.start, decay))
}

/// The trainable parameters of `model` in module order, with their offsets.
fn segments<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Vec<Segment> {
    let mut visitor = Trainable { path: Vec::new(), segments: Vec::new(), offset: 0 };
    model.visit(&mut visitor);
    visitor.segments
}

struct Trainable {
    path: Vec<String>,
    segments: Vec<Segment>,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let path = self.path.join(".");
        let len = param.shape().num_elements();
        let decay = !excluded_from_decay(&path);
        self.segments.push(Segment { path, id: param.id, offset: self.offset, len, decay });
        self.offset += len;
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert")
}

/// The trainable parameters in segment order as one flat tensor on their device: their values,
/// or with `grads` their gradients (zeros for a parameter without one).
fn flat_tensor<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    segments: &[Segment],
    grads: Option<&GradientsParams>,
) -> Tensor<B::InnerBackend, 1> {
    struct Flatten<'a, I: Backend> {
        ids: std::collections::HashSet<ParamId>,
        grads: Option<&'a GradientsParams>,
        parts: Vec<Tensor<I, 1>>,
    }
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for Flatten<'_, AD::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if !self.ids.contains(&param.id) {
                return;
            }
            let value = param.val().inner();
            let len = value.shape().num_elements();
            self.parts.push(match self.grads {
                None => value.reshape([len]),
                Some(grads) => match grads.get::<AD::InnerBackend, D>(param.id) {
                    Some(grad) => grad.reshape([len]),
                    None => Tensor::zeros([len], &value.device()),
                },
            });
        }
    }
    let mut visitor = Flatten::<B::InnerBackend> { ids: segments.iter().map(|s| s.id).collect(), grads, parts: Vec::new() };
    model.visit(&mut visitor);
    Tensor::cat(visitor.parts, 0)
}

/// `flat` (the trainable parameters' gradients in segment order) as one gradient per parameter
/// of `model`, each in its parameter's shape.
fn gradients_from_flat<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    segments: &[Segment],
    flat: Tensor<B::InnerBackend, 1>,
) -> GradientsParams {
    struct Split<'a, I: Backend> {
        by_id: HashMap<ParamId, &'a Segment>,
        flat: Tensor<I, 1>,
        grads: GradientsParams,
    }
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for Split<'_, AD::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            let Some(s) = self.by_id.get(&param.id).copied() else { return };
            let part = self.flat.clone().narrow(0, s.offset, s.len).reshape(param.shape());
            self.grads.register::<AD::InnerBackend, D>(param.id, part);
        }
    }
    let mut visitor = Split::<B::InnerBackend> { by_id: segments.iter().map(|s| (s.id, s)).collect(), flat, grads: GradientsParams::new() };
    model.visit(&mut visitor);
    visitor.grads
}

/// `model` with its trainable parameters replaced by their parts of `flat` (segment order), on
/// the device.
fn write_param_tensors<B: AutodiffBackend, M: AutodiffModule<B>>(model: M, segments: &[Segment], flat: Tensor<B::InnerBackend, 1>) -> M {
    struct Write<'a, I: Backend> {
        by_id: HashMap<ParamId, &'a Segment>,
        flat: Tensor<I, 1>,
    }
    impl<AD: AutodiffBackend> ModuleMapper<AD> for Write<'_, AD::InnerBackend> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
            let Some(s) = self.by_id.get(&param.id).copied() else { return param };
            let (id, tensor, mapper) = param.consume();
            let part = self.flat.clone().narrow(0, s.offset, s.len).reshape(tensor.shape());
            Param::from_mapped_value(id, Tensor::from_inner(part).require_grad(), mapper)
        }
    }
    let mut mapper = Write::<B::InnerBackend> { by_id: segments.iter().map(|s| (s.id, s)).collect(), flat };
    model.map(&mut mapper)
}
