#!/usr/bin/env bash
# CPU training speed, ours against TRL's trainers on the same cores, back to back (issue #14).
#
# For each task (SFT, DPO): our example binary on the repo's SmolLM2 CPU recipe, once per backend
# of BACKENDS (`ndarray`, the default build; `tch`, libtorch's CPU kernels, built against the
# reference venv's torch by scripts/with_torch.sh), then TRL 1.16's trainer with the same recipe's model, rows, template and shapes (scripts/bench_cpu_trl.py, in
# the reference venv of scripts/reference_env.sh), each for STEPS optimizer steps of which the
# first WARMUP are not timed; no evaluation, no checkpoint. Prints one JSON line per side and a
# table of real (non-padding) tokens per second and the ratio; the JSON lines also go to $OUT.
#
#   bash scripts/bench_cpu.sh                    # sft and dpo, 12 steps (2 warm-up)
#   TASKS=sft STEPS=8 bash scripts/bench_cpu.sh  # one task, fewer steps
#   BACKENDS=ndarray bash scripts/bench_cpu.sh   # the default build only (no torch build)
#
# Both sides use every core (torch: torch.set_num_threads(os.cpu_count())). Run it on a quiet
# machine: the other side's numbers suffer from anything else running, torch's more (its threads
# spin-wait when oversubscribed).
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS="${TASKS:-sft dpo}"
STEPS="${STEPS:-12}"
BACKENDS="${BACKENDS:-ndarray tch}"
WARMUP="${WARMUP:-2}"
OUT="${OUT:-target/bench-cpu.jsonl}"
cache="${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}"

# binary_for BACKEND: builds our example binaries for that backend, prints their directory.
binary_for() {
    case "$1" in
        ndarray) cargo build --release --example zephyr_sft --example zephyr_dpo >&2; echo target/release/examples ;;
        tch)
            bash scripts/with_torch.sh cargo build --release --features tch --example zephyr_sft --example zephyr_dpo >&2
            echo target/tch/release/examples
            ;;
        *) echo "unknown backend $1 (ndarray, tch)" >&2; exit 2 ;;
    esac
}
declare -A bin_dir
for backend in $BACKENDS; do bin_dir[$backend]="$(binary_for "$backend")"; done
python="$(bash scripts/reference_env.sh | tail -n 1)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

for task in $TASKS; do
    recipe="recipes/smollm2-135m/$task/config_cpu.yaml"
    for backend in $BACKENDS; do
        echo "== $task: ours on $backend ($recipe, $STEPS steps)" >&2
        runner=()
        [ "$backend" = tch ] && runner=(bash scripts/with_torch.sh) # libtorch's lib on LD_LIBRARY_PATH
        "${runner[@]}" "${bin_dir[$backend]}/zephyr_$task" "$recipe" --max_steps="$STEPS" --logging_steps=1 \
            --eval_strategy=no --eval_on_start=false --save_strategy=no --output_dir="$work/ours-$task-$backend" >&2
        # One logging window per step: its tokens from the running total, its seconds from its rate.
        "$python" - "$work/ours-$task-$backend/metrics.jsonl" "$task" "$WARMUP" "$backend" >>"$OUT" <<'EOF'
import json, statistics, sys
path, task, warmup, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [r for r in map(json.loads, open(path)) if "tokens_per_second" in r]
tokens, seconds, before = [], [], 0
for r in rows:
    tokens.append(r["num_tokens"] - before)
    seconds.append((r["num_tokens"] - before) / r["tokens_per_second"])
    before = r["num_tokens"]
tokens, seconds = tokens[warmup:], seconds[warmup:]
print(json.dumps({"side": "ours", "backend": backend, "task": task, "steps": len(seconds), "median_step_s": statistics.median(seconds),
                  "tokens": sum(tokens), "tokens_per_second": sum(tokens) / sum(seconds)}))
EOF
        tail -n 1 "$OUT"
    done
    echo "== $task: TRL" >&2
    model="$cache/models/SmolLM2-135M-Instruct" # the directory our run just loaded (converted from the GGUF)
    "$python" scripts/bench_cpu_trl.py --task "$task" --model "$model" --recipe "$recipe" --steps "$STEPS" \
        --warmup "$WARMUP" 2>"$work/trl-$task.log" | tail -n 1 >>"$OUT" || { cat "$work/trl-$task.log" >&2; exit 1; }
    tail -n 1 "$OUT"
done

"$python" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n| task | ours on | ours (tokens/s) | TRL (tokens/s) | ours / TRL | median step ours / TRL (s) |")
print("|---|---|---|---|---|---|")
for task in dict.fromkeys(r["task"] for r in rows):
    trl = next(r for r in rows if r["task"] == task and r["side"] == "trl")
    for ours in (r for r in rows if r["task"] == task and r["side"] == "ours"):
        print(f"| {task} | {ours['backend']} | {ours['tokens_per_second']:.1f} | {trl['tokens_per_second']:.1f} | "
              f"{ours['tokens_per_second'] / trl['tokens_per_second']:.2f}× | "
              f"{ours['median_step_s']:.2f} / {trl['median_step_s']:.2f} |")
EOF
