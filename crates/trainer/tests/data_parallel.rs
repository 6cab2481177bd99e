//! Data-parallel training across real processes (DDP, ZeRO-1/2/3 over the TCP communicator):
//! two ranks with the same global batch log the loss curve of one process (≤1e-5 relative) and
//! end with bit-identical weights on every rank; the state each rank keeps shrinks as the stage
//! rises (ZeRO-3: the embedding and projections are held as half-shards, gathered per use); a
//! checkpoint written by 2 ranks resumes on 1 and one written by 1 resumes on 2 (ZeRO-2 and
//! ZeRO-3 both ways); a rank that dies — between steps or inside ZeRO-3's passes — makes the
//! others stop with an error naming it instead of hanging; 8-bit AdamW and RMSprop, whose state
//! every rank keeps whole, train under DDP as in one process and are refused under ZeRO.
//!
//! The ranks are this test binary re-executed with torchrun's variables (RANK, WORLD_SIZE,
//! LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the stage's accelerate config, running the
//! `#[ignore]`d entry point below.

use crate::common;

use alignment_core::backend::CpuAutodiff;
use alignment_distributed::launch::free_port;
use alignment_models::{load_pretrained, CausalLm};
use alignment_peft::{apply_lora, load_adapter, LoraConfig, TargetModules};
use alignment_trainer::checkpoint::list_checkpoints;
use alignment_trainer::optimizer::UpdateRule;
use alignment_trainer::train::SaveStrategy;
use alignment_trainer::{train, train_with, AdapterOutput, DataParallel, Recipe, TrainerConfig};
use common::{fixture, task, HookedSft};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const GLOBAL_BATCH: usize = 4;
const STEPS: u64 = 6;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// 29 examples: each epoch's last micro-batch (global size 4) holds one example, so rank 1 has
/// none there (under ZeRO-3 it still runs a zero-weighted pass for the collectives).
fn examples() -> Vec<alignment_trainer::Sequence> {
    common::examples(29)
}

/// Evaluated every 3 steps (ZeRO-3 gathers weights inside evaluation passes too).
fn eval_examples() -> Vec<alignment_trainer::Sequence> {
    common::examples(35).split_off(30)
}

/// The run's settings with `per_device` examples per rank and micro-batch.
fn config(output_dir: &Path, per_device: usize, resume_from: Option<PathBuf>) -> TrainerConfig {
    let recipe = Recipe::from_yaml_str(
        "learning_rate: 3.0e-3\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nmax_steps: 6\ngradient_accumulation_steps: 2\n\
         logging_steps: 1\nsave_strategy: steps\nsave_steps: 3\neval_strategy: steps\neval_steps: 3\nweight_decay: 0.01\nmax_grad_norm: 0.5\nseed: 11\n",
        "test recipe",
        &[format!("--output_dir={}", output_dir.display()), format!("--per_device_train_batch_size={per_device}")],
    )
    .unwrap();
    let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
    config.quiet = true;
    config.save = SaveStrategy::Steps(3);
    config.resume_from = resume_from;
    config
}

/// (step, training loss) of each logged step.
fn losses(history: &[serde_json::Map<String, serde_json::Value>]) -> Vec<(u64, f64)> {
    logged(history, "loss")
}

/// (step, value of `key`) of each log line that has it.
fn logged(history: &[serde_json::Map<String, serde_json::Value>], key: &str) -> Vec<(u64, f64)> {
    history.iter().filter_map(|e| Some((e.get("step")?.as_u64()?, e.get(key)?.as_f64()?))).collect()
}

/// Values in the embedding, the decoder projections and an untied `lm_head`: what ZeRO-3
/// partitions.
fn partitioned_values(model: &CausalLm<CpuAutodiff>) -> usize {
    let layers = model.layers.iter().flat_map(|l| l.linears().map(|(_, linear)| linear.dims()));
    let dims = std::iter::once(model.embedding_dims()).chain(layers).chain(model.lm_head.iter().map(|h| h.dims()));
    dims.map(|[o, i]| o * i).sum()
}

