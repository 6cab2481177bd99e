//! The training loop's optimizer steps replayed from captured CUDA graphs (libtorch on a GPU,
//! `torch_compile_mode: reduce-overhead`: PyTorch's mode of that name replays CUDA graphs too).
//!
//! On a small model the GPU step is the host's: burn's autodiff and the torch calls under it
//! issue thousands of operations a step while the kernels take a fraction of it
//! (docs/performance.md, "The next lever"). A step captured once ([`crate::tch_graph`]) launches
//! every kernel again with one call. What differs from one step to the next must then reach the
//! device outside the graph, into memory the graph reads:
//!
//! ```text
//! before each step   AdamW's step count and learning rate staged on the device (tch_adamw::stage)
//! eager step         the first step of each batch signature (shapes and flags, [`Signature`]):
//!                    the loop's own step, and that signature's warm-up
//! capture            the second step of a signature: its micro-batches' tensors become the
//!                    graph's inputs (`slots`), its loss scale (1 / the step's weight) a [1]
//!                    tensor; captured, then replayed once
//! replay             a step of a captured signature: its micro-batches' tensors copied into
//!                    that graph's slots, its scale into the scale's, one replay; the metrics
//!                    and gradient norm copied out (the next replay of any graph rewrites them)
//! ```
//!
//! Each signature has a graph of its own, up to [`MAX_GRAPHS`] (later signatures run eagerly),
//! all allocating from the first one's memory pool ([`CudaGraph::capture_sharing`]): a graph's
//! intermediates live only within its replay, and its outputs are copied out right after, so
//! the graphs take the memory of the largest one, not the sum. Unpacked batches take as many
//! shapes as their longest rows have lengths; `pad_to_multiple_of` makes them few.
//!
//! What the captured step computed on the host — from its examples, from the shapes and flags of
//! its batches — is baked into the graph. The shapes and flags are compared before each replay
//! ([`Signature`]); the examples must not matter beyond the tensors refilled: every number the
//! step reads about its batch comes from the device (SFT's logged token-mean loss divides by the
//! device's count of scored tokens, DPO's reference log-probabilities are uploaded with the
//! rows). [`GraphMode::Emulated`] checks that on the CPU: the same loop, each "replay" running
//! the captured step's host code again — with the captured examples — over the refilled tensors,
//! so anything a replay would not refresh shows as a difference from the eager loop (`tests`).

use crate::optimizer::AdamW;
pub use crate::step::GraphMode;
use crate::step::{forward_backward_scaled, prepare, LossScale, PreparedBatch, StepOptions};
use crate::strategy::StepValues;
use crate::task::Task;
use crate::tch_graph::{state_addresses, CudaGraph, SideStream};
use crate::TrainError;
use alignment_core::backend::{downcast, retype, Torch};
use alignment_models::CausalLm;
use alignment_objectives::DeferredMetrics;
use burn::backend::libtorch::LibTorchDevice;
use burn::optim::GradientsAccumulator;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

/// The shapes and host-side flags of a step's micro-batches, which a captured step bakes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature(Vec<Vec<usize>>);

impl Signature {
    /// Every tensor's shape, in [`refill`]'s order, and the attention mask's `plain_causal` flag.
    fn of<B: AutodiffBackend>(batches: &[PreparedBatch<B>]) -> Self {
        let mut out = Vec::new();
        for p in batches {
            let (inputs, scoring) = (&p.inputs, &p.scoring);
            out.push(inputs.ids.dims().to_vec());
            out.push(inputs.layers.mask.masked.dims().to_vec());
            out.push(vec![usize::from(inputs.layers.mask.plain_causal)]);
            out.push(inputs.layers.cos.dims().to_vec());
            out.push(inputs.layers.sin.dims().to_vec());
            out.extend(scoring.label_sets.iter().map(|l| l.dims().to_vec()));
            out.push(vec![scoring.label_sets.len()]);
            out.extend(scoring.row_values.iter().map(|v| v.dims().to_vec()));
            out.push(vec![scoring.row_values.len()]);
        }
        Signature(out)
    }
}

/// The most steps captured, one per batch signature: a run whose batches take more shapes runs
/// the steps of the others eagerly. Each graph keeps its input slots and outputs allocated (the
/// size of a batch and of its metrics) and its kernels' launch parameters.
pub const MAX_GRAPHS: usize = 16;

/// The most signatures remembered as warmed up and not captured yet: a run whose every step has
/// new shapes (unpacked, unpadded batches) forgets the oldest.
const MAX_WARMED: usize = 64;

