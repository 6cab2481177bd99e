//! AdamW with PyTorch's semantics, global-norm gradient clipping, and transformers' rule for
//! which parameters get weight decay (none for norms and biases).
//!
//! burn's own optimizers clip per tensor and decay every parameter alike; training recipes need
//! the global norm (`max_grad_norm`, as `torch.nn.utils.clip_grad_norm_`) and the decay
//! exclusion (transformers' `get_decay_parameter_names`), so the update is written out here:
//!
//! ```text
//! g ← g · min(1, max_norm / (‖g‖₂ + 1e-6))        (‖g‖ over all parameters)
//! p ← p − lr · wd · p                            (decoupled decay, skipped for norms/biases)
//! m ← β₁m + (1−β₁)g ;  v ← β₂v + (1−β₂)g²
//! p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
//! ```
//! Moments live on the inner (non-autodiff) backend, keyed by parameter path so they can be
//! checkpointed and restored by name. The update is written twice, as tensor operations
//! (`adamw_on_tensors`, any backend) and as one threaded pass over host buffers
//! ([`adamw_on_slices`]), with the same f32 operations in the same order, so the two are
//! bit-identical (`cpu_adamw.rs`'s test). The host pass serves the CPU backend's one-process
//! step (`cpu_adamw.rs`) and every data-parallel stage's owned shard (`data_parallel.rs`).
//!
//! On burn's GPU backends the one-process update is one CubeCL kernel per parameter
//! (`adamw_kernel.rs`), the same f32 operations in the same order, in place.
//!
//! `optim: adamw_bnb_8bit` (and `adamw_8bit`, `paged_adamw_8bit`) swaps it for bitsandbytes'
//! AdamW with 8-bit block-wise moments, after the same clipping: a host pass on the CPU backend
//! (`crate::adam8bit`), the same arithmetic as tensor operations on the device elsewhere
//! (`crate::adam8bit_tensors`), bitsandbytes' own kernels on libtorch with a GPU when its
//! library is found (`tch_adam8bit`).
//!
//! `optim: rmsprop` swaps the update for `torch.optim.RMSprop` with transformers' arguments
//! (`α = 0.99`, `ε = 1e-8`, weight decay added to the gradient, no momentum), after the same
//! clipping: `v ← αv + (1−α)g² ; p ← p − lr · g / (√v + ε)`; `v` is kept as `exp_avg_sq`.

use crate::adam8bit_tensors::{BlockwiseState, CodeTables};
use alignment_core::precision::{cast_to, float_type};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor};
use std::collections::HashMap;
use std::ops::Range;

/// AdamW hyper-parameters (TrainingArguments names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Global-norm clipping threshold; `None` or ≤ 0 disables clipping.
    pub max_grad_norm: Option<f64>,
    /// The update applied after clipping (`optim`).
    pub rule: UpdateRule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0), rule: UpdateRule::AdamW }
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s ε: gradients of global norm `‖g‖` are scaled by
/// `min(1, max_grad_norm / (‖g‖ + ε))`.
pub const CLIP_EPSILON: f64 = 1e-6;

impl AdamWConfig {
    /// The global-norm threshold when clipping applies (`max_grad_norm` set and > 0).
    pub fn clip_threshold(&self) -> Option<f64> {
        self.max_grad_norm.filter(|&max| max > 0.0)
    }

    /// The factor gradients of global norm `norm` are scaled by (1 without clipping): the host
    /// form of what [`AdamW::step`] computes on the device.
    pub fn clip_factor(&self, norm: f64) -> f64 {
        self.clip_threshold().map_or(1.0, |max| (max / (norm + CLIP_EPSILON)).min(1.0))
    }

    /// [`Self::clip_factor`] on the device, from a `[1]` global norm; `None` without clipping.
    pub fn clip_factor_on_device<B: Backend>(&self, grad_norm: &Tensor<B, 1>) -> Option<Tensor<B, 1>> {
        self.clip_threshold().map(|max| grad_norm.clone().add_scalar(CLIP_EPSILON).recip().mul_scalar(max).clamp_max(1.0))
    }
}

