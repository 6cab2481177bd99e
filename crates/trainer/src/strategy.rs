//! How the ranks of a run share each optimizer step. The loop in [`crate::train`] calls a
//! [`Strategy`] at the few points where ranks differ, and never asks which one it has:
//!
//! | | [`SingleProcess`] | [`DataParallel`] (DDP, ZeRO-1/2/3) |
//! |---|---|---|
//! | before the first step | nothing | rank 0's weights broadcast; ZeRO-3 shards; the resumed moments' own shard |
//! | a micro-batch | all of it | this rank's rows (ZeRO-3: a zero-weighted pass when it has none) |
//! | the update | [`AdamW::step`] on the device | gradients reduced over the group, AdamW on the owned shard (on the device; on the host when offloaded); 8-bit AdamW, RMSprop: DDP only, [`AdamW::step`] on every rank |
//! | the step's metrics | left on the device until a logging step | summed over the group (read every step) |
//! | a checkpoint | the optimizer as it is | the moments gathered from every rank |
//! | after the last step | nothing | the whole model gathered on every rank |
//!
//! [`Parallelism`] is what a launched binary holds: the strategy its environment describes.

use crate::data_parallel::{DataParallel, MetricSums};
use crate::logging::MetricsAccumulator;
use crate::optimizer::{AdamW, AdamWConfig, UpdateRule};
use crate::task::metric_values;
use crate::TrainError;
use alignment_models::CausalLm;
use alignment_objectives::DeferredMetrics;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

/// What one optimizer step leaves for the log, in the form the strategy has it.
pub enum StepValues<B: AutodiffBackend> {
    /// Still on the device: each counted micro-batch's metrics with its weight, and the gradient
    /// norm (`[1]`), read together at the next logging step.
    OnDevice { metrics: Vec<(DeferredMetrics<B>, f64)>, grad_norm: Tensor<B::InnerBackend, 1> },
    /// Already read, by the collective that summed them over the group: (name, Σ value·weight,
    /// Σ weight) and the gradient norm.
    Read { sums: MetricSums, grad_norm: f64 },
}

/// What a checkpoint saves, in the one-process format whatever the strategy.
pub struct CheckpointState<B: Backend> {
    /// Every parameter's moments and the step count.
    pub optimizer: AdamW<B>,
    /// The whole model (ZeRO-3's shards gathered).
    pub model: CausalLm<B>,
}

/// One way of sharing the work of each step among the ranks of a run (module docs).
pub trait Strategy {
    /// Number of ranks; the global batch is this times the per-rank batch.
    fn world_size(&self) -> usize;

    /// Whether this rank writes the run's files and progress.
    fn is_main(&self) -> bool;

    /// Whether every step is this process's alone ([`SingleProcess`]): what a step replayed from
    /// a CUDA graph needs (`crate::graph_steps`; collectives are not captured).
    fn single_process(&self) -> bool {
        false
    }

    /// The launcher's `mixed_precision` (accelerate config): `no`, `bf16` or `fp16`.
    fn launcher_precision(&self) -> &str;

    /// Refuses an optimizer the strategy cannot run (8-bit AdamW and RMSprop under ZeRO), so a
    /// run can say so before it loads anything; [`Strategy::prepare`] refuses it too.
    fn check_optimizer(&self, _config: &AdamWConfig) -> Result<(), TrainError> {
        Ok(())
    }

    /// Brings `model` (and, when `resumed`, `optimizer`'s restored moments) into the form the
    /// steps need. Refuses what the strategy cannot run.
    fn prepare<B: AutodiffBackend>(
        &mut self,
        model: CausalLm<B>,
        optimizer: &mut AdamW<B::InnerBackend>,
        resumed: bool,
    ) -> Result<CausalLm<B>, TrainError>;

