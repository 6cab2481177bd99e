#!/usr/bin/env bash
# The GPU code paths' tests (scripts/test.sh runs this): every command below is built with one
# feature set, so burn and the workspace compile once for all of them. Each `cargo test` with
# other features (a package's own, a backend's own) rebuilds burn's crates: CI has a time limit,
# and seven such builds took 20 minutes of it.
#
#   bash scripts/test_backends.sh tch,wgpu   # both (tch needs scripts/with_torch.sh's environment)
#   bash scripts/test_backends.sh wgpu       # burn's WebGPU backend on lavapipe only
#
# `tch`: libtorch's fused attention and RMSNorm, recorded steps, NF4 dequantization, the loss's
# passes over the logits, torch storage under burn's tensors, fused and 8-bit AdamW, the replayed
# loop, the profiler (each crate's `tch_` unit tests and core's `torch_storage`), the training-step
# check on torch's CPU kernels (backend_check's `tch_` tests), bf16 weights under an offloaded f32
# master copy (offload_bf16), QLoRA's adapters in bf16 as TRL holds them (qlora_bf16_adapters),
# what replaying a step as a CUDA graph asks (cuda_graph_ready), and
# the data-parallel tests in a `tch` build (the trainer's `data_parallel`: ranks on torch's CPU
# connect over TCP; on GPUs they would take NCCL).
# `wgpu`: the whole training-step check (tests/backend_check.rs) on burn's WebGPU backend, whose
# products take the route of burn-cuda's (core::gemm; a plain kernel in cuBLAS's place).
set -euo pipefail
cd "$(dirname "$0")/.."
features="${1:?usage: test_backends.sh tch,wgpu | tch | wgpu}"
# Two package selections with one feature set, so that both build the same crates (every
# workspace library with `tch`/`wgpu`; alignment-core's `default` is on when it is selected, so it
# is named for the second): the unit tests of five crates, and the `integration` test binaries of
# the two whose binaries hold GPU-path tests. alignment-models' and alignment-objectives' own
# `integration` binaries hold none and took 442 s of compiling (docs/ci-time.md).
features="$features,alignment-core/default"
units=(-p alignment-core -p alignment-models -p alignment-objectives -p alignment-trainer -p alignment-handbook)
binaries=(-p alignment-trainer -p alignment-handbook)
unit_tests() { cargo test "${units[@]}" --features "$features" "$@"; }
integration() { cargo test "${binaries[@]}" --features "$features" --test integration "$@"; }
case ",$features," in *,tch,*) tch=1 ;; *) tch=0 ;; esac
case ",$features," in *,wgpu,*) wgpu=1 ;; *) wgpu=0 ;; esac

# Every target first: cargo compiles the targets of one command side by side (built one command
# at a time, each waited for the crates the one before had not needed). backend_check and the
# handbook's `tch` tests but offload_bf16 (Cargo.toml says why) are modules of its `integration`
# binary; data_parallel of the trainer's.
start=$SECONDS
integration --no-run
[ "$tch" = 1 ] && unit_tests --lib --test offload_bf16 --no-run
echo "scripts/test_backends.sh: building took $((SECONDS - start)) s" >&2

if [ "$tch" = 1 ]; then
    unit_tests --lib -- tch_ torch_storage
    integration -- qlora_bf16_adapters:: cuda_graph_ready:: data_parallel::
    unit_tests --test offload_bf16
fi
if [ "$wgpu" = 1 ]; then
    # All of it: the CPU cases, the wgpu ones and, with `tch`, torch's.
    integration -- backend_check::
else
    integration -- backend_check::tch_
fi
