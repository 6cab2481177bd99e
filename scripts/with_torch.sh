#!/usr/bin/env bash
# Runs a command with the environment that builds and runs the `tch` (libtorch) backend against
# the reference environment's torch (scripts/reference_env.sh installs it on first use):
#
#   bash scripts/with_torch.sh cargo run --release --features tch --example zephyr_sft
#   bash scripts/with_torch.sh target/tch/release/examples/zephyr_sft recipe.yaml
#
# Sets LIBTORCH to that torch's directory (tch 0.22 asks for libtorch 2.9; the venv has 2.9.1,
# LIBTORCH_BYPASS_VERSION_CHECK covers the patch release and the device's 2.11), puts its `lib` on
# LD_LIBRARY_PATH for the binary, and builds into target/tch (CARGO_TARGET_DIR, unless set), so
# the tch build and the default one never rebuild each other's dependencies. A LIBTORCH already
# set (an enclosing with_torch.sh, or your own libtorch) is kept: the venv check takes ~30 s.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${LIBTORCH:-}" ]; then
    torch_dir="$LIBTORCH"
else
    python="$(bash "$root/scripts/reference_env.sh" | tail -n 1)"
    torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
fi
export LIBTORCH="$torch_dir" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1
export LD_LIBRARY_PATH="$torch_dir/lib:${LD_LIBRARY_PATH:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/tch}"
exec "$@"