    /// The rows of `micro_batch` this rank computes, and whether they count: `false` for a
    /// zero-weighted pass of a rank without rows, run only to take part in the collectives
    /// inside the passes (ZeRO-3).
    fn part<'a, T>(&self, micro_batch: &'a [T]) -> (&'a [T], bool);

    /// The first failure of a collective inside the last forward/backward pass (ZeRO-3 gathers
    /// and reduces inside them, where errors cannot be returned).
    fn check(&self) -> Result<(), TrainError>;

    /// Applies the step's gradients `grads` (already normalised by the global step's weight;
    /// consumed, see [`AdamW::step`]) with learning rate `lr`. `metrics` are this rank's counted
    /// micro-batches and `tokens` their token count; returns the updated model, the step's
    /// values and the step's tokens over all ranks.
    fn update<B: AutodiffBackend>(
        &mut self,
        optimizer: &mut AdamW<B::InnerBackend>,
        lr: f64,
        model: CausalLm<B>,
        grads: GradientsParams,
        metrics: Vec<(DeferredMetrics<B>, f64)>,
        tokens: usize,
    ) -> Result<(CausalLm<B>, StepValues<B>, usize), TrainError>;

    /// What a checkpoint saves: the whole optimizer state and model in the one-process format.
    /// Every rank calls it (a collective for data-parallel runs).
    fn checkpoint_state<B: AutodiffBackend>(
        &mut self,
        optimizer: &AdamW<B::InnerBackend>,
        model: &CausalLm<B>,
        device: &B::Device,
    ) -> Result<CheckpointState<B::InnerBackend>, TrainError>;

    /// Waits for every rank (after rank 0 wrote a checkpoint).
    fn barrier(&mut self) -> Result<(), TrainError>;

    /// After the last step: the whole model on every rank.
    fn finish<B: AutodiffBackend>(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>, TrainError>;

    /// At the very end, after the final model was saved: prints what the rank held, and waits
    /// for every rank.
    fn conclude(&mut self) -> Result<(), TrainError>;
}

/// One process computes every step on its device.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Strategy for SingleProcess {
    fn world_size(&self) -> usize {
        1
    }

    fn single_process(&self) -> bool {
        true
    }

    fn is_main(&self) -> bool {
        true
    }

    fn launcher_precision(&self) -> &str {
        "no"
    }

    fn prepare<B: AutodiffBackend>(
        &mut self,
        model: CausalLm<B>,
        _: &mut AdamW<B::InnerBackend>,
        _: bool,
    ) -> Result<CausalLm<B>, TrainError> {
        Ok(model)
    }

    fn part<'a, T>(&self, micro_batch: &'a [T]) -> (&'a [T], bool) {
        (micro_batch, true)
    }

    fn check(&self) -> Result<(), TrainError> {
        Ok(())
    }

    fn update<B: AutodiffBackend>(
        &mut self,
        optimizer: &mut AdamW<B::InnerBackend>,
        lr: f64,
        model: CausalLm<B>,
        grads: GradientsParams,
        metrics: Vec<(DeferredMetrics<B>, f64)>,
        tokens: usize,
    ) -> Result<(CausalLm<B>, StepValues<B>, usize), TrainError> {
        let (updated, report) = optimizer.step(lr, model, grads);
        Ok((updated, StepValues::OnDevice { metrics, grad_norm: report.grad_norm }, tokens))
    }

    fn checkpoint_state<B: AutodiffBackend>(
        &mut self,
        optimizer: &AdamW<B::InnerBackend>,
        model: &CausalLm<B>,
        _: &B::Device,
    ) -> Result<CheckpointState<B::InnerBackend>, TrainError> {
        // Tensor handles: no copy of the values.
        Ok(CheckpointState { optimizer: optimizer.clone(), model: model.valid() })
    }

    fn barrier(&mut self) -> Result<(), TrainError> {
        Ok(())
    }

    fn finish<B: AutodiffBackend>(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>, TrainError> {
        Ok(model)
    }

    fn conclude(&mut self) -> Result<(), TrainError> {
        // On the libtorch route with a GPU: the device's peaks in torch's allocator.
        #[cfg(feature = "tch")]
        if let Some(line) = crate::tch_device_memory::summary() {
            eprintln!("device memory: {line}");
        }
        Ok(())
    }
}

impl Strategy for DataParallel {
    fn world_size(&self) -> usize {
        DataParallel::world_size(self)
    }

