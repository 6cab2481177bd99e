#!/usr/bin/env bash
# Prepares and rehearses the GPU measurements of issue #12 (docs/performance.md).
#
#   bash scripts/gpu/run.sh stage     build bench_train with --features cuda (no CUDA needed to
#                                     build), put it (xz-compressed) and the CPU's reference
#                                     values in .gpu/, and print the device command to run; then
#                                     bench_train_tch: the libtorch route (--features tch) linked
#                                     against the device's torch version (DEVICE_TORCH, 2.11.0:
#                                     PyPI's wheel unpacked in the cache, headers and libraries
#                                     only; on the device it loads that machine's own torch/lib)
#   bash scripts/gpu/run.sh dry-run   the same pipeline on the CPU here: a CPU-only build in
#                                     .gpu-dry/, device_run.sh's `dry` plan (checks, ours and
#                                     PyTorch's steps on a tiny shape) with the reference venv
#   bash scripts/gpu/run.sh dry-run wgpu   the same, ours on burn's wgpu backend (CubeCL, the
#                                     kernels cuda runs) over Mesa's software Vulkan
#   bash scripts/gpu/run.sh dry-run tch    the same, ours on the libtorch backend (the reference
#                                     venv's torch, on the CPU): bench_train_tch's code path
#   bash scripts/gpu/run.sh staged    what .gpu/ holds: the commit it was staged at, and whether
#                                     the code its binaries come from changed since (a session
#                                     lent a device can then skip the ≈ 35 minutes of staging)
#   bash scripts/gpu/run.sh report DIR   tables from the files a device run brought back (its
#                                     bundle unpacked into a temporary folder; profiles first)
#
# .gpu/ and .gpu-dry/ are ignored by git; the device tool carries .gpu/ ("carry": [".gpu"]).
# The tracked files the run needs (scripts/gpu/, the tiny fixtures) travel with the tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
cmd="${1:-stage}"

# Builds bench_train with `$1` features into `$2`/bin and writes the CPU's check values.
build_into() {
    local features="$1" dir="$2"
    echo "building bench_train (release, features: ${features:-default}) ..." >&2
    cargo build --release --example bench_train ${features:+--features "$features"} >&2
    mkdir -p "$dir/bin"
    cp target/release/examples/bench_train "$dir/bin/bench_train"
    strip "$dir/bin/bench_train" 2>/dev/null || true
    rm -rf "$dir/reference"
    "$dir/bin/bench_train" check --backend cpu --write-reference "$dir/reference" >&2
}

# PyPI wheels unpacked once into the cache: `cached_wheels DIR MARKER MEMBERS SPEC...` downloads
# the wheels SPEC... (binaries only, no dependencies, with $PIP_ARGS, e.g. a platform) and unpacks
# the members under the top-level folders MEMBERS (space-separated; empty: all) into DIR, unless
# DIR/MARKER is there already. A partial folder is renamed into place, so nothing half-unpacked stays.
cached_wheels() {
    local dir="$1" marker="$2" members="$3"
    shift 3
    [ -f "$dir/$marker" ] && return
    local python tmp
    python="$(bash scripts/reference_env.sh)"
    tmp="$(mktemp -d)"
    echo "fetching $* (the wheels only, without their dependencies) ..." >&2
    # shellcheck disable=SC2086 # PIP_ARGS is a list of options
    "$python" -m pip download "$@" --no-deps --only-binary :all: ${PIP_ARGS:-} -d "$tmp" >&2
    rm -rf "$dir.partial"
    "$python" - "$tmp" "$dir.partial" "$members" <<'EOF'
import glob, sys, zipfile
prefixes = [p.rstrip("/") + "/" for p in sys.argv[3].split()]
for path in glob.glob(sys.argv[1] + "/*.whl"):
    wheel = zipfile.ZipFile(path)
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if not prefixes or any(n.startswith(p) for p in prefixes)])
EOF
    rm -rf "$tmp" "$dir"
    mv "$dir.partial" "$dir"
}

CACHE="${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}"

