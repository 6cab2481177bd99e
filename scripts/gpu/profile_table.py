#!/usr/bin/env python3
"""Per-kernel profiles of one training step, side by side (issue #12: "profile first").

    python3 profile_table.py LABEL=PATH [LABEL=PATH ...] [--steps N] [--top K] [--json OUT]

Each PATH is what `--profile` wrote:
  * `trace.json` — a Chrome trace from libtorch's Kineto profiler: ours on a `tch-*` backend
    (bench_train) or PyTorch's baseline (torch_baseline.py). Device time is the sum of its
    `kernel`, `gpu_memcpy` and `gpu_memset` events; a trace without any (a CPU run) is read by
    operator self time (`cpu_op` events minus the operators nested in them, per thread).
  * `cubecl.log` — CubeCL's profiling log: ours on a CubeCL backend (`cuda*`, `wgpu*`). Every
    kernel launch is logged as `| duration | name` and every device synchronisation (one per
    step in bench_train) ends with a summary table; the last `--steps` tables are read.

Prints, per profile, the time per step by category (GEMM, attention, normalisation and
reductions, element-wise, casts and copies, optimizer, other) and the top kernels; with
`--by-op K`, also the K torch operators whose kernels took most device time, each named with its
input types, layouts (`c` contiguous, `s` strided or broadcast) and sizes, so that a kernel can
be traced to the tensor it ran on; then one table of the categories side by side. Time is per step: the profile's total divided by `--steps`
(bench_train and torch_baseline profile their timed steps).
"""

import argparse
import json
import re
import sys
from collections import defaultdict

# First match wins; matched against the lower-cased kernel or operator name. torch's generic
# element-wise kernels are named `gpu_kernel_impl_nocast<Functor>` when they cast nothing: `cast`
# alone would count those adds and products as casts (the 2026-12-04 profile did so).
CATEGORIES = [
    ("optimizer", r"adam|optim"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|matmul|\bmm\b|aten::mm|addmm|bmm|aten::linear|wgmma|sm90_|sm80_"),
    ("norm/reduce", r"reduce|norm|softmax|logsumexp|logits|cross_entropy|nll|sum|aten::mean|aten::max|aten::amax|argmax|topk"),
    ("cast/copy", r"copy|memcpy|memset|(?<!no)cast|to_copy|aten::to\b|aten::t\b|contiguous|fill|full|aten::cat|index|gather|scatter|select|embedding|slice|layout|transpose|permute|clone|zeros|ones|arange|empty"),
    ("elementwise", r"elementwise|elemwise|vectorized|fuse|aten::(mul|add|sub|div|neg|exp|log|silu|sigmoid|pow|rsqrt|sqrt|where|clamp|tanh|cos|sin|abs|sign|masked)|unary|binop|binary|cmp|mask"),
]
COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]
ORDER = [name for name, _ in CATEGORIES] + ["other"]


def category(name):
    lower = name.lower()
    for label, pattern in COMPILED:
        if pattern.search(lower):
            return label
    return "other"


def operator_key(op):
    """An operator as `name types layouts sizes`: `aten::add_ float/float sc [[4, 32], [4, 32]]`."""
    args = op.get("args", {})
    dims = args.get("Input Dims", [])
    strides = args.get("Input Strides", [])
    types = [t for t, d in zip(args.get("Input type", []), dims) if d]
    layouts = []
    for size, stride in zip(dims, strides):
        flat = all(isinstance(x, int) for x in size) and all(isinstance(x, int) for x in stride or [None])
        if not size or not flat:
            continue
        expected, step = [], 1
        for x in reversed(size):
            expected.append(step)
            step *= x
        layouts.append("c" if list(reversed(expected)) == stride or 0 in size else "s")
    return f"{op['name']} {'/'.join(types)} {''.join(layouts)} {[d for d in dims if d][:3]}".strip()


def kernels_by_operator(events):
    """{operator key: [device µs, kernels]}: each kernel charged to the innermost torch operator
    around the runtime call that launched it (matched by CUPTI's correlation id)."""
    launched_by = {}
    threads = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            threads[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), 0, e))
        elif e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            threads[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), 1, e))
    for items in threads.values():
        items.sort(key=lambda item: (item[0], item[1], -float(item[2]["dur"])))
        stack = []  # (end, operator)
        for start, is_call, e in items:
            while stack and stack[-1][0] <= start:
                stack.pop()
            if is_call:
                launched_by[e["args"]["correlation"]] = operator_key(stack[-1][1]) if stack else "(outside any operator)"
            else:
                stack.append((start + float(e["dur"]), e))
    totals = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            item = totals[launched_by.get(e.get("args", {}).get("correlation"), "(unattributed)")]
            item[0] += float(e["dur"])
            item[1] += 1
    return totals


