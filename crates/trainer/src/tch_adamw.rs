//! The optimizer step on libtorch (`--features tch`) as PyTorch runs it with
//! `clip_grad_norm_` and `torch.optim.AdamW(fused=True)`: the global gradient norm from one
//! `torch._foreach_norm` over every gradient, then one `torch._fused_adamw_` per weight-decay
//! group that updates every parameter and both moments in place, the clipping factor folded in as
//! its `grad_scale`. On the GPU that is a handful of multi-tensor kernels, where the tensor
//! formulation (`optimizer::adamw_on_tensors`) issues a dozen out-of-place torch calls per
//! parameter, and five per parameter even with a per-parameter fused update: the gradient's
//! square, its sum, the clipping multiply, the step count and the update. tch wraps neither
//! call: `csrc/fused_adamw.cpp` holds the C++ entries, built by `build.rs` against torch-sys's
//! libtorch.
//!
//! Same update as the tensor formulation (the test below, to f32 rounding: torch computes the
//! bias corrections in double and divides by `1/clip` where the tensors multiply by `clip`), so
//! checkpoints move between the two. The kernel writes the scaled gradient back, so the step
//! consumes its gradients; a tensor shared with anything else (burn-tch's storage count: a
//! gradient the caller kept a handle to, a checkpoint holding the moments) is copied first, so
//! nothing else sees the update.

use crate::optimizer::{excluded_from_decay, with_grad, AdamW, DeviceScalars, DeviceStepReport, Moments};
use alignment_core::backend::retype;
use burn::backend::libtorch::{LibTorch, TchTensor};
use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use std::ffi::{c_char, c_void, CStr};

type Torch = LibTorch<f32>;

extern "C" {
    /// `csrc/fused_adamw.cpp`; the tensors are `at::Tensor*`, what tch's handles point to.
    fn alignment_global_norm(tensors: *const *mut c_void, n: usize, norm: *mut *mut c_void) -> *mut c_char;
    fn alignment_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        n: usize,
        grad_scale: *mut c_void,
        step: *mut c_void,
        lr: *mut c_void,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn free(ptr: *mut c_void);
}

/// Whether `B` is the libtorch backend (f32) this update is written for.
pub(crate) fn applies<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<Torch>()
}