fn weights_digest(model: &CausalLm<CpuAutodiff>) -> Vec<u32> {
    use burn::module::AutodiffModule;
    let inner = model.valid();
    alignment_models::pretrained::named_tensors(&inner).iter().flat_map(|t| t.values.iter().map(|v| v.to_bits())).fold(
        vec![0u32; 4],
        |mut acc, bits| {
            acc[0] = acc[0].wrapping_mul(31).wrapping_add(bits);
            acc[1] ^= bits.rotate_left(acc[0] % 32);
            acc
        },
    )
}

#[test]
#[ignore = "entry point of the rank processes of the data-parallel tests"]
fn rank_process_entry_point() {
    let Ok(out) = std::env::var("DP_TEST_OUT") else { return };
    let out = PathBuf::from(out);
    let resume = std::env::var("DP_TEST_RESUME").ok().map(PathBuf::from);
    let mut parallel = DataParallel::from_env().unwrap().expect("launched with RANK/WORLD_SIZE");
    let rank = parallel.rank();
    let world = parallel.world_size();
    let die_after = match (std::env::var("DP_TEST_DIE_RANK"), std::env::var("DP_TEST_DIE_CALL")) {
        (Ok(r), Ok(n)) if r.parse::<usize>().unwrap() == rank => Some(n.parse().unwrap()),
        _ => None,
    };
    // With DP_TEST_DIE_RANK/DP_TEST_DIE_CALL, that rank's process exits once it has evaluated
    // the loss DP_TEST_DIE_CALL times (a rank dying mid-run).
    let calls = std::cell::Cell::new(0usize);
    let task = HookedSft {
        inner: task(),
        before_loss: || {
            calls.set(calls.get() + 1);
            if die_after.is_some_and(|n| calls.get() > n) {
                std::process::exit(3);
            }
        },
    };
    let device = Default::default();
    let mut model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    if rank > 0 && std::env::var("DP_TEST_PERTURB").is_ok() {
        // Other ranks start elsewhere: the start-up broadcast must give them rank 0's weights.
        let doubled = model.embed_tokens.val().inner() * 2.0;
        model.embed_tokens = burn::module::Param::from_tensor(burn::tensor::Tensor::from_inner(doubled));
    }
    let mut config = config(&out.join("run"), GLOBAL_BATCH / world, resume);
    let model = match std::env::var("DP_TEST_LORA") {
        Ok(variant) => with_lora(model, &mut config, &variant),
        Err(_) => model,
    };
    if let Ok(optim) = std::env::var("DP_TEST_OPTIM") {
        config.adamw.rule = UpdateRule::from_optim(&optim).unwrap();
    }
    if let Ok(lr) = std::env::var("DP_TEST_LR") {
        config.learning_rate = lr.parse().unwrap();
    }
    match train_with(model, &task, &examples(), &eval_examples(), &config, &device, &mut parallel) {
        Ok((model, outcome)) => {
            let held = parallel.held_state();
            let report = json!({
                "losses": losses(&outcome.history), "eval_losses": logged(&outcome.history, "eval_loss"), "digest": weights_digest(&model),
                "held": {"params": held.params, "grads": held.grads, "optimizer": held.optimizer},
            });
            std::fs::write(out.join(format!("rank{rank}.json")), report.to_string()).unwrap();
        }
        Err(e) => {
            eprintln!("rank {rank} stopped: {e}");
            std::process::exit(2);
        }
    }
}

/// `model` with LoRA adapters on all linear maps, `config` saving adapters; the variant `saved`
/// trains the embedding, the head and the norms whole beside them (`modules_to_save`), `dora`
/// makes the adapters weight-decomposed (`use_dora`).
fn with_lora(model: CausalLm<CpuAutodiff>, config: &mut TrainerConfig, variant: &str) -> CausalLm<CpuAutodiff> {
    let mut lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    lora.use_dora = variant == "dora";
    if variant == "saved" {
        lora.modules_to_save = vec!["embed_tokens".into(), "lm_head".into(), "norm".into()];
    }
    config.adapter = Some(AdapterOutput { lora: lora.clone(), base_model_name_or_path: fixture().display().to_string() });
    apply_lora(model, &lora, 0).unwrap()
}