# The device's torch as a libtorch folder (include/, lib/): PyPI's wheel of DEVICE_TORCH, headers
# and libraries only (≈ 1 GB; the CUDA libraries it needs are not fetched: nothing here runs it).
# Prints the folder.
DEVICE_TORCH="${DEVICE_TORCH:-2.11.0}"
device_libtorch() {
    local dir="$CACHE/torch-$DEVICE_TORCH"
    PIP_ARGS="--python-version 3.12 --platform manylinux_2_28_x86_64" \
        cached_wheels "$dir" torch/lib/libtorch_cpu.so "torch/include torch/lib torch/share" "torch==$DEVICE_TORCH"
    echo "$dir/torch"
}

# CUDA's runtime headers and library (include/, lib/) of the device's CUDA (torch 2.11 is built
# for 13.0), for `csrc/cuda_graph.cpp`: PyPI's `nvidia-cuda-runtime` and `nvidia-cuda-crt`
# wheels (≈ 2.4 MB). Prints the folder.
DEVICE_CUDA_RUNTIME="${DEVICE_CUDA_RUNTIME:-13.0.96}" DEVICE_CUDA_CRT="${DEVICE_CUDA_CRT:-13.0.88}"
device_cuda_runtime() {
    local dir="$CACHE/cuda-runtime-$DEVICE_CUDA_RUNTIME"
    cached_wheels "$dir" nvidia/cu13/include/crt/host_config.h "" \
        "nvidia-cuda-runtime==$DEVICE_CUDA_RUNTIME" "nvidia-cuda-crt==$DEVICE_CUDA_CRT"
    echo "$dir/nvidia/cu13"
}

# Builds bench_train and the example binaries zephyr_sft and zephyr_dpo (the trainer runs) with
# the `tch` feature against libtorch folder `$1` into `$2`/bin/{bench_train,zephyr_sft,zephyr_dpo}_tch,
# in its own target folder `$3` (the libtorch build differs in every crate above torch-sys, so
# sharing target/ would rebuild the cuda and CPU binaries after it); with CUDA's runtime folder
# `$4`, CUDA graphs built in (ALIGNMENT_CUDA_RUNTIME).
build_tch_into() {
    local libtorch="$1" dir="$2" target="$3" cuda_runtime="${4:-}"
    echo "building bench_train, zephyr_sft, zephyr_dpo (release, features: tch, libtorch $libtorch${cuda_runtime:+, CUDA graphs}) ..." >&2
    LIBTORCH="$libtorch" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR="$target" \
        ALIGNMENT_CUDA_RUNTIME="$cuda_runtime" cargo build --release --example bench_train --example zephyr_sft --example zephyr_dpo --features tch >&2
    mkdir -p "$dir/bin"
    for name in bench_train zephyr_sft zephyr_dpo; do
        rm -f "$dir/bin/${name}_tch.xz"
        cp "$target/release/examples/$name" "$dir/bin/${name}_tch"
        strip "$dir/bin/${name}_tch" 2>/dev/null || true
    done
}

# SmolLM2's tokenizer files into `$1`/smollm2-tokenizer/, for the models the trainer runs make
# (scripts/gpu/trainer_model.py): from the default model's directory (made on first use by the
# tests or a run: reference::smollm2_dir), else from transformers' conversion of the same GGUF
# (scripts/convert_smollm2.py; the same tokenizer: tests/smollm2_gguf.rs).
stage_tokenizer() {
    local dir="$1/smollm2-tokenizer" source="$CACHE/models/SmolLM2-135M-Instruct"
    if [ ! -f "$source/tokenizer_config.json" ]; then
        source="$("$(bash scripts/reference_env.sh | tail -1)" scripts/convert_smollm2.py | tail -1)"
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    for name in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json; do
        if [ -f "$source/$name" ]; then cp "$source/$name" "$dir/"; fi
    done
}

# bitsandbytes into `$1`/python/, for the device's check of its 8-bit AdamW kernels
# (scripts/gpu/check_adam8bit.py): the version the goldens were made with (scripts/reference_env.sh),
# its Python files and only the libraries of CUDA 13.0 (the device's torch) and the CPU, ≈ 5 MiB
# of its 43 MiB wheel.
stage_bitsandbytes() {
    local dir="$1/python" wheels version
    version="$(grep -o '"bitsandbytes==[0-9.]*' scripts/reference_env.sh | cut -d= -f3)"
    wheels="$(mktemp -d "${TMPDIR:-/tmp}/bnb.XXXXXX")"
    "$(bash scripts/reference_env.sh | tail -1)" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "bitsandbytes==$version" >&2
    rm -rf "$dir/bitsandbytes"
    mkdir -p "$dir"
    python3 - "$wheels"/bitsandbytes-*.whl "$dir" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        library = name.rsplit("/", 1)[-1].startswith("libbitsandbytes_")
        if name.startswith("bitsandbytes/") and (not library or name.endswith(("_cuda130.so", "_cpu.so"))):
            z.extract(name, out)
PY
    rm -rf "$wheels"
}

