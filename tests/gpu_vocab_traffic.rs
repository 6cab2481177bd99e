//! `scripts/gpu/vocab_traffic.py`, the count of bytes a step moves over vocabulary-sized tensors
//! (issue #12: the loss's passes over the logits), on a small trace written here.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// A host operator of a Kineto trace with its inputs' sizes and types.
fn op(name: &str, ts: f64, dur: f64, dims: Value, types: Value) -> Value {
    json!({"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur,
           "args": {"Input Dims": dims, "Input type": types}})
}

#[test]
fn the_bytes_over_vocabulary_sized_tensors_are_counted_once_per_computing_operator() {
    const V: u64 = 1_000_000;
    let trace = json!({"traceEvents": [
        // A cast: its source (bf16) read, its destination (f32) written: 4 + 8 MB.
        op("aten::copy_", 0.0, 10.0, json!([[1, 2, V], [1, 2, V]]), json!(["float", "c10::BFloat16"])),
        // In place: read and written, 8 + 8 MB.
        op("aten::exp_", 20.0, 10.0, json!([[1, 2, V]]), json!(["float"])),
        // A reduction: read only, 8 MB.
        op("aten::max", 40.0, 10.0, json!([[1, 2, V]]), json!(["float"])),
        // Not a reduction, whatever its name holds: read and written, 8 + 8 MB.
        op("aten::_softmax", 150.0, 5.0, json!([[1, 2, V]]), json!(["float"])),
        // The head's product (inside aten::linear, which computes nothing itself) is left out.
        op("aten::linear", 60.0, 30.0, json!([[2, 64], [V, 64]]), json!(["float", "float"])),
        op("aten::mm", 65.0, 20.0, json!([[2, 64], [64, V]]), json!(["float", "float"])),
        // A product written to an `out=` bf16 tensor: the f32 operand read, the bf16 tensor
        // written, 8 + 4 MB.
        op("aten::mul", 120.0, 5.0, json!([[1, 2, V], [1, 2, 1], [1, 2, V]]), json!(["float", "float", "c10::BFloat16"])),
        // A dot product per row of two f32 operands: read only, 8 + 8 MB.
        op("aten::bmm", 130.0, 5.0, json!([[2, 1, V], [2, V, 1]]), json!(["float", "float"])),
        // An in-place scatter of two values per row: nothing vocabulary-sized.
        op("aten::scatter_", 140.0, 5.0, json!([[1, 2, V], [1, 2, 2], [1, 2, 2]]), json!(["c10::BFloat16", "long int", "c10::BFloat16"])),
        // Not vocabulary-sized; a view.
        op("aten::mul", 100.0, 5.0, json!([[2, 64], [2, 64]]), json!(["float", "float"])),
        op("aten::view", 110.0, 1.0, json!([[1, 2, V]]), json!(["float"])),
    ]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    std::fs::write(&path, trace.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/vocab_traffic.py");
    let output = Command::new("python3").arg(script).args(["--vocab", &V.to_string()]).arg(&path).output().expect("python3 runs");
    assert!(output.status.success(), "vocab_traffic.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("80 MB over [..., {V}] tensors (read 52, written 28)")), "{stdout}");
    assert!(
        stdout.contains("16 MB  aten::exp_")
            && stdout.contains("16 MB  aten::bmm")
            && stdout.contains("16 MB  aten::_softmax")
            && stdout.contains("12 MB  aten::copy_")
            && stdout.contains("12 MB  aten::mul")
            && stdout.contains("8 MB  aten::max"),
        "{stdout}"
    );
    assert!(!stdout.contains("aten::mm") && !stdout.contains("aten::scatter_"), "{stdout}");
}
