//! ZeRO stages: the four accelerate configs, shard layouts, memory fractions, and ZeroPlan's
//! synchronisation run on 1, 2 and 3 ranks (threads with TCP communicators) against serial SGD.

use alignment_distributed::zero::{StateBytes, ZeroPlan};
use alignment_distributed::{AccelerateConfig, Communicator, DistEnv, LocalCommunicator, ShardLayout, TcpCommunicator, ZeroStage};
use std::path::Path;
use std::time::Duration;

fn config(name: &str) -> AccelerateConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/accelerate_configs").join(name);
    AccelerateConfig::from_path(&path).unwrap()
}

#[test]
fn the_four_recipe_configs() {
    for (file, stage) in [
        ("multi_gpu.yaml", ZeroStage::Ddp),
        ("deepspeed_zero1.yaml", ZeroStage::Zero1),
        ("deepspeed_zero2.yaml", ZeroStage::Zero2),
        ("deepspeed_zero3.yaml", ZeroStage::Zero3),
    ] {
        let c = config(file);
        assert_eq!(c.stage, stage, "{file}");
        assert_eq!((c.num_processes, c.num_machines, c.processes_per_machine()), (8, 1, 8), "{file}");
        assert_eq!(c.mixed_precision, "bf16");
    }
}

#[test]
fn unsupported_configs_name_the_field() {
    let err = |yaml: &str| AccelerateConfig::parse(yaml, "test.yaml").unwrap_err().to_string();
    assert!(err("distributed_type: FSDP\n").contains("FSDP is not supported"));
    assert!(err("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 4\n").contains("deepspeed_config.zero_stage: 4"));
    assert!(err("distributed_type: DEEPSPEED\n").contains("deepspeed_config section"));
    assert!(err("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_optimizer_device: nvme\n")
        .contains("offload_optimizer_device: \"nvme\""));
    assert!(err("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_param_device: cpu\n")
        .contains("offload_param_device: \"cpu\""));
    let offload = "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n";
    let offload = AccelerateConfig::parse(offload, "x").unwrap();
    assert!(
        offload.offload_optimizer == Some(true) && offload.stage == ZeroStage::Zero2,
        "the optimizer state on the host is what ZeRO runs here"
    );
    assert!(err("distributed_type: MULTI_GPU\nnum_processes: 3\nnum_machines: 2\n").contains("not a multiple"));
    assert!(err("distributed_type: [").starts_with("accelerate config test.yaml:"));
    let zero0 = AccelerateConfig::parse("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 0\n", "x").unwrap();
    assert_eq!((zero0.stage, zero0.num_processes), (ZeroStage::Ddp, 1));
}

#[test]
fn shard_layouts_are_contiguous_and_cover_the_buffer() {
    for len in [0, 1, 2, 7, 10, 1001] {
        for world in 1..=5 {
            let layout = ShardLayout::new(len, world);
            let mut next = 0;
            for rank in 0..world {
                let range = layout.range(rank);
                assert_eq!(range.start, next);
                assert!(range.len() == layout.max_shard_len() || range.len() + 1 == layout.max_shard_len() || len == 0);
                for i in range.clone() {
                    assert_eq!(layout.owner(i), rank);
                }
                next = range.end;
            }
            assert_eq!(next, len);
        }
    }
    assert_eq!(ShardLayout::new(10, 4).range(0), 0..3);
    assert_eq!(ShardLayout::new(10, 4).range(3), 8..10);
}

#[test]
fn what_each_stage_keeps_per_rank() {
    let f = |s: ZeroStage| {
        let x = s.fractions(8);
        (x.params, x.grads, x.optimizer)
    };
    assert_eq!(f(ZeroStage::Ddp), (1.0, 1.0, 1.0));
    assert_eq!(f(ZeroStage::Zero1), (1.0, 1.0, 0.125));
    assert_eq!(f(ZeroStage::Zero2), (1.0, 0.125, 0.125));
    assert_eq!(f(ZeroStage::Zero3), (0.125, 0.125, 0.125));
    // The ZeRO paper's 7.5B example on 64 GPUs: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB.
    let gb = |s: ZeroStage| s.memory_per_rank(7_500_000_000, 64, StateBytes::BF16_MIXED_ADAM).total() / 1e9;
    assert_eq!(gb(ZeroStage::Ddp).round(), 120.0);
    assert!((gb(ZeroStage::Zero1) - 31.4).abs() < 0.1);
    assert!((gb(ZeroStage::Zero2) - 16.6).abs() < 0.1);
    assert!((gb(ZeroStage::Zero3) - 1.875).abs() < 0.01);
}

/// `steps` SGD steps of `params -= lr * (sum of the ranks' grads)` through ZeroPlan on `comm`.
fn train(comm: &mut dyn Communicator, stage: ZeroStage, len: usize, steps: usize) -> Vec<f32> {
    let plan = ZeroPlan::new(stage, len, comm);
    let mut params: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
    for step in 0..steps {
        // Each rank's gradient depends on its rank, the step and the current parameters.
        let mut grads: Vec<f32> =
            params.iter().enumerate().map(|(i, p)| p * 0.5 + ((i + 3 * comm.rank() + step) as f32 * 0.11).cos()).collect();
        let owned_grads = plan.reduce_gradients(comm, &mut grads).unwrap();
        let range = plan.owned_range();
        let owned: Vec<f32> = params[range].iter().zip(&owned_grads).map(|(p, g)| p - 0.01 * g).collect();
        params = plan.gather_parameters(comm, &owned).unwrap();
    }
    params
}

fn serial(world: usize, len: usize, steps: usize) -> Vec<f32> {
    let mut params: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
    for step in 0..steps {
        let mut sum = vec![0f32; len];
        for rank in 0..world {
            for (i, s) in sum.iter_mut().enumerate() {
                let g = params[i] * 0.5 + ((i + 3 * rank + step) as f32 * 0.11).cos();
                *s = if rank == 0 { g } else { *s + g };
            }
        }
        for (p, g) in params.iter_mut().zip(&sum) {
            *p -= 0.01 * g;
        }
    }
    params
}

#[test]
fn every_stage_trains_like_the_serial_computation() {
    let (len, steps) = (101, 5);
    assert_eq!(train(&mut LocalCommunicator::new(), ZeroStage::Zero3, len, steps), serial(1, len, steps));
    for world in [2, 3] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    scope.spawn(move || {
                        let env = DistEnv { rank, world_size: world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port };
                        let mut comm = TcpCommunicator::connect(&env, Duration::from_secs(20)).unwrap();
                        [ZeroStage::Ddp, ZeroStage::Zero1, ZeroStage::Zero2, ZeroStage::Zero3]
                            .map(|s| train(&mut comm, s, len, steps))
                            .to_vec()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = serial(world, len, steps);
        for (rank, per_stage) in results.iter().enumerate() {
            for (stage, params) in per_stage.iter().enumerate() {
                assert_eq!(params, &want, "world {world} rank {rank} stage {stage}");
            }
        }
    }
}
