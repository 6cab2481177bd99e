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

/// Without `--vocab`, every tensor of `--min-elements` or more is counted, the products and the
/// attention kernels left out, and a copy is named by the operator it runs in.
#[test]
fn every_large_tensor_is_counted_and_copies_are_named_by_their_operator() {
    const N: u64 = 1_000_000;
    let trace = json!({"traceEvents": [
        // A cast inside `aten::to`: bf16 read, f32 written, 2 + 4 MB.
        op("aten::to", 0.0, 10.0, json!([[N]]), json!(["c10::BFloat16"])),
        op("aten::copy_", 1.0, 5.0, json!([[N], [N]]), json!(["float", "c10::BFloat16"])),
        // A copy of its own: 4 + 4 MB.
        op("aten::copy_", 20.0, 5.0, json!([[N], [N]]), json!(["float", "float"])),
        // In place on two f32 tensors: both read, one written, 12 MB.
        op("aten::add_", 30.0, 5.0, json!([[N], [N], []]), json!(["float", "float", "Scalar"])),
        // Left out: a product, an attention kernel, a tensor under the threshold.
        op("aten::mm", 40.0, 5.0, json!([[1000, 1000], [1000, 1000]]), json!(["float", "float"])),
        op("aten::_scaled_dot_product_flash_attention", 50.0, 5.0, json!([[1, 4, 1000, 250]]), json!(["c10::BFloat16"])),
        op("aten::mul", 60.0, 5.0, json!([[999], [999]]), json!(["float", "float"])),
    ]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    std::fs::write(&path, trace.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/vocab_traffic.py");
    let output = Command::new("python3").arg(script).args(["--min-elements", "1000"]).arg(&path).output().expect("python3 runs");
    assert!(output.status.success(), "vocab_traffic.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("26 MB over tensors of 1000 elements or more (read 14, written 12)"), "{stdout}");
    assert!(
        stdout.contains("12 MB  aten::add_")
            && stdout.contains("8 MB  aten::copy_\n")
            && stdout.contains("6 MB  aten::copy_ (in aten::to)"),
        "{stdout}"
    );
    assert!(!stdout.contains("aten::mm") && !stdout.contains("flash") && !stdout.contains("aten::mul"), "{stdout}");
}
