//! ZeRO stages: what each shards, the accelerate-style configs that select them, per-rank memory,
//! and [`ZeroPlan`], the gradient/parameter synchronisation the trainer performs around AdamW.

use crate::{Communicator, DistError, ShardLayout};
use serde::Deserialize;
use std::fmt;
use std::ops::Range;
use std::path::Path;

/// How data-parallel ranks divide the training state (DeepSpeed's ZeRO stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ZeroStage {
    /// Plain data parallelism (accelerate `MULTI_GPU`, DeepSpeed stage 0): every rank keeps
    /// everything; gradients are all-reduced.
    #[default]
    Ddp,
    /// ZeRO-1: the optimizer state (fp32 master weights, Adam moments) is sharded.
    Zero1,
    /// ZeRO-2: optimizer state and gradients are sharded (gradients are reduce-scattered).
    Zero2,
    /// ZeRO-3: optimizer state, gradients and parameters are sharded; parameters are gathered
    /// layer by layer when needed.
    Zero3,
}

impl ZeroStage {
    /// DeepSpeed's `zero_stage` number (0-3).
    pub fn from_deepspeed_stage(stage: u64) -> Option<Self> {
        match stage {
            0 => Some(ZeroStage::Ddp),
            1 => Some(ZeroStage::Zero1),
            2 => Some(ZeroStage::Zero2),
            3 => Some(ZeroStage::Zero3),
            _ => None,
        }
    }

    /// DeepSpeed's stage number (Ddp is 0).
    pub fn index(self) -> u8 {
        self as u8
    }

    /// Whether each rank keeps optimizer state only for its own shard.
    pub fn shards_optimizer_state(self) -> bool {
        self != ZeroStage::Ddp
    }

    /// Whether each rank keeps only its shard of the summed gradients (reduce-scatter).
    pub fn shards_gradients(self) -> bool {
        matches!(self, ZeroStage::Zero2 | ZeroStage::Zero3)
    }

    /// Whether each rank keeps only its shard of the parameters between steps.
    pub fn shards_parameters(self) -> bool {
        self == ZeroStage::Zero3
    }

    /// The fraction of each kind of state one rank holds persistently among `world_size` ranks.
    pub fn fractions(self, world_size: usize) -> StateFractions {
        let shard = 1.0 / world_size.max(1) as f64;
        let pick = |sharded: bool| if sharded { shard } else { 1.0 };
        StateFractions {
            params: pick(self.shards_parameters()),
            grads: pick(self.shards_gradients()),
            optimizer: pick(self.shards_optimizer_state()),
        }
    }

    /// Persistent bytes per rank for a model of `n_params` parameters (the ZeRO paper's model
    /// states; activations, temporary buffers and ZeRO-3's gathered layer are not included).
    pub fn memory_per_rank(self, n_params: u64, world_size: usize, bytes: StateBytes) -> MemoryPerRank {
        let f = self.fractions(world_size);
        let n = n_params as f64;
        MemoryPerRank {
            params: n * bytes.param as f64 * f.params,
            grads: n * bytes.grad as f64 * f.grads,
            optimizer: n * bytes.optimizer as f64 * f.optimizer,
        }
    }
}

impl fmt::Display for ZeroStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ZeroStage::Ddp => "DDP",
            ZeroStage::Zero1 => "ZeRO-1",
            ZeroStage::Zero2 => "ZeRO-2",
            ZeroStage::Zero3 => "ZeRO-3",
        })
    }
}

/// Fractions (0-1] of parameters, gradients and optimizer state one rank keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateFractions {
    /// Of the parameters (between steps).
    pub params: f64,
    /// Of the gradients (after the reduction).
    pub grads: f64,
    /// Of the optimizer state.
    pub optimizer: f64,
}

/// Bytes per parameter of each kind of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBytes {
    /// Working copy of a parameter.
    pub param: u32,
    /// Its gradient.
    pub grad: u32,
    /// Optimizer state (master copy and moments).
    pub optimizer: u32,
}

impl StateBytes {
    /// Mixed precision as DeepSpeed/the ZeRO paper: bf16 params and grads, fp32 master weights
    /// plus fp32 Adam m and v (2 + 2 + 12 = 16 bytes per parameter).
    pub const BF16_MIXED_ADAM: StateBytes = StateBytes { param: 2, grad: 2, optimizer: 12 };
    /// Everything in fp32, as the CPU trainer today: params, grads, Adam m and v (4 + 4 + 8).
    pub const FP32_ADAM: StateBytes = StateBytes { param: 4, grad: 4, optimizer: 8 };
}