/// A step captured for replaying: its input tensors, loss scale and outputs.
struct Captured<B: AutodiffBackend, E> {
    signature: Signature,
    /// Where the parameters, moments and AdamW's scalars were at the capture: a replay updates
    /// them there ([`state_addresses`]).
    addresses: Vec<(String, usize)>,
    slots: Vec<PreparedBatch<B>>,
    scale: Tensor<B::InnerBackend, 1>,
    /// The captured step's examples ([`GraphMode::Emulated`] runs its host code with them again).
    examples: Vec<Vec<E>>,
    graph: Option<CudaGraph>,
    metrics: Vec<DeferredMetrics<B>>,
    grad_norm: Tensor<B::InnerBackend, 1>,
}

/// The loop's steps, eager until one is captured, replayed after (module docs).
pub struct GraphedSteps<B: AutodiffBackend, E> {
    mode: GraphMode,
    /// The signatures of eager steps not captured yet, oldest first: a signature is captured at
    /// its second step (the first is its warm-up: the moments, AdamW's device scalars and
    /// cuBLAS's workspace exist by then, as does anything torch makes once per shape).
    warmed: Vec<Signature>,
    /// The captured steps, by signature; every graph after the first shares its memory pool.
    captured: Vec<Captured<B, E>>,
    /// The stream every step runs on ([`GraphMode::Capture`]: capture cannot use the default).
    _stream: Option<SideStream>,
    /// Steps replayed, and steps run eagerly (the capture counts as replayed).
    pub replayed: u64,
    pub eager: u64,
}

impl<B: AutodiffBackend, E: Clone> GraphedSteps<B, E> {
    /// Steps in `mode` on `device`, or why they cannot run there (the loop then says so and
    /// runs every step eagerly): libtorch's f32 backend with its fused AdamW, and for
    /// [`GraphMode::Capture`] a GPU and a binary built with CUDA graphs.
    pub fn new(mode: GraphMode, model: &CausalLm<B>, optimizer: &AdamW<B::InnerBackend>, device: &B::Device) -> Result<Self, String> {
        if !crate::tch_adamw::applies::<B::InnerBackend>() || optimizer.config.rule != crate::optimizer::UpdateRule::AdamW {
            return Err("steps are replayed on libtorch (--features tch) with the AdamW optimizer".into());
        }
        if model.has_lora_dropout() {
            return Err("LoRA dropout draws new masks every step (set lora_dropout: 0)".into());
        }
        let stream = match mode {
            GraphMode::Emulated => None,
            GraphMode::Capture => {
                let gpu = match downcast::<_, LibTorchDevice>(device.clone()) {
                    Ok(LibTorchDevice::Cuda(index)) => index,
                    _ => return Err("CUDA graphs need a GPU".into()),
                };
                if !crate::tch_graph::built() {
                    return Err(crate::tch_graph::GraphError::NotBuilt.to_string());
                }
                Some(SideStream::enter(gpu).map_err(|e| e.to_string())?)
            }
        };
        Ok(Self { mode, warmed: Vec::new(), captured: Vec::new(), _stream: stream, replayed: 0, eager: 0 })
    }

    /// How many steps are captured (one per batch signature).
    pub fn graphs(&self) -> usize {
        self.captured.len()
    }