/// The update rule an `optim` value selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdateRule {
    /// `torch.optim.AdamW` (`adamw_torch`, `adamw_torch_fused`, and `paged_adamw_32bit`, whose
    /// update is the same: paging only moves the moments between GPU and host memory).
    #[default]
    AdamW,
    /// bitsandbytes' AdamW with 8-bit block-wise moments (`adamw_bnb_8bit`, `adamw_8bit`, and
    /// `paged_adamw_8bit`, the same update paged): `crate::adam8bit`.
    AdamW8bit,
    /// `torch.optim.RMSprop` with transformers' defaults (`rmsprop`).
    RmsProp,
}

impl UpdateRule {
    /// The rule and the `optim` values that select it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::AdamW => "AdamW (adamw_torch, adamw_torch_fused, paged_adamw_32bit)",
            Self::AdamW8bit => "8-bit AdamW (adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit)",
            Self::RmsProp => "RMSprop (rmsprop)",
        }
    }

    /// The rule of transformers' `optim` value `name`; an error naming the values this
    /// implementation has for the others (8-bit RMSprop and Lion among them).
    pub fn from_optim(name: &str) -> Result<Self, String> {
        match name {
            "adamw_torch" | "adamw_torch_fused" | "paged_adamw_32bit" => Ok(UpdateRule::AdamW),
            "adamw_bnb_8bit" | "adamw_8bit" | "paged_adamw_8bit" => Ok(UpdateRule::AdamW8bit),
            "rmsprop" => Ok(UpdateRule::RmsProp),
            "rmsprop_bnb_8bit" | "lion_8bit" | "paged_lion_8bit" => Err(format!(
                "`{name}`: 8-bit RMSprop/Lion (bitsandbytes' block-quantised moments) are not implemented; \
                 use rmsprop or adamw_torch"
            )),
            other => Err(format!(
                "`{other}` is not implemented (supported: adamw_torch, adamw_torch_fused, paged_adamw_32bit, adamw_bnb_8bit, \
                 adamw_8bit, paged_adamw_8bit, rmsprop)"
            )),
        }
    }
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

impl<B: Backend> Moments<B> {
    /// Fresh moments of `len` elements (a parameter's first update).
    pub fn zeros(len: usize, device: &B::Device) -> Self {
        Self { exp_avg: Tensor::zeros([len], device), exp_avg_sq: Tensor::zeros([len], device) }
    }

    /// Both moments in `dtype` (themselves when already of it).
    pub fn in_type(self, dtype: FloatDType) -> Self {
        Self { exp_avg: cast_to(self.exp_avg, dtype), exp_avg_sq: cast_to(self.exp_avg_sq, dtype) }
    }
}

/// The optimizer: configuration, step count and per-parameter moments.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Number of updates applied so far.
    pub step: u64,
    /// Moments by parameter path (e.g. `layers.0.self_attn.q_proj.weight`).
    pub state: HashMap<String, Moments<B>>,
    /// 8-bit moments by parameter path (`optim: adamw_bnb_8bit`'s large parameters; the others
    /// keep theirs in `state`): on the host for the host pass (a CPU device), on the parameters'
    /// device for a GPU's.
    pub blockwise: HashMap<String, BlockwiseState<B>>,
    /// bitsandbytes' quantization maps on the parameters' device, for the 8-bit update's tensor
    /// form; uploaded at its first use, never saved.
    pub(crate) code_tables: Option<CodeTables<B>>,
    /// The step count and learning rate on the device, for an update that reads them there
    /// (libtorch's fused AdamW); derived from `step`, never saved.
    #[cfg(feature = "tch")]
    pub(crate) device_scalars: Option<DeviceScalars<B>>,
}

