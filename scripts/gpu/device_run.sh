#!/usr/bin/env bash
# Runs ON THE GPU MACHINE (or, with DRY_RUN=1, here on the CPU): the prepared measurements of
# issue #12 in one command, within a time budget, writing everything under $OUT.
#
#   bash scripts/gpu/device_run.sh [PLAN]        PLAN: first (default) | second | profile | tch | tch-profile | check | cuda-bisect | dry
#
# Expects the staged folder (scripts/gpu/run.sh stage): $GPU_DIR/bin/bench_train or its .xz (built
# with --features cuda), $GPU_DIR/bin/bench_train_tch (--features tch, linked against the device's
# torch version; optional: without it the tch-* backends are skipped), zephyr_sft_tch and
# zephyr_dpo_tch (or their .xz: the example binaries, built the same way) with SmolLM2's
# tokenizer files in $GPU_DIR/smollm2-tokenizer/ (optional: the trainer runs), and
# $GPU_DIR/reference/ (the CPU's values for the correctness check).
# Order of work, most important first, each step skipped once the budget is spent:
#   1. environment (GPU, driver, CUDA paths, torch) — printed, so a failure is explainable;
#   2. correctness: SFT / DPO / LoRA / QLoRA steps on the tiny fixture vs the CPU (f32, and
#      cuda-bf16: mixed precision, bf16 products over f32 parameters, as `bf16: true`); plans
#      tch, cuda-bisect and dry: burn's operations one at a time against the CPU (`bench_train ops`);
#      plans tch and dry: the example binaries' training loop, GPU against CPU (`run_trainer`);
#   3. the NCCL communicator at world size 1 vs one process (host buffers, and the data-parallel
#      step's device route), then QLoRA's NF4 dequantization alone, kernel vs tensor operations
#      (`bench_train dequant`), and the step's products alone, cuBLAS vs CubeCL's matmul
#      (`bench_train gemm`); plan second: the optimizer update alone (`bench_train update`);
#   4. throughput: ours and PyTorch's on the same shapes, peak device memory sampled by nvidia-smi;
#   5. profiles: one step of ours and of PyTorch with every kernel's device time, by category
#      (scripts/gpu/profile_table.py), to rank what to speed up.
# The last lines printed are the tables of scripts/gpu/report.py.
# $OUT receives three files (the device tool brings back at most 8): log.txt, results.jsonl and
# bundle.tar.gz, which holds everything else (check reports, NCCL output, profiles) and is
# rewritten after each stage, so a run cut short still brings back what it finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
PLAN="${1:-first}"
GPU_DIR="${GPU_DIR:-.gpu}"
OUT="${OUT:-$GPU_DIR/out}"
BUDGET_S="${BUDGET_S:-450}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-150}"
BIN="$GPU_DIR/bin/bench_train"
BIN_TCH="$GPU_DIR/bin/bench_train_tch"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
START=$(date +%s)
LOG="$OUT/log.txt"
RESULTS="$OUT/results.jsonl"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX")}"
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET_S - $(elapsed))); }
say() { echo "[$(elapsed)s] $*"; }
# run_limit MIN: the seconds the next run may take (what is left of the budget, at most
# RUN_TIMEOUT_S); fails, printing nothing, when less than MIN seconds are left.
run_limit() {
    local budget
    budget=$(left)
    [ "$budget" -ge "$1" ] || return 1
    echo $((budget < RUN_TIMEOUT_S ? budget : RUN_TIMEOUT_S))
}
# Packs what $WORK holds into $OUT/bundle.tar.gz (replacing the previous bundle whole).
bundle() { tar czf "$OUT/bundle.tar.gz.partial" -C "$WORK" . && mv "$OUT/bundle.tar.gz.partial" "$OUT/bundle.tar.gz"; }

if [ "$PLAN" = dry ]; then
    DRY_RUN=1
fi
DRY_RUN="${DRY_RUN:-0}"

# --- 1. environment ------------------------------------------------------------------------
for packed in "$GPU_DIR"/bin/*.xz; do
    # run.sh stage ships the larger binaries xz-compressed (they would crowd the 64 MiB carry).
    [ -f "$packed" ] && [ ! -x "${packed%.xz}" ] || continue
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$packed" "${packed%.xz}" && chmod +x "${packed%.xz}"
done
say "plan $PLAN, budget ${BUDGET_S}s, binary $(ls -la "$BIN" 2>&1 | awk '{print $5, $9}')"
[ -f "$GPU_DIR/staged.txt" ] && say "$(cat "$GPU_DIR/staged.txt")"
if [ "$DRY_RUN" = 1 ]; then
    OURS_BACKENDS="${OURS_BACKENDS:-cpu}"
    CHECK_BACKENDS="${CHECK_BACKENDS:-cpu}"
    OPS_BACKENDS="${OPS_BACKENDS:-cpu}"
else
    # burn-cuda (CubeCL kernels) and the libtorch route (cuBLAS; burn's ops as torch calls).
    OURS_BACKENDS="${OURS_BACKENDS:-cuda-bf16 tch-cuda-bf16 cuda}"
    CHECK_BACKENDS="${CHECK_BACKENDS:-cuda cuda-bf16 tch-cuda tch-cuda-bf16}"
    # burn's operations one at a time: f32, then bf16 inputs (bench_train ops).
    OPS_BACKENDS="${OPS_BACKENDS:-cuda-bf16}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
    # NVRTC compiles burn's kernels and needs CUDA's headers (cubecl reads CUDA_PATH).
    if [ -z "${CUDA_PATH:-}" ]; then
        for c in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
            if [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_PATH="$c"; break; fi
        done
    fi
    # cudarc loads libnvrtc.so.13 / libnccl.so by name: link what is installed into one folder.
    LIBS=/tmp/cuda-libs
    mkdir -p "$LIBS"
    SITE=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    # libcublas (and the libcublasLt it loads) for the products on cuda* (alignment_core::gemm).
    for pattern in 'libnvrtc.so.1[0-9]' 'libnvrtc-builtins.so.1[0-9]*' 'libnccl.so.2' 'libcudart.so.1[0-9]' 'libcublas.so.1[0-9]' 'libcublasLt.so.1[0-9]'; do
        found=$(find ${CUDA_PATH:+$CUDA_PATH/lib64} $SITE/nvidia -name "$pattern" 2>/dev/null | head -1)
        if [ -n "$found" ]; then
            ln -sf "$found" "$LIBS/$(basename "$found")"
            case "$pattern" in libnccl*) ln -sf "$found" "$LIBS/libnccl.so" ;; esac
            export LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
        else
            say "not found: $pattern"
        fi
    done
    export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
    say "CUDA_PATH=${CUDA_PATH:-unset}; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ls "$LIBS"
fi
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "| transformers", transformers.__version__)' || say "python reference not importable"
# bench_train_tch loads libtorch from the Python torch's lib folder (its libraries find CUDA's
# through their own rpath); the dry run passes TORCH_LIB.
if [ -z "${TORCH_LIB:-}" ]; then
    TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)"
    # Its CUDA graphs (csrc/cuda_graph.cpp) link CUDA's runtime directly: the libcudart.so.13 of
    # torch's own nvidia/ packages, beside torch in site-packages, goes on the path too.
    for lib in "$TORCH_LIB"/../../nvidia/*/lib; do
        [ -f "$lib/libcudart.so.13" ] && TORCH_LIB="$TORCH_LIB:$(cd "$lib" && pwd)"
    done