/// Persistent bytes on one rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPerRank {
    /// Parameters.
    pub params: f64,
    /// Gradients.
    pub grads: f64,
    /// Optimizer state.
    pub optimizer: f64,
}

impl MemoryPerRank {
    /// The sum.
    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer
    }
}

/// The parts of an accelerate config file (`recipes/accelerate_configs/*.yaml`, the format of
/// the handbook's) that select the distributed strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelerateConfig {
    /// The ZeRO stage (`MULTI_GPU` → Ddp; `DEEPSPEED` → `deepspeed_config.zero_stage`).
    pub stage: ZeroStage,
    /// `num_processes`: ranks in the whole job (all machines).
    pub num_processes: usize,
    /// `num_machines`.
    pub num_machines: usize,
    /// `mixed_precision` (`no`, `bf16`, `fp16`), `no` when absent.
    pub mixed_precision: String,
    /// `deepspeed_config.offload_optimizer_device: cpu` (DeepSpeed-Chat's `--offload`): f32
    /// master weights and AdamW moments in host memory, updated there on all cores. The
    /// data-parallel step of this implementation keeps them there whatever this says (its
    /// optimizer runs on host buffers, `trainer::data_parallel`), so `cpu` is what every run
    /// gets today and `none` does not yet move them to the device (the trainer says so when
    /// the config names `none`). `None` when the config does not name it.
    pub offload_optimizer: Option<bool>,
}

/// Environment variable naming the accelerate config the launcher used.
pub const ACCELERATE_CONFIG_VAR: &str = "ALIGNMENT_ACCELERATE_CONFIG";

#[derive(Deserialize)]
struct RawConfig {
    distributed_type: Option<String>,
    num_processes: Option<usize>,
    num_machines: Option<usize>,
    mixed_precision: Option<String>,
    deepspeed_config: Option<RawDeepSpeed>,
    use_cpu: Option<bool>,
}

#[derive(Deserialize)]
struct RawDeepSpeed {
    zero_stage: Option<u64>,
    offload_optimizer_device: Option<String>,
    offload_param_device: Option<String>,
}

impl AccelerateConfig {
    /// Reads and checks a config file.
    pub fn from_path(path: &Path) -> Result<Self, DistError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| DistError::Config { path: path.display().to_string(), detail: e.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The config named by `ALIGNMENT_ACCELERATE_CONFIG` (set by `cargo xtask launch
    /// --config_file` and `recipes/launch.slurm`), `None` when unset.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        match std::env::var_os(ACCELERATE_CONFIG_VAR) {
            Some(path) => Self::from_path(Path::new(&path)).map(Some),
            None => Ok(None),
        }
    }

    /// Parses YAML text; `origin` names it in errors. Unsupported settings (FSDP, offloading,
    /// TPU types, an unknown ZeRO stage) are errors naming the field.
    pub fn parse(text: &str, origin: &str) -> Result<Self, DistError> {
        let error = |detail: String| DistError::Config { path: origin.to_string(), detail };
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| error(format!("not a valid accelerate config: {e}")))?;
        let distributed_type = raw.distributed_type.unwrap_or_else(|| "NO".into());
        let mut offload_optimizer = None;
        let stage = match distributed_type.as_str() {
            "NO" | "MULTI_GPU" | "MULTI_CPU" => ZeroStage::Ddp,
            "DEEPSPEED" => {
                let ds = raw.deepspeed_config.ok_or_else(|| error("distributed_type DEEPSPEED needs a deepspeed_config section".into()))?;
                match ds.offload_optimizer_device.as_deref() {
                    None => {}
                    Some("none") => offload_optimizer = Some(false),
                    Some("cpu") => offload_optimizer = Some(true),
                    Some(other) => {
                        return Err(error(format!("deepspeed_config.offload_optimizer_device: {other:?} is not supported (none or cpu)")))
                    }
                }
                if let Some(value) = ds.offload_param_device.as_deref().filter(|&v| v != "none") {
                    return Err(error(format!(
                        "deepspeed_config.offload_param_device: {value:?} is not supported (only none: parameters stay on the device)"
                    )));
                }
                let n = ds.zero_stage.ok_or_else(|| error("deepspeed_config.zero_stage is missing".into()))?;
                ZeroStage::from_deepspeed_stage(n)
                    .ok_or_else(|| error(format!("deepspeed_config.zero_stage: {n} is not a ZeRO stage (0-3)")))?
            }
            "FSDP" => {
                return Err(error("distributed_type FSDP is not supported: use DEEPSPEED with zero_stage 3 (the same sharding)".into()))
            }
            other => return Err(error(format!("distributed_type {other:?} is not supported (NO, MULTI_GPU, MULTI_CPU, DEEPSPEED)"))),
        };
        let num_processes = raw.num_processes.unwrap_or(1);
        let num_machines = raw.num_machines.unwrap_or(1);
        if num_processes == 0 || num_machines == 0 {
            return Err(error("num_processes and num_machines must be at least 1".into()));
        }
        if !num_processes.is_multiple_of(num_machines) {
            return Err(error(format!("num_processes {num_processes} is not a multiple of num_machines {num_machines}")));
        }
        let _ = raw.use_cpu;
        Ok(AccelerateConfig {
            stage,
            num_processes,
            num_machines,
            mixed_precision: raw.mixed_precision.unwrap_or_else(|| "no".into()),
            offload_optimizer,
        })
    }

    /// Processes per machine.
    pub fn processes_per_machine(&self) -> usize {
        self.num_processes / self.num_machines
    }
}

