#!/usr/bin/env bash
# The project's test command (README, .ci/run): prepares the Python reference environment
# (torch/transformers in a virtualenv cached under ~/.cache/alignment-handbook) and runs the
# whole workspace's tests on the CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/reference_env.sh >/dev/null
cargo test --workspace "$@"