/// An update's step count and learning rate as `[1]` f32 tensors on the parameters' device,
/// kept from one step to the next and changed in place (the count advanced, the rate filled), as
/// `torch.optim.AdamW(capturable=True)` keeps its `state_steps`: a step replayed as a CUDA graph
/// reads them where a number would have been baked in at capture.
#[cfg(feature = "tch")]
#[derive(Debug, Clone)]
pub(crate) struct DeviceScalars<B: Backend> {
    /// The count of the update that last used it (from 1).
    pub step: Tensor<B, 1>,
    pub lr: Tensor<B, 1>,
    /// The host's count (`AdamW::step`) when `step` was last written: a count set from outside
    /// (a resumed run) makes the device's stale, and it is written afresh.
    pub counts: u64,
}

/// What one optimizer step did, for logging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping (`grad_norm` in transformers' logs).
    pub grad_norm: f64,
    /// Factor applied to the gradients (1 when not clipped).
    pub clip_coef: f64,
}

/// [`StepReport`] still on the device (`[1]` tensors): the one-process step computes the norm
/// and the clipping factor without reading them back; the loop reads them when it logs.
#[derive(Debug, Clone)]
pub struct DeviceStepReport<B: Backend> {
    pub grad_norm: Tensor<B, 1>,
    pub clip_coef: Tensor<B, 1>,
}

impl<B: Backend> DeviceStepReport<B> {
    /// Reads both values (waits for the device).
    pub fn read(&self) -> StepReport {
        let values: Vec<f64> = Tensor::cat(vec![self.grad_norm.clone(), self.clip_coef.clone()], 0).into_data().iter::<f64>().collect();
        StepReport { grad_norm: values[0], clip_coef: values[1] }
    }
}

/// Whether transformers would exempt this parameter from weight decay: biases and the weights
/// of normalisation layers.
pub fn excluded_from_decay(path: &str) -> bool {
    path.ends_with("bias") || path.split('.').any(|part| part.contains("norm"))
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            state: HashMap::new(),
            blockwise: HashMap::new(),
            code_tables: None,
            #[cfg(feature = "tch")]
            device_scalars: None,
        }
    }

    /// Bytes of the optimizer's state in its own format: 4 a value for f32 moments (RMSprop's
    /// one, AdamW's two), bitsandbytes' for the 8-bit ones ([`BlockwiseState::format_bytes`]).
    pub fn state_bytes(&self) -> usize {
        let moments: usize = self.state.values().map(|m| 4 * (m.exp_avg.dims()[0] + m.exp_avg_sq.dims()[0])).sum();
        moments + self.blockwise.values().map(BlockwiseState::format_bytes).sum::<usize>()
    }

    /// Applies one update with learning rate `lr` to every parameter of `module` that has a
    /// gradient in `grads`, clipping by global norm first. Nothing is read back from the device:
    /// the norm and the clipping factor are `[1]` tensors, the factor multiplies every gradient
    /// (as `torch.nn.utils.clip_grad_norm_` does, `min(1, max_norm / (‖g‖ + 1e-6))`).
    ///
    /// The step consumes the gradients, as PyTorch's clipping and fused AdamW do: on libtorch
    /// they are scaled in place (`tch_adamw`). A gradient tensor the caller still holds a handle
    /// to is copied first and keeps its values.
    pub fn step<AD, M>(&mut self, lr: f64, module: M, grads: GradientsParams) -> (M, DeviceStepReport<B>)
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AD>,
    {
        #[cfg(feature = "tch")]
        if self.config.rule == UpdateRule::AdamW && crate::tch_adamw::applies::<B>() {
            return crate::tch_adamw::step::<AD, M>(self, lr, module, grads);
        }
        let grads = &grads;
        let mut norm = GradNorm::<B> { grads, sum_squares: None };
        module.visit(&mut norm);
        let sum_squares = norm.sum_squares.unwrap_or_else(|| Tensor::zeros([1], &Default::default()));
        let grad_norm = sum_squares.sqrt();
        let clip_coef = self.config.clip_factor_on_device(&grad_norm);
        self.step += 1;
        // The CPU backend's one-pass AdamW takes the clipping factor as a number: read once here.
        #[cfg(feature = "ndarray")]
        let cpu_clip = crate::cpu_adamw::applies::<B>()
            .then(|| clip_coef.clone().map(|coef| burn::tensor::ElementConversion::elem::<f32>(coef.into_scalar())));
        #[cfg(not(feature = "ndarray"))]
        let cpu_clip = None;
        // The GPU backends' one-kernel AdamW takes the factor as a `[1]` tensor, ones without clipping.
        let kernel_clip = (self.config.rule == UpdateRule::AdamW && update_by_kernel::<B>())
            .then(|| clip_coef.clone().unwrap_or_else(|| grad_norm.ones_like()));
        let mut mapper = Update::<AD> { optimizer: self, grads, lr, clip_coef: clip_coef.clone(), cpu_clip, kernel_clip, path: Vec::new() };
        let module = module.map(&mut mapper);
        let clip_coef = clip_coef.unwrap_or_else(|| grad_norm.ones_like());
        (module, DeviceStepReport { grad_norm, clip_coef })
    }
}

