//! One micro-batch's forward and backward pass: the part of the training step that decides
//! what the device keeps between the two.
//!
//! ```text
//! plain               logits = model(batch)            the graph keeps every layer's activations
//!                     loss(logps(logits)).backward()   and the [rows, seq, vocab] logits
//!
//! chunked head        h = model.hidden_states(batch)   (graph through the layers)
//!                     pass 1: logps from h Wᵀ chunk by chunk, no graph   (objectives::chunked)
//!                     loss(logps as leaves).backward() → ∂loss/∂logps     (a few numbers per row)
//!                     pass 2: ∂h, ∂W chunk by chunk (each chunk's logits recomputed, then dropped)
//!                     (SFT: ∂loss/∂logps is −scale for every row, known before the loss, so
//!                     passes 1 and 2 are one walk: each chunk's logits computed once)
//!                     (h · ∂h).sum().backward()         → the layers' gradients
//!
//! checkpointing       forward on the inner backend, no graph, keeping each layer's input x_l
//!                     head (final norm + logits, plain or chunked) from a leaf x_L → ∂x_L
//!                     for l = L-1 … 0: y = layer_l(leaf x_l) with a graph; (y · ∂x_{l+1}).sum()
//!                       .backward() → layer l's gradients and ∂x_l; the layer's graph is dropped
//!                     (embed(batch) · ∂x_0).sum().backward() → the embedding's gradient
//! ```
//! The three give the same loss and gradients (to float rounding: `tests/step.rs`). Peak memory
//! differs: checkpointing keeps `L + 1` hidden states instead of every intermediate of every
//! layer, at the cost of a second forward pass; the chunked head never holds the logits. LoRA
//! dropout under checkpointing is replayed: the backend's generator is reseeded before each
//! layer in both passes, so the recomputed layer draws the masks the forward pass drew.
//!
//! Each backward call is its own small graph, so a collective inside it (ZeRO-3's
//! reduce-scatter of a layer's weight gradient) runs once per layer, in the same order on
//! every rank.

use crate::task::{Scoring, Task};
use alignment_models::{BatchInputs, CausalLm};
use alignment_objectives::logprobs::sequence_logps_with;
use alignment_objectives::{
    chunk_tokens_for_head, chunked_logps_and_backward, chunked_logps_backward, chunked_sequence_logps_with, DeferredMetrics, SequenceLogps,
};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

/// How one micro-batch's forward and backward pass is shaped (recipe keys
/// `gradient_checkpointing`, `use_liger_kernel`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepOptions {
    /// Recompute each decoder layer in the backward pass, keeping only its input.
    pub gradient_checkpointing: bool,
    /// Compute the head and the log-probabilities this many tokens at a time, never holding the
    /// full logits; `None`: from the full logits.
    pub head_chunk_tokens: Option<usize>,
    /// Seed of the dropout masks replayed under checkpointing (varied per micro-batch by the caller).
    pub dropout_seed: u64,
}

/// Logits per head chunk with `use_liger_kernel` (2²⁵ values, 64 MiB in bf16): 261 tokens of a
/// 128k vocabulary, 682 of SmolLM2's 49k — at least `hidden_size` tokens where the head is
/// trained ([`chunk_tokens_for_head`]).
pub const HEAD_CHUNK_VALUES: usize = 1 << 25;

impl StepOptions {
    /// The step a run takes on `model` when asked for `gradient_checkpointing` and `chunked_head`:
    /// a 4-bit base is always checkpointed (burn's matmul keeps its operands for the backward
    /// pass, so every dequantized layer weight would otherwise stay resident — PEFT's
    /// `prepare_model_for_kbit_training` turns checkpointing on for the same reason), and the
    /// head chunk follows the vocabulary ([`HEAD_CHUNK_VALUES`]).
    pub fn for_model<B: Backend>(model: &CausalLm<B>, gradient_checkpointing: bool, chunked_head: bool) -> Self {
        StepOptions {
            gradient_checkpointing: gradient_checkpointing || model.has_quantized_layers(),
            head_chunk_tokens: chunked_head.then(|| {
                chunk_tokens_for_head(model.config.vocab_size, model.config.hidden_size, head_is_trainable(model), HEAD_CHUNK_VALUES)
            }),
            dropout_seed: 0,
        }
    }
}

/// How the loop's optimizer steps are replayed from a captured step (`TrainerConfig::step_graphs`,
/// `torch_compile_mode: reduce-overhead`; `crate::graph_steps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMode {
    /// Captured as a CUDA graph and replayed (libtorch on a GPU, a binary built with CUDA graphs).
    Capture,
    /// The same loop without the capture: each replay runs the captured step's host code again
    /// over the refilled tensors. For checking on the CPU that a replay sees everything that
    /// changes between steps.
    Emulated,
}

