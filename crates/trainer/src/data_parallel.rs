//! Data-parallel training across processes — DDP and ZeRO stages 1-3 — on the collectives of
//! `alignment-distributed`: everything the loop does differently when there are N ranks.
//!
//! ```text
//! every rank: the same permutation of the examples; each micro-batch of the global step is
//!             split into N contiguous parts and rank r computes part r (loss ÷ global weight)
//! gradients → one flat host vector, in module order of the trainable parameters
//!   DDP:      all-reduce                 → every rank holds the summed gradient
//!   ZeRO-1:   all-reduce, keep own shard → AdamW moments only for the own shard
//!   ZeRO-2/3: reduce-scatter             → own shard of the gradient and of the moments
//! global gradient norm (partial sums of squares all-reduced) → clip coefficient
//! AdamW on the owned range only; ZeRO-1/2/3: all-gather the updated parameters
//! parameters written back into the model (identical on every rank)
//! ```
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
//! For the flat vector, burn's backward pass produces every gradient at once, so ZeRO-2 shards
//! the gradient kept after the reduction, not the peak inside the backward pass (ZeRO-3's
//! partitioned weights do reduce inside it). See docs/distributed.md.

use crate::optimizer::{adamw_on_slices, excluded_from_decay, AdamW, AdamWConfig, AdamWScalars, Moments, StepReport};
use crate::zero3::{self, Group, ShardedWeight};
use crate::TrainError;
#[cfg(not(feature = "cuda"))]
use alignment_distributed::TcpCommunicator;
use alignment_distributed::{AccelerateConfig, Communicator, DistEnv, ShardLayout, ZeroPlan, ZeroStage};
use alignment_models::compressed::CompressedWeight;
use alignment_models::CausalLm;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
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
#[derive(Debug)]
struct Shards {
    segments: Vec<Segment>,
    plan: ZeroPlan,
    /// AdamW moments of `plan.owned_range()`.
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// A ZeRO-3 weight and the AdamW moments of this rank's shard of it.
#[derive(Debug)]
struct PartitionedParam {
    weight: Arc<ShardedWeight>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

impl PartitionedParam {
    fn new(weight: Arc<ShardedWeight>) -> Self {
        let owned = weight.values().len();
        Self { weight, exp_avg: vec![0.0; owned], exp_avg_sq: vec![0.0; owned] }
    }
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
    sharded: Vec<Arc<ShardedWeight>>,
    /// The trainable ones among them, with their moments.
    partitioned: Vec<PartitionedParam>,
    metric_names: Option<Vec<String>>,
    /// Peak RSS at the end of the training steps ([`DataParallel::note_training_peak`]).
    training_peak: Option<u64>,
    /// The accelerate config's `mixed_precision` (`no`, `bf16`, `fp16`): what the launcher
    /// asked of every rank, on top of the recipe's `bf16`.
    pub mixed_precision: String,
    /// The accelerate config's `deepspeed_config.offload_optimizer_device` (`Some(true)`: cpu,
    /// `Some(false)`: none, which is not implemented: the optimizer state stays on the host).
    pub offload_optimizer: Option<bool>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataParallel {{ rank {}/{}, {:?} }}", self.rank(), self.world_size(), self.stage)
    }
}

impl DataParallel {
    /// A group over `comm` with `stage`.
    pub fn new(comm: Box<dyn Communicator>, stage: ZeroStage) -> Self {
        Self {
            group: Arc::new(Group::new(comm)),
            stage,
            shards: None,
            sharded: Vec::new(),
            partitioned: Vec::new(),
            metric_names: None,
            training_peak: None,
            mixed_precision: "no".into(),
            offload_optimizer: None,
        }
    }

    /// The group the environment describes (torchrun/Slurm variables, the accelerate config
    /// named by `ALIGNMENT_ACCELERATE_CONFIG`; DDP when none), `None` for a single process.
    /// Collectives go through NCCL in a `cuda` build (each rank on GPU `LOCAL_RANK`, NVLink
    /// between them), through TCP otherwise.
    pub fn from_env() -> Result<Option<Self>, TrainError> {
        let Some(env) = DistEnv::from_env()? else {
            return Ok(None);
        };
        let accelerate = AccelerateConfig::from_env()?;
        let stage = accelerate.as_ref().map_or(ZeroStage::Ddp, |c| c.stage);
        let timeout = alignment_distributed::timeout_from_env()?;
        #[cfg(feature = "cuda")]
        let comm: Box<dyn Communicator> = Box::new(alignment_distributed::NcclCommunicator::connect(&env, timeout)?);
        #[cfg(not(feature = "cuda"))]
        let comm: Box<dyn Communicator> = Box::new(TcpCommunicator::connect(&env, timeout)?);
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

    /// ZeRO-3: replaces the model's trainable embedding and projections by this rank's shards
    /// of them (see [`crate::zero3`]); other stages return `model` as it is. Call once, after
    /// [`DataParallel::broadcast_parameters`].
    pub fn partition<B: AutodiffBackend>(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>, TrainError> {
        if self.stage != ZeroStage::Zero3 {
            return Ok(model);
        }
        let (model, sharded) = zero3::partition(model, &self.group)?;
        self.partitioned = sharded.iter().filter(|w| w.is_trainable()).cloned().map(PartitionedParam::new).collect();
        self.sharded = sharded;
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
        Ok(zero3::gathered(model, &self.sharded)?)
    }

    /// This rank's part of a micro-batch of the global step: contiguous, sizes differing by at
    /// most one, earlier ranks taking the extra examples.
    pub fn part<'a, T>(&self, micro_batch: &'a [T]) -> &'a [T] {
        let layout = ShardLayout::new(micro_batch.len(), self.world_size());
        &micro_batch[layout.range(self.rank())]
    }