struct GradNorm<'a, B: Backend> {
    grads: &'a GradientsParams,
    /// `[1]`, on the gradients' device.
    sum_squares: Option<Tensor<B, 1>>,
}

impl<AD: AutodiffBackend> ModuleVisitor<AD> for GradNorm<'_, AD::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        if let Some(g) = self.grads.get::<AD::InnerBackend, D>(param.id) {
            // Summed in f32 whatever the gradient's type (a bf16 adapter's).
            let s = cast_to(g, float_type::<AD::InnerBackend>()).square().sum();
            self.sum_squares = Some(match self.sum_squares.take() {
                Some(total) => total + s,
                None => s,
            });
        }
    }
}

struct Update<'a, AD: AutodiffBackend> {
    optimizer: &'a mut AdamW<AD::InnerBackend>,
    grads: &'a GradientsParams,
    lr: f64,
    /// `[1]` clipping factor, `None` without clipping.
    clip_coef: Option<Tensor<AD::InnerBackend, 1>>,
    /// `Some` when AdamW runs as the CPU backend's one pass (`cpu_adamw`), holding the clipping
    /// factor's value (`None` without clipping).
    cpu_clip: Option<Option<f32>>,
    /// `Some` when AdamW runs as one kernel per parameter on a GPU backend (`adamw_kernel`),
    /// holding the `[1]` clipping factor (ones without clipping).
    kernel_clip: Option<Tensor<AD::InnerBackend, 1>>,
    path: Vec<String>,
}