    /// One optimizer step over `batches` (each a micro-batch), whose weight is `step_weight`,
    /// with learning rate `lr`: replayed when a captured step has their shapes, else eager
    /// (capturing when an eager step had the same shapes before). Returns the updated model and
    /// the step's values, still on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn step<T: Task<Example = E>>(
        &mut self,
        model: CausalLm<B>,
        task: &T,
        batches: &[Vec<&E>],
        step_weight: f64,
        options: &StepOptions,
        optimizer: &mut AdamW<B::InnerBackend>,
        lr: f64,
        device: &B::Device,
    ) -> Result<(CausalLm<B>, StepValues<B>), TrainError> {
        let torch_device = tch::Device::from(retype::<_, LibTorchDevice>(device.clone()));
        crate::tch_adamw::stage(optimizer, lr, torch_device);
        let prepared: Vec<PreparedBatch<B>> = batches.iter().map(|b| prepare(&model, task, b, device)).collect();
        let weights: Vec<f64> = batches.iter().map(|b| task.weight(b)).collect();
        let signature = Signature::of(&prepared);
        let scale = 1.0 / step_weight;
        let mut replay_index = self.captured.iter().position(|c| c.signature == signature);
        if let Some(index) = replay_index {
            // An eager step in between updates in place too; if anything had moved the state,
            // the replays would train what is no longer the model: captured again instead.
            if state_addresses(&model, optimizer) != self.captured[index].addresses {
                eprintln!("note: torch_compile_mode: the training state moved since the capture; the steps are captured again");
                self.captured.clear();
                replay_index = None;
            }
        }
        let warmed = self.warmed.iter().position(|s| *s == signature);
        let capture_now = replay_index.is_none() && warmed.is_some() && self.captured.len() < MAX_GRAPHS;
        let (model, metrics, grad_norm) = if let Some(index) = replay_index {
            self.replay(index, model, task, &prepared, scale, options, optimizer, device)?
        } else if capture_now {
            self.warmed.remove(warmed.expect("warmed up"));
            self.capture(model, task, batches, prepared, signature, scale, options, optimizer, device)?
        } else {
            if warmed.is_none() && self.captured.len() < MAX_GRAPHS {
                if self.warmed.len() == MAX_WARMED {
                    self.warmed.remove(0);
                }
                self.warmed.push(signature);
            }
            self.eager += 1;
            let refs: Vec<Vec<&E>> = batches.to_vec();
            run_step(model, task, &prepared, &refs, &LossScale::Number(scale), options, optimizer, lr, device)
        };
        let metrics = metrics.into_iter().zip(weights).collect();
        Ok((model, StepValues::OnDevice { metrics, grad_norm }))
    }

    /// Captures this step (eager in [`GraphMode::Emulated`]): its prepared tensors become the
    /// slots; the graph is replayed once to run it.
    #[allow(clippy::too_many_arguments)]
    fn capture<T: Task<Example = E>>(
        &mut self,
        model: CausalLm<B>,
        task: &T,
        batches: &[Vec<&E>],
        slots: Vec<PreparedBatch<B>>,
        signature: Signature,
        scale: f64,
        options: &StepOptions,
        optimizer: &mut AdamW<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<StepOutputs<B>, TrainError> {
        // The slots are written by copies: each one its own memory (a broadcast view, such as a
        // mask expanded over the batch, is made whole first; the values are the same).
        let slots: Vec<PreparedBatch<B>> = slots.into_iter().map(materialized).collect();
        let examples: Vec<Vec<E>> = batches.iter().map(|b| b.iter().map(|e| (*e).clone()).collect()).collect();
        let scale = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(vec![scale as f32], [1]), &inner_device(&model));
        let loss_scale = LossScale::Device(scale.clone());
        let refs: Vec<Vec<&E>> = examples.iter().map(|b| b.iter().collect()).collect();
        let before = state_addresses(&model, optimizer);
        let lr = 0.0; // staged on the device already: the update reads it there
        let (graph, (model, metrics, grad_norm)) = match self.mode {
            GraphMode::Emulated => (None, run_step(model, task, &slots, &refs, &loss_scale, options, optimizer, lr, device)),
            GraphMode::Capture => {
                let pool = self.captured.first().and_then(|c| c.graph.as_ref());
                let (graph, out) =
                    CudaGraph::capture_sharing(pool, || run_step(model, task, &slots, &refs, &loss_scale, options, optimizer, lr, device))
                        .map_err(|e| graph_error(first_line(&e.to_string()).to_string()))?;
                (Some(graph), out)
            }
        };
        let addresses = state_addresses(&model, optimizer);
        check_in_place(&before, &addresses)?;
        if let Some(graph) = &graph {
            graph.replay().map_err(|e| graph_error(first_line(&e.to_string()).to_string()))?;
        }
        self.replayed += 1;
        let out = (copied_metrics(&metrics), grad_norm.clone().mul_scalar(1.0));
        let examples = match self.mode {
            GraphMode::Emulated => examples,
            GraphMode::Capture => Vec::new(),
        };
        self.captured.push(Captured { signature, addresses, slots, scale, examples, graph, metrics, grad_norm });
        Ok((model, out.0, out.1))
    }

    /// Replays captured step `index` over `prepared` (tensors of its signature).
    #[allow(clippy::too_many_arguments)]
    fn replay<T: Task<Example = E>>(
        &mut self,
        index: usize,
        model: CausalLm<B>,
        task: &T,
        prepared: &[PreparedBatch<B>],
        scale: f64,
        options: &StepOptions,
        optimizer: &mut AdamW<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<StepOutputs<B>, TrainError> {
        let captured = &self.captured[index];
        for (slot, batch) in captured.slots.iter().zip(prepared) {
            refill(slot, batch)?;
        }
        let scale = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(vec![scale as f32], [1]), &captured.scale.device());
        copy_into(&float_storage(captured.scale.clone()), &float_storage(scale))?;
        self.replayed += 1;
        match &captured.graph {
            Some(graph) => {
                graph.replay().map_err(|e| graph_error(first_line(&e.to_string()).to_string()))?;
                optimizer.step += 1; // the replayed update's (staged on the device before it)
                Ok((model, copied_metrics(&captured.metrics), captured.grad_norm.clone().mul_scalar(1.0)))
            }
            // Emulated: the captured step's host code again, with its examples, over the slots.
            None => {
                let refs: Vec<Vec<&E>> = captured.examples.iter().map(|b| b.iter().collect()).collect();
                let loss_scale = LossScale::Device(captured.scale.clone());
                let (model, metrics, grad_norm) =
                    run_step(model, task, &captured.slots, &refs, &loss_scale, options, optimizer, 0.0, device);
                // `step` found the state at the captured addresses before this replay.
                check_in_place(&captured.addresses, &state_addresses(&model, optimizer))?;
                Ok((model, copied_metrics(&metrics), grad_norm.mul_scalar(1.0)))
            }
        }
    }
}