fi
# bitsandbytes' CUDA library for `optim: adamw_bnb_8bit` on tch-cuda (trainer::tch_adam8bit
# finds it beside torch otherwise; the staged wheel is not installed there).
BNB_LIB="$GPU_DIR/python/bitsandbytes/libbitsandbytes_cuda130.so"
if [ "$DRY_RUN" != 1 ] && [ -f "$BNB_LIB" ]; then
    export ALIGNMENT_BITSANDBYTES_LIB="$BNB_LIB"
fi
if [ -x "$BIN_TCH" ]; then
    say "bench_train_tch: $(ls -la "$BIN_TCH" | awk '{print $5}') bytes, libtorch from ${TORCH_LIB:-nowhere}"
    LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}" ldd "$BIN_TCH" 2>&1 | grep -E "torch|c10|not found" || true
fi

# The binary (with its library path) that runs backend `$1`: tch-* in bench_train_tch, the rest
# in bench_train, with the switches its `@` suffix names. Prints nothing when that binary was
# not staged.
runner_for() {
    local BIN="$BIN"
    case "$1" in
        tch-*)
            [ -x "$BIN_TCH" ] || return 0
            BIN="env LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-} $BIN_TCH"
            ;;
        *) [ -x "$BIN" ] || return 0 ;;
    esac
    case "$1" in
        # `NAME@cubecl`: backend NAME with its products on CubeCL's matmul instead of cuBLAS;
        # `NAME@sync`: on cuBLAS ordered by host synchronisation instead of on CubeCL's stream.
        *@cubecl) echo "env ALIGNMENT_CUBLAS=0 $BIN" ;;
        *@sync) echo "env ALIGNMENT_CUBLAS=sync $BIN" ;;
        # `NAME@ops-softmax`: blocked attention's softmax by tensor operations instead of its
        # CubeCL kernels (models::softmax_kernel).
        *@ops-softmax) echo "env ALIGNMENT_SOFTMAX_KERNEL=0 $BIN" ;;
        # `NAME@ops-adamw`: AdamW by tensor operations instead of its CubeCL kernel
        # (trainer::adamw_kernel).
        *@ops-adamw) echo "env ALIGNMENT_ADAMW_KERNEL=0 $BIN" ;;
        # `NAME@ops-logits`: the loss's passes over the logits by tensor operations instead of
        # their CubeCL kernels (objectives::logits_kernel) or torch's (objectives::tch_logits).
        *@ops-logits) echo "env ALIGNMENT_LOGITS_KERNEL=0 $BIN" ;;
        # `NAME@f32-frozen`: a LoRA/QLoRA base's frozen weights kept in f32 instead of bf16.
        *@f32-frozen) echo "env ALIGNMENT_FROZEN_IN_PRODUCT_TYPE=0 $BIN" ;;
        # `NAME@whole-dequant`: the tensor operations dequantize an NF4 weight whole, not by runs of rows.
        *@whole-dequant) echo "env ALIGNMENT_DEQUANTIZE_RUNS=0 $BIN" ;;
        # `NAME@f32-adapters`: QLoRA's adapters (and their gradients and moments) in f32 instead
        # of bf16, as before 2026-12-07 (TRL holds a quantized model's in bf16).
        *@f32-adapters) echo "env ALIGNMENT_QLORA_ADAPTERS_IN_BF16=0 $BIN" ;;
        # `NAME@burn-dequant`: an NF4 weight dequantized by burn's tensor operations instead of
        # four torch kernels a run of rows (models::tch_nf4).
        *@burn-dequant) echo "env ALIGNMENT_DEQUANTIZE_BY_TORCH=0 $BIN" ;;
        # `NAME@keep-dense`: QLoRA's products by burn's operations, which keep each dense weight
        # until its backward step, instead of the recorded step that dequantizes again there.
        *@keep-dense) echo "env ALIGNMENT_QUANTIZED_PRODUCT_STEP=0 $BIN" ;;
        # `NAME@two-step-mlp`: the gated MLP's gate and down projection as two recorded steps
        # (keeping their product for the backward pass) instead of one.
        *@two-step-mlp) echo "env ALIGNMENT_GATED_DOWN_STEP=0 $BIN" ;;
        # `NAME@tensor-8bit`: `optim: adamw_bnb_8bit` by its tensor form (trainer::adam8bit_tensors)
        # instead of bitsandbytes' kernels (trainer::tch_adam8bit).
        *@tensor-8bit) echo "env ALIGNMENT_BNB_KERNELS=0 $BIN" ;;
        # `NAME@ops-steps`: attention and RMSNorm by burn's operations instead of the recorded
        # steps written for GPU memory (models::blocked_attention, recorded_norm).
        *@ops-steps) echo "env ALIGNMENT_GPU_STEPS=0 $BIN" ;;
        # `NAME@plain`: every path of this project's own off at once (CubeCL's matmul, burn's
        # operations for attention, norms, AdamW and the loss): burn-cuda as burn ships it.
        *@plain) echo "env ALIGNMENT_CUBLAS=0 ALIGNMENT_SOFTMAX_KERNEL=0 ALIGNMENT_ADAMW_KERNEL=0 ALIGNMENT_LOGITS_KERNEL=0 ALIGNMENT_GPU_STEPS=0 $BIN" ;;
        *) echo "$BIN" ;;
    esac
}