impl<AD: AutodiffBackend> ModuleMapper<AD> for Update<'_, AD> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
        let id: ParamId = param.id;
        let Some(grad) = self.grads.get::<AD::InnerBackend, D>(id) else { return param };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let path = self.path.join(".");
        let c = self.optimizer.config;
        let t = self.optimizer.step as i32;
        let shape = tensor.shape();
        let numel = shape.num_elements();

        // A parameter held narrower than the backend's float type (QLoRA's bf16 adapters, as TRL
        // holds them) is updated in f32, as torch's fused AdamW computes, and stored back in its
        // type; AdamW's moments are kept in that type too (`zeros_like(p)` in torch), the 8-bit
        // and RMSprop states as they are.
        let stored: FloatDType = tensor.dtype().into();
        let float = float_type::<AD::InnerBackend>();
        let (p, grad) = (cast_to(tensor.inner(), float), cast_to(grad, float));
        let device = p.device();
        let clipped = |grad: Tensor<AD::InnerBackend, D>| -> Tensor<AD::InnerBackend, 1> {
            let g = match &self.clip_coef {
                Some(coef) => grad * coef.clone().reshape([1; D]),
                None => grad,
            };
            g.reshape([numel])
        };
        let (p, moments) = match c.rule {
            UpdateRule::AdamW8bit => {
                let decay = if excluded_from_decay(&path) { 0.0 } else { c.weight_decay };
                let scalars = crate::adam8bit::Scalars::new(c.beta1, c.beta2, c.epsilon, self.lr, decay, t as u64);
                let (p, moments) = update_8bit(self.optimizer, &path, &scalars, p.reshape([numel]), clipped(grad));
                (p.reshape(shape), moments)
            }
            UpdateRule::AdamW => {
                let moments = self.optimizer.state.remove(&path).unwrap_or_else(|| Moments::zeros(numel, &device)).in_type(float);
                let decays = !excluded_from_decay(&path);
                let scalars = AdamWScalars::new(&c, self.lr, t, decays);
                let (p, moments) = match (self.cpu_clip, &self.kernel_clip) {
                    #[cfg(feature = "ndarray")]
                    (Some(clip), _) => crate::cpu_adamw::update(p, grad, moments, &scalars, clip),
                    #[cfg(any(feature = "cuda", feature = "wgpu"))]
                    (_, Some(clip)) => crate::adamw_kernel::update(p, grad, clip.clone(), moments, &scalars),
                    _ => adamw_on_tensors(p, clipped(grad), moments, &scalars, &[]),
                };
                (p, Some(moments.in_type(stored)))
            }
            UpdateRule::RmsProp => {
                const ALPHA: f64 = 0.99;
                const EPS: f64 = 1e-8;
                let g_flat = clipped(grad);
                let g_flat = if c.weight_decay > 0.0 && !excluded_from_decay(&path) {
                    g_flat + p.clone().reshape([numel]) * c.weight_decay
                } else {
                    g_flat
                };
                let square_avg = match self.optimizer.state.remove(&path) {
                    Some(m) => m.exp_avg_sq,
                    None => g_flat.zeros_like(),
                };
                let square_avg = square_avg * ALPHA + g_flat.clone().square() * (1.0 - ALPHA);
                let update = g_flat / (square_avg.clone().sqrt() + EPS) * self.lr;
                (p - update.reshape(shape), Some(Moments { exp_avg: Tensor::zeros([0], &device), exp_avg_sq: square_avg }))
            }
        };
        if let Some(moments) = moments {
            self.optimizer.state.insert(path, moments);
        }
        let p = cast_to(p, stored);
        Param::from_mapped_value(id, with_grad(Tensor::from_inner(p), require_grad), mapper)
    }
}