/// A step's updated model, its micro-batches' metrics and its gradient norm.
type StepOutputs<B> = (CausalLm<B>, Vec<DeferredMetrics<B>>, Tensor<<B as AutodiffBackend>::InnerBackend, 1>);

/// One optimizer step: the micro-batches' forward and backward passes, the loss scaled by
/// `scale`, then the update (the learning rate as staged on the device when `lr` is not read).
#[allow(clippy::too_many_arguments)]
fn run_step<B: AutodiffBackend, T: Task>(
    model: CausalLm<B>,
    task: &T,
    batches: &[PreparedBatch<B>],
    examples: &[Vec<&T::Example>],
    scale: &LossScale<B>,
    options: &StepOptions,
    optimizer: &mut AdamW<B::InnerBackend>,
    lr: f64,
    device: &B::Device,
) -> StepOutputs<B> {
    let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
    let metrics = batches
        .iter()
        .zip(examples)
        .map(|(prepared, examples)| forward_backward_scaled(&model, task, prepared, examples, scale, options, &mut accumulator, device))
        .collect();
    let (model, report) = optimizer.step(lr, model, accumulator.grads());
    (model, metrics, report.grad_norm)
}

fn copied_metrics<B: AutodiffBackend>(metrics: &[DeferredMetrics<B>]) -> Vec<DeferredMetrics<B>> {
    metrics.iter().map(DeferredMetrics::copied).collect()
}

fn inner_device<B: AutodiffBackend>(model: &CausalLm<B>) -> burn::tensor::Device<B::InnerBackend> {
    model.embed_tokens.val().inner().device()
}

/// A torch error's message without the C++ backtrace torch appends.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message)
}

fn graph_error(message: String) -> TrainError {
    TrainError::Config { key: "torch_compile_mode".into(), message: format!("the step could not be replayed as a CUDA graph: {message}") }
}

/// Refuses a captured step that moved a parameter, a moment or AdamW's scalars: its replays
/// would read the state from before the capture.
fn check_in_place(before: &[(String, usize)], after: &[(String, usize)]) -> Result<(), TrainError> {
    if before.len() != after.len() {
        return Err(graph_error(format!(
            "the captured step changed the optimizer's state ({} tensors before, {} after)",
            before.len(),
            after.len()
        )));
    }
    match before.iter().zip(after).find(|(a, b)| a.1 != b.1) {
        Some(((name, was), (_, is))) => Err(graph_error(format!("the captured step moved {name} ({was:#x} → {is:#x})"))),
        None => Ok(()),
    }
}

