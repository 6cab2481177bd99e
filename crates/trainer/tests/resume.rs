//! Exact resume: a run killed with SIGKILL after a checkpoint and resumed from it logs the same
//! per-step losses as a run never interrupted; and a resume under changed settings is refused.
//!
//! The run to kill is this test binary itself, re-executed as a child process that runs the
//! `#[ignore]`d entry point below; steps after the first checkpoint are slowed down so the parent
//! can SIGKILL the child mid-run, as `kill -9` would.

use crate::common;

use alignment_core::backend::CpuAutodiff;
use alignment_models::load_pretrained;
use alignment_trainer::checkpoint::list_checkpoints;
use alignment_trainer::train::SaveStrategy;
use alignment_trainer::{train, Recipe, TrainError, TrainerConfig};
use common::{examples, fixture, logged_losses as losses, task, HookedSft};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn config(output_dir: &Path) -> TrainerConfig {
    let recipe = Recipe::from_yaml_str(
        "learning_rate: 3.0e-3\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nmax_steps: 8\nper_device_train_batch_size: 3\n\
         gradient_accumulation_steps: 2\nlogging_steps: 1\nsave_strategy: steps\nsave_steps: 4\nweight_decay: 0.01\nseed: 7\n",
        "test recipe",
        &[format!("--output_dir={}", output_dir.display())],
    )
    .unwrap();
    let mut config = TrainerConfig::from_recipe(&recipe).unwrap();
    config.quiet = true;
    config
}

#[test]
#[ignore = "entry point of the child process of killed_run_resumes_with_identical_losses"]
fn child_process_entry_point() {
    let Ok(dir) = std::env::var("RESUME_TEST_OUTPUT_DIR") else { return };
    let dir = PathBuf::from(dir);
    let device = Default::default();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    // Steps after the first checkpoint are slowed down so the parent can kill the process.
    let slow = HookedSft {
        inner: task(),
        before_loss: || {
            if !list_checkpoints(&dir).is_empty() {
                std::thread::sleep(Duration::from_millis(300));
            }
        },
    };
    train(model, &slow, &examples(24), &[], &config(&dir), &device).unwrap();
}

#[test]
fn killed_run_resumes_with_identical_losses() {
    let device = Default::default();
    let root = tempfile::tempdir().unwrap();

    // Reference: never interrupted.
    let straight = root.path().join("straight");
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let (_, outcome) = train(model, &task(), &examples(24), &[], &config(&straight), &device).unwrap();
    assert_eq!(outcome.steps, 8);
    let expected = losses(&straight);
    assert_eq!(expected.len(), 8);

    // Killed with SIGKILL after checkpoint-4, then resumed.
    let killed = root.path().join("killed");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([common::test_name(module_path!(), "child_process_entry_point").as_str(), "--exact", "--ignored", "--nocapture"])
        .env("RESUME_TEST_OUTPUT_DIR", &killed)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while list_checkpoints(&killed).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the child exited before its first checkpoint");
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let logged_before_kill = losses(&killed);
    assert!(logged_before_kill.len() < 8, "the child was killed before finishing: {logged_before_kill:?}");
    assert_eq!(list_checkpoints(&killed).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4]);
    assert!(!killed.join("model.safetensors").exists(), "no final model from a killed run");

    let mut resume = config(&killed);
    resume.resume_from = list_checkpoints(&killed).pop().map(|(_, p)| p);
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    train(model, &task(), &examples(24), &[], &resume, &device).unwrap();
    let resumed = losses(&killed);
    assert_eq!(resumed.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    let max_diff = expected.iter().zip(&resumed).map(|((_, a), (_, b))| (a - b).abs() / a.abs()).fold(0.0, f64::max);
    println!("losses straight {expected:?}\nlosses resumed {resumed:?}\nmax relative difference {max_diff:e}");
    assert!(max_diff <= 1e-6, "resumed losses differ: {max_diff:e}");
    assert!(expected[7].1 < expected[0].1, "training lowers the loss");
    assert!(killed.join("model.safetensors").is_file() && killed.join("loss.svg").is_file());
}

#[test]
fn resume_with_other_settings_is_refused() {
    let device = Default::default();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let mut first = config(&dir);
    first.max_steps = Some(4);
    first.save = SaveStrategy::Steps(2);
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    train(model, &task(), &examples(24), &[], &first, &device).unwrap();
    let checkpoint = list_checkpoints(&dir).pop().map(|(_, p)| p);
    let same_count_other_tokens = {
        let mut e = examples(24);
        e[5].input_ids[2] += 1;
        e
    };
    // Each change is refused, naming the setting with its value then and now.
    type Change = fn(&mut alignment_trainer::TrainerConfig);
    let changes: [(&str, Change, &str); 5] = [
        ("global_batch_size", |c| c.train_batch_size = 4, "was 3 in the checkpoint, now 4"),
        ("weight_decay", |c| c.adamw.weight_decay = 0.1, "was 0.01 in the checkpoint, now 0.1"),
        ("max_grad_norm", |c| c.adamw.max_grad_norm = Some(0.5), "was Some(1.0) in the checkpoint, now Some(0.5)"),
        ("assistant_only_loss", |c| set(c, "assistant_only_loss", "true"), "was false in the checkpoint, now true"),
        ("max_seq_length", |c| set(c, "max_seq_length", "Some(64)"), "was Some(1024) in the checkpoint, now Some(64)"),
    ];
    fn set(config: &mut alignment_trainer::TrainerConfig, key: &str, value: &str) {
        config.resume_settings.iter_mut().find(|(k, _)| k == key).unwrap().1 = value.into();
    }
    for (key, change, then_now) in changes {
        let mut other = config(&dir);
        other.max_steps = first.max_steps;
        change(&mut other);
        other.resume_from = checkpoint.clone();
        let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
        let err = train(model, &task(), &examples(24), &[], &other, &device).unwrap_err();
        assert!(matches!(err, TrainError::Resume { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("`{key}` {then_now}")) && message.lines().count() == 2, "{key}: {message}");
    }
    // Other data, even with as many examples, is another run.
    let mut other = config(&dir);
    other.max_steps = first.max_steps;
    other.resume_from = checkpoint.clone();
    let model = load_pretrained::<CpuAutodiff>(&fixture(), &device).unwrap();
    let err = train(model, &task(), &same_count_other_tokens, &[], &other, &device).unwrap_err().to_string();
    assert!(err.contains("`data` was ") && !err.contains("`examples`"), "{err}");
}