/// One `optim: adamw_bnb_8bit` update of the flat parameter `p` at `path` from its clipped
/// gradient `g`, with the moments `optimizer` keeps for it: 8-bit block-wise for a large
/// parameter, f32 for the others. Where the device is the host, the host pass (`crate::adam8bit`);
/// on a GPU, bitsandbytes' own kernels (libtorch, its library found: `tch_adam8bit`) or the
/// tensor form (`crate::adam8bit_tensors`). Returns the parameter and the f32 moments to keep
/// (`None`: kept 8-bit).
fn update_8bit<B: Backend>(
    optimizer: &mut AdamW<B>,
    path: &str,
    scalars: &crate::adam8bit::Scalars,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
) -> (Tensor<B, 1>, Option<Moments<B>>) {
    use crate::adam8bit::{quantizes, BlockwiseMoments};
    let (numel, device) = (p.dims()[0], p.device());
    let eight_bit = quantizes(path, numel);
    let blockwise = optimizer.blockwise.remove(path);
    let moments = optimizer.state.remove(path);
    if updates_on_host::<B>(&device) {
        let tensor = |values: Vec<f32>| Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(values, [numel]), &device);
        let (mut values, g) = (host_values(p), host_values(g));
        if eight_bit {
            let mut state = blockwise.map_or_else(|| BlockwiseMoments::zeros(numel), BlockwiseState::into_host);
            crate::adam8bit::update_blockwise(scalars, &mut values, &g, &mut state);
            optimizer.blockwise.insert(path.to_string(), BlockwiseState::Host(state));
            return (tensor(values), None);
        }
        let (mut m, mut v) = match moments {
            Some(m) => (host_values(m.exp_avg), host_values(m.exp_avg_sq)),
            None => (vec![0.0; numel], vec![0.0; numel]),
        };
        crate::adam8bit::update_32bit(scalars, &mut values, &g, &mut m, &mut v);
        return (tensor(values), Some(Moments { exp_avg: tensor(m), exp_avg_sq: tensor(v) }));
    }
    // On libtorch with a GPU, bitsandbytes' own kernels when its library is found (they count
    // elements in an `int`).
    #[cfg(feature = "tch")]
    let kernels = crate::tch_adam8bit::kernels_for::<B>(&device).filter(|_| i32::try_from(numel).is_ok());
    if eight_bit {
        let state = blockwise.unwrap_or_else(|| BlockwiseState::Host(BlockwiseMoments::zeros(numel))).into_device(&device);
        let maps = optimizer.code_tables.get_or_insert_with(|| CodeTables::new(&device));
        #[cfg(feature = "tch")]
        let (p, state) = match kernels {
            Some(kernels) => crate::tch_adam8bit::update_blockwise(kernels, scalars, maps, p, g, state),
            None => crate::adam8bit_tensors::update_blockwise(scalars, maps, p, g, state),
        };
        #[cfg(not(feature = "tch"))]
        let (p, state) = crate::adam8bit_tensors::update_blockwise(scalars, maps, p, g, state);
        optimizer.blockwise.insert(path.to_string(), BlockwiseState::Device(state));
        return (p, None);
    }
    let Moments { exp_avg, exp_avg_sq } = moments.unwrap_or_else(|| Moments::zeros(numel, &device));
    #[cfg(feature = "tch")]
    let (p, exp_avg, exp_avg_sq) = match kernels {
        Some(kernels) => crate::tch_adam8bit::update_32bit(kernels, scalars, p, g, exp_avg, exp_avg_sq),
        None => crate::adam8bit_tensors::update_32bit(scalars, p, g, exp_avg, exp_avg_sq),
    };
    #[cfg(not(feature = "tch"))]
    let (p, exp_avg, exp_avg_sq) = crate::adam8bit_tensors::update_32bit(scalars, p, g, exp_avg, exp_avg_sq);
    (p, Some(Moments { exp_avg, exp_avg_sq }))
}

/// Whether the 8-bit update on `B`'s `device` runs as the host pass: where the device is the
/// host (the CPU backend, libtorch on the CPU), whose one threaded pass is faster than the tensor
/// form's two hundred operations (`benches/adam8bit.rs`).
fn updates_on_host<B: Backend>(device: &B::Device) -> bool {
    #[cfg(feature = "ndarray")]
    if crate::cpu_adamw::applies::<B>() {
        return true;
    }
    #[cfg(feature = "tch")]
    if let Ok(device) = alignment_core::backend::downcast::<_, burn::backend::libtorch::LibTorchDevice>(device.clone()) {
        return device == burn::backend::libtorch::LibTorchDevice::Cpu;
    }
    let _ = device;
    false
}

/// Whether the one-process AdamW update on `B` (an autodiff's inner backend) runs as one CubeCL
/// kernel per parameter (`adamw_kernel`: burn's GPU backends, unless `ALIGNMENT_ADAMW_KERNEL=0`).
pub fn update_by_kernel<B: Backend>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return crate::adamw_kernel::enabled::<B>();
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    false
}

/// A tensor's values on the host, as f32.
fn host_values<B: Backend>(tensor: Tensor<B, 1>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert")
}

/// `tensor`, tracked again when the parameter was.
pub(crate) fn with_grad<AD: AutodiffBackend, const D: usize>(tensor: Tensor<AD, D>, require_grad: bool) -> Tensor<AD, D> {
    if require_grad {
        tensor.require_grad()
    } else {
        tensor
    }
}