    fn is_main(&self) -> bool {
        DataParallel::is_main(self)
    }

    fn launcher_precision(&self) -> &str {
        &self.mixed_precision
    }

    fn check_optimizer(&self, config: &AdamWConfig) -> Result<(), TrainError> {
        match config.rule {
            UpdateRule::AdamW => Ok(()),
            rule => self.can_keep_optimizer_whole().map_err(|reason| unshardable(rule, reason)),
        }
    }

    fn prepare<B: AutodiffBackend>(
        &mut self,
        model: CausalLm<B>,
        optimizer: &mut AdamW<B::InnerBackend>,
        resumed: bool,
    ) -> Result<CausalLm<B>, TrainError> {
        if optimizer.config.rule != UpdateRule::AdamW {
            // Its state is not sharded: under DDP every rank keeps it whole and runs the
            // one-process update; a resumed one is already whole on every rank.
            self.keep_optimizer_whole().map_err(|reason| unshardable(optimizer.config.rule, reason))?;
            return self.broadcast_parameters(model);
        }
        let model = self.broadcast_parameters(model)?;
        let model = self.partition(model)?; // ZeRO-3: each rank keeps its shard of the embedding and projections
        if resumed {
            self.restore_optimizer(&model, optimizer)?; // this rank's shard of the moments
            optimizer.state.clear();
        }
        Ok(model)
    }

