//! Nothing comes back from the device inside a training step (issue #13): every read of a tensor
//! to the host is counted, by running the step on a backend that routes each operation to the
//! CPU backend through burn's router and counts its `read_tensor` calls.
//!
//! Every case of `step_check` (SFT, DPO, LoRA, QLoRA, and the lean step with checkpointing and
//! the chunked head) runs three optimizer steps — two micro-batches each, padding masks, RoPE
//! tables, the loss, the backward pass, gradient accumulation, the global grad norm, clipping
//! and AdamW — with no read at all. Logging then reads one transfer per micro-batch (its
//! metrics, `DeferredMetrics`) and one per step (grad norm and clipping factor). On a GPU each
//! read is a synchronisation; the batch's token ids going the other way are the only transfers
//! a step needs.
//!
//! The router backend takes none of the CPU backend's own fast paths (they are chosen by type),
//! so this is the generic path the CubeCL backends run.

use alignment_handbook::step_check::{self, CASES};
use alignment_handbook::trainer::optimizer::{AdamW, AdamWConfig};
use burn::backend::ndarray::{NdArray, NdArrayDevice};
use burn::backend::Autodiff;
use burn_ir::{BackendIr, OperationIr, TensorId, TensorIr};
use burn_router::{BackendRouter, MultiBackendBridge, RouterTensor, Runner, RunnerChannel, RunnerClient};
use burn_std::future::DynFut;
use burn_std::{DType, Shape};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Reads of tensors to the host since the process started.
static READS: AtomicUsize = AtomicUsize::new(0);

type Inner = NdArray<f32>;

/// The CPU backend's runner, counting reads.
#[derive(Clone, Debug)]
struct Counting(Runner<Inner>);

impl RunnerClient for Counting {
    type Device = NdArrayDevice;

    fn register_op(&self, op: OperationIr) {
        self.0.register_op(op)
    }
    fn read_tensor_async(&self, tensor: TensorIr) -> DynFut<Result<burn::tensor::TensorData, burn::tensor::backend::ExecutionError>> {
        READS.fetch_add(1, Ordering::SeqCst);
        self.0.read_tensor_async(tensor)
    }
    fn sync(&self) -> Result<(), burn::tensor::backend::ExecutionError> {
        self.0.sync()
    }
    fn create_empty_handle(&self) -> TensorId {
        self.0.create_empty_handle()
    }
    fn register_tensor_data(&self, data: burn::tensor::TensorData) -> RouterTensor<Self> {
        let ir = self.0.register_tensor_data_desc(data);
        RouterTensor::new(ir.id, ir.shape, ir.dtype, self.clone())
    }
    fn device(&self) -> NdArrayDevice {
        self.0.device()
    }
    fn seed(&self, seed: u64) {
        self.0.seed(seed)
    }
    fn dtype_usage(&self, dtype: DType) -> burn::tensor::backend::DTypeUsageSet {
        self.0.dtype_usage(dtype)
    }
}

/// One backend only: nothing to move between backends.
struct SameBackend;

impl MultiBackendBridge for SameBackend {
    type TensorHandle = <Inner as BackendIr>::Handle;
    type Device = NdArrayDevice;

    fn change_backend_float(tensor: Self::TensorHandle, _: Shape, _: &NdArrayDevice) -> Self::TensorHandle {
        tensor
    }
    fn change_backend_int(tensor: Self::TensorHandle, _: Shape, _: &NdArrayDevice) -> Self::TensorHandle {
        tensor
    }
    fn change_backend_bool(tensor: Self::TensorHandle, _: Shape, _: &NdArrayDevice) -> Self::TensorHandle {
        tensor
    }
}

#[derive(Clone)]
struct CountingChannel;

impl RunnerChannel for CountingChannel {
    type Device = NdArrayDevice;
    type Bridge = SameBackend;
    type Client = Counting;
    type FloatElem = f32;
    type IntElem = i64;
    type BoolElem = bool;

    fn name(_: &NdArrayDevice) -> String {
        "counting<ndarray>".into()
    }
    fn init_client(device: &NdArrayDevice) -> Counting {
        Counting(Runner::new(*device))
    }
    fn get_tensor_handle(tensor: &TensorIr, client: &Counting) -> <Inner as BackendIr>::Handle {
        client.0.get_tensor_handle(tensor)
    }
    fn register_tensor(client: &Counting, handle: <Inner as BackendIr>::Handle, shape: Shape, dtype: DType) -> RouterTensor<Counting> {
        client.0.register_tensor(handle, shape, dtype, client.clone())
    }
}

type Counted = Autodiff<BackendRouter<CountingChannel>>;

fn reads() -> usize {
    READS.load(Ordering::SeqCst)
}

#[test]
fn training_steps_read_nothing_back_until_their_metrics_are_logged() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/models/tests/fixtures/tiny-llama");
    let device = NdArrayDevice::default();
    const STEPS: usize = 3;
    for case in CASES {
        let (mut model, options) = step_check::prepare_case::<Counted>(&fixture, case, None, &device).unwrap();
        let mut optimizer = AdamW::new(AdamWConfig::default());
        let before = reads();
        let mut logged = Vec::new();
        for _ in 0..STEPS {
            let (updated, pending, _grads, report) = step_check::case_step(model, case, &mut optimizer, &options, &device);
            logged.push((pending, report));
            model = updated;
        }
        let in_steps = reads() - before;
        let before = reads();
        let micro_batches: usize = logged.iter().map(|(pending, _)| pending.len()).sum();
        let mut losses = Vec::new();
        for (pending, report) in logged {
            losses.push(step_check::read_metrics(pending)["loss"]);
            assert!(report.read().grad_norm.is_finite());
        }
        let at_logging = reads() - before;
        println!("{:<9} reads in {STEPS} steps: {in_steps}; reading their metrics: {at_logging}; losses {losses:?}", case.name);
        assert_eq!(in_steps, 0, "{}: the steps read tensors back from the device", case.name);
        assert_eq!(at_logging, micro_batches + STEPS, "{}: one read per micro-batch's metrics and one per grad norm", case.name);
        assert!(losses.iter().all(|l| l.is_finite()) && losses[2] < losses[0], "{}: it trained: {losses:?}", case.name);
    }
}
