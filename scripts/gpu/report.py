#!/usr/bin/env python3
"""Tables from a device run (scripts/gpu/device_run.sh): the correctness checks, and ours vs
PyTorch on each shape, as markdown ready for docs/performance.md.

    python3 scripts/gpu/report.py OUT/results.jsonl --checks OUT
"""

import argparse
import glob
import json
import os


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def qlora_bound_mib(shape_path, seq, batch, rank=16, adapter_bytes=8):
    """The arithmetic memory floor of a QLoRA step: NF4 base (4 bits + one f32 absmax per 64
    values, double-quantized to ≈ 1 byte per 64), bf16 embedding and head, the adapters with
    their gradients and two AdamW moments (`adapter_bytes` a parameter: 8 in bf16, as TRL holds
    a quantized model's adapters and a bf16 run here does since 2026-12-07; 16 in f32, the floor
    before), and the bf16 input of every layer (what gradient checkpointing must keep).
    Everything else (recomputed activations, logits, workspace) is extra."""
    with open(shape_path) as f:
        c = json.load(f)
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    linears = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    base = layers * sum(o * n for o, n in linears)
    nf4 = base * (0.5 + 1 / 64)
    embed = v * h * 2 * (1 if c.get("tie_word_embeddings") else 2)
    adapters = layers * sum(rank * (o + n) for o, n in linears)
    activations = layers * batch * seq * h * 2
    return (nf4 + embed + adapters * adapter_bytes + activations) / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--checks", help="folder with check-*.json")
    args = p.parse_args()

    if args.checks:
        for path in sorted(glob.glob(os.path.join(args.checks, "check-*.json"))):
            report = json.load(open(path))
            # The file's name keeps the `@` variant the backend field drops (tch-cuda@tensor-8bit).
            name = os.path.basename(path)[len("check-"):-len(".json")]
            print(f"\nCorrectness, {name} vs CPU (relative; tolerance {next((r['tolerance'] for r in report.values() if isinstance(r, dict)), '?')}):\n")
            print("| case | max rel. scalar (losses, metrics, grad norm) | max rel. gradient (‖Δ‖/‖g‖ per tensor) | result |")
            print("|---|---|---|---|")
            for case, r in report.items():
                if isinstance(r, dict):
                    # A non-finite difference is written as null by the check (cuda-bf16's first run).
                    num = lambda v: "non-finite" if v is None else f"{v:.2e}"  # noqa: E731
                    verdict = "pass" if r.get("pass") else "FAIL: " + str(r.get("worst"))
                    print(f"| {case} | {num(r.get('max_rel_scalar'))} | {num(r.get('max_rel_grad'))} | {verdict} |")

        # bench_train ops: burn's operations and this project's paths one at a time (src/op_check.rs).
        for path in sorted(glob.glob(os.path.join(args.checks, "ops-*.json"))):
            report = json.load(open(path))
            ops = report.get("ops", [])
            failing = [r for r in ops if not r.get("pass")]
            print(f"\nOperations one at a time, {report.get('backend')} vs CPU: {len(ops) - len(failing)} of {len(ops)} pass" + (", failing:\n" if failing else ""))
            if failing:
                print("| inputs | operation | relative difference | tolerance | error |")
                print("|---|---|---|---|---|")
                for r in failing:
                    num = "non-finite" if r.get("relative") is None else f"{r['relative']:.2e}"
                    print(f"| {r.get('inputs')} | {r.get('op')} | {num} | {r.get('tolerance'):.0e} | {(r.get('error') or '')[:200]} |")

    rows = [json.loads(l) for l in open(args.results) if l.strip()]
    groups = {}
    dequant = [r for r in rows if "dequant" in r or " dequant " in r.get("label", "")]
    for r in rows:
        # Training steps only: not the dequantization, products or optimizer updates timed alone.
        if "shape" in r and not ({"dequant", "gemm", "update"} & r.keys()) and r.get("check") != "adam8bit-time":
            # Runs with gradient checkpointing compare among themselves; ours with the chunked head
            # alone (no full logits, as TRL 1.16's SFTTrainer computes its loss with a fused head)
            # beside PyTorch's plain step.
            # A 4-bit base always checkpoints (bench_train reports it so), and PyTorch's QLoRA row is
            # a skipped one: QLoRA's rows are one group whatever they say.
            lean = bool(r.get("gradient_checkpointing") or str(r.get("backend", "")).endswith("-gc") or r.get("task") == "qlora")
            groups.setdefault((r["shape"], r["task"], r.get("seq"), r.get("batch"), lean), []).append(r)
    print(
        "\nThroughput (median step after warm-up; MFU against 989 TFLOP/s; peak = device memory sampled by nvidia-smi, "
        "CUDA context included; allocated = the steps' peak in torch's CUDA allocator, exact, tensors only, on the libtorch route and PyTorch):\n"
    )
    print(
        "| shape | task | seq × batch | implementation | tokens/s | step ms | MFU | peak MiB | allocated MiB | "
        "× PyTorch tokens/s | × PyTorch memory (peak) | × PyTorch memory (allocated) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    floor_notes = []
    for (shape, task, seq, batch, _lean), group in groups.items():
        torch_row = next((r for r in group if r.get("impl") == "torch" and "tokens_per_second" in r), None)
        for r in group:
            name = r.get("backend", r.get("impl"))
            # A variant set by environment switches (`NAME@f32-frozen`, `NAME@ops-logits`, ...)
            # runs under the backend's own name: its label says which.
            label_words = r.get("label", "").split()
            if len(label_words) > 1 and label_words[0] == "ours" and "@" in label_words[1]:
                name = label_words[1]
            if name.startswith("cuda") and r.get("products") == "backend":
                name += " (CubeCL matmul)"
            elif name.startswith("cuda") and r.get("products") == "cublas-sync":
                name += " (cuBLAS, host-synchronised)"
            name += "".join(f" +{flag}" for flag in ("gradient_checkpointing", "chunked_head") if r.get(flag))
            if "error" in r or "tokens_per_second" not in r:
                why = r.get("skipped") or (r.get("error", "").strip().splitlines() or ["failed"])[-1][:120]
                print(f"| {shape} | {task} | {seq} × {batch} | {name} | – | – | – | – | – | – | – | {why} |")
                continue
            ratio = mem_ratio = allocated_ratio = None
            if torch_row and r is not torch_row:
                ratio = r["tokens_per_second"] / torch_row["tokens_per_second"]
                if r.get("peak_device_mib") and torch_row.get("peak_device_mib"):
                    mem_ratio = r["peak_device_mib"] / torch_row["peak_device_mib"]
                if r.get("torch_max_allocated_mib") and torch_row.get("torch_max_allocated_mib"):
                    allocated_ratio = r["torch_max_allocated_mib"] / torch_row["torch_max_allocated_mib"]
            print(
                f"| {shape} | {task} | {seq} × {batch} | {name} | {r['tokens_per_second']:.0f} | {r['median_step_seconds'] * 1000:.0f} | "
                f"{r['mfu'] * 100:.1f}% | {fmt(r.get('peak_device_mib'), '.0f')} | {fmt(r.get('torch_max_allocated_mib'), '.0f')} | "
                f"{fmt(ratio, '.2f')} | {fmt(mem_ratio, '.2f')} | {fmt(allocated_ratio, '.2f')} |"
            )
        if task == "qlora":
            path = os.path.join(os.path.dirname(__file__), "shapes", f"{shape}.json")
            if os.path.exists(path):
                floor = qlora_bound_mib(path, seq, batch)
                print(f"| {shape} | qlora | {seq} × {batch} | arithmetic floor | | | | {floor:.0f} | {floor:.0f} | | | |")
                for r in group:
                    allocated = r.get("torch_max_allocated_mib")
                    if allocated and "tokens_per_second" in r:
                        label = (r.get("label") or r.get("backend", "?")).removeprefix("ours ")
                        floor_notes.append(f"- {shape} QLoRA, {label}: allocated peak {allocated:.0f} MiB = {allocated / floor:.2f}× the floor (target ≤ 1.3×)")

    if floor_notes:
        print("\n" + "\n".join(floor_notes))

    gemm = [r for r in rows if "gemm" in r or " gemm " in r.get("label", "")]
    if gemm:
        print("\nA step's products alone (bench_train gemm: the step's route, cuBLAS on cuda, against burn's matmul, CubeCL's kernels; differences from burn's f32 product of the same operands, relative to its largest value):\n")
        print("| backend | shape | product | [batch·heads] m×k·k×n | route ms | TFLOP/s | burn ms | TFLOP/s | × burn | difference: route, burn |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in gemm:
            if not r.get("gemm"):
                why = r.get("skipped") or (r.get("error", "").strip().splitlines() or ["failed"])[-1][:120]
                print(f"| {r.get('label')} | | | | – | – | – | – | – | {why} |")
                continue
            for p in r["gemm"]:
                b, h, m, k, n = p["dims"]
                print(
                    f"| {r['backend']} ({r['route']}) | {r['shape']} {r['dtype']} | {p['product']} | [{b}·{h}] {m}×{k}·{k}×{n} | {p['route_s'] * 1e3:.3f} | "
                    f"{p['flops'] / p['route_s'] / 1e12:.0f} | {p['burn_s'] * 1e3:.3f} | {p['flops'] / p['burn_s'] / 1e12:.0f} | {p['burn_s'] / p['route_s']:.2f} | {p['difference']:.1e}, {fmt(p.get('burn_difference'), '.1e')} |"
                )
            dx, dw = r.get("gradient_difference", [None, None])
            print(f"| {r['backend']} | | gradients of x Wᵀ (∂x, ∂W) | | | | | | | {fmt(dx, '.1e')}, {fmt(dw, '.1e')} {'' if r.get('agrees') else 'FAIL'} |")

    if dequant:
        print("\nQLoRA's NF4 base dequantized alone (bench_train dequant: one [intermediate, hidden] weight into the products' type; GB/s at the least bytes: indices and scales read, the weight written once):\n")
        print("| backend | shape | path | ms | GB/s | × tensor ops |")
        print("|---|---|---|---|---|---|")
        for r in dequant:
            paths = r.get("dequant")
            if not paths:
                why = r.get("skipped") or (r.get("error", "").strip().splitlines() or ["failed"])[-1][:120]
                print(f"| {r.get('label')} | | | – | – | {why} |")
                continue
            base = paths.get("tensor-ops", {}).get("median_s")
            for name, p in paths.items():
                speedup = base / p["median_s"] if base and name != "tensor-ops" else None
                print(f"| {r['backend']} | {r['shape']} {r['dims']} {r['dtype']} | {name} | {p['median_s'] * 1e3:.3f} | {p['least_bytes'] / p['median_s'] / 1e9:.0f} | {fmt(speedup, '.1f')} |")

    trainer = [r for r in rows if r.get("trainer")]
    if trainer:
        print(
            "\nThe example binaries' loop (zephyr_sft, zephyr_dpo built with `tch`; device_run.sh's run_trainer): each GPU run against "
            "the CPU's in the same call — every logged metric, |Δ| / max(|x|, 0.1), and every saved weight, ‖Δ‖ / ‖w‖; tokens/s: "
            "the logging windows after the first:\n"
        )
        print("| run | logged steps | loss, first → last | max rel. metric (where) | max rel. weight (which) | finite weights | tokens/s | result |")
        print("|---|---|---|---|---|---|---|---|")
        for r in trainer:
            label = r.get("label", "?").removeprefix("trainer ")
            if r.get("skipped") or r.get("error"):
                print(f"| {label} | | | | | | | {r.get('skipped') or r.get('error')} |")
                continue
            loss = f"{r['first_loss']:.4f} → {r['last_loss']:.4f}" if "first_loss" in r else "–"
            metric = f"{r['max_rel_metric']:.1e} ({r.get('worst_metric')})" if "max_rel_metric" in r else "–"
            weight = f"{r['max_rel_weight']:.1e} ({r.get('worst_weight')})" if "max_rel_weight" in r else "–"
            tolerance = f" (≤ {r['tolerance']:.0e})" if "tolerance" in r else ""
            verdict = ("pass" if r.get("pass") else "FAIL") + tolerance
            if r.get("missing"):
                verdict += "; missing: " + ", ".join(r["missing"][:5])
            finite = {True: "yes", False: "no"}.get(r.get("finite_weights"), "–")
            print(
                f"| {label} | {r.get('logged_steps', '–')} | {loss} | {metric} | {weight} | {finite} | "
                f"{fmt(r.get('tokens_per_second'), '.0f')} | {verdict} |"
            )

    adam8bit = [r for r in rows if r.get("check") == "adam8bit"]
    if adam8bit:
        print(
            "\n8-bit AdamW: bitsandbytes' CUDA kernels against the transcription the Rust update equals bit for bit "
            "(scripts/gpu/check_adam8bit.py; parameters in units of the learning rate and in f32 ulps):\n"
        )
        print("| case | max abs. Δp / lr | max ulps | codes apart (> 1 step) of all | block maxima, max rel. | result |")
        print("|---|---|---|---|---|---|")
        for r in adam8bit:
            if r.get("skipped"):
                print(f"| {r.get('case')} | | | | | {r['skipped']} |")
                continue
            codes = f"{r['codes_differ']} ({r['codes_more_than_one_apart']}) of {r['codes_total']}" if "codes_total" in r else "–"
            print(
                f"| {r['case']} | {r['param_max_diff_in_lr']:.1e} | {r['param_max_ulps']} | {codes} | "
                f"{fmt(r.get('absmax_max_rel'), '.1e')} | {'pass' if r.get('pass') else 'FAIL'} |"
            )

    # `optim: adamw_bnb_8bit`'s update alone (device_run.sh's run_update_8bit): ours through
    # bitsandbytes' kernels and through the tensor form, PyTorch's with bitsandbytes and fused AdamW.
    timed = [r for r in rows if r.get("check") == "adam8bit-time" or str(r.get("label", "")).startswith("update-8bit ")]
    if timed:
        print("\n8-bit AdamW's update alone (clipping included; median of the timed updates):\n")
        print("| implementation | shape | parameters | ms an update | peak MiB (nvidia-smi) |")
        print("|---|---|---|---|---|")
        for r in timed:
            if r.get("check") == "adam8bit-time":
                name, shape, params, median = r["impl"], r.get("shape", "?"), r.get("params"), r.get("median_s")
            else:
                name, shape, params = "ours " + r["label"].split()[1], r.get("shape", "?"), r.get("trainable")
                median = (r.get("update") or {}).get("one-process", {}).get("median_s")
            if median is None:
                print(f"| {name} | {shape} | {params or '–'} | failed: {str(r.get('error', r.get('skipped', '')))[-120:]} | |")
                continue
            print(f"| {name} | {shape} | {params or '–'} | {1e3 * median:.2f} | {fmt(r.get('peak_device_mib'), '.0f')} |")


if __name__ == "__main__":
    main()