/// [`AdamW::step`] on libtorch: clips by the global norm and applies one AdamW update to every
/// parameter of `module` that has a gradient in `grads`. Only for `B = LibTorch<f32>` (see
/// [`applies`]) and the AdamW rule.
pub(crate) fn step<AD, M>(
    optimizer: &mut AdamW<AD::InnerBackend>,
    lr: f64,
    module: M,
    mut grads: GradientsParams,
) -> (M, DeviceStepReport<AD::InnerBackend>)
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD>,
{
    optimizer.step += 1;
    let mut lists = Lists::default();
    let module = module.map(&mut Collect::<AD> { grads: &mut grads, optimizer, lists: &mut lists, path: Vec::new() });

    let all_grads: Vec<*mut c_void> = lists.groups.iter().flat_map(|g| g.grads.iter()).map(handle).collect();
    if all_grads.is_empty() {
        // Nothing to update (every parameter frozen): the tensor formulation's report.
        let grad_norm = Tensor::<AD::InnerBackend, 1>::zeros([1], &Default::default());
        return (module, DeviceStepReport { clip_coef: grad_norm.ones_like(), grad_norm });
    }
    let mut norm_handle: *mut c_void = std::ptr::null_mut();
    // SAFETY: the handles are live tch tensors held by `lists`; the call only reads them and
    // stores a new handle, owned from here on, in `norm_handle`.
    check(unsafe { alignment_global_norm(all_grads.as_ptr(), all_grads.len(), &mut norm_handle) });
    // SAFETY: a fresh `new at::Tensor`, the allocation tch's handles own and free.
    let grad_norm: Tensor<AD::InnerBackend, 1> = wrap(unsafe { tch::Tensor::from_ptr(norm_handle.cast()) });
    let clip_coef = optimizer.config.clip_factor_on_device(&grad_norm);
    // The kernel divides by its scale: `1 / clip`, as `GradScaler` hands it the loss scale.
    let grad_scale = clip_coef.clone().map(|coef| torch_tensor(coef.recip(), false));
    let device = lists.groups.iter().flat_map(|g| g.params.first()).next().expect("a gradient, so a parameter").device();
    let (step_count, rate) = device_scalars(optimizer, lr, device);

    let c = optimizer.config;
    for (group, weight_decay) in lists.groups.iter().zip([c.weight_decay, 0.0]) {
        let [params, grads, exp_avgs, exp_avg_sqs] =
            [&group.params, &group.grads, &group.exp_avgs, &group.exp_avg_sqs].map(|list| list.iter().map(handle).collect::<Vec<_>>());
        let scale = grad_scale.as_ref().map_or(std::ptr::null_mut(), handle);
        // SAFETY: every handle is a live tch tensor held by `lists` (or `grad_scale`, `step_count`,
        // `rate`); the call reads the scale, count and rate and updates the parameters, gradients
        // and moments in place, none of which anything else holds (`torch_tensor(_, true)` copied
        // what was shared).
        check(unsafe {
            alignment_fused_adamw(
                params.as_ptr(),
                grads.as_ptr(),
                exp_avgs.as_ptr(),
                exp_avg_sqs.as_ptr(),
                params.len(),
                scale,
                handle(&step_count),
                handle(&rate),
                c.beta1,
                c.beta2,
                weight_decay,
                c.epsilon,
            )
        });
    }
    let clip_coef = clip_coef.unwrap_or_else(|| grad_norm.ones_like());
    (module, DeviceStepReport { grad_norm, clip_coef })
}

/// This update's step count (`optimizer.step`, already advanced) and the learning rate as `[1]` f32
/// tensors on `device`: as [`stage`] left them for this update, or else staged now.
fn device_scalars<B: Backend>(optimizer: &mut AdamW<B>, lr: f64, device: tch::Device) -> (tch::Tensor, tch::Tensor) {
    let step = optimizer.step;
    if optimizer.device_scalars.as_ref().is_none_or(|s| s.counts != step) {
        stage_update(optimizer, lr, device, step);
    }
    let kept = optimizer.device_scalars.as_ref().expect("staged for this update");
    (torch_tensor(kept.step.clone(), false), torch_tensor(kept.lr.clone(), false))
}

/// Writes the next update's step count (`optimizer.step + 1`) and learning rate `lr` into the
/// optimizer's `[1]` f32 tensors on `device`: the kept ones, the count advanced and the rate
/// filled in place (copied first if anything else holds them), or new ones when there are none
/// yet or the host's count moved without them (a resumed run). The update then reads them as
/// they are. Called before the update by the update itself, or by a loop replaying a captured
/// step (`crate::graph_steps`), whose replays must find this step's values there: a count or
/// rate written inside the capture would be the captured step's at every replay.
pub(crate) fn stage<B: Backend>(optimizer: &mut AdamW<B>, lr: f64, device: tch::Device) {
    stage_update(optimizer, lr, device, optimizer.step + 1);
}

/// [`stage`] for update number `next`.
fn stage_update<B: Backend>(optimizer: &mut AdamW<B>, lr: f64, device: tch::Device, next: u64) {
    let kept = optimizer.device_scalars.take().filter(|s| s.counts + 1 == next || s.counts == next);
    let options = (tch::Kind::Float, device);
    let (count, mut rate) = match kept.map(|s| (s.counts, torch_tensor(s.step, true), torch_tensor(s.lr, true))) {
        Some((counts, count, rate)) if count.device() == device && counts == next => (count, rate),
        // The kept count is the previous update's: one more, on the device.
        Some((_, mut count, rate)) if count.device() == device => {
            let _ = count.f_add_scalar_(1.0).expect("a [1] f32 tensor advances by one");
            (count, rate)
        }
        _ => (tch::Tensor::full([1], next as f64, options), tch::Tensor::zeros([1], options)),
    };
    let _ = rate.f_fill_(lr).expect("a [1] f32 tensor is filled");
    optimizer.device_scalars = Some(DeviceScalars { step: wrap(count), lr: wrap(rate), counts: next });
}