    /// Makes every rank start from rank 0's trainable parameters, one tensor at a time (so the
    /// transient copy is one tensor, not the whole model).
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
                let (shape, device) = (tensor.shape(), tensor.device());
                let mut values = host(tensor.inner());
                if let Err(e) = self.comm.broadcast(&mut values, 0) {
                    self.failure = Some(e);
                }
                let inner = Tensor::<B::InnerBackend, D>::from_data(TensorData::new(values, shape), &device);
                Param::from_mapped_value(id, Tensor::from_inner(inner).require_grad(), mapper)
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
    /// globally normalised) gradients `grads`.
    pub fn step<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        config: &AdamWConfig,
        optimizer_step: u64,
        lr: f64,
        model: M,
        grads: &GradientsParams,
    ) -> Result<(M, StepReport), TrainError> {
        self.ensure_shards(&model);
        let Self { group, stage, shards, partitioned, .. } = self;
        let mut comm = group.lock();
        let (comm, stage, shards) = (&mut **comm, *stage, shards.as_mut().expect("built by ensure_shards"));
        let plan = shards.plan;
        let mut flat_grads = flatten_grads::<B, M>(&model, grads, &shards.segments);
        let owned_grads = plan.reduce_gradients(comm, &mut flat_grads)?; // the owned range of the sum
        drop(flat_grads);
        // ZeRO-3's partitioned weights: their gradient shards were summed inside the backward pass.
        let partitioned_grads: Vec<Vec<f32>> = partitioned.iter().map(|p| p.weight.take_gradient()).collect();
        let grad_norm = plan.global_sq_norm(comm, owned_grads.iter().chain(partitioned_grads.iter().flatten()))?.sqrt();
        let clip_coef = config.clip_factor(grad_norm);
        let range = plan.owned_range();
        let mut owned_params = flatten_params(&model, &shards.segments);
        owned_params.truncate(range.end);
        owned_params.drain(..range.start);
        let pieces: Vec<(Range<usize>, bool)> = shards.segments.iter().map(|s| (s.offset..s.offset + s.len, s.decay)).collect();
        adamw_update(
            config,
            optimizer_step,
            lr,
            clip_coef,
            &pieces,
            range.start,
            &mut owned_params,
            &owned_grads,
            &mut shards.exp_avg,
            &mut shards.exp_avg_sq,
        );
        for (p, grad) in partitioned.iter_mut().zip(&partitioned_grads) {
            let whole = 0..p.weight.layout().len();
            let pieces = [(whole, !excluded_from_decay(&p.weight.path))];
            let mut values = p.weight.values();
            adamw_update(
                config,
                optimizer_step,
                lr,
                clip_coef,
                &pieces,
                p.weight.owned_start(),
                &mut values,
                grad,
                &mut p.exp_avg,
                &mut p.exp_avg_sq,
            );
        }
        let full = match stage {
            ZeroStage::Ddp => owned_params, // every rank updated everything
            ZeroStage::Zero1 | ZeroStage::Zero2 | ZeroStage::Zero3 => plan.gather_parameters(comm, &owned_params)?,
        };
        let model = write_params(model, &shards.segments, &full);
        Ok((model, StepReport { grad_norm, clip_coef }))
    }

