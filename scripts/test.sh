#!/usr/bin/env bash
# The project's test command (README, .ci/run): prepares the Python reference environment
# (torch/transformers in a virtualenv cached under ~/.cache/alignment-handbook) and runs the
# whole workspace's tests on the CPU backend; then the GPU code path: the training-step check
# (tests/backend_check.rs) on burn's `wgpu` backend over Mesa's software Vulkan, installed by
# scripts/vulkan_env.sh when missing (SKIP_WGPU=1 skips this part); and the libtorch route
# (`--features tch`, built against the reference environment's torch by scripts/with_torch.sh;
# SKIP_TCH=1 skips this part): its fused attention and RMSNorm (crates/models/src/tch_attention.rs,
# tch_norm.rs) against burn's decompositions, the recorded steps (gate, half-type products,
# log-probabilities of bf16 logits) against burn's operations in bf16, the NF4 base dequantized
# by torch's kernels (crates/models/src/tch_nf4.rs) against burn's operations, the loss's passes over the
# logits as torch kernels (crates/objectives/src/tch_logits.rs) against burn's operations, the
# torch tensors under burn's (crates/core/src/torch_storage.rs), its fused AdamW step (crates/trainer/src/tch_adamw.rs)
# against the tensor formulation, the 8-bit AdamW's tensor form (crates/trainer/src/adam8bit_tensors.rs)
# against the host pass within bitsandbytes' kernel bounds, its profiler (tch_profiler.rs: a trace naming the operators burn
# issued), the same training-step check on torch's CPU kernels, bf16 weights under an
# offloaded f32 master copy on torch's bf16 backend (tests/offload_bf16.rs), and what replaying
# the step as a CUDA graph asks of it: its state updated in place (tests/cuda_graph_ready.rs).
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
if [ "${SKIP_TCH:-0}" != 1 ]; then
    # In the default target directory: the debug builds of the dependencies burn-tch leaves alone
    # are shared with the tests above.
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}" bash scripts/with_torch.sh bash -c '
        set -e
        cargo test -p alignment-core --features tch --lib torch_storage
        cargo test -p alignment-models --features tch --lib tch_
        cargo test -p alignment-objectives --features tch --lib tch_
        cargo test -p alignment-trainer --features tch --lib tch_
        cargo test --features tch --test backend_check tch_
        cargo test --features tch --test offload_bf16
        cargo test --features tch --test cuda_graph_ready'
    took "the libtorch part" $start
fi
start=$SECONDS
if [ "${SKIP_WGPU:-0}" != 1 ]; then
    bash scripts/vulkan_env.sh
    # Mesa warns on every start without a runtime directory.
    if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
        export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/alignment-handbook-xdg-$(id -u)"
        mkdir -p -m 700 "$XDG_RUNTIME_DIR"
    fi
    cargo test --features wgpu --test backend_check
    took "the wgpu part" $start
fi
