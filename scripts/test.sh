#!/usr/bin/env bash
# The project's test command (README, .ci/run): prepares the Python reference environment
# (torch/transformers in a virtualenv cached under ~/.cache/alignment-handbook) and runs the
# whole workspace's tests on the CPU backend; then the GPU code path: the training-step check
# (tests/backend_check.rs) on burn's `wgpu` backend over Mesa's software Vulkan, installed by
# scripts/vulkan_env.sh when missing (SKIP_WGPU=1 skips this part); and the libtorch route's
# fused attention (crates/models/src/tch_attention.rs, what bench_train_tch runs on the GPU)
# against burn's decomposition, built against the reference environment's torch (SKIP_TCH=1
# skips this part).
set -euo pipefail
cd "$(dirname "$0")/.."
python="$(bash scripts/reference_env.sh | tail -1)"
cargo test --workspace "$@"
if [ "${SKIP_TCH:-0}" != 1 ]; then
    torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
    LIBTORCH="$torch_dir" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1 LD_LIBRARY_PATH="$torch_dir/lib:${LD_LIBRARY_PATH:-}" \
        cargo test -p alignment-models --features tch --lib tch_attention
fi
if [ "${SKIP_WGPU:-0}" != 1 ]; then
    bash scripts/vulkan_env.sh
    # Mesa warns on every start without a runtime directory.
    if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
        export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/alignment-handbook-xdg-$(id -u)"
        mkdir -p -m 700 "$XDG_RUNTIME_DIR"
    fi
    cargo test --features wgpu --test backend_check
fi
