#!/usr/bin/env bash
# CPU training speed, ours against TRL's trainers on the same cores, back to back (issue #14).
#
# For each task (SFT, DPO): our example binary on the repo's SmolLM2 CPU recipe, then TRL 1.16's
# trainer with the same recipe's model, rows, template and shapes (scripts/bench_cpu_trl.py, in
# the reference venv of scripts/reference_env.sh), each for STEPS optimizer steps of which the
# first WARMUP are not timed; no evaluation, no checkpoint. Prints one JSON line per side and a
# table of real (non-padding) tokens per second and the ratio; the JSON lines also go to $OUT.
#
#   bash scripts/bench_cpu.sh                    # sft and dpo, 12 steps (2 warm-up)
#   TASKS=sft STEPS=8 bash scripts/bench_cpu.sh  # one task, fewer steps
#
# Both sides use every core (torch: torch.set_num_threads(os.cpu_count())). Run it on a quiet
# machine: the other side's numbers suffer from anything else running, torch's more (its threads
# spin-wait when oversubscribed).
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS="${TASKS:-sft dpo}"
STEPS="${STEPS:-12}"
WARMUP="${WARMUP:-2}"
OUT="${OUT:-target/bench-cpu.jsonl}"
cache="${ALIGNMENT_HANDBOOK_CACHE:-$HOME/.cache/alignment-handbook}"

cargo build --release --example zephyr_sft --example zephyr_dpo >&2
python="$(bash scripts/reference_env.sh | tail -n 1)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

for task in $TASKS; do
    recipe="recipes/smollm2-135m/$task/config_cpu.yaml"
    echo "== $task: ours ($recipe, $STEPS steps)" >&2
    target/release/examples/zephyr_"$task" "$recipe" --max_steps="$STEPS" --logging_steps=1 \
        --eval_strategy=no --eval_on_start=false --save_strategy=no --output_dir="$work/ours-$task" >&2
    # One logging window per step: its tokens from the running total, its seconds from its rate.
    "$python" - "$work/ours-$task/metrics.jsonl" "$task" "$WARMUP" >>"$OUT" <<'EOF'
import json, statistics, sys
path, task, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [r for r in map(json.loads, open(path)) if "tokens_per_second" in r]
tokens, seconds, before = [], [], 0
for r in rows:
    tokens.append(r["num_tokens"] - before)
    seconds.append((r["num_tokens"] - before) / r["tokens_per_second"])
    before = r["num_tokens"]
tokens, seconds = tokens[warmup:], seconds[warmup:]
print(json.dumps({"side": "ours", "task": task, "steps": len(seconds), "median_step_s": statistics.median(seconds),
                  "tokens": sum(tokens), "tokens_per_second": sum(tokens) / sum(seconds)}))
EOF
    tail -n 1 "$OUT"
    echo "== $task: TRL" >&2
    model="$cache/models/SmolLM2-135M-Instruct" # the directory our run just loaded (converted from the GGUF)
    "$python" scripts/bench_cpu_trl.py --task "$task" --model "$model" --recipe "$recipe" --steps "$STEPS" \
        --warmup "$WARMUP" 2>"$work/trl-$task.log" | tail -n 1 >>"$OUT" || { cat "$work/trl-$task.log" >&2; exit 1; }
    tail -n 1 "$OUT"
done

"$python" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n| task | ours (tokens/s) | TRL (tokens/s) | ours / TRL | median step ours / TRL (s) |")
print("|---|---|---|---|---|")
for task in dict.fromkeys(r["task"] for r in rows):
    ours = next(r for r in rows if r["task"] == task and r["side"] == "ours")
    trl = next(r for r in rows if r["task"] == task and r["side"] == "trl")
    print(f"| {task} | {ours['tokens_per_second']:.1f} | {trl['tokens_per_second']:.1f} | "
          f"{ours['tokens_per_second'] / trl['tokens_per_second']:.2f}× | "
          f"{ours['median_step_s']:.2f} / {trl['median_step_s']:.2f} |")
EOF