# bench_train options a backend name's suffix asks for: `NAME@chunked-head`, the head and the
# log-probabilities in chunks of tokens, never the full logits (`use_liger_kernel: true`; TRL
# 1.16's SFTTrainer computes its loss and metrics with a fused head too); `NAME@cuda-graph`, the
# step captured once as a CUDA graph and replayed (libtorch on CUDA, every task).
options_for() {
    case "$1" in
        *@chunked-head) echo "--chunked-head" ;;
        *@cuda-graph) echo "--cuda-graph" ;;
    esac
}

# Runs one measurement, sampling device memory, and appends its JSON line (plus the peak and
# the wall time) to $RESULTS; a failure is recorded with the end of its output.
measure() {
    local label="$1"
    shift
    local limit
    if ! limit=$(run_limit 20); then
        say "skip $label (budget spent)"
        echo "{\"label\": \"$label\", \"skipped\": \"budget\"}" >>"$RESULTS"
        return
    fi
    local mem="$WORK/mem.$$.txt" sampler=""
    if [ "$DRY_RUN" != 1 ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem" 2>/dev/null &
        sampler=$!
    fi
    local t0 rc
    t0=$(date +%s.%N)
    timeout --signal=KILL "$limit" "$@" >"$WORK/run.out" 2>"$WORK/run.err"
    rc=$?
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
    "$PY" - "$label" "$rc" "$t0" "$mem" "$WORK/run.out" "$WORK/run.err" >>"$RESULTS" <<'EOF'
import json, sys, time
label, rc, t0, mem, out, err = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
lines = [l for l in open(out).read().splitlines() if l.startswith("{")]
row = json.loads(lines[-1]) if lines else {}
row["label"], row["exit_code"], row["wall_seconds"] = label, rc, time.time() - t0
try:
    used = [float(x) for x in open(mem).read().split() if x.strip()]
    if used:
        row["peak_device_mib"] = max(used) - used[0]
except OSError:
    pass
if rc != 0 or not lines:
    row["error"] = (open(err).read() + open(out).read())[-1500:]
print(json.dumps(row))
EOF
    say "$label: exit $rc, $(tail -c 300 "$WORK/run.err" | tr '\n' ' ' | tail -c 200)"
    rm -f "$mem"
}

# --- 2. correctness ------------------------------------------------------------------------
run_checks() {
    for backend in $CHECK_BACKENDS; do
        local runner
        runner="$(runner_for "$backend")"
        if [ -z "$runner" ]; then
            say "check $backend: skipped (no binary staged)"
            continue
        fi
        if [ "$(left)" -lt 30 ]; then
            say "skip check $backend (budget spent)"
            continue
        fi
        say "check $backend"
        # shellcheck disable=SC2086 # the runner is `env VAR=... binary`
        timeout --signal=KILL "${CHECK_TIMEOUT_S:-240}" $runner check --backend "${backend%@*}" --reference "$GPU_DIR/reference" --report "$WORK/check-$backend.json" ${CHECK_CASES:+--cases "$CHECK_CASES"} || say "check $backend: FAILED (exit $?)"
    done
}

# burn's operations one at a time against the CPU, in the same process (bench_train ops,
# src/op_check.rs: element-wise, casts, reductions, softmax, layout, indexing, products, the
# backward pass of each composite the model builds, AdamW's arithmetic): names the operation a
# backend gets wrong when its step check fails. Each backend in a process of its own.
run_ops() {
    local backend runner
    for backend in $OPS_BACKENDS; do
        runner="$(runner_for "$backend")"
        if [ -z "$runner" ]; then
            say "ops $backend: skipped (no binary staged)"
            continue
        fi
        say "ops $backend"
        # shellcheck disable=SC2086 # the runner is `env VAR=... binary`
        timeout --signal=KILL "${OPS_TIMEOUT_S:-120}" $runner ops --backend "${backend%@*}" --report "$WORK/ops-$backend.json" || say "ops $backend: FAILED (exit $?)"
    done
}

# The training loop a user runs: the example binaries `zephyr_sft` and `zephyr_dpo` built with
# `--features tch` (run.sh stage), on the GPU and on this machine's CPU (the same binaries with
# no GPU visible), in the same call. SFT on a small random model with SmolLM2's vocabulary and
# tokenizer (trainer_model.py, shapes/smollm2-tiny.json), f32 and then `--bf16=true` (mixed
# precision), and DPO from the CPU's SFT model, f32; each GPU run beside the CPU's by
# compare_runs.py: every metric logged at every step (losses, grad norm, learning rate, rewards,
# the evaluation at the end) and every saved weight, f32 ≤ 1e-4, bf16 ≤ 2e-2 (issue #12, item 1,
# at the level of the command line). A line each in $RESULTS.
TRAINER_BIN_SFT="$GPU_DIR/bin/zephyr_sft_tch" TRAINER_BIN_DPO="$GPU_DIR/bin/zephyr_dpo_tch"
TRAINER_TOKENIZER="$GPU_DIR/smollm2-tokenizer"

# trainer_run NAME DEVICE BINARY RECIPE [--key=value ...]: one run of an example binary into
# $WORK/trainer/NAME (its output_dir), on the GPU (`cuda`) or the CPU (`cpu`), each device with
# its own cache (DPO's reference log-probs are cached there). Returns the binary's exit status.
trainer_run() {
    local name="$1" device="$2" binary="$3" recipe="$4"
    shift 4
    local limit hide=()
    if ! limit=$(run_limit 20); then
        say "skip trainer $name (budget spent)"
        return 1
    fi
    [ "$device" = cpu ] && hide=(CUDA_VISIBLE_DEVICES=)
    say "trainer $name"
    timeout --signal=KILL "$limit" env "${hide[@]}" \
        ALIGNMENT_HANDBOOK_CACHE="$WORK/trainer/cache-$device" LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}" \
        ${TRAINER_ENV:-} "$binary" "$recipe" --output_dir="$WORK/trainer/$name" --overwrite_output_dir=true "$@" >"$WORK/trainer/$name.log" 2>&1
    local rc=$?
    say "trainer $name: exit $rc — $(tail -c 300 "$WORK/trainer/$name.log" | tr '\n' ' ' | tail -c 200)"
    return $rc
}