/// Copies every tensor of `batch` into the same tensor of `slot` (same shapes: [`Signature`]).
fn refill<B: AutodiffBackend>(slot: &PreparedBatch<B>, batch: &PreparedBatch<B>) -> Result<(), TrainError> {
    let (a, b) = (&slot.inputs, &batch.inputs);
    copy_into(&int_storage(a.ids.clone()), &int_storage(b.ids.clone()))?;
    copy_into(&bool_storage(a.layers.mask.masked.clone()), &bool_storage(b.layers.mask.masked.clone()))?;
    copy_into(&float_storage(a.layers.cos.clone().inner()), &float_storage(b.layers.cos.clone().inner()))?;
    copy_into(&float_storage(a.layers.sin.clone().inner()), &float_storage(b.layers.sin.clone().inner()))?;
    for (a, b) in slot.scoring.label_sets.iter().zip(&batch.scoring.label_sets) {
        copy_into(&int_storage(a.clone()), &int_storage(b.clone()))?;
    }
    for (a, b) in slot.scoring.row_values.iter().zip(&batch.scoring.row_values) {
        copy_into(&float_storage(a.clone().inner()), &float_storage(b.clone().inner()))?;
    }
    Ok(())
}

/// `batch` with every tensor in memory of its own, contiguous (copied where it is a view).
fn materialized<B: AutodiffBackend>(batch: PreparedBatch<B>) -> PreparedBatch<B> {
    let PreparedBatch { mut scoring, mut inputs } = batch;
    inputs.ids = int_tensor(whole(int_storage(inputs.ids)));
    inputs.layers.mask.masked = bool_tensor(whole(bool_storage(inputs.layers.mask.masked)));
    inputs.layers.cos = Tensor::from_inner(float_tensor(whole(float_storage(inputs.layers.cos.inner()))));
    inputs.layers.sin = Tensor::from_inner(float_tensor(whole(float_storage(inputs.layers.sin.inner()))));
    scoring.label_sets = scoring.label_sets.into_iter().map(|l| int_tensor(whole(int_storage(l)))).collect();
    scoring.row_values =
        scoring.row_values.into_iter().map(|v| Tensor::from_inner(float_tensor(whole(float_storage(v.inner()))))).collect();
    PreparedBatch { scoring, inputs }
}

/// A contiguous copy of `t`, never sharing its memory.
fn whole(t: tch::Tensor) -> tch::Tensor {
    t.contiguous().copy()
}

fn float_tensor<B: burn::tensor::backend::Backend, const D: usize>(t: tch::Tensor) -> Tensor<B, D> {
    retype(Tensor::<Torch, D>::from_primitive(burn::tensor::TensorPrimitive::Float(burn::backend::libtorch::TchTensor::new(t))))
}

fn int_tensor<B: AutodiffBackend, const D: usize>(t: tch::Tensor) -> Tensor<B, D, Int> {
    Tensor::from_inner(retype(Tensor::<Torch, D, Int>::from_primitive(burn::backend::libtorch::TchTensor::new(t))))
}

fn bool_tensor<B: AutodiffBackend, const D: usize>(t: tch::Tensor) -> Tensor<B, D, Bool> {
    Tensor::from_inner(retype(Tensor::<Torch, D, Bool>::from_primitive(burn::backend::libtorch::TchTensor::new(t))))
}

/// `destination.copy_(source)` in place: the memory a captured step reads.
fn copy_into(destination: &tch::Tensor, source: &tch::Tensor) -> Result<(), TrainError> {
    let mut destination = destination.shallow_clone();
    destination.f_copy_(source).map_err(|e| graph_error(format!("refilling the captured step's inputs: {}", first_line(&e.to_string()))))
}

fn float_storage<B: burn::tensor::backend::Backend, const D: usize>(tensor: Tensor<B, D>) -> tch::Tensor {
    retype::<_, Tensor<Torch, D>>(tensor).into_primitive().tensor().tensor
}

fn int_storage<B: AutodiffBackend, const D: usize>(tensor: Tensor<B, D, Int>) -> tch::Tensor {
    retype::<_, Tensor<Torch, D, Int>>(tensor.inner()).into_primitive().tensor
}