    fn part<'a, T>(&self, micro_batch: &'a [T]) -> (&'a [T], bool) {
        match DataParallel::part(self, micro_batch) {
            [] if self.needs_lockstep() => (&micro_batch[..micro_batch.len().min(1)], false),
            part => (part, true),
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        DataParallel::check(self)
    }

    fn update<B: AutodiffBackend>(
        &mut self,
        optimizer: &mut AdamW<B::InnerBackend>,
        lr: f64,
        model: CausalLm<B>,
        grads: GradientsParams,
        metrics: Vec<(DeferredMetrics<B>, f64)>,
        tokens: usize,
    ) -> Result<(CausalLm<B>, StepValues<B>, usize), TrainError> {
        // The ranks' metrics are summed now (a collective), so they are read every step.
        let mut local = MetricsAccumulator::default();
        for (values, weight) in metrics {
            local.add(metric_values(values).iter().map(|(k, v)| (k.as_str(), *v)), weight);
        }
        let (sums, tokens) = self.reduce_metrics(local.sums(), tokens)?;
        if self.keeps_optimizer_whole() {
            let grads = self.all_reduce_gradients(&model, &grads)?;
            let (updated, report) = optimizer.step(lr, model, grads);
            self.note_whole_optimizer_bytes(optimizer.state_bytes());
            let grad_norm = report.grad_norm.into_scalar().elem::<f64>();
            return Ok((updated, StepValues::Read { sums, grad_norm }, tokens));
        }
        optimizer.step += 1;
        let (updated, report) = self.step(&optimizer.config, optimizer.step, lr, model, &grads)?;
        Ok((updated, StepValues::Read { sums, grad_norm: report.grad_norm }, tokens))
    }

    fn checkpoint_state<B: AutodiffBackend>(
        &mut self,
        optimizer: &AdamW<B::InnerBackend>,
        model: &CausalLm<B>,
        device: &B::Device,
    ) -> Result<CheckpointState<B::InnerBackend>, TrainError> {
        if self.keeps_optimizer_whole() {
            // Every rank holds all of it, and the whole model (DDP).
            return Ok(CheckpointState { optimizer: optimizer.clone(), model: model.valid() });
        }
        let optimizer = self.gather_optimizer(optimizer.config, optimizer.step, device)?;
        Ok(CheckpointState { optimizer, model: self.gathered(&model.valid())? })
        // collective with ZeRO-3
    }

    fn barrier(&mut self) -> Result<(), TrainError> {
        DataParallel::barrier(self)
    }

    fn finish<B: AutodiffBackend>(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>, TrainError> {
        self.note_training_peak();
        self.gathered(&model) // collective with ZeRO-3
    }

    fn conclude(&mut self) -> Result<(), TrainError> {
        eprintln!("{}", self.memory_summary());
        DataParallel::barrier(self)
    }
}

/// The error for an update rule whose state cannot be sharded, under a ZeRO stage.
fn unshardable(rule: UpdateRule, reason: String) -> TrainError {
    TrainError::Config { key: "optim".into(), message: format!("{}: {reason}", rule.describe()) }
}

/// The strategy a launched process's environment describes: a [`DataParallel`] rank under
/// torchrun/Slurm/accelerate variables, else [`SingleProcess`].
#[derive(Debug)]
pub enum Parallelism {
    Single(SingleProcess),
    Data(Box<DataParallel>),
}

impl Parallelism {
    /// Reads the environment ([`DataParallel::from_env`]).
    pub fn from_env() -> Result<Self, TrainError> {
        Ok(DataParallel::from_env()?.map_or(Self::Single(SingleProcess), |group| Self::Data(Box::new(group))))
    }
}

/// Calls `$call` with `$s` bound to whichever strategy `$self` holds (`ref`: shared, `mut`:
/// exclusive).
macro_rules! delegate {
    (ref $self:ident, $s:ident => $call:expr) => {
        match $self {
            Parallelism::Single($s) => $call,
            Parallelism::Data(group) => {
                let $s: &DataParallel = group;
                $call
            }
        }
    };
    (mut $self:ident, $s:ident => $call:expr) => {
        match $self {
            Parallelism::Single($s) => $call,
            Parallelism::Data(group) => {
                let $s: &mut DataParallel = group;
                $call
            }
        }
    };
}

impl Strategy for Parallelism {
    fn world_size(&self) -> usize {
        delegate!(ref self, s => s.world_size())
    }

    fn is_main(&self) -> bool {
        delegate!(ref self, s => Strategy::is_main(s))
    }

    fn single_process(&self) -> bool {
        delegate!(ref self, s => Strategy::single_process(s))
    }

    fn launcher_precision(&self) -> &str {
        delegate!(ref self, s => s.launcher_precision())
    }

    fn check_optimizer(&self, config: &AdamWConfig) -> Result<(), TrainError> {
        delegate!(ref self, s => s.check_optimizer(config))
    }

    fn prepare<B: AutodiffBackend>(
        &mut self,
        model: CausalLm<B>,
        optimizer: &mut AdamW<B::InnerBackend>,
        resumed: bool,
    ) -> Result<CausalLm<B>, TrainError> {
        delegate!(mut self, s => s.prepare(model, optimizer, resumed))
    }

    fn part<'a, T>(&self, micro_batch: &'a [T]) -> (&'a [T], bool) {
        delegate!(ref self, s => Strategy::part(s, micro_batch))
    }

    fn check(&self) -> Result<(), TrainError> {
        delegate!(ref self, s => Strategy::check(s))
    }

    fn update<B: AutodiffBackend>(
        &mut self,
        optimizer: &mut AdamW<B::InnerBackend>,
        lr: f64,
        model: CausalLm<B>,
        grads: GradientsParams,
        metrics: Vec<(DeferredMetrics<B>, f64)>,
        tokens: usize,
    ) -> Result<(CausalLm<B>, StepValues<B>, usize), TrainError> {
        delegate!(mut self, s => s.update(optimizer, lr, model, grads, metrics, tokens))
    }

    fn checkpoint_state<B: AutodiffBackend>(
        &mut self,
        optimizer: &AdamW<B::InnerBackend>,
        model: &CausalLm<B>,
        device: &B::Device,
    ) -> Result<CheckpointState<B::InnerBackend>, TrainError> {
        delegate!(mut self, s => s.checkpoint_state(optimizer, model, device))
    }

    fn barrier(&mut self) -> Result<(), TrainError> {
        delegate!(mut self, s => Strategy::barrier(s))
    }

    fn finish<B: AutodiffBackend>(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>, TrainError> {
        delegate!(mut self, s => s.finish(model))
    }

    fn conclude(&mut self) -> Result<(), TrainError> {
        delegate!(mut self, s => s.conclude())
    }
}