# compare NAME REFERENCE TOLERANCE: the run NAME beside the run REFERENCE, a line in $RESULTS.
trainer_compare() {
    "$PY" scripts/gpu/compare_runs.py --label "trainer $1" --tolerance "$3" "$WORK/trainer/$2" "$WORK/trainer/$1" >>"$RESULTS"
    say "trainer $1 against $2: $(tail -n 1 "$RESULTS" | cut -c 1-300)"
}

run_trainer() {
    if [ ! -x "$TRAINER_BIN_SFT" ] || [ ! -x "$TRAINER_BIN_DPO" ] || [ ! -f "$TRAINER_TOKENIZER/tokenizer.json" ]; then
        say "trainer: skipped (no example binaries or tokenizer staged)"
        return
    fi
    local gpu=cuda
    [ "$DRY_RUN" = 1 ] && gpu=cpu-again
    mkdir -p "$WORK/trainer"
    "$PY" scripts/gpu/trainer_model.py --shape scripts/gpu/shapes/smollm2-tiny.json --tokenizer "$TRAINER_TOKENIZER" \
        --out "$WORK/trainer/tiny" || { say "trainer: the model could not be made"; return; }
    # A few updates, each logged, the evaluation at the end (the recipes' own data and settings).
    local steps="${TRAINER_STEPS:-4}" common=()
    common=(--max_steps="$steps" --logging_steps=1 --eval_strategy=steps --eval_steps="$steps" --eval_on_start=false --save_strategy=no)
    local sft=(recipes/smollm2-135m/sft/config_cpu.yaml --model_name_or_path="$WORK/trainer/tiny" "${common[@]}")
    trainer_run sft-cpu cpu "$TRAINER_BIN_SFT" "${sft[@]}" || return
    trainer_run "sft-$gpu" "${gpu%-again}" "$TRAINER_BIN_SFT" "${sft[@]}" && trainer_compare "sft-$gpu" sft-cpu 1e-4
    trainer_run "sft-$gpu-bf16" "${gpu%-again}" "$TRAINER_BIN_SFT" "${sft[@]}" --bf16=true && trainer_compare "sft-$gpu-bf16" sft-cpu 2e-2
    local dpo=(recipes/smollm2-135m/dpo/config_cpu.yaml --model_name_or_path="$WORK/trainer/sft-cpu" "${common[@]}")
    trainer_run dpo-cpu cpu "$TRAINER_BIN_DPO" "${dpo[@]}" && trainer_run "dpo-$gpu" "${gpu%-again}" "$TRAINER_BIN_DPO" "${dpo[@]}" &&
        trainer_compare "dpo-$gpu" dpo-cpu 1e-4
    # The logs and metrics travel in the bundle; the models stay behind.
    find "$WORK/trainer" \( -name '*.safetensors' -o -name tokenizer.json \) -delete
    rm -rf "$WORK/trainer/cache-"*
}

# The same loop's speed on the 135M shape (random weights), bf16, packed 1024-token rows of 4,
# one update a batch: its tokens/s (the logging windows after the first) beside `bench_train
# train`'s step on the same shape, which leaves out the loop (data, logging, the final save).
# Then the layout a replayed run uses, eagerly: the packed rows kept whole under a block-diagonal
# mask and padded to the row length (`ALIGNMENT_PACKED_ROWS=whole --pad_to_multiple_of=1024`;
# the eager run splits them by document: ≈ 1.5× the real tokens in positions there, ≈ 1.05×
# whole). Then that run with its steps replayed from captured CUDA graphs
# (`--torch_compile_mode=reduce-overhead`, trainer::graph_steps; every full batch then has one
# shape): its tokens/s, and every logged metric and saved weight against the eager whole-row
# run's (the same kernels: equal, up to cuBLAS picking other algorithms on the capture's stream).
run_trainer_speed() {
    [ -x "$TRAINER_BIN_SFT" ] && [ -f "$TRAINER_TOKENIZER/tokenizer.json" ] || return
    local shape="${1:-smollm2-135m}" device=cuda
    [ "$DRY_RUN" = 1 ] && device=cpu
    mkdir -p "$WORK/trainer"
    "$PY" scripts/gpu/trainer_model.py --shape "scripts/gpu/shapes/$shape.json" --tokenizer "$TRAINER_TOKENIZER" \
        --out "$WORK/trainer/$shape" || { say "trainer speed: the model could not be made"; return; }
    local steps="${TRAINER_SPEED_STEPS:-16}" speed=()
    speed=(recipes/smollm2-135m/sft/config_cpu.yaml --model_name_or_path="$WORK/trainer/$shape" --bf16=true --packing=true
        --max_seq_length=1024 --per_device_train_batch_size=4 --gradient_accumulation_steps=1 --max_steps="$steps"
        --logging_steps=4 --eval_strategy=no --eval_on_start=false --save_strategy=no)
    trainer_run "speed-$shape" "$device" "$TRAINER_BIN_SFT" "${speed[@]}"
    "$PY" scripts/gpu/compare_runs.py --label "trainer speed-$shape sft s1024 b4" "$WORK/trainer/speed-$shape" >>"$RESULTS"
    say "trainer speed-$shape: $(tail -n 1 "$RESULTS" | cut -c 1-300)"
    TRAINER_ENV=ALIGNMENT_PACKED_ROWS=whole trainer_run "speed-$shape-whole" "$device" "$TRAINER_BIN_SFT" "${speed[@]}" \
        --pad_to_multiple_of=1024 || return
    "$PY" scripts/gpu/compare_runs.py --label "trainer speed-$shape-whole sft s1024 b4" "$WORK/trainer/speed-$shape-whole" >>"$RESULTS"
    say "trainer speed-$shape-whole: $(tail -n 1 "$RESULTS" | cut -c 1-300)"
    if trainer_run "speed-$shape-graph" "$device" "$TRAINER_BIN_SFT" "${speed[@]}" --pad_to_multiple_of=1024 \
        --torch_compile_mode=reduce-overhead; then
        "$PY" scripts/gpu/compare_runs.py --label "trainer speed-$shape-graph sft s1024 b4" "$WORK/trainer/speed-$shape-graph" >>"$RESULTS"
        say "trainer speed-$shape-graph: $(tail -n 1 "$RESULTS" | cut -c 1-300)"
        say "trainer speed-$shape-graph: $(grep -h 'CUDA graph\|torch_compile_mode' "$WORK/trainer/speed-$shape-graph.log" | tail -n 2 | tr '\n' ' ')"
        trainer_compare "speed-$shape-graph" "speed-$shape-whole" 1e-4
    fi
    rm -rf "$WORK/trainer/$shape" "$WORK/trainer/speed-$shape"{,-whole,-graph}/{*.safetensors,tokenizer.json}
}