    /// The whole optimizer state in the one-process format (moments gathered from all ranks),
    /// for rank 0 to checkpoint. Every rank must call it (it is a collective).
    pub fn gather_optimizer<B: Backend>(&mut self, config: AdamWConfig, step: u64, device: &B::Device) -> Result<AdamW<B>, TrainError> {
        let mut optimizer = AdamW::new(config);
        optimizer.step = step;
        let Some(shards) = &self.shards else { return Ok(optimizer) };
        let mut comm = self.group.lock();
        for p in &self.partitioned {
            let layout = p.weight.layout();
            let tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [layout.len()]), device);
            let moments = Moments {
                exp_avg: tensor(comm.all_gather(&p.exp_avg, layout)?),
                exp_avg_sq: tensor(comm.all_gather(&p.exp_avg_sq, layout)?),
            };
            optimizer.state.insert(p.weight.path.clone(), moments);
        }
        let (exp_avg, exp_avg_sq) = match self.stage {
            ZeroStage::Ddp => (shards.exp_avg.clone(), shards.exp_avg_sq.clone()),
            _ => (comm.all_gather(&shards.exp_avg, &shards.plan.layout)?, comm.all_gather(&shards.exp_avg_sq, &shards.plan.layout)?),
        };
        if exp_avg.is_empty() {
            return Ok(optimizer);
        }
        for s in &shards.segments {
            let tensor = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v[s.offset..s.offset + s.len].to_vec(), [s.len]), device);
            optimizer.state.insert(s.path.clone(), Moments { exp_avg: tensor(&exp_avg), exp_avg_sq: tensor(&exp_avg_sq) });
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
        shards.exp_avg = m[range.clone()].to_vec();
        shards.exp_avg_sq = v[range].to_vec();
        for p in &mut self.partitioned {
            let Some(moments) = optimizer.state.get(&p.weight.path) else { continue };
            let start = p.weight.owned_start();
            let len = p.exp_avg.len();
            p.exp_avg = host(moments.exp_avg.clone())[start..start + len].to_vec();
            p.exp_avg_sq = host(moments.exp_avg_sq.clone())[start..start + len].to_vec();
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
        format!(
            "rank {}/{} ({:?}): kept between steps: parameters {:.1} MiB, gradients {:.1} MiB, AdamW moments {:.1} MiB; peak RSS {peak}",
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
        let Some(s) = &self.shards else { return HeldState::default() };
        let total: usize = s.segments.iter().map(|s| s.len).sum();
        // The summed gradient a reduction leaves: all of it for DDP and ZeRO-1 (all-reduce), the
        // own shard for ZeRO-2/3 (reduce-scatter).
        let grads = if self.stage.shards_gradients() { s.plan.owned_range().len() } else { total };
        // ZeRO-3's partitioned weights: only the own shard of values, gradient and moments.
        let shard: usize = self.partitioned.iter().map(|p| p.exp_avg.len()).sum();
        HeldState {
            params: 4 * (total + shard),
            grads: 4 * (grads + shard),
            optimizer: 4 * (s.exp_avg.len() + s.exp_avg_sq.len() + 2 * shard),
        }
    }

    /// Builds the flat layout and moment buffers from `model`'s trainable parameters on first
    /// use.
    fn ensure_shards<B: AutodiffBackend, M: AutodiffModule<B>>(&mut self, model: &M) {
        if self.shards.is_none() {
            let segments = segments(model);
            let total = segments.iter().map(|s| s.len).sum();
            let plan = ZeroPlan::new(self.stage, total, &**self.group.lock());
            let owned = plan.owned_range().len();
            self.shards = Some(Shards { segments, plan, exp_avg: vec![0.0; owned], exp_avg_sq: vec![0.0; owned] });
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

/// The trainable parameters' values, concatenated in segment order.
fn flatten_params<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, segments: &[Segment]) -> Vec<f32> {
    struct Collect<'a> {
        by_id: HashMap<ParamId, &'a Segment>,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(s) = self.by_id.get(&param.id) {
                debug_assert_eq!(s.offset, self.out.len());
                self.out.extend(host(param.val().inner()));
            }
        }
    }
    let mut visitor = Collect { by_id: segments.iter().map(|s| (s.id, s)).collect(), out: Vec::new() };
    model.visit(&mut visitor);
    visitor.out
}

/// This rank's gradients of the trainable parameters, concatenated in segment order (zeros
/// for a parameter without gradient, e.g. a rank that had no examples).
fn flatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams, segments: &[Segment]) -> Vec<f32> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        by_id: HashMap<ParamId, &'a Segment>,
        out: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(s) = self.by_id.get(&param.id) {
                match self.grads.get::<B::InnerBackend, D>(param.id) {
                    Some(g) => self.out.extend(host(g)),
                    None => self.out.resize(self.out.len() + s.len, 0.0),
                }
            }
        }
    }
    let mut visitor = Collect { grads, by_id: segments.iter().map(|s| (s.id, s)).collect(), out: Vec::new() };
    model.visit(&mut visitor);
    visitor.out
}

/// `model` with its trainable parameters replaced by the values of `flat` (segment order).
fn write_params<B: AutodiffBackend, M: AutodiffModule<B>>(model: M, segments: &[Segment], flat: &[f32]) -> M {
    struct Write<'a> {
        by_id: HashMap<ParamId, &'a Segment>,
        flat: &'a [f32],
    }
    impl<B: AutodiffBackend> ModuleMapper<B> for Write<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let Some(s) = self.by_id.get(&param.id).copied() else { return param };
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let device = tensor.device();
            let values = TensorData::new(self.flat[s.offset..s.offset + s.len].to_vec(), shape);
            let inner = Tensor::<B::InnerBackend, D>::from_data(values, &device);
            Param::from_mapped_value(id, Tensor::from_inner(inner).require_grad(), mapper)
        }
    }
    let mut mapper = Write { by_id: segments.iter().map(|s| (s.id, s)).collect(), flat };
    model.map(&mut mapper)
}
