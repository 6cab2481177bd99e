//! `scripts/gpu/compare_runs.py`, which reads the example binaries' runs that the device plan
//! `run_trainer` makes (issue #12: the training loop a user runs, on the GPU against the CPU in
//! the same call), and `scripts/gpu/report.py`'s table of them: on run folders laid out as a
//! run leaves them (`metrics.jsonl`, `model.safetensors`), written here.

use alignment_handbook::reference::{python, repo_root};
use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// A run's output_dir: a line per logged step (two training steps, then an evaluation), the
/// losses and tokens/s given, and a model of two f32 tensors.
fn write_run(dir: &Path, losses: [f64; 2], tokens_per_second: [f64; 2], weights: &[f32]) {
    std::fs::create_dir_all(dir).unwrap();
    let lines = [
        json!({"step": 1, "epoch": 0.1, "loss": losses[0], "grad_norm": 3.5, "learning_rate": 3e-5, "tokens_per_second": tokens_per_second[0]}),
        json!({"step": 2, "epoch": 0.2, "loss": losses[1], "grad_norm": 3.25, "learning_rate": 2e-5, "tokens_per_second": tokens_per_second[1]}),
        json!({"step": 2, "epoch": 0.2, "eval_loss": 10.5, "eval_runtime": 0.25}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
    let half = bytes.len() / 2;
    let views = vec![
        ("model.embed_tokens.weight".to_string(), TensorView::new(Dtype::F32, vec![half / 4], &bytes[..half]).unwrap()),
        ("model.norm.weight".to_string(), TensorView::new(Dtype::F32, vec![half / 4], &bytes[half..]).unwrap()),
    ];
    serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// compare_runs.py on `dirs` (reference first, or one run alone): its exit status and JSON line.
fn compare(label: &str, tolerance: Option<&str>, dirs: &[&Path]) -> (bool, Value) {
    let mut command = Command::new(python().expect("the reference environment (scripts/reference_env.sh)"));
    command.arg(repo_root().join("scripts/gpu/compare_runs.py")).args(["--label", label]);
    if let Some(tolerance) = tolerance {
        command.args(["--tolerance", tolerance]);
    }
    let output = command.args(dirs).output().expect("python runs");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no output: {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.success(), serde_json::from_str(line).unwrap())
}

#[test]
fn runs_are_compared_metric_by_metric_and_weight_by_weight() {
    let root = tempfile::tempdir().unwrap();
    let weights = [0.5f32, -1.25, 2.0, 0.75, 1.0, 1.0, 1.0, 1.0];
    let cpu = root.path().join("sft-cpu");
    write_run(&cpu, [10.8, 10.6], [900.0, 1000.0], &weights);

    // Within f32's tolerance: passes; its tokens/s are the windows after the first.
    let close = root.path().join("sft-cuda");
    let mut nearby = weights;
    nearby[1] *= 1.0 + 1e-6;
    write_run(&close, [10.8 * (1.0 + 2e-6), 10.6], [40_000.0, 50_000.0], &nearby);
    let (ok, row) = compare("trainer sft-cuda", Some("1e-4"), &[&cpu, &close]);
    assert!(ok, "{row}");
    assert_eq!(row["pass"], true, "{row}");
    assert!(row["max_rel_metric"].as_f64().unwrap() < 3e-6 && row["max_rel_metric"].as_f64().unwrap() > 1e-6, "{row}");
    assert!(row["worst_metric"].as_str().unwrap().starts_with("step 1 loss"), "{row}");
    assert!(row["max_rel_weight"].as_f64().unwrap() > 0.0 && row["max_rel_weight"].as_f64().unwrap() < 1e-5, "{row}");
    assert_eq!(row["worst_weight"], "model.embed_tokens.weight", "{row}");
    assert_eq!(row["tokens_per_second"], 50_000.0, "{row}");
    assert_eq!(row["logged_steps"], 2, "{row}");

    // A loss off by 1e-3 fails, naming the step; the timings never count.
    let off = root.path().join("sft-off");
    write_run(&off, [10.8, 10.6 * (1.0 + 1e-3)], [1.0, 2.0], &weights);
    let (ok, row) = compare("trainer sft-off", Some("1e-4"), &[&cpu, &off]);
    assert!(!ok, "{row}");
    assert_eq!(row["pass"], false);
    assert!(row["worst_metric"].as_str().unwrap().starts_with("step 2 loss"), "{row}");
    assert_eq!(row["max_rel_weight"], 0.0, "{row}");

    // A non-finite weight fails even alone (the speed run).
    let mut broken = weights;
    broken[6] = f32::NAN;
    let nan = root.path().join("speed");
    write_run(&nan, [10.8, 10.7], [100.0, 300.0], &broken);
    let (ok, row) = compare("trainer speed", None, &[&nan]);
    assert!(!ok, "{row}");
    assert_eq!(row["finite_weights"], false, "{row}");
    assert_eq!(row["tokens_per_second"], 300.0, "{row}");
    assert!(row.get("max_rel_metric").is_none(), "a run alone is not compared: {row}");

    // A missing evaluation line is named.
    let short = root.path().join("sft-short");
    write_run(&short, [10.8, 10.6], [1.0, 2.0], &weights);
    let text = std::fs::read_to_string(short.join("metrics.jsonl")).unwrap();
    std::fs::write(short.join("metrics.jsonl"), text.lines().take(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let (ok, row) = compare("trainer sft-short", Some("1e-4"), &[&cpu, &short]);
    assert!(!ok);
    assert_eq!(row["missing"], json!(["step 2 eval"]), "{row}");
}

#[test]
fn the_report_tabulates_the_trainer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        json!({"label": "trainer sft-cuda", "trainer": true, "missing": [], "finite_weights": true, "logged_steps": 4,
               "first_loss": 10.81, "last_loss": 10.52, "tokens_per_second": 51234.0, "tolerance": 1e-4, "pass": true,
               "max_rel_metric": 3.2e-6, "worst_metric": "step 4 grad_norm: 3.5 against 3.5", "max_rel_weight": 1.1e-6,
               "worst_weight": "model.norm.weight"}),
        json!({"label": "trainer dpo-cuda", "trainer": true, "missing": ["step 4 eval"], "pass": false, "finite_weights": true,
               "tolerance": 1e-4, "max_rel_metric": 0.0, "worst_metric": "", "max_rel_weight": 0.0, "worst_weight": ""}),
        json!({"label": "trainer speed-smollm2-135m sft s1024 b4", "trainer": true, "missing": [], "error": "OSError: no metrics.jsonl", "pass": false}),
    ];
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let output = Command::new("python3").arg(repo_root().join("scripts/gpu/report.py")).arg(&results).output().expect("python3 runs");
    assert!(output.status.success(), "report.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(
            "| sft-cuda | 4 | 10.8100 → 10.5200 | 3.2e-06 (step 4 grad_norm: 3.5 against 3.5) | 1.1e-06 (model.norm.weight) | yes | 51234 | pass (≤ 1e-04) |"
        ),
        "{text}"
    );
    assert!(text.contains("| dpo-cuda |") && text.contains("FAIL (≤ 1e-04); missing: step 4 eval |"), "{text}");
    assert!(text.contains("| speed-smollm2-135m sft s1024 b4 | | | | | | | OSError: no metrics.jsonl |"), "{text}");
}
