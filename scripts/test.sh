#!/usr/bin/env bash
# The project's test command (README, .ci/run): prepares the Python reference environment
# (torch/transformers in a virtualenv cached under ~/.cache/alignment-handbook) and runs the
# whole workspace's tests on the CPU backend; then the GPU code paths (scripts/test_backends.sh,
# one build for both): the training-step check (tests/backend_check.rs) on burn's `wgpu` backend
# over Mesa's software Vulkan, installed by scripts/vulkan_env.sh when missing (SKIP_WGPU=1 skips
# this part), and the libtorch route (`--features tch`, built against the reference environment's
# torch by scripts/with_torch.sh; SKIP_TCH=1 skips this part): fused attention and RMSNorm, the
# recorded steps, NF4 dequantization, the loss's passes over the logits as torch kernels, torch
# storage under burn's tensors, fused and 8-bit AdamW, the replayed loop, the profiler, the
# training-step check on torch's CPU kernels, bf16 weights under an offloaded f32 master copy,
# and what replaying the step as a CUDA graph asks of it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each part's wall time goes to stderr as it ends (CI has a time limit).
took() { echo "scripts/test.sh: $1 took $((SECONDS - $2)) s" >&2; }
start=$SECONDS
python="$(bash scripts/reference_env.sh | tail -1)"
took "the reference environment" $start
start=$SECONDS
cargo test --workspace "$@"
took "the workspace tests" $start
start=$SECONDS
# The GPU code paths, both backends in one build (scripts/test_backends.sh says why).
backends=()
[ "${SKIP_TCH:-0}" = 1 ] || backends+=(tch)
[ "${SKIP_WGPU:-0}" = 1 ] || backends+=(wgpu)
if [ "${#backends[@]}" -gt 0 ]; then
    features="$(IFS=,; echo "${backends[*]}")"
    if [ "${SKIP_WGPU:-0}" != 1 ]; then
        bash scripts/vulkan_env.sh
        # Mesa warns on every start without a runtime directory.
        if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
            export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/alignment-handbook-xdg-$(id -u)"
            mkdir -p -m 700 "$XDG_RUNTIME_DIR"
        fi
    fi
    if [ "${SKIP_TCH:-0}" != 1 ]; then
        # In the default target directory: the debug builds of the dependencies burn-tch leaves
        # alone are shared with the tests above.
        CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}" bash scripts/with_torch.sh bash scripts/test_backends.sh "$features"
    else
        bash scripts/test_backends.sh "$features"
    fi
    took "the GPU code paths ($features)" $start
fi
