#!/usr/bin/env bash
# What one training step moves between host and device, found on libtorch's CPU kernels: a step
# replayed as a CUDA graph may neither upload nor read back inside it (docs/performance.md, "The
# step replayed as a CUDA graph"). Runs one `bench_train train` step of each task under gdb with
# a breakpoint on every tch entry that uploads a host buffer (at_tensor_of_data,
# at_tensor_of_blob) or reads one back (at_copy_data, at_double_value_at_indexes,
# at_int64_value_at_indexes) and on torch's `item`, and sorts the hits inside the step by where
# they come from: the batch's preparation (`Task::scoring`, `CausalLm::batch_inputs`), or the
# step itself. Exits 1 if anything moved inside the step itself.
#
#   bash scripts/gpu/host_transfers.sh [bench_train binary built with --features tch]
#
# (default: target/tch/release/examples/bench_train, which `bash scripts/gpu/run.sh dry-run tch`
# builds; needs gdb.) torch's CPU fused AdamW reads its step count and learning rate with `item`
# inside its kernel: those hits are listed apart (its CUDA kernel reads them on the device).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-target/tch/release/examples/bench_train}"
[ -x "$bin" ] || { echo "no $bin: build it with bash scripts/gpu/run.sh dry-run tch" >&2; exit 2; }
command -v gdb >/dev/null || { echo "gdb is needed (apt-get install gdb)" >&2; exit 2; }
export $(bash scripts/with_torch.sh env | grep -E "^(LIBTORCH|LD_LIBRARY_PATH)=" | xargs)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
    echo "set pagination off"
    echo "set breakpoint pending on"
    for entry in at_tensor_of_data at_tensor_of_blob at_copy_data at_double_value_at_indexes at_int64_value_at_indexes at::_ops::item::call; do
        printf 'break %s\ncommands\nsilent\nbt 60\ncontinue\nend\n' "$entry"
    done
    echo "run"
} >"$work/gdb"
status=0
for spec in "sft" "dpo" "orpo" "lora" "qlora" "sft --gradient-checkpointing --chunked-head" "dpo --gradient-checkpointing --chunked-head" "orpo --gradient-checkpointing --chunked-head"; do
    # shellcheck disable=SC2086 # the task and its options
    gdb -batch -x "$work/gdb" --args "$bin" train --backend tch-cpu-bf16 --shape scripts/gpu/shapes/tiny.json \
        --task $spec --seq 64 --batch 2 --warmup 0 --steps 1 >"$work/log" 2>&1 || true
    python3 - "$work/log" "$spec" <<'EOF' || status=1
import collections, re, sys
log, spec = open(sys.argv[1]).read(), sys.argv[2]
where = collections.Counter()
inside = []
for stack in re.split(r"\n(?=#0 )", log):
    if not stack.startswith("#0"):
        continue
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(.+?) \(", stack, re.M)
    if not any("step_check::train_step" in f for f in frames):
        continue  # making the model, reading the metrics after the step
    preparation = ("alignment_trainer::step::prepare", "as alignment_trainer::task::Task>::scoring", "CausalLm<B>::batch_inputs")
    if any(marker in f for f in frames for marker in preparation):
        where["the batch's preparation"] += 1
    elif frames[0].startswith("at::_ops::item") and any("_fused_adamw" in f for f in frames):
        where["torch's CPU fused AdamW reading its scalars (on the device under CUDA)"] += 1
    else:
        ours = [re.sub(r"::h[0-9a-f]{16}$", "", f) for f in frames if "alignment" in f]
        inside.append(f"{frames[0]} <- " + " <- ".join(ours[:4]))
print(f"--task {spec}: " + ", ".join(f"{n} in {k}" for k, n in where.items()) + f"; inside the step itself: {len(inside)}")
for line in inside:
    print("   ", line)
sys.exit(1 if inside else 0)
EOF
done
exit $status