# bitsandbytes' 8-bit AdamW kernels against the f32 transcription that the Rust update
# (`optim: adamw_bnb_8bit`, crates/trainer/src/adam8bit.rs) equals bit for bit (≈ 5–10 s):
# scripts/gpu/check_adam8bit.py, a line per case in $RESULTS. bitsandbytes (its Python files and
# the CUDA 13.0 library only) travels in $GPU_DIR/python (run.sh stage).
run_adam8bit() {
    local limit
    if [ ! -d "$GPU_DIR/python/bitsandbytes" ]; then
        say "adam8bit: skipped (bitsandbytes not staged)"
        return
    fi
    limit=$(run_limit 15) || { say "skip adam8bit (budget spent)"; return; }
    say "adam8bit"
    timeout --signal=KILL "$limit" env PYTHONPATH="$GPU_DIR/python${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" scripts/gpu/check_adam8bit.py --results "$RESULTS" >"$WORK/adam8bit.txt" 2>&1
    say "adam8bit: exit $? — $(grep -c '"pass": true' "$WORK/adam8bit.txt") cases pass; $(grep -v '"pass": true' "$WORK/adam8bit.txt" | tail -c 400 | tr '\n' ' ')"
}

# `optim: adamw_bnb_8bit`'s update alone on shape $1 (default the 1B; ≈ 30 s): through
# bitsandbytes' kernels called from Rust (trainer::tch_adam8bit), through the tensor form
# (@tensor-8bit), and PyTorch's step with bnb.optim.AdamW(optim_bits=8) and with its fused AdamW,
# clipping included in each, in the same call; rows in $RESULTS (the `tch` plan's checks ran the
# `sft-8bit` case both ways).
run_update_8bit() {
    local shape="${1:-llama-3.2-1b}" backend runner limit
    for backend in tch-cuda tch-cuda@tensor-8bit; do
        runner="$(runner_for "$backend")"
        [ -z "$runner" ] && continue
        # shellcheck disable=SC2086 # the runner is `env VAR=... binary`
        measure "update-8bit $backend $shape" $runner update --backend "${backend%@*}" --shape "scripts/gpu/shapes/$shape.json" --optim adamw_bnb_8bit --warmup 1 --steps 3
    done
    [ -d "$GPU_DIR/python/bitsandbytes" ] || return
    limit=$(run_limit 20) || { say "skip PyTorch's 8-bit update (budget spent)"; return; }
    say "PyTorch's 8-bit update $shape"
    timeout --signal=KILL "$limit" env PYTHONPATH="$GPU_DIR/python${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" scripts/gpu/check_adam8bit.py --time-shape "scripts/gpu/shapes/$shape.json" --results "$RESULTS" >"$WORK/adam8bit-time.txt" 2>&1
    say "PyTorch's 8-bit update: exit $? — $(tail -c 400 "$WORK/adam8bit-time.txt" | tr '\n' ' ')"
}

# --- 3. NCCL -------------------------------------------------------------------------------
# The communicator at world size 1 against one process, then the data-parallel step's device
# route on the backend's own buffers: burn-cuda's (`run_nccl`), or libtorch's (`run_nccl tch`:
# the libtorch route's multi-GPU transport, never run).
run_nccl() {
    [ "$DRY_RUN" = 1 ] && return
    local runner="$BIN" out="$WORK/nccl.txt"
    if [ "${1:-}" = tch ]; then
        runner=$(runner_for tch-cuda)
        out="$WORK/nccl-tch.txt"
        [ -n "$runner" ] || { say "skip nccl tch (bench_train_tch not staged)"; return; }
    fi
    say "nccl ${1:-cuda}"
    timeout --signal=KILL 60 $runner nccl >"$out" 2>&1
    say "nccl ${1:-cuda}: exit $? — $(tail -c 600 "$out" | tr '\n' ' ')"
}