fn bool_storage<B: AutodiffBackend, const D: usize>(tensor: Tensor<B, D, Bool>) -> tch::Tensor {
    retype::<_, Tensor<Torch, D, Bool>>(tensor.inner()).into_primitive().tensor
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::SftTask;
    use crate::tasks::{DpoTask, OrpoTask, PreferencePair, ReferenceLogps};
    use crate::{train, Recipe, Scoring, Sequence, TrainerConfig, IGNORE_INDEX};
    use crate::{Collation, PackedRows};
    use alignment_core::backend::TorchAutodiff;
    use alignment_models::load_pretrained;
    use alignment_objectives::{DpoConfig, OrpoConfig};
    use alignment_objectives::{Reduction, SequenceLogps};
    use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
    use burn::tensor::backend::Backend;
    use std::path::{Path, PathBuf};

    type Entry = serde_json::Map<String, serde_json::Value>;

    /// A run's logged entries (without the wall-clock rate), final weights and steps replayed.
    type Outcome = (Vec<Entry>, Vec<Vec<f32>>, u64);

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-llama")
    }

    /// 20 sequences, 18 of 10 tokens and 2 of 6, each with an unlabelled prefix of 1 to 5 tokens:
    /// the steps differ in scored tokens (the loss's scale, the logged token mean), and a
    /// micro-batch with a short row has another shape and a padding mask (those steps run eagerly).
    fn examples() -> Vec<Sequence> {
        (0..20u32)
            .map(|i| {
                let len = if i % 10 == 9 { 6 } else { 10 };
                let prompt = 1 + (i as usize * 3) % 5;
                let ids: Vec<u32> = (0..len as u32).map(|t| (i * 41 + t * 13 + 5) % 256).collect();
                let labels = ids.iter().enumerate().map(|(t, &id)| if t < prompt { IGNORE_INDEX } else { id as i64 }).collect();
                Sequence::new(ids, labels)
            })
            .collect()
    }

    /// 8 steps of 2 micro-batches of 2, unless `extra` (more recipe lines) sets `max_steps`.
    fn config(dir: &Path, mode: Option<GraphMode>, extra: &str) -> TrainerConfig {
        let steps = if extra.contains("max_steps:") { "" } else { "max_steps: 8\n" };
        let recipe = Recipe::from_yaml_str(
            &format!(
                "learning_rate: 3.0e-3\nlr_scheduler_type: linear\nwarmup_steps: 2\n{steps}per_device_train_batch_size: 2\n\
                 gradient_accumulation_steps: 2\nlogging_steps: 1\nweight_decay: 0.01\nseed: 3\n{extra}"
            ),
            "test recipe",
            &[format!("--output_dir={}", dir.display())],
        )
        .unwrap();
        let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
        config.quiet = true;
        config.step_graphs = mode;
        config
    }

    /// Every parameter's values, in module order.
    fn weights<M: Module<Torch>>(model: &M) -> Vec<Vec<f32>> {
        struct Values(Vec<Vec<f32>>);
        impl ModuleVisitor<Torch> for Values {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Torch, D>>) {
                self.0.push(param.val().into_data().to_vec::<f32>().unwrap());
            }
        }
        let mut values = Values(Vec::new());
        model.visit(&mut values);
        values.0
    }

    /// The [`Outcome`] of a run of `task` on libtorch's CPU kernels.
    fn run<T: Task>(task: &T, examples: &[T::Example], dir: &Path, mode: Option<GraphMode>, extra: &str) -> Outcome {
        let device = LibTorchDevice::Cpu;
        let model = load_pretrained::<TorchAutodiff>(&fixture(), &device).unwrap();
        let (model, outcome) = train(model, task, examples, &[], &config(dir, mode, extra), &device).unwrap();
        let mut history = outcome.history;
        for entry in &mut history {
            entry.remove("tokens_per_second");
        }
        (history, weights(&model.valid()), outcome.steps_replayed)
    }

    fn sft() -> SftTask {
        SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" }
    }

    /// The loop replaying its steps over refilled inputs (the captured step's host code run again
    /// with the captured examples, as a CUDA graph's replays would) logs what the eager loop logs
    /// and ends with its weights, bit for bit: every value that changes from step to step — the
    /// batch, the loss's scale, the learning rate and step count, the logged token mean — reaches
    /// the step through the device. Also with checkpointing and the chunked head (SFT's one walk).
    #[test]
    fn tch_steps_replayed_over_refilled_inputs_equal_the_eager_loop() {
        for extra in ["", "gradient_checkpointing: true\nuse_liger_kernel: true\n"] {
            let root = tempfile::tempdir().unwrap();
            let (eager, eager_weights, none) = run(&sft(), &examples(), &root.path().join("eager"), None, extra);
            let (replayed, replayed_weights, replays) =
                run(&sft(), &examples(), &root.path().join("replayed"), Some(GraphMode::Emulated), extra);
            assert_eq!(none, 0);
            assert!(replays >= 3, "{extra}: only {replays} of 8 steps replayed");
            assert_eq!(eager.len(), 8);
            let losses: Vec<f64> = eager.iter().map(|e| e["loss"].as_f64().unwrap()).collect();
            assert!(losses.windows(2).any(|w| w[0] != w[1]), "the steps' losses differ: {losses:?}");
            assert_eq!(replayed, eager, "{extra}");
            assert!(replayed_weights == eager_weights, "{extra}: the replayed run's weights differ from the eager run's");
        }
    }

    /// Steps of several shapes each have a graph: 20 sequences of 5 to 15 tokens (none a multiple
    /// of 8), padded to a multiple of 8, make micro-batches 8 or 16 wide, so a step of two
    /// micro-batches has one of four signatures. Each signature runs eagerly once and is replayed
    /// after, logging what the eager loop logs and ending with its weights, bit for bit.
    #[test]
    fn tch_each_batch_shape_is_captured_and_replayed() {
        let rows: Vec<Sequence> = (0..20u32)
            .map(|i| {
                let len = [5, 7, 9, 12, 15][i as usize % 5];
                let ids: Vec<u32> = (0..len).map(|t| (i * 29 + t * 17 + 2) % 256).collect();
                let labels = ids.iter().enumerate().map(|(t, &id)| if t < 2 { IGNORE_INDEX } else { id as i64 }).collect();
                Sequence::new(ids, labels)
            })
            .collect();
        let task = SftTask {
            reduction: Reduction::Mean,
            collation: Collation { pad_to_multiple_of: Some(8), ..Collation::pad_with(0) },
            name: "sft",
        };
        let root = tempfile::tempdir().unwrap();
        let extra = "max_steps: 16\n";
        let (eager, eager_weights, _) = run(&task, &rows, &root.path().join("eager"), None, extra);
        let (replayed, replayed_weights, replays) = run(&task, &rows, &root.path().join("replayed"), Some(GraphMode::Emulated), extra);
        assert_eq!(eager.len(), 16);
        assert!(replays >= 12, "only {replays} of 16 steps replayed: at most 4 signatures run eagerly");
        assert_eq!(replayed, eager);
        assert!(replayed_weights == eager_weights, "the replayed run's weights differ from the eager run's");
    }

    /// Packed rows kept whole ([`PackedRows::Whole`], what a recipe replaying its steps gets) and
    /// padded to the row length have one shape, so every step after the first replays; split by
    /// document, the batches' shapes (documents × longest document) rarely repeat.
    #[test]
    fn tch_packed_rows_kept_whole_replay_every_step_after_the_first() {
        let doc = |d: u32| {
            let ids: Vec<u32> = (0..3 + d % 6).map(|t| (d * 23 + t * 7 + 1) % 256).collect();
            alignment_data::TokenizedExample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids }
        };
        let mut rows: Vec<Sequence> =
            alignment_data::pack(&(0..60).map(doc).collect::<Vec<_>>(), 16, 0).into_iter().map(Sequence::from).collect();
        rows.truncate(20); // five whole steps an epoch: no shorter last batch
        assert!(rows.len() == 20 && rows.iter().all(|r| r.documents().len() >= 2), "{} rows", rows.len());
        let root = tempfile::tempdir().unwrap();
        let extra = "max_steps: 16\n";
        let by_document = Collation { pad_to_multiple_of: Some(16), ..Collation::pad_with(0) };
        let whole = Collation { packed_rows: PackedRows::Whole, ..by_document };
        let task = |collation| SftTask { reduction: Reduction::Mean, collation, name: "sft" };
        let (eager, eager_weights, _) = run(&task(whole), &rows, &root.path().join("eager"), None, extra);
        let (replayed, replayed_weights, replays) =
            run(&task(whole), &rows, &root.path().join("replayed"), Some(GraphMode::Emulated), extra);
        assert_eq!(replays, 15, "every step after the first replays");
        assert_eq!(replayed, eager);
        assert!(replayed_weights == eager_weights, "the replayed run's weights differ from the eager run's");
        let (_, _, split_replays) = run(&task(by_document), &rows, &root.path().join("split"), Some(GraphMode::Emulated), extra);
        assert!(split_replays < 12, "split by document, {split_replays} of 16 steps replayed");
    }

    /// DPO pairs of one shape (4 prompt, 4 completion tokens each side) whose reference
    /// log-probabilities differ: the values the loss reads beside the rows.
    fn pairs() -> Vec<PreferencePair> {
        (0..16u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..4).map(|t| (i * 13 + t * 7 + 1) % 256).collect();
                let row = |salt: u32| {
                    let mut ids = prompt.clone();
                    ids.extend((0..4).map(|t| (salt * 31 + i * 17 + t * 5) % 256));
                    let labels = ids.iter().enumerate().map(|(t, &id)| if t < 4 { IGNORE_INDEX } else { id as i64 }).collect();
                    Sequence::new(ids, labels)
                };
                let (chosen, rejected) = (-20.0 - i as f64, -22.5 + i as f64 / 2.0);
                let reference = ReferenceLogps { chosen, rejected, tails: None };
                PreferencePair { chosen: row(1), rejected: row(2), reference: Some(reference) }
            })
            .collect()
    }

    /// DPO and ORPO the same way: DPO's reference log-probabilities reach each replay with its
    /// rows, and the metrics (rewards, margins, accuracies, log-probs, ORPO's odds ratio) are the
    /// replayed batch's.
    #[test]
    fn tch_preference_steps_replayed_over_refilled_inputs_equal_the_eager_loop() {
        assert_replays_equal_eager_steps(&DpoTask { config: DpoConfig::default(), collation: Collation::pad_with(0) }, "rewards/margins");
        assert_replays_equal_eager_steps(&OrpoTask { config: OrpoConfig::default(), collation: Collation::pad_with(0) }, "log_odds_ratio");
    }

    /// `task` on [`pairs`]: every step but the first replayed, logging `metric` and everything
    /// else as the eager loop does, ending with its weights.
    fn assert_replays_equal_eager_steps<T: Task<Example = PreferencePair>>(task: &T, metric: &str) {
        let root = tempfile::tempdir().unwrap();
        let (eager, eager_weights, _) = run(task, &pairs(), &root.path().join("eager"), None, "");
        let (replayed, replayed_weights, replays) = run(task, &pairs(), &root.path().join("replayed"), Some(GraphMode::Emulated), "");
        assert_eq!(replays, 7, "{metric}: every step but the first has the same shapes");
        assert!(eager[0].contains_key(metric), "{:?}", eager[0]);
        assert_eq!(replayed, eager, "{metric}");
        assert!(replayed_weights == eager_weights, "{metric}: the replayed run's weights differ from the eager run's");
    }

    /// SFT logging its loss divided by a count the host takes from the examples (what SFT did
    /// before its count came from the device): a captured step bakes the count in.
    struct HostCountedSft(SftTask);

    impl Task for HostCountedSft {
        type Example = Sequence;
        fn name(&self) -> &'static str {
            "sft"
        }
        fn weight(&self, examples: &[&Sequence]) -> f64 {
            self.0.weight(examples)
        }
        fn num_tokens(&self, examples: &[&Sequence]) -> usize {
            self.0.num_tokens(examples)
        }
        fn scoring<B: Backend>(&self, examples: &[&Sequence], device: &B::Device) -> Scoring<B> {
            self.0.scoring(examples, device)
        }
        fn constant_sum_gradients(&self) -> Option<Vec<f64>> {
            self.0.constant_sum_gradients()
        }
        fn loss_from_logps<B: Backend>(
            &self,
            logps: Vec<SequenceLogps<B>>,
            examples: &[&Sequence],
            device: &B::Device,
        ) -> (Tensor<B, 1>, DeferredMetrics<B>) {
            let (loss, metrics) = self.0.loss_from_logps(logps, examples, device);
            let scored = examples.iter().map(|e| e.num_scored()).sum::<usize>() as f64;
            let metrics = metrics.map(move |m| m.iter().map(|(k, v)| (k.to_string(), if k == "loss" { v * scored } else { v })).collect());
            (loss, metrics)
        }
    }

    /// The emulation is a check with teeth: a value the host takes from the captured step's
    /// examples stays the captured one in every replay, and the logged losses then differ from
    /// the eager loop's (the weights, which depend only on the device's values, still agree).
    #[test]
    fn tch_a_host_value_baked_into_the_captured_step_shows_in_the_emulation() {
        let root = tempfile::tempdir().unwrap();
        let task = HostCountedSft(sft());
        let (eager, eager_weights, _) = run(&task, &examples(), &root.path().join("eager"), None, "");
        let (replayed, replayed_weights, replays) = run(&task, &examples(), &root.path().join("replayed"), Some(GraphMode::Emulated), "");
        assert!(replays >= 3);
        assert!(replayed_weights == eager_weights);
        let differing = eager.iter().zip(&replayed).filter(|(a, b)| a["loss"] != b["loss"]).count();
        assert!(differing >= 1, "no logged loss differs: the emulation did not replay the captured examples");
    }
}