/// The tensors of one `_fused_adamw_` call.
#[derive(Default)]
struct Group {
    params: Vec<tch::Tensor>,
    grads: Vec<tch::Tensor>,
    exp_avgs: Vec<tch::Tensor>,
    exp_avg_sqs: Vec<tch::Tensor>,
}

/// The step's tensors: `groups[0]` with weight decay, `groups[1]` exempt (norms, biases).
#[derive(Default)]
struct Lists {
    groups: [Group; 2],
}

/// Takes each parameter that has a gradient out of the module, with its gradient and moments, as
/// contiguous torch tensors the update may write; puts back handles to the same storage, which
/// the update then changes in place.
struct Collect<'a, AD: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    optimizer: &'a mut AdamW<AD::InnerBackend>,
    lists: &'a mut Lists,
    path: Vec<String>,
}

impl<AD: AutodiffBackend> ModuleMapper<AD> for Collect<'_, AD> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
        let Some(grad) = self.grads.remove::<AD::InnerBackend, D>(param.id) else { return param };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let path = self.path.join(".");
        let p = tensor.inner();
        let numel = p.shape().num_elements();
        // In the parameter's type, as torch's AdamW keeps them (`zeros_like(p)`): bf16 for bf16
        // adapters (moments read back from a checkpoint arrive in f32, a lossless widening).
        let dtype = p.dtype().into();
        let moments = self.optimizer.state.remove(&path).unwrap_or_else(|| Moments::zeros(numel, &p.device())).in_type(dtype);
        // The kernel reads each parameter's gradient in its type (autodiff gives it so).
        let grad = alignment_core::precision::cast_to(grad, dtype);
        let group = &mut self.lists.groups[usize::from(excluded_from_decay(&path))];
        let (p, m, v) = (torch_tensor(p, true), torch_tensor(moments.exp_avg, true), torch_tensor(moments.exp_avg_sq, true));
        self.optimizer.state.insert(path, Moments { exp_avg: wrap(m.shallow_clone()), exp_avg_sq: wrap(v.shallow_clone()) });
        let updated = Tensor::from_inner(wrap(p.shallow_clone()));
        group.params.push(p);
        group.grads.push(torch_tensor(grad, true));
        group.exp_avgs.push(m);
        group.exp_avg_sqs.push(v);
        Param::from_mapped_value(id, with_grad(updated, require_grad), mapper)
    }
}