def from_trace(path, by_operator=None):
    """{name: [total µs, count]} from a Kineto Chrome trace, and what was measured; with a dict
    `by_operator`, also fills it with the device time per launching operator."""
    with open(path) as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    totals = defaultdict(lambda: [0.0, 0])
    if device:
        for e in device:
            item = totals[e["name"]]
            item[0] += float(e["dur"])
            item[1] += 1
        if by_operator is not None:
            by_operator.update(kernels_by_operator(events))
        return totals, "device time of kernels and copies"
    # A CPU run: operator self time, per thread (children are nested intervals on one thread).
    threads = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            threads[(e.get("pid"), e.get("tid"))].append(e)
    for ops in threads.values():
        ops.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack = []  # [end, name, self µs]
        for e in ops:
            start, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= start:
                _, name, own = stack.pop()
                totals[name][0] += own
                totals[name][1] += 1
            if stack:
                stack[-1][2] -= dur
            stack.append([start + dur, e["name"], dur])
        for _, name, own in stack:
            totals[name][0] += own
            totals[name][1] += 1
    return totals, "operator self time on the host (no device kernels in the trace)"


UNITS = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
DURATION = re.compile(r"^([0-9.]+)(ns|µs|us|ms|s)$")
# A row of CubeCL's summary table: `| name | duration | count | ratio |`, where the kernel's name
# itself may hold ` | ` (CubeCL joins the parts of a kernel's type name with it).
TABLE_ROW = re.compile(r"^\|\s*(?P<name>.*?)\s*\|\s*(?P<duration>[0-9.]+(?:ns|µs|us|ms|s))\s*\|\s*(?P<count>\d+)\s*\|\s*\d+ %\s*\|\s*$")


def micros(text):
    m = DURATION.match(text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def from_cubecl_log(path, steps):
    """{name: [total µs, count]} from CubeCL's profiling log: its last `steps` summary tables."""
    tables, current = [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("| Name ") and "| Duration " in line:
                current = {}
                continue
            row = TABLE_ROW.match(line) if current is not None else None
            if row and row["name"] == "Total":
                tables.append(current)
                current = None
            elif row:
                name = row["name"].replace(" | ", " ")
                current[name] = [micros(row["duration"]), int(row["count"])]
    if not tables:
        raise SystemExit(f"{path}: no summary table (was the run synchronised, and profiling on?)")
    totals = defaultdict(lambda: [0.0, 0])
    for table in tables[-steps:]:
        for name, (us, count) in table.items():
            totals[name][0] += us
            totals[name][1] += count
    return totals, f"device time per kernel (CubeCL, last {min(steps, len(tables))} of {len(tables)} synchronisations)"


def load(path, steps, by_operator=None):
    return from_cubecl_log(path, steps) if path.endswith(".log") else from_trace(path, by_operator)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", help="LABEL=PATH")
    p.add_argument("--steps", type=int, default=1, help="steps the profiles cover (time is shown per step)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--by-op", type=int, default=0, metavar="K", help="also list the K operators whose kernels took most device time")
    p.add_argument("--json", help="also write the per-category table here")
    args = p.parse_args()

    summary = {}
    for spec in args.profiles:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"`{spec}`: expected LABEL=PATH")
        try:
            by_operator = {}
            totals, what = load(path, args.steps, by_operator)
        except (OSError, ValueError) as e:
            print(f"## {label}: cannot read {path}: {e}\n")
            continue
        per_step = {name: (us / args.steps / 1e3, n / args.steps) for name, (us, n) in totals.items()}
        by_category = defaultdict(lambda: [0.0, 0.0])
        for name, (ms, n) in per_step.items():
            c = by_category[category(name)]
            c[0] += ms
            c[1] += n
        total = sum(ms for ms, _ in per_step.values())
        summary[label] = {"total_ms": total, "launches": sum(n for _, n in per_step.values()), "categories": {k: v[0] for k, v in by_category.items()}, "what": what}
        operators = sorted(((key, us / args.steps / 1e3, n / args.steps) for key, (us, n) in by_operator.items()), key=lambda row: -row[1])
        if args.by_op and operators:
            summary[label]["by_operator"] = [{"operator": key, "ms": ms, "kernels": n} for key, ms, n in operators[: args.by_op]]
        print(f"## {label}: {total:.2f} ms per step, {summary[label]['launches']:.0f} kernels/ops ({what})")
        print(f"{'category':<12} {'ms/step':>9} {'share':>6} {'count':>7}")
        for name in ORDER:
            if name in by_category:
                ms, n = by_category[name]
                print(f"{name:<12} {ms:>9.3f} {100 * ms / max(total, 1e-12):>5.1f}% {n:>7.0f}")
        print(f"top {args.top}:")
        for name, (ms, n) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {ms:>9.3f} ms {n:>6.0f}×  [{category(name)}] {name[:110]}")
        if args.by_op and operators:
            print(f"top {args.by_op} operators by their kernels' device time:")
            for key, ms, n in operators[: args.by_op]:
                print(f"  {ms:>9.3f} ms {n:>6.0f}×  {key[:160]}")
        print()

    if len(summary) > 1:
        labels = list(summary)
        print("| category | " + " | ".join(labels) + " |")
        print("|---|" + "---:|" * len(labels))
        for name in ORDER + ["total"]:
            row = [summary[l]["total_ms"] if name == "total" else summary[l]["categories"].get(name, 0.0) for l in labels]
            if any(row):
                print(f"| {name} | " + " | ".join(f"{ms:.2f} ms" for ms in row) + " |")
        print("| launches | " + " | ".join(f"{summary[l]['launches']:.0f}" for l in labels) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