/// One AdamW update's scalars, rounded to f32 as the tensor operations round them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWScalars {
    /// `lr · wd`, `None` for a parameter without decay.
    pub decay: Option<f32>,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `√(1 − β₂ᵗ)`.
    pub sqrt_bias2: f32,
    pub epsilon: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
}

impl AdamWScalars {
    pub(crate) fn new(c: &AdamWConfig, lr: f64, t: i32, decays: bool) -> Self {
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        Self {
            decay: (c.weight_decay > 0.0 && decays).then_some((lr * c.weight_decay) as f32),
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            sqrt_bias2: bias2.sqrt() as f32,
            epsilon: c.epsilon as f32,
            step_size: (lr / bias1) as f32,
        }
    }
}

/// Elements per task of [`adamw_on_slices`]: large enough to amortise scheduling, small enough
/// to balance the cores.
pub(crate) const HOST_CHUNK: usize = 1 << 16;

/// The AdamW update of `p` from its raw gradient `g` (multiplied by `clip` first when clipping)
/// and its moments `m`, `v`, in place, split across threads: the operations of
/// [`adamw_on_tensors`], element by element, in its order.
pub(crate) fn adamw_on_slices(s: &AdamWScalars, clip: Option<f32>, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    use rayon::prelude::*;
    assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len(), "AdamW: parameter, gradient and moments differ in size");
    p.par_chunks_mut(HOST_CHUNK)
        .zip(g.par_chunks(HOST_CHUNK))
        .zip(m.par_chunks_mut(HOST_CHUNK))
        .zip(v.par_chunks_mut(HOST_CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = match clip {
                    Some(coef) => g[i] * coef,
                    None => g[i],
                };
                let mut param = p[i];
                if let Some(decay) = s.decay {
                    param = param - param * decay;
                }
                let exp_avg = m[i] * s.beta1 + g * s.one_minus_beta1;
                let exp_avg_sq = v[i] * s.beta2 + (g * g) * s.one_minus_beta2;
                let denom = exp_avg_sq.sqrt() / s.sqrt_bias2 + s.epsilon;
                p[i] = param - (exp_avg / denom) * s.step_size;
                m[i] = exp_avg;
                v[i] = exp_avg_sq;
            }
        });
}

/// The AdamW update of one parameter `p` with its (clipped, flattened) gradient, by tensor
/// operations on any backend. `crate::cpu_adamw` does the same f32 operations in one pass.
///
/// `exempt` lets one call update a flat buffer of several parameters, some exempt from weight
/// decay (the data-parallel step's owned range): those ranges of the flattened `p` keep their
/// values through the decay, so every element gets the bits its own parameter's update would
/// give it, with no buffer the size of `p` to say which (the exempt norms and biases are a few
/// small ranges).
pub(crate) fn adamw_on_tensors<B: Backend, const D: usize>(
    p: Tensor<B, D>,
    g_flat: Tensor<B, 1>,
    moments: Moments<B>,
    s: &AdamWScalars,
    exempt: &[Range<usize>],
) -> (Tensor<B, D>, Moments<B>) {
    let shape = p.shape();
    let p = match s.decay {
        Some(decay) if exempt.is_empty() => p.clone() - p * decay,
        Some(decay) => {
            let flat = p.reshape([shape.num_elements()]);
            let decayed = flat.clone() - flat.clone() * decay;
            let kept = exempt.iter().fold(decayed, |d, r| d.slice_assign([r.clone()], flat.clone().narrow(0, r.start, r.len())));
            kept.reshape(shape.clone())
        }
        None => p,
    };
    let exp_avg = moments.exp_avg * s.beta1 + g_flat.clone() * s.one_minus_beta1;
    let exp_avg_sq = moments.exp_avg_sq * s.beta2 + g_flat.square() * s.one_minus_beta2;
    let denom = exp_avg_sq.clone().sqrt() / s.sqrt_bias2 + s.epsilon;
    let update = (exp_avg.clone() / denom) * s.step_size;
    (p - update.reshape(shape), Moments { exp_avg, exp_avg_sq })
}