# The optimizer update alone (issue #13): one process, a data-parallel rank with its optimizer on
# the device, and offloaded to the host (the round trip a data-parallel step paid before), on
# burn-cuda and on libtorch (torch's multi-tensor norm and fused AdamW: docs/performance.md,
# "The update as PyTorch's multi-tensor kernels").
run_update() {
    [ "$DRY_RUN" = 1 ] && return
    local backend shape runner
    for backend in cuda tch-cuda; do
        runner="$(runner_for "$backend")"
        [ -z "$runner" ] && continue
        for shape in smollm2-135m llama-3.2-1b; do
            [ "$(left)" -lt 40 ] && { say "skip update $backend $shape (budget spent)"; continue; }
            say "update $backend $shape"
            # shellcheck disable=SC2086 # the runner is `env VAR=... binary`
            timeout --signal=KILL 120 $runner update --backend "$backend" --shape "scripts/gpu/shapes/$shape.json" --warmup 1 --steps 3 >"$WORK/update-$backend-$shape.txt" 2>&1
            say "update $backend $shape: exit $? — $(grep -v '^{' "$WORK/update-$backend-$shape.txt" | tail -c 400 | tr '\n' ' ')"
        done
    done
}

# QLoRA's NF4 base dequantized alone (one Mistral-7B MLP weight, into bf16): the CubeCL kernel
# (models::nf4_kernel) against the tensor operations it replaced, in one process; a line per
# path in $RESULTS (docs/performance.md, "QLoRA's base dequantized by one kernel").
run_dequant() {
    local backend runner
    for backend in ${DEQUANT_BACKENDS:-cuda-bf16}; do
        runner="$(runner_for "$backend")"
        [ -z "$runner" ] && { say "dequant $backend: skipped (no binary staged)"; continue; }
        # shellcheck disable=SC2086 # the runner is `env VAR=... binary`
        measure "ours $backend dequant ${DEQUANT_SHAPE:-mistral-7b}" $runner dequant --backend "$backend" --shape "scripts/gpu/shapes/${DEQUANT_SHAPE:-mistral-7b}.json"
    done
}

# A training step's products alone at the 1B shape (4096 tokens): cuBLAS, the route the step
# takes on cuda*, against CubeCL's matmul, values compared (bench_train gemm exits non-zero when
# they disagree); docs/performance.md, "Products by cuBLAS on burn-cuda".
run_gemm() {
    local backend runner
    for backend in ${GEMM_BACKENDS:-cuda-bf16 cuda cuda-bf16@sync}; do
        runner="$(runner_for "$backend")"
        [ -z "$runner" ] && { say "gemm $backend: skipped (no binary staged)"; continue; }
        # shellcheck disable=SC2086 # the runner is `env VAR=... binary`
        measure "ours $backend gemm ${GEMM_SHAPE:-llama-3.2-1b}" $runner gemm --backend "${backend%@*}" --shape "scripts/gpu/shapes/${GEMM_SHAPE:-llama-3.2-1b}.json" ${GEMM_ARGS:-}
    done
}
# --- 4. throughput -------------------------------------------------------------------------
# bench SHAPE TASK SEQ BATCH ACCUM: ours on each backend of $OURS_BACKENDS, then PyTorch.
# LEAN=1: ours with --gradient-checkpointing --chunked-head, PyTorch with --grad-checkpointing
# (the recipes' `gradient_checkpointing: true`; PyTorch has no chunked head without Liger).
# NO_TORCH=1: ours only (a variant of ours measured after PyTorch was, on the same shape).
# TORCH_GRAPH=1: PyTorch's step again, captured once as a CUDA graph and replayed
# (torch_baseline.py --cuda-graph): against the eager run, what the host costs a step.
bench() {
    local shape="$1" task="$2" seq="$3" batch="$4" accum="$5"
    local common=(--shape "scripts/gpu/shapes/$shape.json" --task "$task" --seq "$seq" --batch "$batch" --accum "$accum" --warmup "${WARMUP:-2}" --steps "${STEPS:-5}")
    local ours=() torch=() tag=""
    if [ "${LEAN:-0}" = 1 ]; then
        ours=(--gradient-checkpointing --chunked-head) torch=(--grad-checkpointing) tag=" lean"
    fi
    for backend in $OURS_BACKENDS; do
        local runner options
        runner="$(runner_for "$backend")"
        [ -z "$runner" ] && continue
        options="$(options_for "$backend")"
        # LEAN runs take the chunked head already.
        [ "${LEAN:-0}" = 1 ] && options="${options//--chunked-head/}"
        # shellcheck disable=SC2086 # the runner is `env VAR=... binary`, the options words
        measure "ours $backend $shape $task s$seq b$batch$tag" $runner train --backend "${backend%@*}" "${common[@]}" "${ours[@]}" $options
    done
    if [ "${NO_TORCH:-0}" != 1 ]; then
        measure "torch $shape $task s$seq b$batch$tag" "$PY" scripts/gpu/torch_baseline.py "${common[@]}" "${torch[@]}"
        if [ "${TORCH_GRAPH:-0}" = 1 ]; then
            measure "torch $shape $task s$seq b$batch$tag graph" "$PY" scripts/gpu/torch_baseline.py "${common[@]}" "${torch[@]}" --cuda-graph
        fi
    fi
    bundle
}