case "$cmd" in
    stage)
        # The commit the binaries are built from, taken before the ≈ 35 minutes of building.
        staged_from="staged at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- || echo ' plus uncommitted changes')"
        build_into cuda .gpu
        build_tch_into "$(device_libtorch)" .gpu target/tch-device "$(device_cuda_runtime)"
        # Linked against the device's own torch version (PyPI's 2.11.0 is the same +cu130 build),
        # so every symbol resolved at link time; it needs these libraries from its torch/lib there.
        readelf -d .gpu/bin/bench_train_tch | grep NEEDED >&2
        # The example binaries carry everything a run needs (tokenizers, templates, data
        # formats): xz keeps them from crowding the carry; device_run.sh unpacks them.
        xz -T0 -6 -f .gpu/bin/zephyr_sft_tch .gpu/bin/zephyr_dpo_tch
        stage_tokenizer .gpu
        stage_bitsandbytes .gpu
        # The stripped cuda binary is ≈ 51 MiB (CubeCL with fusion and autotune): xz takes it to
        # ≈ 8 MiB of the 64 MiB carry; device_run.sh unpacks it with Python's lzma.
        xz -T0 -6 -f .gpu/bin/bench_train
        # What was staged, for `run.sh staged` here and for device_run.sh's log there (the
        # device's copy of the tree has no git history).
        echo "$staged_from on $(date -u +%Y-%m-%dT%H:%MZ)" > .gpu/staged.txt
        size=$(du -sb .gpu | cut -f1)
        tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
        echo "staged .gpu/ ($((size / 1048576)) MiB; tracked tree $((tree / 1048576)) MiB; the device takes 64 MiB in all)" >&2
        cat <<EOF