/// A micro-batch made ready for [`forward_backward_prepared`]: what the objective scores and the
/// model's inputs, uploaded to the device.
#[derive(Debug, Clone)]
pub struct PreparedBatch<B: Backend> {
    pub scoring: Scoring<B>,
    pub inputs: BatchInputs<B>,
}

/// Uploads what one micro-batch of `examples` puts through `model`: [`Task::scoring`]'s label
/// sets and [`CausalLm::batch_inputs`] of its rows.
pub fn prepare<B: AutodiffBackend, T: Task>(
    model: &CausalLm<B>,
    task: &T,
    examples: &[&T::Example],
    device: &B::Device,
) -> PreparedBatch<B> {
    let scoring = task.scoring::<B>(examples, device);
    let inputs = model.batch_inputs(&scoring.batch);
    PreparedBatch { scoring, inputs }
}

/// Runs `task` on `examples`, adding the gradients of `scale × loss` to `accumulator`, and
/// returns the micro-batch's metrics (still on the device).
pub fn forward_backward<B: AutodiffBackend, T: Task>(
    model: &CausalLm<B>,
    task: &T,
    examples: &[&T::Example],
    scale: f64,
    options: &StepOptions,
    accumulator: &mut GradientsAccumulator<CausalLm<B>>,
    device: &B::Device,
) -> DeferredMetrics<B> {
    let prepared = prepare(model, task, examples, device);
    forward_backward_prepared(model, task, &prepared, examples, scale, options, accumulator, device)
}

/// [`forward_backward`] of a micro-batch already [`prepare`]d: nothing moves between host and
/// device between `prepared`'s uploads and the loss's metrics (the loss reads what the
/// objective uploaded with the rows: [`Task::loss_from_scored`]), so this is the part of a step
/// a CUDA graph can capture (`tch_graph`).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_prepared<B: AutodiffBackend, T: Task>(
    model: &CausalLm<B>,
    task: &T,
    prepared: &PreparedBatch<B>,
    examples: &[&T::Example],
    scale: f64,
    options: &StepOptions,
    accumulator: &mut GradientsAccumulator<CausalLm<B>>,
    device: &B::Device,
) -> DeferredMetrics<B> {
    forward_backward_scaled(model, task, prepared, examples, &LossScale::Number(scale), options, accumulator, device)
}

/// What a micro-batch's loss is multiplied by before its backward pass: one over the weight of
/// the step it belongs to ([`Task::weight`]).
#[derive(Debug, Clone)]
pub enum LossScale<B: AutodiffBackend> {
    /// A number, which the kernels take as an argument (an eager step).
    Number(f64),
    /// A `[1]` f32 tensor on the device, refilled before each replay of a step captured as a
    /// CUDA graph (`crate::graph_steps`): the kernels read it there, so every replay scales by
    /// its own step's weight where a number would have stayed the captured step's. The same
    /// products as [`LossScale::Number`] (its value is the number rounded to f32, as
    /// `mul_scalar` rounds it).
    Device(Tensor<B::InnerBackend, 1>),
}

impl<B: AutodiffBackend> LossScale<B> {
    /// `loss × scale`.
    fn apply(&self, loss: Tensor<B, 1>) -> Tensor<B, 1> {
        match self {
            LossScale::Number(scale) => loss.mul_scalar(*scale),
            LossScale::Device(scale) => loss * Tensor::from_inner(scale.clone()),
        }
    }

    /// `[rows]` of `c × scale` (a constant `∂loss/∂sum`, [`Task::constant_sum_gradients`]).
    /// With the scale on the device, `c` multiplies first: the same bits as the number's
    /// `c × scale` for SFT's `c = −1`, within an f32 rounding otherwise.
    fn constant(&self, c: f64, rows: usize, device: &burn::tensor::Device<B::InnerBackend>) -> Tensor<B::InnerBackend, 1> {
        // `ones × c` rather than `full(c)`: burn-tch makes a full tensor from host data (an
        // upload inside the step, which a CUDA graph cannot hold).
        let ones = Tensor::<B::InnerBackend, 1>::ones([rows], device);
        match self {
            LossScale::Number(scale) => ones.mul_scalar((c * scale) as f32),
            LossScale::Device(scale) => ones.mul_scalar(c as f32) * scale.clone(),
        }
    }
}