/// Runs `world` rank processes with the accelerate config `stage_config`; returns their outputs.
fn launch(world: usize, stage_config: &str, out: &Path, extra_env: &[(&str, String)]) -> Vec<Output> {
    std::fs::create_dir_all(out).unwrap();
    let port = free_port().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args([common::test_name(module_path!(), "rank_process_entry_point").as_str(), "--exact", "--ignored", "--nocapture"])
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("ALIGNMENT_DIST_TIMEOUT_S", "30")
                .env("ALIGNMENT_ACCELERATE_CONFIG", repo().join("recipes/accelerate_configs").join(stage_config))
                .env("DP_TEST_OUT", out)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            for (k, v) in extra_env {
                cmd.env(k, v);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn report(out: &Path, rank: usize) -> serde_json::Value {
    let path = out.join(format!("rank{rank}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn report_losses(r: &serde_json::Value) -> Vec<(u64, f64)> {
    serde_json::from_value(r["losses"].clone()).unwrap()
}

fn max_relative_difference(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    assert_eq!(a.iter().map(|(s, _)| *s).collect::<Vec<_>>(), b.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    a.iter().zip(b).map(|((_, x), (_, y))| (x - y).abs() / x.abs()).fold(0.0, f64::max)
}

fn check_ok(outputs: &[Output]) {
    for (rank, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {rank} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn two_ranks_match_one_process_for_every_stage_and_shard_their_state() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let (_, single) =
        train(model, &task(), &examples(), &eval_examples(), &config(&root.path().join("single"), GLOBAL_BATCH, None), &device).unwrap();
    let expected = losses(&single.history);
    assert_eq!(expected.len(), STEPS as usize);
    let expected_eval = logged(&single.history, "eval_loss");
    assert_eq!(expected_eval.len(), 2, "evaluated at steps 3 and 6");

    let mut held = Vec::new();
    for stage in ["multi_gpu.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"] {
        let out = root.path().join(stage);
        check_ok(&launch(2, stage, &out, &[("DP_TEST_PERTURB", "1".into())]));
        let (r0, r1) = (report(&out, 0), report(&out, 1));
        let diff = max_relative_difference(&expected, &report_losses(&r0));
        println!("{stage}: max relative loss difference vs one process {diff:.2e}; rank 0 holds {}", r0["held"]);
        assert!(diff <= 1e-5, "{stage}: {diff:e}\n1 process {expected:?}\n2 ranks {:?}", report_losses(&r0));
        let eval: Vec<(u64, f64)> = serde_json::from_value(r0["eval_losses"].clone()).unwrap();
        let eval_diff = max_relative_difference(&expected_eval, &eval);
        assert!(eval_diff <= 1e-5, "{stage}: eval losses {eval:?} vs {expected_eval:?}");
        assert_eq!(r0["digest"], r1["digest"], "{stage}: ranks end with different weights");
        let h = |k: &str| (r0["held"][k].as_u64().unwrap(), r1["held"][k].as_u64().unwrap());
        held.push((stage, h("params"), h("grads"), h("optimizer")));
        assert!(out.join("run/checkpoint-3/optimizer.safetensors").is_file(), "{stage}: rank 0 saves checkpoints");
    }
    // Persistent state per rank: DDP keeps everything; ZeRO-1 shards the moments, ZeRO-2 also
    // the gradients (halves on 2 ranks, up to a few bytes per shard), ZeRO-3 also the values of
    // the embedding and projections (the norms stay whole: `rest` below).
    let full = held[0].1 .0;
    let partitioned = 4 * partitioned_values(&load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap()) as u64;
    let rest = full - partitioned;
    let near = |x: u64, y: u64| x.abs_diff(y) <= 64;
    let half = |x: u64| near(x, full / 2);
    let (ddp, z1, z2, z3) = (&held[0], &held[1], &held[2], &held[3]);
    assert!(ddp.1 .0 == full && ddp.2 .0 == full && ddp.3 .0 == 2 * full, "{ddp:?}");
    assert!(z1.1 .0 == full && z1.2 .0 == full && half(z1.3 .0 / 2), "{z1:?}");
    assert!(z2.1 .0 == full && half(z2.2 .0) && half(z2.3 .0 / 2), "{z2:?}");
    assert!(
        near(z3.1 .0, rest + partitioned / 2) && half(z3.2 .0) && half(z3.3 .0 / 2),
        "{z3:?} (partitioned {partitioned} of {full} bytes)"
    );
    for (stage, (p0, p1), (g0, g1), (o0, o1)) in &held {
        println!("| {stage} | {p0} / {p1} | {g0} / {g1} | {o0} / {o1} | {} / {} |", p0 + g0 + o0, p1 + g1 + o1);
    }
}

/// 8-bit AdamW and RMSprop keep their state whole (8-bit blocks, one moment): under DDP every
/// rank runs the one-process update on the summed gradient, so two ranks log one process's
/// losses and end with identical weights; the checkpoint they save is the one-process
/// optimizer, and resuming from it in one process continues the one-process run. A ZeRO stage
/// refuses them before training, naming `optim` and the stage.
#[test]
fn optimizers_kept_whole_train_under_ddp_as_in_one_process() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    for optim in ["adamw_bnb_8bit", "rmsprop"] {
        let rule = UpdateRule::from_optim(optim).unwrap();
        let mut single_config = config(&root.path().join(format!("single-{optim}")), GLOBAL_BATCH, None);
        single_config.adamw.rule = rule;
        let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
        let (_, single) = train(model, &task(), &examples(), &eval_examples(), &single_config, &device).unwrap();
        let expected = losses(&single.history);
        assert_eq!(expected.len(), STEPS as usize);

        let out = root.path().join(format!("ddp-{optim}"));
        let outputs = launch(2, "multi_gpu.yaml", &out, &[("DP_TEST_OPTIM", optim.into()), ("DP_TEST_PERTURB", "1".into())]);
        check_ok(&outputs);
        let (r0, r1) = (report(&out, 0), report(&out, 1));
        let diff = max_relative_difference(&expected, &report_losses(&r0));
        println!("{optim} under DDP: max relative loss difference vs one process {diff:.2e}; rank 0 holds {}", r0["held"]);
        assert!(diff <= 1e-5, "{optim}: {diff:e}\n1 process {expected:?}\n2 ranks {:?}", report_losses(&r0));
        assert_eq!(r0["digest"], r1["digest"], "{optim}: ranks end with different weights");
        let closing = String::from_utf8_lossy(&outputs[0].stderr);
        assert!(closing.contains("optimizer state") && closing.contains("(whole on every rank)"), "{optim}: {closing}");
        let held = |k: &str| r0["held"][k].as_u64().unwrap();
        assert_eq!(held("grads"), held("params"), "{optim}: DDP keeps the whole summed gradient");
        // RMSprop: one f32 moment a value; 8-bit AdamW: two codes a value for the large
        // parameters, two f32 moments for the small ones and the embedding.
        match optim {
            "rmsprop" => assert_eq!(held("optimizer"), held("params"), "{optim}"),
            _ => assert!(held("optimizer") > held("params") / 2 && held("optimizer") < 2 * held("params"), "{optim}: {}", r0["held"]),
        }

        // The DDP run's checkpoint, resumed in one process, continues the one-process run.
        let checkpoint = out.join("run/checkpoint-3");
        let mut resumed_config = config(&root.path().join(format!("resumed-{optim}")), GLOBAL_BATCH, Some(checkpoint));
        resumed_config.adamw.rule = rule;
        let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
        let (_, resumed) = train(model, &task(), &examples(), &eval_examples(), &resumed_config, &device).unwrap();
        let after: Vec<(u64, f64)> = losses(&resumed.history).into_iter().filter(|(s, _)| *s > 3).collect();
        let diff = max_relative_difference(&expected[3..], &after);
        assert!(diff <= 1e-5, "{optim}: resumed from the DDP checkpoint {after:?} vs one process {:?}", &expected[3..]);
    }

    let out = root.path().join("zero2-8bit");
    let outputs = launch(2, "deepspeed_zero2.yaml", &out, &[("DP_TEST_OPTIM", "paged_adamw_8bit".into())]);
    for (rank, o) in outputs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "rank {rank} trained 8-bit AdamW under ZeRO-2");
        assert!(stderr.contains("`optim`") && stderr.contains("8-bit AdamW") && stderr.contains("ZeRO-2"), "rank {rank}: {stderr}");
    }
    assert!(!out.join("run/checkpoint-3").exists(), "nothing is trained or saved");
}

/// LoRA under ZeRO-3: the frozen base is partitioned too (only gathered, never given a
/// gradient); the adapters train as in one process. With `modules_to_save`, the embedding and
/// the head are partitioned and trained (their shards' gradients reduce-scattered), and gathered
/// into the saved adapter. With DoRA, each layer's weight norm reads the gathered base weight.
#[test]
fn lora_on_zero3_ranks_matches_one_process() {
    for variant in ["1", "saved", "dora"] {
        let root = tempfile::tempdir().unwrap();
        let device = Default::default();
        let mut single_config = config(&root.path().join("single"), GLOBAL_BATCH, None);
        let model = with_lora(load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap(), &mut single_config, variant);
        let (_, single) = train(model, &task(), &examples(), &eval_examples(), &single_config, &device).unwrap();
        let out = root.path().join("ranks");
        check_ok(&launch(2, "deepspeed_zero3.yaml", &out, &[("DP_TEST_LORA", variant.into())]));
        let diff = max_relative_difference(&losses(&single.history), &report_losses(&report(&out, 0)));
        println!("LoRA ({variant}), ZeRO-3: max relative loss difference vs one process {diff:.2e}");
        assert!(diff <= 1e-5, "{variant}: {diff:e}");
        let saved = alignment_peft::adapter::adapter_tensor_names(&out.join("run")).unwrap();
        let expected = match variant {
            "saved" => 2 * 7 * 2 + 2 + 2 * 2 + 1,
            "dora" => 2 * 7 * 3,
            _ => 2 * 7 * 2,
        };
        assert_eq!(saved.len(), expected, "rank 0 saves the adapter ({variant}): {saved:?}");
        if variant == "saved" {
            // The embedding each run saved, loaded as PEFT's adapters load here.
            let embedding = |adapter_dir: &Path| -> Vec<f32> {
                let base = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
                load_adapter(base, adapter_dir).unwrap().0.embed_tokens.val().into_data().to_vec().unwrap()
            };
            let (x, y) = (embedding(&root.path().join("single")), embedding(&out.join("run")));
            let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5, "the trained embedding, one process against ZeRO-3: {worst}");
            let base: Vec<f32> =
                load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap().embed_tokens.val().into_data().to_vec().unwrap();
            let moved = x.iter().zip(&base).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(moved > 1e-4, "the embedding trained: {moved}");
        }
    }
}

/// `offload_optimizer_device: cpu` (AdamW's state and update on the host) and `none` (on the
/// model's device, the collectives on device buffers) train alike, and each rank's closing line
/// says where its moments were.
#[test]
fn the_offloaded_optimizer_trains_as_the_one_on_the_device() {
    let root = tempfile::tempdir().unwrap();
    // ZeRO-2 (the flat vector's moments) and ZeRO-3 (the partitioned weights' moments too).
    for stage in ["deepspeed_zero2", "deepspeed_zero3"] {
        let shipped = repo().join(format!("recipes/accelerate_configs/{stage}.yaml"));
        let text = std::fs::read_to_string(&shipped).unwrap();
        assert!(text.contains("offload_optimizer_device: none"), "the shipped {stage} config keeps the optimizer on the device");
        let offloaded = root.path().join(format!("{stage}_offload.yaml"));
        std::fs::write(&offloaded, text.replace("offload_optimizer_device: none", "offload_optimizer_device: cpu")).unwrap();
        let mut curves = Vec::new();
        for (place, config) in [("device", shipped), ("host", offloaded)] {
            let out = root.path().join(format!("{stage}-{place}"));
            let outputs = launch(2, &config.display().to_string(), &out, &[]);
            check_ok(&outputs);
            for (rank, output) in outputs.iter().enumerate() {
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    stderr.contains(&format!("(on the {place})")),
                    "{stage} rank {rank} should say its moments were on the {place}:\n{stderr}"
                );
            }
            curves.push(report_losses(&report(&out, 0)));
        }
        let diff = max_relative_difference(&curves[0], &curves[1]);
        println!("{stage}, optimizer on the device vs offloaded: max relative loss difference {diff:.2e}");
        assert!(diff <= 1e-6, "{stage}: {diff:e}\ndevice {:?}\nhost {:?}", curves[0], curves[1]);
    }
}

#[test]
fn checkpoints_move_between_world_sizes() {
    let root = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let single_dir = root.path().join("single");
    let (_, single) = train(model, &task(), &examples(), &eval_examples(), &config(&single_dir, GLOBAL_BATCH, None), &device).unwrap();
    let expected = losses(&single.history);
    // ZeRO-3 with its moments offloaded too: a resume fills host vectors.
    let zero3 = std::fs::read_to_string(repo().join("recipes/accelerate_configs/deepspeed_zero3.yaml")).unwrap();
    let offloaded = root.path().join("deepspeed_zero3_offload.yaml");
    std::fs::write(&offloaded, zero3.replace("offload_optimizer_device: none", "offload_optimizer_device: cpu")).unwrap();
    let offloaded = offloaded.display().to_string();

    for stage in ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", offloaded.as_str()] {
        let stage_name = Path::new(stage).file_name().unwrap().to_string_lossy();
        // Saved by 2 ranks (moments sharded; ZeRO-3: weights too), resumed by 1 process.
        let two = root.path().join(format!("two-{stage_name}"));
        check_ok(&launch(2, stage, &two, &[]));
        let checkpoint = list_checkpoints(&two.join("run")).pop().unwrap().1;
        let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
        let one = root.path().join(format!("one-{stage_name}"));
        let (_, resumed) =
            train(model, &task(), &examples(), &eval_examples(), &config(&one, GLOBAL_BATCH, Some(checkpoint)), &device).unwrap();
        let after: Vec<(u64, f64)> = losses(&resumed.history).into_iter().filter(|(s, _)| *s > 3).collect();
        let diff = max_relative_difference(&expected[3..], &after);
        println!("{stage_name}: 2 ranks → 1 process: max relative difference {diff:.2e}");
        assert!(diff <= 1e-5, "{stage_name}: {diff:e}");

        // Saved by 1 process, resumed by 2 ranks.
        let checkpoint = list_checkpoints(&single_dir).pop().unwrap().1;
        let resumed_two = root.path().join(format!("resumed-two-{stage_name}"));
        check_ok(&launch(2, stage, &resumed_two, &[("DP_TEST_RESUME", checkpoint.display().to_string())]));
        let after: Vec<(u64, f64)> = report_losses(&report(&resumed_two, 0)).into_iter().filter(|(s, _)| *s > 3).collect();
        let diff = max_relative_difference(&expected[3..], &after);
        println!("{stage_name}: 1 process → 2 ranks: max relative difference {diff:.2e}");
        assert!(diff <= 1e-5, "{stage_name}: {diff:e}");
    }
}

