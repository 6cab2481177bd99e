//! DeepSpeed's bf16 mode with optimizer offload, as `cli.rs` runs it under `--features tch` (or
//! `cuda`) when `bf16: true` meets `offload_optimizer_device: cpu`: the model on the bf16
//! backend, its f32 master weights and AdamW moments on the host (`trainer::data_parallel`).
//! Checked on torch's bf16 CPU backend (scripts/test.sh runs it with the other `tch` tests).
//!
//! A test binary of its own: burn 0.21 fixes each device's default float type at the first
//! tensor created on it, in a process-wide registry keyed by the device (burn-backend's
//! `DeviceSettings`), and `LibTorch<f32>` and `LibTorch<bf16>` share `LibTorchDevice::Cpu`. A
//! bf16 model built first made the f32 libtorch runs of `backend_check.rs` in the same process
//! create bf16 tensors (their gradients 1.6e-2 from the CPU's instead of 6e-7). The trainer runs
//! one backend per process.

#![cfg(feature = "tch")]

use alignment_handbook::core::backend::CpuAutodiff;
use alignment_handbook::step_check::{self, CASES};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/models/tests/fixtures/tiny-llama")
}

/// Random gradients for every trainable parameter of a model, as bf16 values (so that an f32 and
/// a bf16 backend receive the same numbers): one step's `GradientsParams`.
fn bf16_gradients<B: burn::tensor::backend::AutodiffBackend>(
    model: &alignment_handbook::models::CausalLm<B>,
    seed: u64,
    device: &B::Device,
) -> burn::optim::GradientsParams {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{Tensor, TensorData};
    struct Random<'a, B: burn::tensor::backend::AutodiffBackend> {
        grads: burn::optim::GradientsParams,
        seed: u64,
        device: &'a B::Device,
    }
    impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for Random<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !param.is_require_grad() {
                return;
            }
            let shape = param.shape();
            self.seed += 1;
            let values: Vec<f32> = step_check::random_tokens(shape.num_elements(), 20_001, self.seed)
                .into_iter()
                .map(|t| burn::tensor::bf16::from_f32((t as f32 - 10_000.0) * 1e-6).to_f32())
                .collect();
            let grad = Tensor::<B::InnerBackend, D>::from_data(TensorData::new(values, shape), self.device);
            self.grads.register::<B::InnerBackend, D>(param.id, grad);
        }
    }
    let mut random = Random::<B> { grads: burn::optim::GradientsParams::new(), seed: seed * 1_000, device };
    model.visit(&mut random);
    random.grads
}

/// Every float parameter's values, in module order.
fn parameter_values<B: burn::tensor::backend::Backend>(model: &alignment_handbook::models::CausalLm<B>) -> Vec<f32> {
    alignment_handbook::models::pretrained::named_tensors(model).into_iter().flat_map(|t| t.values).collect()
}

/// DeepSpeed's bf16 with optimizer offload, as `cli.rs` runs it on a bf16 backend: the weights on
/// the device are bf16, their f32 master copy and the moments on the host. After ten offloaded
/// updates on torch's bf16 CPU backend, every weight is exactly the bf16 rounding of the f32
/// weights of the same updates run on the f32 CPU backend from the same start and gradients, so
/// no update was lost to bf16 rounding; the same updates run on the device (bf16 weights and
/// moments, no master copy) end elsewhere.
#[test]
fn tch_offloaded_bf16_weights_follow_their_f32_master_copy() {
    use alignment_distributed::{LocalCommunicator, ZeroStage};
    use alignment_handbook::core::backend::TorchBf16;
    use alignment_handbook::models::{load_pretrained, pretrained::save_pretrained, SaveDtype};
    use alignment_handbook::trainer::optimizer::AdamWConfig;
    use alignment_handbook::trainer::DataParallel;
    type Bf16 = burn::backend::Autodiff<TorchBf16>;
    let (torch, cpu) = (burn::backend::libtorch::LibTorchDevice::Cpu, Default::default());
    let (mut bf16, _) = step_check::prepare_case::<Bf16>(&fixture(), CASES[0], None, &torch).unwrap();
    let mut on_device = bf16.clone();
    // The same (bf16-representable) weights as f32 on the CPU backend.
    let copy = tempfile::tempdir().unwrap();
    save_pretrained(&bf16, copy.path(), SaveDtype::F32, None).unwrap();
    let mut f32_model = load_pretrained::<CpuAutodiff>(copy.path(), &cpu).unwrap();
    assert_eq!(parameter_values(&f32_model), parameter_values(&bf16), "the f32 copy starts from the bf16 weights");

    let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let group = |offload| {
        let mut parallel = DataParallel::new(Box::new(LocalCommunicator::new()), ZeroStage::Zero2);
        parallel.offload_optimizer = Some(offload);
        parallel
    };
    let (mut offloaded_bf16, mut offloaded_f32, mut device_bf16) = (group(true), group(true), group(false));
    for step in 1..=10u64 {
        let lr = 1e-3;
        (bf16, _) = offloaded_bf16.step(&config, step, lr, bf16.clone(), &bf16_gradients(&bf16, step, &torch)).unwrap();
        (f32_model, _) = offloaded_f32.step(&config, step, lr, f32_model.clone(), &bf16_gradients(&f32_model, step, &cpu)).unwrap();
        (on_device, _) = device_bf16.step(&config, step, lr, on_device.clone(), &bf16_gradients(&on_device, step, &torch)).unwrap();
    }
    let rounded: Vec<f32> = parameter_values(&f32_model).into_iter().map(|v| burn::tensor::bf16::from_f32(v).to_f32()).collect();
    let (offloaded, device) = (parameter_values(&bf16), parameter_values(&on_device));
    let differ = |a: &[f32]| a.iter().zip(&rounded).filter(|(x, y)| x != y).count();
    println!(
        "bf16 weights after 10 updates, of {}: {} differ from the bf16 rounding of the f32 run offloaded, {} without the master copy",
        rounded.len(),
        differ(&offloaded),
        differ(&device)
    );
    assert_eq!(differ(&offloaded), 0, "offloaded bf16 weights are the rounding of their f32 master copy");
    assert!(differ(&device) > 0, "without the master copy bf16 updates round differently");
}