/// [`forward_backward_prepared`] with the loss scaled by `scale`, a number or a tensor on the
/// device ([`LossScale`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_scaled<B: AutodiffBackend, T: Task>(
    model: &CausalLm<B>,
    task: &T,
    prepared: &PreparedBatch<B>,
    examples: &[&T::Example],
    scale: &LossScale<B>,
    options: &StepOptions,
    accumulator: &mut GradientsAccumulator<CausalLm<B>>,
    device: &B::Device,
) -> DeferredMetrics<B> {
    let scoring = prepared.scoring.clone();
    let inputs = &prepared.inputs;
    // With LoRA dropout the generator is reseeded before each layer, in every mode, so the masks
    // are a function of the seed: replayable by checkpointing and by a resumed run.
    let replay = model.has_lora_dropout();

    // The layers' forward pass: with a graph, or (checkpointing) on the inner backend keeping
    // each layer's input, the final norm then applied on the autodiff side to a leaf.
    let (hidden, checkpoints) = if options.gradient_checkpointing {
        let mut frozen = model.valid();
        if replay {
            frozen = force_lora_dropout(frozen);
        }
        let inner = inputs.clone().inner();
        let mut xs = vec![frozen.embed_ids(inner.ids)];
        for (l, layer) in frozen.layers.iter().enumerate() {
            if replay {
                B::seed(device, layer_seed(options.dropout_seed, l)); // seeds the inner backend's generator
            }
            let x = layer.forward(xs[l].clone(), &inner.layers, None);
            xs.push(x);
        }
        let top = Tensor::<B, 3>::from_inner(xs.pop().expect("the embedding at least")).require_grad();
        (model.norm.forward(top.clone()), Some((xs, top)))
    } else if replay {
        let mut x = model.embed_ids(inputs.ids.clone());
        for (l, layer) in model.layers.iter().enumerate() {
            B::seed(device, layer_seed(options.dropout_seed, l));
            x = layer.forward(x, &inputs.layers, None);
        }
        (model.norm.forward(x), None)
    } else {
        (model.hidden_states_of(inputs), None)
    };

    // The head and the loss: gradients of everything above `hidden`, and ∂hidden.
    let metrics = match options.head_chunk_tokens {
        None => {
            // Half-type logits under mixed precision: the loss casts runs of positions to f32.
            let logps = sequence_logps_with(model.project_in_product_type(hidden), scoring.label_sets, task.extra_stats());
            let (loss, metrics) = task.loss_from_scored(logps, examples, &prepared.scoring, device);
            let grads = scale.apply(loss).backward();
            let top_grad = checkpoints.as_ref().and_then(|(_, top)| top.grad(&grads));
            accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
            if let Some((xs, _)) = checkpoints {
                backward_layers(model, inputs, xs, top_grad.expect("the leaf feeds the loss"), options, replay, accumulator);
            }
            metrics
        }
        Some(chunk) => {
            let label_sets: Vec<Tensor<B::InnerBackend, 2, Int>> = scoring.label_sets.into_iter().map(Tensor::inner).collect();
            let hidden_values = hidden.clone().inner();
            let weight = model.head_weight_for_products().inner();
            let (head, metrics) = match task.constant_sum_gradients() {
                // ∂loss/∂sum known before the loss: both passes in one walk over the chunks; the
                // loss is computed for its metrics only.
                Some(coefficients) => {
                    let rows = hidden_values.dims()[0];
                    let inner = hidden_values.device();
                    let upstream = coefficients.iter().map(|c| scale.constant(*c, rows, &inner)).collect();
                    let (logps, head) = chunked_logps_and_backward(
                        hidden_values,
                        weight,
                        head_is_trainable(model),
                        label_sets,
                        upstream,
                        chunk,
                        task.extra_stats(),
                    );
                    let untracked = logps.into_iter().map(|l| {
                        let sum = Tensor::from_inner(l.sum.clone());
                        on_autodiff::<B>(l, sum)
                    });
                    (head, task.loss_from_scored(untracked.collect(), examples, &prepared.scoring, device).1)
                }
                None => {
                    let logps =
                        chunked_sequence_logps_with(hidden_values.clone(), weight.clone(), label_sets.clone(), chunk, task.extra_stats());
                    // The objective on leaves standing for the per-row sums: its backward pass
                    // gives ∂loss/∂sum, all that pass 2 needs.
                    let leaves: Vec<Tensor<B, 1>> = logps.iter().map(|l| Tensor::from_inner(l.sum.clone()).require_grad()).collect();
                    let tracked = logps.into_iter().zip(&leaves).map(|(l, leaf)| on_autodiff::<B>(l, leaf.clone())).collect();
                    let (loss, metrics) = task.loss_from_scored(tracked, examples, &prepared.scoring, device);
                    let loss_grads = scale.apply(loss).backward();
                    let upstream =
                        leaves.iter().map(|leaf| leaf.grad(&loss_grads).unwrap_or_else(|| leaf.clone().inner().zeros_like())).collect();
                    (chunked_logps_backward(hidden_values, weight, head_is_trainable(model), label_sets, upstream, chunk), metrics)
                }
            };
            if let Some(grad) = head.weight {
                add_head_gradient(model, grad, accumulator);
            }
            let grads = (hidden * Tensor::from_inner(head.hidden)).sum().backward();
            let top_grad = checkpoints.as_ref().and_then(|(_, top)| top.grad(&grads));
            accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
            if let Some((xs, _)) = checkpoints {
                backward_layers(model, inputs, xs, top_grad.expect("the leaf feeds the norm"), options, replay, accumulator);
            }
            metrics
        }
    };
    metrics
}

