//! `scripts/gpu/report.py`, which turns a device run's files into the tables of
//! docs/performance.md (issue #12): here its part for `bench_train ops` (the operations one at a
//! time, `src/op_check.rs`), on a report in the form `bench_train ops --report` writes.

use serde_json::json;
use std::path::Path;
use std::process::Command;

#[test]
fn operations_report_lists_the_failing_operations_with_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ops = json!({"backend": "cuda-bf16", "ops": [
        {"inputs": "f32", "op": "softmax over 7, 128 and 4096", "relative": 3.1e-8, "tolerance": 1e-4, "pass": true, "error": null},
        {"inputs": "f32", "op": "∂ softmax", "relative": 2.5, "tolerance": 1e-4, "pass": false, "error": null},
        // An operation that failed (infinite difference, written as null).
        {"inputs": "bf16", "op": "matmul, odd sizes (3 × 13 by 13 × 5)", "relative": null, "tolerance": 2e-2, "pass": false,
         "error": "panicked: DriverError(CUDA_ERROR_INVALID_VALUE)"},
    ]});
    std::fs::write(dir.path().join("ops-cuda-bf16.json"), ops.to_string()).unwrap();
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, "").unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/report.py");
    let output = Command::new("python3").arg(script).arg(&results).arg("--checks").arg(dir.path()).output().expect("python3 runs");
    assert!(output.status.success(), "report.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("Operations one at a time, cuda-bf16 vs CPU: 1 of 3 pass"), "{text}");
    assert!(text.contains("| f32 | ∂ softmax | 2.50e+00 | 1e-04 |  |"), "{text}");
    assert!(
        text.contains(
            "| bf16 | matmul, odd sizes (3 × 13 by 13 × 5) | non-finite | 2e-02 | panicked: DriverError(CUDA_ERROR_INVALID_VALUE) |"
        ),
        "{text}"
    );
    assert!(!text.contains("softmax over 7"), "passing operations are counted, not listed: {text}");
}

/// The 8-bit AdamW update's table: ours (a `measure` row of `bench_train update --optim
/// adamw_bnb_8bit`, one of them failed) beside PyTorch's (`check_adam8bit.py --time-shape`).
#[test]
fn eight_bit_update_report_puts_ours_beside_pytorchs() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        json!({"label": "update-8bit tch-cuda llama-3.2-1b", "update": {"one-process": {"median_s": 0.0123, "steps_s": [0.0123]}},
               "backend": "tch-cuda", "shape": "llama-3.2-1b", "trainable": 1_235_814_400u64, "optim": "adamw_bnb_8bit",
               "exit_code": 0, "peak_device_mib": 14000.0}),
        json!({"label": "update-8bit tch-cuda@tensor-8bit llama-3.2-1b", "exit_code": 137, "error": "killed"}),
        json!({"check": "adam8bit-time", "impl": "pytorch bnb.optim.AdamW 8-bit", "median_s": 0.0081, "steps_s": [0.0081],
               "params": 1_235_814_400u64, "shape": "llama-3.2-1b"}),
    ];
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/report.py");
    let output = Command::new("python3").arg(script).arg(&results).arg("--checks").arg(dir.path()).output().expect("python3 runs");
    assert!(output.status.success(), "report.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("| ours tch-cuda | llama-3.2-1b | 1235814400 | 12.30 | 14000 |"), "{text}");
    assert!(text.contains("| ours tch-cuda@tensor-8bit | ? | – | failed: killed | |"), "{text}");
    assert!(text.contains("| pytorch bnb.optim.AdamW 8-bit | llama-3.2-1b | 1235814400 | 8.10 | – |"), "{text}");
}
