#!/usr/bin/env bash
# Runs a command with scripts/mem/peak_heap.c preloaded and prints the peak of the bytes it held
# through malloc (MiB): a step's memory without the allocator's caching in it, comparable between
# two builds of ours and between ours and PyTorch's eager loop on the CPU.
#
#   bash scripts/peak_heap.sh target/tch/release/examples/bench_train train --backend tch-cpu-bf16 ...
#   bash scripts/peak_heap.sh python scripts/gpu/torch_baseline.py --shape ... --precision bf16-autocast
#
# The command's own output passes through; the last line is `peak_heap_mib N` (the largest over
# the processes it started, e.g. a Python launcher and its interpreter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
lib="$root/target/peak_heap/peak_heap.so"
if [ ! -f "$lib" ] || [ "$root/scripts/mem/peak_heap.c" -nt "$lib" ]; then
    mkdir -p "$(dirname "$lib")"
    cc -O2 -shared -fPIC -o "$lib" "$root/scripts/mem/peak_heap.c"
fi
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
status=0
PEAK_HEAP_OUT="$report" LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" "$@" || status=$?
awk '{ if ($2 > peak) peak = $2 } END { printf "peak_heap_mib %.1f\n", peak / 1048576 }' "$report"
exit "$status"