Device commands (the device tool's run, carry [".gpu"]; 15 minutes of device time in all,
machine start and idle waits included), in the order the 2026-12-04 results ask for. A machine
stays warm only 30 s after a call: send the next command at once and read the results after,
or each call pays a new start. A call naming no kind may get an H100 rather than the H200 of
2026-12-04: the ratios to PyTorch (same call) compare across cards, absolute numbers do not.
  1. OUT=\$OUT BUDGET_S=270 WARMUP=1 STEPS=3 bash scripts/gpu/device_run.sh tch           timeout_s 300
     (the libtorch checks, the example binaries' training loop on the GPU against the CPU
     (never run on a GPU), bitsandbytes' 8-bit AdamW kernels against the update's transcription, then the libtorch route against PyTorch, full logits and chunked
     head: the predictions in docs/performance.md, "The profile read again", "The loss's passes
     over the logits as torch kernels" and "The chunked head: half-type logits, ..."; the 135M
     step replayed as a CUDA graph, ours and PyTorch's: "The step replayed as a CUDA graph")
  2. OUT=\$OUT BUDGET_S=200 WARMUP=1 bash scripts/gpu/device_run.sh tch-profile            timeout_s 230
     (the 1B profile, the 2048-token step, QLoRA on Mistral-7B, the example binary's loop on the
     135M shape (eager; eager with packed rows kept whole; then its steps replayed as CUDA
     graphs, one per batch shape: torch_compile_mode: reduce-overhead), the 135M profile, then
     the 1B SFT and DPO steps as CUDA graphs if budget is left)
  3. OUT=\$OUT bash scripts/gpu/device_run.sh cuda-bisect                                 timeout_s 450
     (where burn-cuda's wrong step comes from: burn's operations one at a time, then the
     step with this project's GPU paths off, all at once and one at a time; with less device
     time left, a shorter timeout_s and BUDGET_S = timeout_s − 30: the operations come first)
'first' (checks, NCCL, GEMMs, every backend) spends most of its budget on burn-cuda's failures.
Afterwards: bash scripts/gpu/run.sh report <files_at folder>, then docs/performance.md.
EOF
        ;;
    staged)
        [ -f .gpu/staged.txt ] || { echo "nothing staged (.gpu/staged.txt missing): bash scripts/gpu/run.sh stage" >&2; exit 1; }
        cat .gpu/staged.txt
        commit="$(awk '{print $3}' .gpu/staged.txt)"
        # What the staged binaries were built from (docs do not matter; crates' tests are
        # counted, as `git diff` cannot tell them apart cheaply).
        changed="$(git diff --stat "$commit" HEAD -- crates src examples Cargo.toml Cargo.lock | tail -1)"
        if [ -z "$changed" ]; then
            echo "the code the staged binaries were built from is unchanged since: carry .gpu/ as it is"
        else
            echo "changed since in the code the binaries are built from: $changed"
            echo "(the staged binaries measure $commit; restage for HEAD: bash scripts/gpu/run.sh stage)"
        fi
        # The scripts travel with the tree: the device runs today's, with the staged binaries.
        scripts="$(git diff --stat "$commit" HEAD -- scripts/gpu | tail -1)"
        [ -z "$scripts" ] || echo "scripts/gpu changed since ($scripts): the device runs them as they are now; check they ask nothing of the binaries that $commit lacks"
        ;;
    dry-run)
        backend="${2:-cpu}"
        case "$backend" in
            cpu) build_into "" .gpu-dry ;;
            wgpu)
                bash scripts/vulkan_env.sh
                # The Vulkan loader wants a runtime directory (as scripts/test.sh sets up).
                if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
                    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/alignment-handbook-xdg-$(id -u)"
                    mkdir -p -m 700 "$XDG_RUNTIME_DIR"
                fi
                build_into wgpu .gpu-dry
                export OURS_BACKENDS="wgpu-f16 wgpu" CHECK_BACKENDS="wgpu wgpu-f16" OPS_BACKENDS="wgpu-f16"
                ;;
            tch)
                python="$(bash scripts/reference_env.sh)"
                torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
                build_tch_into "$torch_dir" .gpu-dry target/tch
                stage_tokenizer .gpu-dry
                stage_bitsandbytes .gpu-dry
                mkdir -p .gpu-dry/bin
                rm -rf .gpu-dry/reference
                LD_LIBRARY_PATH="$torch_dir/lib:${LD_LIBRARY_PATH:-}" .gpu-dry/bin/bench_train_tch check --backend cpu --write-reference .gpu-dry/reference >&2
                export OURS_BACKENDS="tch-cpu" CHECK_BACKENDS="tch-cpu tch-cpu-bf16" OPS_BACKENDS="tch-cpu-bf16" TORCH_LIB="$torch_dir/lib"
                ;;
            *) echo "usage: run.sh dry-run [cpu|wgpu|tch]" >&2; exit 2 ;;
        esac
        python="$(bash scripts/reference_env.sh)"
        rm -rf .gpu-dry/out
        GPU_DIR=.gpu-dry OUT=.gpu-dry/out PYTHON="$python" BUDGET_S="${BUDGET_S:-600}" bash scripts/gpu/device_run.sh dry
        ;;
    report)
        dir="${2:?usage: run.sh report DIR}"
        # device_run.sh packs everything but its log and results into bundle.tar.gz (the device
        # tool brings back 8 files at most); the folder it came back to is read-only.
        checks="$dir"
        if [ -f "$dir/bundle.tar.gz" ]; then
            checks="$(mktemp -d "${TMPDIR:-/tmp}/gpu-report.XXXXXX")"
            tar xzf "$dir/bundle.tar.gz" -C "$checks"
            echo "bundle unpacked into $checks" >&2
            for table in "$checks"/profile-*/table.md; do
                [ -f "$table" ] && { echo "### $(basename "$(dirname "$table")")"; cat "$table"; }
            done
        fi
        python3 scripts/gpu/report.py "$dir/results.jsonl" --checks "$checks"
        ;;
    *)
        echo "usage: run.sh stage | dry-run [cpu|wgpu|tch] | report DIR" >&2
        exit 2
        ;;
esac