# --- 5. profiles ---------------------------------------------------------------------------
# profile SHAPE TASK SEQ BATCH: one step (after ${WARMUP:-1} untimed ones) of ours on each backend
# of $OURS_BACKENDS and of PyTorch, each kernel's device time recorded (bench_train --profile:
# libtorch's Kineto trace, or CubeCL's kernel log; torch_baseline.py --profile: torch.profiler),
# then their tables by category side by side (profile_table.py, also kept as table.md/.json).
# The raw profiles travel gzip-compressed when small enough for the bundle.
profile() {
    local shape="$1" task="$2" seq="$3" batch="$4"
    local name="$shape-$task-s$seq-b$batch" specs=()
    local dir="$WORK/profile-$name"
    local common=(--shape "scripts/gpu/shapes/$shape.json" --task "$task" --seq "$seq" --batch "$batch" --accum 1 --warmup "${WARMUP:-1}" --steps 1)
    mkdir -p "$dir"
    for backend in $OURS_BACKENDS torch; do
        local limit runner file
        if ! limit=$(run_limit 30); then
            say "skip profile $backend $name (budget spent)"
            continue
        fi
        if [ "$backend" = torch ]; then
            runner="$PY scripts/gpu/torch_baseline.py"
            file="$dir/$backend/trace.json"
        else
            runner="$(runner_for "$backend")"
            [ -z "$runner" ] && continue
            runner="$runner train --backend ${backend%@*} $(options_for "$backend")"
            case "$backend" in tch-*) file="$dir/$backend/trace.json" ;; *) file="$dir/$backend/cubecl.log" ;; esac
        fi
        say "profile $backend $name"
        # shellcheck disable=SC2086 # the runner is a command line
        timeout --signal=KILL "$limit" $runner "${common[@]}" --profile "$dir/$backend" >"$dir/$backend.out" 2>&1
        say "profile $backend $name: exit $? — $(tail -c 200 "$dir/$backend.out" | tr '\n' ' ')"
        [ -f "$file" ] && specs+=("$backend=$file")
    done
    if [ "${#specs[@]}" -gt 0 ]; then
        "$PY" scripts/gpu/profile_table.py "${specs[@]}" --by-op 25 --json "$dir/table.json" >"$dir/table.md" 2>&1
        cat "$dir/table.md"
    fi
    for raw in "$dir"/*/trace.json "$dir"/*/cubecl.log; do
        [ -f "$raw" ] || continue
        gzip -f "$raw"
        # Over 6 MiB compressed, the raw profile would crowd the 16 MiB bundle: keep the table.
        if [ "$(stat -c %s "$raw.gz")" -gt 6291456 ]; then
            say "dropped $raw.gz ($(stat -c %s "$raw.gz") bytes)"
            rm -f "$raw.gz"
        fi
    done
    bundle
}

