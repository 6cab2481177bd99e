//! `scripts/gpu/profile_table.py`, the reader of the kernel profiles a device run brings back
//! (issue #12), on small profiles written here in each format it reads: device kernels in a
//! Kineto trace, host operators nested in one (self time), and CubeCL's kernel log.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Writes `contents` as the profile `file_name` (its name tells the script the format), runs
/// the script on it over `steps` steps and returns that profile's `--json` summary.
fn summarise(file_name: &str, contents: &str, steps: usize) -> Value {
    summarise_with(file_name, contents, steps, &[])
}

/// [`summarise`] with more of the script's options.
fn summarise_with(file_name: &str, contents: &str, steps: usize, options: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join(file_name);
    std::fs::write(&profile, contents).unwrap();
    let out = dir.path().join("summary.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/profile_table.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(format!("profile={}", profile.display()))
        .args(options)
        .args(["--steps", &steps.to_string(), "--json"])
        .arg(&out)
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "profile_table.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    summary["profile"].clone()
}

fn close(actual: &Value, expected: f64) {
    let actual = actual.as_f64().unwrap_or_else(|| panic!("{actual} is not a number"));
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

fn event(cat: &str, name: &str, tid: u64, ts: f64, dur: f64) -> Value {
    json!({"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur})
}

#[test]
fn device_kernels_are_summed_by_category_per_step() {
    let trace = json!({"traceEvents": [
        // Host operators and runtime calls do not count once the trace has device kernels.
        event("cpu_op", "aten::mm", 1, 0.0, 900.0),
        event("cuda_runtime", "cudaLaunchKernel", 1, 0.0, 5.0),
        event("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 7, 10.0, 300.0),
        event("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 7, 400.0, 100.0),
        event("kernel", "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", 7, 600.0, 50.0),
        event("kernel", "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", 7, 700.0, 20.0),
        event("kernel", "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 7, 800.0, 30.0),
        event("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 7, 900.0, 8.0),
        // A strided add casts nothing, whatever its kernel's name says; a bf16 copy does cast.
        event("kernel", "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::CUDAFunctor_add<float>>>", 7, 920.0, 12.0),
        event("kernel", "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)>", 7, 940.0, 6.0),
    ]});
    let torch = &summarise("trace.json", &trace.to_string(), 2);
    // Two steps profiled: everything is halved.
    close(&torch["total_ms"], (300.0 + 100.0 + 50.0 + 20.0 + 30.0 + 8.0 + 12.0 + 6.0) / 2.0 / 1e3);
    close(&torch["launches"], 4.0);
    close(&torch["categories"]["gemm"], 0.2);
    close(&torch["categories"]["attention"], 0.025);
    close(&torch["categories"]["elementwise"], 0.016);
    close(&torch["categories"]["optimizer"], 0.015);
    close(&torch["categories"]["cast/copy"], 0.007);
}

#[test]
fn kernels_are_charged_to_the_operator_that_launched_them() {
    let with_inputs = |mut op: Value, dims: Value, strides: Value, types: Value| {
        op["args"] = json!({"Input Dims": dims, "Input Strides": strides, "Input type": types});
        op
    };
    let launch = |ts: f64, correlation: u64| {
        let mut call = event("cuda_runtime", "cudaLaunchKernel", 1, ts, 2.0);
        call["args"] = json!({"correlation": correlation});
        call
    };
    let kernel = |name: &str, ts: f64, dur: f64, correlation: u64| {
        let mut k = event("kernel", name, 7, ts, dur);
        k["args"] = json!({"correlation": correlation});
        k
    };
    let trace = json!({"traceEvents": [
        // A strided in-place add: its first input is a transposed [4, 8].
        with_inputs(event("cpu_op", "aten::add_", 1, 100.0, 50.0), json!([[4, 8], [4, 8]]), json!([[1, 4], [8, 1]]), json!(["float", "float"])),
        launch(110.0, 1),
        // aten::linear holds aten::mm: the kernels go to the innermost operator.
        event("cpu_op", "aten::linear", 1, 190.0, 80.0),
        with_inputs(event("cpu_op", "aten::mm", 1, 200.0, 50.0), json!([[4, 8], [8, 2]]), json!([[8, 1], [2, 1]]), json!(["c10::BFloat16", "c10::BFloat16"])),
        launch(210.0, 2),
        launch(215.0, 3),
        launch(300.0, 4),
        kernel("void at::native::elementwise_kernel<128, 2, add>", 400.0, 10.0, 1),
        kernel("nvjet_sm90_tst_256x128", 420.0, 20.0, 2),
        kernel("nvjet_sm90_tst_256x128", 450.0, 30.0, 3),
        kernel("void at::native::vectorized_elementwise_kernel<4, fill>", 490.0, 5.0, 4),
    ]});
    let summary = summarise_with("trace.json", &trace.to_string(), 1, &["--by-op", "5"]);
    let rows = summary["by_operator"].as_array().expect("a by_operator list");
    let row = |i: usize| (rows[i]["operator"].as_str().unwrap().to_string(), rows[i]["kernels"].as_f64().unwrap());
    assert_eq!(rows.len(), 3);
    assert_eq!(row(0), ("aten::mm c10::BFloat16/c10::BFloat16 cc [[4, 8], [8, 2]]".into(), 2.0));
    close(&rows[0]["ms"], 0.05);
    assert_eq!(row(1), ("aten::add_ float/float sc [[4, 8], [4, 8]]".into(), 1.0));
    close(&rows[1]["ms"], 0.01);
    assert_eq!(row(2), ("(outside any operator)".into(), 1.0));
    close(&rows[2]["ms"], 0.005);
}

#[test]
fn host_operators_count_their_self_time_once() {
    // aten::linear (100 µs) holds aten::t (10) and aten::addmm (70), which holds aten::copy_ (20);
    // another thread runs aten::mul (40) at the same time.
    let trace = json!({"traceEvents": [
        event("cpu_op", "aten::linear", 1, 0.0, 100.0),
        event("cpu_op", "aten::t", 1, 5.0, 10.0),
        event("cpu_op", "aten::addmm", 1, 20.0, 70.0),
        event("cpu_op", "aten::copy_", 1, 30.0, 20.0),
        event("cpu_op", "aten::mul", 2, 10.0, 40.0),
        event("user_annotation", "ProfilerStep#1", 1, 0.0, 200.0),
    ]});
    let ours = &summarise("trace.json", &trace.to_string(), 1);
    // Self times: linear 20, t 10, addmm 50, copy_ 20, mul 40: 140 µs in all, not 240.
    close(&ours["total_ms"], 0.14);
    close(&ours["categories"]["gemm"], 0.07);
    close(&ours["categories"]["cast/copy"], 0.03);
    close(&ours["categories"]["elementwise"], 0.04);
}

#[test]
fn cubecl_logs_are_read_from_their_last_step_tables() {
    let table = |matmul: &str, fused: &str| {
        format!(
            "|⎺⎺⎺⎺⎺| \n\
             | Name                                             | Duration  | Num Computed | Ratio |\n\
             |⎼⎼⎼⎼⎼| \n\
             | MatmulEntry | TensorArgs | __Lhs | CudaRuntime   | {matmul} | 14           | 80 %  |\n\
             | ElemwiseFuse | CudaRuntime                      | {fused} | 40           | 20 %  |\n\
             |⎼⎼⎼⎼⎼| \n\
             | Total                                            | 1.5ms     | 54           | 100 % |\n\
             |⎯⎯⎯⎯⎯| \n"
        )
    };
    // Per-kernel lines, then the warm-up step's table, then the timed step's.
    let log = format!(
        "| 12.5µs     | ElemwiseFuse | CudaRuntime\n{}| 3.2ms      | MatmulEntry | TensorArgs | CudaRuntime\n{}",
        table("9ms", "250µs"),
        table("1.2ms", "300µs")
    );
    let cuda = &summarise("cubecl.log", &log, 1);
    close(&cuda["total_ms"], 1.5);
    close(&cuda["launches"], 54.0);
    close(&cuda["categories"]["gemm"], 1.2);
    close(&cuda["categories"]["elementwise"], 0.3);
}