/// Checkpointing's backward pass: each layer recomputed from its saved input with a graph of its
/// own, from the last to the first, then the embedding.
fn backward_layers<B: AutodiffBackend>(
    model: &CausalLm<B>,
    inputs: &BatchInputs<B>,
    mut inputs_saved: Vec<Tensor<B::InnerBackend, 3>>,
    top_grad: Tensor<B::InnerBackend, 3>,
    options: &StepOptions,
    replay: bool,
    accumulator: &mut GradientsAccumulator<CausalLm<B>>,
) {
    let device = model.embed_tokens.device();
    let mut grad = top_grad;
    for l in (0..model.layers.len()).rev() {
        let x = Tensor::<B, 3>::from_inner(inputs_saved.pop().expect("one input per layer")).require_grad();
        if replay {
            B::seed(&device, layer_seed(options.dropout_seed, l));
        }
        let y = model.layers[l].forward(x.clone(), &inputs.layers, None);
        let grads = (y * Tensor::from_inner(grad)).sum().backward();
        grad = x.grad(&grads).expect("the layer input is a leaf that requires grad");
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    if embedding_is_trainable(model) {
        let grads = (model.embed_ids(inputs.ids.clone()) * Tensor::from_inner(grad)).sum().backward();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
}

/// The dropout seed of layer `l` within a micro-batch.
fn layer_seed(seed: u64, layer: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (layer as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Pass-1 statistics (inner backend) as `B` tensors, with `sum` replaced by `leaf`.
fn on_autodiff<B: AutodiffBackend>(logps: SequenceLogps<B::InnerBackend>, leaf: Tensor<B, 1>) -> SequenceLogps<B> {
    SequenceLogps {
        sum: leaf,
        num_tokens: Tensor::from_inner(logps.num_tokens),
        mean_logits: Tensor::from_inner(logps.mean_logits),
        mean_logits_all: Tensor::from_inner(logps.mean_logits_all),
        entropy_sum: Tensor::from_inner(logps.entropy_sum),
        num_correct: Tensor::from_inner(logps.num_correct),
        log_sum_sq_probs: logps.log_sum_sq_probs.map(Tensor::from_inner),
    }
}

/// Whether the embedding is trained.
fn embedding_is_trainable<B: Backend>(model: &CausalLm<B>) -> bool {
    model.embed_compressed.as_ref().map_or(model.embed_tokens.is_require_grad(), |c| c.is_trainable())
}

/// Whether the head weight (`lm_head`, or the tied embedding) is trained.
fn head_is_trainable<B: Backend>(model: &CausalLm<B>) -> bool {
    match &model.lm_head {
        Some(head) => head.compressed.as_ref().map_or(head.weight.is_require_grad(), |c| c.is_trainable()),
        None => embedding_is_trainable(model),
    }
}

/// Adds `grad` (`∂W` of the head) to whatever holds the head weight: the `lm_head` or tied
/// embedding parameter, or a trainable compressed weight (a ZeRO-3 shard).
fn add_head_gradient<B: AutodiffBackend>(
    model: &CausalLm<B>,
    grad: Tensor<B::InnerBackend, 2>,
    accumulator: &mut GradientsAccumulator<CausalLm<B>>,
) {
    let (id, compressed) = match &model.lm_head {
        Some(head) => (head.weight.id, head.compressed.clone()),
        None => (model.embed_tokens.id, model.embed_compressed.clone()),
    };
    match compressed {
        Some(weight) => weight.accumulate_gradient(Box::new(grad)),
        None => {
            let mut grads = GradientsParams::new();
            grads.register::<B::InnerBackend, 2>(id, grad);
            accumulator.accumulate(model, grads);
        }
    }
}

/// The model with `force_dropout` set on every LoRA adapter: the inner-backend copy that
/// checkpointing's forward pass runs, which must drop what the training pass drops.
fn force_lora_dropout<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for layer in &mut model.layers {
        for (_, linear) in layer.linears_mut() {
            if let Some(adapter) = linear.lora.as_mut() {
                adapter.force_dropout = true;
            }
        }
    }
    model
}