case "$PLAN" in
    dry)
        run_checks
        run_ops
        bundle
        profile tiny sft 64 2
        TORCH_GRAPH=1 bench tiny sft 64 2 2
        LEAN=1 bench tiny sft 64 2 2
        bench tiny dpo 64 2 1
        bench tiny lora 64 2 1
        bench tiny qlora 64 2 1
        run_trainer
        run_adam8bit
        TRAINER_SPEED_STEPS=4 run_trainer_speed smollm2-tiny
        bundle
        DEQUANT_BACKENDS=cpu DEQUANT_SHAPE=tiny run_dequant
        GEMM_BACKENDS=cpu GEMM_SHAPE=tiny GEMM_ARGS="--tokens 128 --seq 64" run_gemm
        ;;
    check)
        run_checks
        run_nccl
        ;;
    cuda-bisect)
        # burn-cuda failed its check on the first device session (f32 off by 1e0-1e3, bf16
        # non-finite, then failed launches). The f32 check again with this project's own paths
        # off all at once (`@plain`: burn-cuda as burn ships it), then one at a time, each in a
        # process of its own, so that one bad path cannot poison the others' context.
        # First burn's operations one by one (bench_train ops, ≤ 120 s), which name the operation
        # when burn-cuda itself is at fault.
        run_ops
        bundle
        CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-60} CHECK_BACKENDS="cuda@plain cuda@cubecl cuda@ops-steps cuda@ops-softmax cuda@ops-logits cuda@ops-adamw cuda" run_checks
        ;;
    first)
        run_checks
        run_nccl
        run_dequant
        run_gemm
        bundle
        # cuda-bf16@cubecl: the same step with CubeCL's matmul, what cuBLAS is measured against;
        # cuda-bf16@sync: cuBLAS ordered from the host, what the patched stream is measured against.
        OURS_BACKENDS="cuda-bf16 tch-cuda-bf16 cuda cuda-bf16@cubecl" bench smollm2-135m sft 1024 4 1
        OURS_BACKENDS="cuda-bf16 tch-cuda-bf16 cuda cuda-bf16@cubecl cuda-bf16@sync" bench llama-3.2-1b sft 1024 4 1
        BF16="cuda-bf16 tch-cuda-bf16"
        # Where each implementation's step goes, before the remaining shapes.
        OURS_BACKENDS="$BF16" profile llama-3.2-1b sft 1024 4
        LEAN=1 OURS_BACKENDS="$BF16" bench llama-3.2-1b sft 1024 4 1
        OURS_BACKENDS="$BF16" bench llama-3.2-1b dpo 1024 2 1
        OURS_BACKENDS="$BF16" bench llama-3.2-1b sft 2048 2 1
        OURS_BACKENDS="$BF16" bench mistral-7b qlora 2048 1 1
        # If budget is left: attention's softmax, AdamW and the loss's passes over the logits by
        # tensor operations, what their kernels (on in `cuda-bf16` above) are measured against;
        # also first in `profile`.
        NO_TORCH=1 OURS_BACKENDS="cuda-bf16@ops-softmax cuda-bf16@ops-adamw cuda-bf16@ops-logits" bench llama-3.2-1b sft 1024 4 1
        ;;
    second)
        run_update
        BF16="cuda-bf16 tch-cuda-bf16"
        OURS_BACKENDS="$BF16" bench smollm2-135m dpo 1024 2 1
        OURS_BACKENDS="$BF16" bench llama-3.2-1b dpo 2048 1 1
        OURS_BACKENDS="$BF16" bench llama-3.2-1b lora 1024 4 1
        OURS_BACKENDS="$BF16" bench smollm2-135m sft 2048 2 1
        # What mixed precision's casts cost: every tensor bf16 (moments too) on the same shape.
        OURS_BACKENDS=cuda-pure-bf16 bench smollm2-135m sft 1024 4 1
        ;;
    tch)
        # The libtorch route alone against PyTorch (the first device session found burn-cuda's
        # CubeCL step wrong and its launches failing, while tch-cuda passed every check).
        # With the chunked head beside the full logits: the 1B step's loss passes over
        # 4096 × 128256 logits are what the head's chunks avoid; and those passes by burn's
        # tensor operations (@ops-logits), as before tch_logits, in the same call. First the
        # libtorch checks (≈ 2 s each): tch_logits and the chunked head's second pass (the
        # check's lean cases) have changed since they last ran on a GPU. The `sft-8bit` case's
        # 8-bit AdamW by its tensor form here (`@tensor-8bit`), then alone through bitsandbytes'
        # kernels called from Rust (never run: in a process of its own, so that a fault there
        # cannot cost the other cases' results).
        CHECK_BACKENDS="tch-cuda@tensor-8bit tch-cuda-bf16@tensor-8bit" run_checks
        CHECK_CASES=sft-8bit CHECK_BACKENDS="tch-cuda tch-cuda-bf16" run_checks
        # The operations and this project's paths one at a time (≈ 10 s): names the path if a
        # check above failed (every torch-kernel path since the first run is among them).
        OPS_BACKENDS=tch-cuda-bf16 run_ops
        # NCCL on torch's buffers at world size 1 (≈ 5 s): the libtorch route's multi-GPU
        # transport (trainer::tch_collectives), never run.
        run_nccl tch
        bundle
        # The example binaries' loop, GPU against CPU (≈ 40–60 s): it has never run on a GPU.
        run_trainer
        # bitsandbytes' 8-bit AdamW kernels against the update's transcription (≈ 5–10 s).
        run_adam8bit
        bundle
        OURS_BACKENDS="tch-cuda-bf16 tch-cuda-bf16@ops-logits tch-cuda-bf16@chunked-head" bench llama-3.2-1b sft 1024 4 1
        # Ours and PyTorch's steps replayed as CUDA graphs beside the eager ones (≈ 30 s): how
        # much of the small model's step is the host's, and what capturing ours gains.
        TORCH_GRAPH=1 OURS_BACKENDS="tch-cuda-bf16 tch-cuda-bf16@cuda-graph" bench smollm2-135m sft 1024 4 1
        OURS_BACKENDS="tch-cuda-bf16 tch-cuda-bf16@chunked-head tch-cuda-bf16@two-step-mlp" bench llama-3.2-1b dpo 1024 2 1
        ;;
    tch-profile)
        # Where the libtorch route's 1B step goes against PyTorch's, then the longer sequence.
        OURS_BACKENDS="tch-cuda-bf16 tch-cuda-bf16@chunked-head" profile llama-3.2-1b sft 1024 4
        OURS_BACKENDS=tch-cuda-bf16 bench llama-3.2-1b sft 2048 2 1
        # QLoRA on the Mistral-7B shape (issue item 3), never run: the first session's budget ran
        # out before it. Against its arithmetic memory floor (report.py), so no PyTorch run
        # (bitsandbytes is not on the device). Then, if budget is left, what the changes of
        # 2026-12-05 save, one at a time: the dequantization by burn's tensor operations instead
        # of torch's kernels (@burn-dequant, time), the dense weights kept from each product to
        # its backward step (@keep-dense), the embedding and head kept in f32 (@f32-frozen), the
        # NF4 weights dequantized whole (@whole-dequant), the adapters in f32 (@f32-adapters:
        # before 2026-12-07; since, in bf16 as TRL holds them).
        NO_TORCH=1 OURS_BACKENDS="tch-cuda-bf16 tch-cuda-bf16@burn-dequant tch-cuda-bf16@keep-dense tch-cuda-bf16@f32-frozen tch-cuda-bf16@whole-dequant tch-cuda-bf16@f32-adapters" bench mistral-7b qlora 2048 1 1
        # The example binary's loop on the 135M shape (≈ 30 s), against the `tch` plan's step.
        run_trainer_speed smollm2-135m
        bundle
        # If budget is left: SmolLM2-135M's step profiled, ours and PyTorch's. Its device time
        # against its step time (the `tch` plan's bench) says how host-bound the small model is,
        # which ranks replaying the step as a CUDA graph (docs/performance.md).
        OURS_BACKENDS=tch-cuda-bf16 profile smollm2-135m sft 1024 4
        # If budget is left: the 1B steps replayed as CUDA graphs, against the `tch` plan's
        # eager ones (predicted ≈ −5 ms of ≈ 110 a step: their idle gaps).
        NO_TORCH=1 OURS_BACKENDS=tch-cuda-bf16@cuda-graph bench llama-3.2-1b sft 1024 4 1
        NO_TORCH=1 OURS_BACKENDS=tch-cuda-bf16@cuda-graph bench llama-3.2-1b dpo 1024 2 1
        # If budget is left: `optim: adamw_bnb_8bit` on the GPU (≈ 30–40 s), never run: the update
        # through bitsandbytes' kernels and through the tensor form, beside PyTorch's.
        run_update_8bit llama-3.2-1b
        ;;
    profile)
        # A second call after `first` (BUDGET_S=200): the 1B step again in case `first` ran out
        # of budget before it, then the smaller model and DPO, where launches weigh more.
        BF16="cuda-bf16 tch-cuda-bf16"
        OURS_BACKENDS="$BF16" profile llama-3.2-1b sft 1024 4
        # The kernels against the tensor operations they replace (when `first` had no budget
        # left for them), with `cuda-bf16` again beside them.
        NO_TORCH=1 OURS_BACKENDS="cuda-bf16 cuda-bf16@ops-softmax cuda-bf16@ops-adamw cuda-bf16@ops-logits" bench llama-3.2-1b sft 1024 4 1
        OURS_BACKENDS="$BF16" profile smollm2-135m sft 1024 4
        OURS_BACKENDS="$BF16" profile llama-3.2-1b dpo 1024 2
        ;;
    loop)
        # The example binary's loop alone (`tch-profile` runs it among the rest): eager, eager with
        # packed rows kept whole, replayed; `bash scripts/gpu/device_run.sh loop [SHAPE]`, with
        # DRY_RUN=1 on the CPU here (TRAINER_SPEED_STEPS=4 and SHAPE smollm2-tiny keep it short).
        run_trainer_speed "${2:-smollm2-135m}"
        ;;
    *)
        echo "unknown plan $PLAN (first, second, profile, tch, tch-profile, check, cuda-bisect, dry, loop)"
        exit 2
        ;;
esac
say "done"
bundle
"$PY" scripts/gpu/report.py "$RESULTS" --checks "$WORK" || true