/// One optimizer step's synchronisation for a stage, over the flat parameter buffer of `len`
/// values (the trainer's fixed parameter order).
///
/// Per step: `grads` (full, this rank's micro-batches) → [`ZeroPlan::reduce_gradients`] →
/// AdamW on [`ZeroPlan::owned_range`] of the parameters with the returned gradient slice →
/// [`ZeroPlan::gather_parameters`] → the full updated parameters on every rank (ZeRO-3 gathers
/// them per layer instead, with [`Communicator::all_gather`] on each layer's own layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroPlan {
    /// The stage.
    pub stage: ZeroStage,
    /// The partition of the flat parameter buffer.
    pub layout: ShardLayout,
    /// This rank.
    pub rank: usize,
}

impl ZeroPlan {
    /// The plan for `len` parameters on `comm`'s world.
    pub fn new(stage: ZeroStage, len: usize, comm: &dyn Communicator) -> Self {
        ZeroPlan { stage, layout: ShardLayout::new(len, comm.world_size()), rank: comm.rank() }
    }

    /// The parameters whose optimizer state this rank keeps and updates: all of them for DDP,
    /// its shard otherwise.
    pub fn owned_range(&self) -> Range<usize> {
        if self.stage.shards_optimizer_state() {
            self.layout.range(self.rank)
        } else {
            0..self.layout.len()
        }
    }

    /// Sums `grads` (the full flat gradient of this rank's share of the batch) over the ranks and
    /// returns the summed gradient of [`ZeroPlan::owned_range`]: DDP all-reduces and keeps all,
    /// ZeRO-1 all-reduces and keeps its shard, ZeRO-2/3 reduce-scatter.
    pub fn reduce_gradients(&self, comm: &mut dyn Communicator, grads: &mut [f32]) -> Result<Vec<f32>, DistError> {
        match self.stage {
            ZeroStage::Ddp => {
                comm.all_reduce_sum(grads)?;
                Ok(grads.to_vec())
            }
            ZeroStage::Zero1 => {
                comm.all_reduce_sum(grads)?;
                Ok(grads[self.layout.range(self.rank)].to_vec())
            }
            ZeroStage::Zero2 | ZeroStage::Zero3 => comm.reduce_scatter_sum(grads, &self.layout),
        }
    }

    /// The squared global norm of the summed gradient from each rank's owned part (for
    /// clipping): the partial sums of squares are all-reduced when the gradient is sharded.
    /// `owned_grads` may chain several buffers (ZeRO-3's partitioned weights keep their own).
    pub fn global_sq_norm<'a>(
        &self,
        comm: &mut dyn Communicator,
        owned_grads: impl IntoIterator<Item = &'a f32>,
    ) -> Result<f64, DistError> {
        let local: f64 = owned_grads.into_iter().map(|&g| g as f64 * g as f64).sum();
        self.sum_of_owned_parts(comm, local)
    }

    /// The sum over ranks of a quantity each rank computed over its owned range (e.g. the
    /// squared gradient norm of its shard): all-reduced when the state is sharded, `local`
    /// itself for DDP, where every rank owns everything.
    pub fn sum_of_owned_parts(&self, comm: &mut dyn Communicator, local: f64) -> Result<f64, DistError> {
        if !self.stage.shards_optimizer_state() {
            return Ok(local);
        }
        let mut partial = [local as f32];
        comm.all_reduce_sum(&mut partial)?;
        Ok(partial[0] as f64)
    }

    /// Every rank's updated owned parameters, concatenated: the full flat parameter buffer (DDP
    /// returns `owned` itself, as every rank updated everything).
    pub fn gather_parameters(&self, comm: &mut dyn Communicator, owned: &[f32]) -> Result<Vec<f32>, DistError> {
        if self.stage.shards_optimizer_state() {
            comm.all_gather(owned, &self.layout)
        } else {
            Ok(owned.to_vec())
        }
    }
}