#[test]
fn a_rank_that_dies_stops_the_others_with_an_error() {
    // ZeRO-2: rank 0 is in the gradient reduction when it notices; ZeRO-3: inside the forward
    // pass (the all-gather of the first projection).
    for stage in ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"] {
        let root = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        // Rank 1 exits in its third step (2 micro-batches per step).
        let outputs = launch(2, stage, root.path(), &[("DP_TEST_DIE_RANK", "1".into()), ("DP_TEST_DIE_CALL", "5".into())]);
        assert_eq!(outputs[1].status.code(), Some(3), "{stage}: rank 1 died as arranged");
        assert!(!outputs[0].status.success(), "{stage}: rank 0 must fail, not finish");
        let stderr = String::from_utf8_lossy(&outputs[0].stderr);
        println!("{stage}: {}", stderr.lines().find(|l| l.contains("stopped")).unwrap_or_default());
        assert!(stderr.contains("rank 0 stopped") && stderr.contains("rank 1"), "{stage}: rank 0 should name the lost peer:\n{stderr}");
        assert!(start.elapsed().as_secs() < 25, "{stage}: rank 0 must notice quickly, not wait for the timeout");
    }
}

#[test]
fn a_nan_loss_stops_every_rank_naming_the_step_before_anything_is_saved() {
    let root = tempfile::tempdir().unwrap();
    // A learning rate past f32's range: the first update with a learning rate above 0 (step 2,
    // after the one warm-up step at 0) makes the weights infinite, so step 3's loss is NaN on
    // every rank (the summed metrics are the group's).
    let outputs = launch(2, "deepspeed_zero2.yaml", root.path(), &[("DP_TEST_LR", "1e39".into())]);
    for (rank, output) in outputs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "rank {rank} must stop with an error:\n{stderr}");
        assert!(
            stderr.contains("optimizer step 3: the loss is NaN") && stderr.contains("no checkpoint was saved"),
            "rank {rank}:\n{stderr}"
        );
    }
    let run = root.path().join("run");
    assert!(!run.join("model.safetensors").exists() && !run.join("config.json").exists(), "nothing saved");
}
