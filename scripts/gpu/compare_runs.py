#!/usr/bin/env python3
"""Runs of an example binary (zephyr_sft, zephyr_dpo) read back: the device's run against the
CPU's, same binary, same recipe, same model (device_run.sh's `run_trainer`, issue #12 item 1 at
the level a user runs), or one run alone for its speed (`run_trainer_speed`). Prints one JSON line
for results.jsonl; exits 1 when the run does not pass.

    python3 compare_runs.py --label L --tolerance 1e-4 REFERENCE_DIR RUN_DIR
    python3 compare_runs.py --label L RUN_DIR

Each run's output_dir holds metrics.jsonl (a line per logging or evaluation step) and the final
model.safetensors. Compared:
- every number both runs logged at the same step (losses, gradient norm, learning rate, DPO's
  rewards and log-probs, evaluation metrics), timings aside: |run − reference| / max(|reference|,
  0.1), the step check's rule (src/step_check.rs, SCALAR_FLOOR);
- every saved tensor: ‖run − reference‖ / ‖reference‖, and whether all of it is finite.
The run passes when both are within the tolerance and nothing is missing or non-finite; a run
alone passes when its weights are finite. Its tokens/s (the mean of its logging windows after the
first, which holds the warm-up) and first and last logged losses come along.
"""

import argparse
import json
import math
import os
import sys

SCALAR_FLOOR = 0.1
TIMINGS = ("tokens_per_second", "runtime", "per_second")


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_step(rows):
    """{(step, 'train' or 'eval'): row}: evaluation lines carry `eval_` keys."""
    out = {}
    for row in rows:
        kind = "eval" if any(k.startswith("eval_") for k in row) else "train"
        out[(row.get("step"), kind)] = row
    return out


def tensors(run_dir):
    """The saved model's tensors as float64 arrays (safetensors' numpy reader; f32 or f16 files)."""
    import numpy as np
    from safetensors.numpy import load_file

    return {name: t.astype(np.float64) for name, t in load_file(os.path.join(run_dir, "model.safetensors")).items()}


def relative(got, expected):
    err = abs(got - expected) / max(abs(expected), SCALAR_FLOOR)
    return math.inf if math.isnan(err) else err


def compare_metrics(expected, got, row):
    """The largest relative difference over the numbers both runs logged, and where."""
    worst, worst_err = "", 0.0
    got_by_step = by_step(got)
    for key, reference in by_step(expected).items():
        other_row = got_by_step.get(key)
        if other_row is None:
            row["missing"].append(f"step {key[0]} {key[1]}")
            continue
        for name, value in reference.items():
            if name in ("step", "epoch") or any(t in name for t in TIMINGS) or not isinstance(value, (int, float)):
                continue
            other = other_row.get(name)
            if not isinstance(other, (int, float)):
                row["missing"].append(f"step {key[0]} {name}")
                continue
            err = relative(other, value)
            if err > worst_err or not worst:
                worst, worst_err = f"step {key[0]} {name}: {other:.6g} against {value:.6g}", err
    return worst_err, worst


def compare_weights(expected, got, row):
    """The largest ‖Δ‖/‖w‖ over the saved tensors, and which."""
    import numpy as np

    worst, worst_err = "", 0.0
    for name, reference in expected.items():
        if name not in got:
            row["missing"].append(name)
            continue
        err = float(np.linalg.norm(got[name] - reference) / max(float(np.linalg.norm(reference)), 1e-30))
        err = math.inf if math.isnan(err) else err
        if err > worst_err or not worst:
            worst, worst_err = name, err
    return worst_err, worst


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--label", required=True)
    p.add_argument("--tolerance", type=float, help="required with a reference run")
    p.add_argument("runs", nargs="+", metavar="DIR", help="[REFERENCE_DIR] RUN_DIR")
    args = p.parse_args()
    if len(args.runs) > 2 or (len(args.runs) == 2) != (args.tolerance is not None):
        p.error("give REFERENCE_DIR RUN_DIR with --tolerance, or RUN_DIR alone")
    *reference, run = args.runs
    row = {"label": args.label, "trainer": True, "missing": []}
    try:
        import numpy as np

        logged = metrics(run)
        weights = tensors(run)
        row["finite_weights"] = all(bool(np.isfinite(t).all()) for t in weights.values())
        losses = [r["loss"] for r in logged if "loss" in r]
        row["logged_steps"] = sum(1 for r in logged if "loss" in r)
        if losses:
            row["first_loss"], row["last_loss"] = losses[0], losses[-1]
        windows = [r["tokens_per_second"] for r in logged if "tokens_per_second" in r]
        if windows:
            timed = windows[1:] or windows
            row["tokens_per_second"] = sum(timed) / len(timed)
        row["pass"] = row["finite_weights"]
        if reference:
            row["tolerance"] = args.tolerance
            row["max_rel_metric"], row["worst_metric"] = compare_metrics(metrics(reference[0]), logged, row)
            row["max_rel_weight"], row["worst_weight"] = compare_weights(tensors(reference[0]), weights, row)
            row["pass"] = (
                row["pass"] and not row["missing"] and row["max_rel_metric"] <= args.tolerance and row["max_rel_weight"] <= args.tolerance
            )
    except (OSError, ValueError, KeyError, ImportError) as e:
        row["pass"], row["error"] = False, f"{type(e).__name__}: {e}"
    print(json.dumps(row))
    return 0 if row["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
