#!/usr/bin/env bash
# Per-rank memory of data-parallel SFT on SmolLM2-135M for each ZeRO stage: 2 CPU ranks launched
# by `cargo xtask launch`, a few steps each; prints the ranks' own summaries (state kept between
# steps, peak RSS). Usage: bash scripts/bench_distributed_memory.sh [STEPS [CONFIG...]]
# (CONFIG: names in recipes/accelerate_configs, default all four stages).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-2}"
shift || true
configs=("$@")
[ "${#configs[@]}" -gt 0 ] || configs=(multi_gpu deepspeed_zero1 deepspeed_zero2 deepspeed_zero3)
cargo build --release --example zephyr_sft -q
out="$(mktemp -d)"
for config in "${configs[@]}"; do
  echo "== $config"
  cargo xtask launch --nproc 2 --config_file "recipes/accelerate_configs/$config.yaml" -- \
    target/release/examples/zephyr_sft recipes/smollm2-135m/sft/config_cpu.yaml \
    --output_dir="$out/$config" --max_steps="$steps" --per_device_train_batch_size=2 \
    --gradient_accumulation_steps=1 --eval_strategy=no --eval_on_start=false --save_strategy=no \
    --logging_steps=1 2>&1 | grep -E "kept between steps|error" || true
  grep -h '"loss"' "$out/$config/metrics.jsonl" | head -n "$steps"
done
rm -rf "$out"