/// The `at::Tensor*` under a tch tensor, for the C++ entries (which never free it).
fn handle(t: &tch::Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// Panics with the message of a C++ entry that failed (a torch error on tensors this module
/// built: a bug, not bad input).
fn check(error: *mut c_char) {
    if !error.is_null() {
        // SAFETY: a NUL-terminated string from strdup, freed once.
        let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
        unsafe { free(error.cast()) };
        panic!("torch's fused AdamW step failed: {message}");
    }
}

/// The torch tensor under `tensor`, contiguous, and when `writable` held by nothing else (copied
/// when shared), so it can be updated in place.
fn torch_tensor<B: Backend, const D: usize>(tensor: Tensor<B, D>, writable: bool) -> tch::Tensor {
    exclusive(retype::<_, Tensor<Torch, D>>(tensor).into_primitive().tensor(), writable)
}

/// The contiguous torch tensor under `primitive`; when `writable`, held by nothing else (copied
/// when burn-tch's storage is shared).
pub(crate) fn exclusive(primitive: TchTensor, writable: bool) -> tch::Tensor {
    let shared = !primitive.can_mut();
    let t = primitive.tensor;
    let t = if writable && shared { t.copy() } else { t };
    if t.is_contiguous() {
        t
    } else {
        t.contiguous()
    }
}

fn wrap<B: Backend, const D: usize>(t: tch::Tensor) -> Tensor<B, D> {
    retype(Tensor::<Torch, D>::from_primitive(TensorPrimitive::Float(TchTensor::new(t))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{adamw_on_tensors, AdamWConfig, AdamWScalars};
    use burn::backend::libtorch::LibTorchDevice;
    use burn::backend::Autodiff;
    use burn::module::Module;
    use burn::tensor::Distribution;

    type Train = Autodiff<Torch>;

    /// Two parameters, one exempt from weight decay by its name.
    #[derive(Module, Debug)]
    struct Pair<B: Backend> {
        weight: Param<Tensor<B, 2>>,
        norm: Param<Tensor<B, 1>>,
    }

    fn values<const D: usize>(t: Tensor<Torch, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn max_relative(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn random<const D: usize>(shape: [usize; D], std: f64) -> Tensor<Torch, D> {
        Tensor::random(shape, Distribution::Normal(0.0, std), &LibTorchDevice::Cpu)
    }

    /// Three steps of the fused step against the tensor formulation, with and without clipping
    /// (at a threshold above the norm and far below it): the same parameters, moments and
    /// clipping factors. The first step's gradients are also held by the caller (shared: copied
    /// before the update, left as they were), the later ones only by the step's container
    /// (scaled in place).
    #[test]
    fn fused_step_equals_the_tensor_operations_and_leaves_shared_tensors_alone() {
        // Large enough that each update is far above the parameters' rounding (|p| ≤ 4, ulp 5e-7).
        const LR: f64 = 1e-2;
        for max_grad_norm in [Some(100.0), Some(1.0), None] {
            let config = AdamWConfig { weight_decay: 0.1, max_grad_norm, ..Default::default() };
            let weight = random([37, 129], 1.0);
            let norm = random([129], 1.0);
            let model = Pair::<Train> {
                weight: Param::from_tensor(Tensor::from_inner(weight.clone())),
                norm: Param::from_tensor(Tensor::from_inner(norm.clone())),
            };
            let (weight_id, norm_id) = (model.weight.id, model.norm.id);
            let mut model = model;
            let mut fused = AdamW::<Torch>::new(config);
            let (mut expected_weight, mut expected_norm) = (weight, norm);
            let mut reference: [Option<Moments<Torch>>; 2] = [None, None];
            for t in 1..=3 {
                // Odd steps: a transposed weight gradient, as the backward pass of a row-major
                // product leaves it (made contiguous, so a copy); even steps: contiguous ones.
                let weight_grad = if t % 2 == 1 { random([129, 37], 0.1).transpose() } else { random([37, 129], 0.1) };
                let norm_grad = random([129], 0.1);
                let device = LibTorchDevice::Cpu;
                let (weight_data, norm_data) = (weight_grad.to_data(), norm_grad.to_data());
                let mut grads = GradientsParams::new();
                // The first step's gradients are also held here; the later ones only by `grads`.
                let kept = (t == 1).then(|| (weight_grad.clone(), norm_grad.clone()));
                grads.register::<Torch, 2>(weight_id, weight_grad);
                grads.register::<Torch, 1>(norm_id, norm_grad);
                let before = values(model.weight.val().inner());
                let (updated, report) = step::<Train, _>(&mut fused, LR, model, grads);
                model = updated;
                if let Some((weight_grad, norm_grad)) = kept {
                    assert_eq!(weight_grad.to_data(), weight_data, "a gradient the caller kept was changed");
                    assert_eq!(norm_grad.to_data(), norm_data, "a gradient the caller kept was changed");
                }
                let weight_grad = Tensor::<Torch, 2>::from_data(weight_data, &device);
                let norm_grad = Tensor::<Torch, 1>::from_data(norm_data, &device);

                // The tensor formulation, parameter by parameter.
                let total = (weight_grad.clone().square().sum() + norm_grad.clone().square().sum()).sqrt();
                let coef = config.clip_factor(f64::from(total.into_scalar()));
                let report = report.read();
                assert!((report.clip_coef - coef).abs() <= 1e-6 * coef, "step {t}: clip factor {} vs {coef}", report.clip_coef);
                let mut update = |p: &mut Tensor<Torch, 2>, g: Tensor<Torch, 2>, slot: usize, decays: bool| {
                    let n = g.shape().num_elements();
                    let s = AdamWScalars::new(&config, LR, t, decays);
                    let moments = reference[slot].take().unwrap_or_else(|| Moments::zeros(n, &p.device()));
                    let (updated, moments) = adamw_on_tensors(p.clone(), (g * coef as f32).reshape([n]), moments, &s, &[]);
                    *p = updated;
                    reference[slot] = Some(moments);
                };
                update(&mut expected_weight, weight_grad, 0, true);
                let mut norm_2d = expected_norm.clone().reshape([1, 129]);
                update(&mut norm_2d, norm_grad.reshape([1, 129]), 1, false);
                expected_norm = norm_2d.reshape([129]);

                let (a, b) = (values(model.weight.val().inner()), values(expected_weight.clone()));
                assert!(a != before, "step {t}: the parameter did not move");
                // Relative to the update's size, not the parameter's: the update is what may differ.
                let delta: Vec<f32> = a.iter().zip(&before).map(|(x, y)| x - y).collect();
                let delta_ref: Vec<f32> = b.iter().zip(&before).map(|(x, y)| x - y).collect();
                assert!(max_relative(&delta, &delta_ref) < 1e-3, "step {t}: update {}", max_relative(&delta, &delta_ref));
                assert!(max_relative(&a, &b) < 1e-6, "step {t}: weight {}", max_relative(&a, &b));
                let (a, b) = (values(model.norm.val().inner()), values(expected_norm.clone()));
                assert!(max_relative(&a, &b) < 1e-6, "step {t}: norm (no decay) {}", max_relative(&a, &b));
                for (path, slot) in [("weight", 0), ("norm", 1)] {
                    let (ours, theirs) = (&fused.state[path], reference[slot].as_ref().unwrap());
                    assert!(
                        max_relative(&values(ours.exp_avg.clone()), &values(theirs.exp_avg.clone())) < 1e-6,
                        "step {t}: {path} exp_avg"
                    );
                    assert!(
                        max_relative(&values(ours.exp_avg_sq.clone()), &values(theirs.exp_avg_sq.clone())) < 1e-6,
                        "step {t}: {path} exp_avg_sq"
                    );
                }
            }
        }
    }

    /// The step count and the learning rate stay on the device from one update to the next:
    /// after three updates they read 3 and the rate; an optimizer whose count was set from
    /// outside (a resumed run restores `step` and the moments only) makes the same third update,
    /// bit for bit, as the one that ran the first two; and a clone's kept count is left alone by
    /// the original's next update.
    #[test]
    fn the_step_count_on_the_device_follows_the_host_count() {
        const LR: f64 = 1e-2;
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let (weight, norm) = (random([8, 16], 1.0), random([16], 1.0));
        let model = || Pair::<Train> {
            weight: Param::from_tensor(Tensor::from_inner(weight.clone())),
            norm: Param::from_tensor(Tensor::from_inner(norm.clone())),
        };
        let gradients: Vec<(Tensor<Torch, 2>, Tensor<Torch, 1>)> = (0..4).map(|_| (random([8, 16], 0.1), random([16], 0.1))).collect();
        let update = |optimizer: &mut AdamW<Torch>, model: Pair<Train>, t: usize| {
            let mut grads = GradientsParams::new();
            grads.register::<Torch, 2>(model.weight.id, gradients[t].0.clone());
            grads.register::<Torch, 1>(model.norm.id, gradients[t].1.clone());
            step::<Train, _>(optimizer, LR, model, grads).0
        };
        let scalars = |optimizer: &AdamW<Torch>| {
            let kept = optimizer.device_scalars.as_ref().expect("kept after an update");
            (values(kept.step.clone()), values(kept.lr.clone()), kept.counts)
        };

        let mut continuing = AdamW::<Torch>::new(config);
        let mut a = model();
        for t in 0..3 {
            a = update(&mut continuing, a, t);
        }
        assert_eq!(scalars(&continuing), (vec![3.0], vec![LR as f32], 3));

        let mut first = AdamW::<Torch>::new(config);
        let mut b = model();
        for t in 0..2 {
            b = update(&mut first, b, t);
        }
        let mut resumed = AdamW::<Torch>::new(config);
        resumed.step = first.step;
        resumed.state = first.state.clone();
        b = update(&mut resumed, b, 2);
        assert_eq!(scalars(&resumed), (vec![3.0], vec![LR as f32], 3));
        assert_eq!(values(b.weight.val().inner()), values(a.weight.val().inner()), "the resumed third update differs");
        assert_eq!(values(b.norm.val().inner()), values(a.norm.val().inner()), "the resumed third update differs");

        let snapshot = continuing.clone();
        let _ = update(&mut continuing, a, 3);
        assert_eq!(scalars(&continuing), (vec![4.0], vec![LR as f32], 4));
        assert_eq!(scalars(&snapshot), (vec![3.0], vec![LR as f32], 3), "the clone's count moved");
    }

    /// A step without gradients (every parameter frozen) changes nothing and reports a zero norm.
    #[test]
    fn a_step_without_gradients_changes_nothing() {
        let model = Pair::<Train> {
            weight: Param::from_tensor(Tensor::from_inner(random([8, 16], 1.0))),
            norm: Param::from_tensor(Tensor::from_inner(random([16], 1.0))),
        };
        let weight = values(model.weight.val().inner());
        let mut optimizer = AdamW::<Torch>::new(AdamWConfig::default());
        let (model, report) = step::<Train, _>(&mut optimizer, 1e-2, model, GradientsParams::new());
        let report = report.read();
        assert_eq!((report.grad_norm, report.clip_coef), (0.0, 1.0));
        assert_eq!(values(model.weight.val().inner()), weight);
        assert!(optimizer.state.is_empty());
    }

    /// A checkpoint holds handles to the model and the moments (`Strategy::checkpoint_state`):
    /// the next step must leave what it holds as it was.
    #[test]
    fn a_held_model_and_moments_are_not_updated_in_place() {
        let config = AdamWConfig::default();
        let model = Pair::<Train> {
            weight: Param::from_tensor(Tensor::from_inner(random([8, 16], 1.0))),
            norm: Param::from_tensor(Tensor::from_inner(random([16], 1.0))),
        };
        let grads = |model: &Pair<Train>| {
            let mut grads = GradientsParams::new();
            grads.register::<Torch, 2>(model.weight.id, random([8, 16], 0.1));
            grads.register::<Torch, 1>(model.norm.id, random([16], 0.1));
            grads
        };
        let mut optimizer = AdamW::<Torch>::new(config);
        let g = grads(&model);
        let (model, _) = step::<Train, _>(&mut optimizer, 1e-2, model, g);
        let held_model = model.clone();
        let held_moments = optimizer.state["weight"].clone();
        let (weight, exp_avg) = (values(held_model.weight.val().inner()), values(held_moments.exp_avg.clone()));
        let g = grads(&model);
        let (updated, _) = step::<Train, _>(&mut optimizer, 1e-2, model, g);
        assert_eq!(values(held_model.weight.val().inner()), weight, "the held model was updated");
        assert_eq!(values(held_moments.exp_avg), exp_avg, "the held moments were updated");
        assert_ne!(values(updated.weight.val().inner()), weight, "the step did not move the weight");
    }
}
