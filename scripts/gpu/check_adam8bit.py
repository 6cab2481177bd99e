"""On the device: bitsandbytes' own CUDA kernels for 8-bit AdamW against the float32 transcription
that the Rust update equals bit for bit (crates/trainer/tests/adam8bit.rs).

Replays the golden cases (crates/trainer/tests/fixtures/adam8bit.json: initial parameters, every
step's gradient and learning rate) through `bitsandbytes.functional.optimizer_update_8bit_blockwise`
and `optimizer_update_32bit` on the GPU, and one larger random case (64 blocks, 3 steps) through
both the kernel and the transcription (scripts/make_adam8bit_goldens.py). The kernels use fast
intrinsics (`__powf`, `__fdividef`) and fused multiply-adds, so the prediction is: parameters
within a few f32 ulps, block maxima within an ulp or two, and at most a few codes a thousand one
step away (a code one step away moves later updates by about 1 % of a step). Prints one JSON line
per case (appended to --results) and exits non-zero when a case misses that by far: parameters
apart by more than 5 % of a learning rate (one Adam step moves an element by about one), more
than 1 % of codes apart, or any code more than one step away.

With --time-shape CONFIG (a config.json), it then times PyTorch's optimizer step on a model of
that shape's parameters instead of checking: gradient clipping (`clip_grad_norm_`, as
transformers' Trainer does before each step) and `bnb.optim.AdamW(optim_bits=8)` with the
embedding kept in 32-bit (the Trainer's override), then the same with torch's fused AdamW; one
JSON line each (`"check": "adam8bit-time"`), what `bench_train update --optim adamw_bnb_8bit`
is measured against.

usage: check_adam8bit.py [--results FILE] [--time-shape CONFIG]   (bitsandbytes importable:
        run.sh stage puts it in .gpu/python, which device_run.sh puts on PYTHONPATH)
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import make_adam8bit_goldens as golden  # noqa: E402  (the transcription; imports bitsandbytes)
import bitsandbytes.functional as F  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
f32 = np.float32


def gpu(a, dtype=torch.float32):
    return torch.tensor(np.asarray(a), dtype=dtype, device="cuda")


def floats(values):
    return np.array([np.nan if v is None else v for v in values], dtype=f32)


def compare(name, lr, p, want_p, codes=None, want_codes=None, absmax=None, want_absmax=None):
    p, want_p = np.asarray(p, f32), np.asarray(want_p, f32)
    in_lr = float(np.max(np.abs(p - want_p))) / float(lr)
    ulps = int(np.max(np.abs(p.view(np.int32).astype(np.int64) - want_p.view(np.int32).astype(np.int64))))
    row = {"check": "adam8bit", "case": name, "param_max_diff_in_lr": in_lr, "param_max_ulps": ulps}
    ok = in_lr <= 0.05
    if codes is not None:
        differ = sum(int(np.sum(np.asarray(c) != np.asarray(w))) for c, w in zip(codes, want_codes))
        total = sum(len(w) for w in want_codes)
        far = sum(int(np.sum(np.abs(np.asarray(c, np.int64) - np.asarray(w, np.int64)) > 1)) for c, w in zip(codes, want_codes))
        absmax_rel = max(float(np.max(np.abs(a - w) / np.maximum(np.abs(w), f32(1e-30)))) for a, w in zip(absmax, want_absmax))
        row.update({"codes_differ": differ, "codes_total": total, "codes_more_than_one_apart": far, "absmax_max_rel": absmax_rel})
        ok = ok and differ <= 0.01 * total and far == 0
    row["pass"] = ok
    return row


def kernel_8bit(p, grads, lrs, wd, beta1, beta2, eps):
    n = len(p)
    blocks = (n + golden.BLOCK - 1) // golden.BLOCK
    p = gpu(p)
    s1, s2 = torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(n, dtype=torch.uint8, device="cuda")
    a1, a2 = torch.zeros(blocks, device="cuda"), torch.zeros(blocks, device="cuda")
    q1, q2 = gpu(golden.SIGNED), gpu(golden.UNSIGNED)
    states = []
    for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
        F.optimizer_update_8bit_blockwise("adam", gpu(g), p, s1, s2, float(beta1), float(beta2), 0.0, 0.0, float(eps), t, float(lr),
                                          q1, q2, a1, a2, weight_decay=float(wd))
        states.append(tuple(x.cpu().numpy().copy() for x in (p, s1, s2, a1, a2)))
    return states


def kernel_32bit(p, grads, lrs, wd, beta1, beta2, eps):
    p = gpu(p)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    states = []
    for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
        F.optimizer_update_32bit("adam", gpu(g), p, m, float(beta1), float(eps), t, float(lr), v, float(beta2), weight_decay=float(wd))
        states.append(tuple(x.cpu().numpy().copy() for x in (p, m, v)))
    return states


def shape_parameters(config):
    """The trainable parameters of a Llama-family model of `config`'s shape, random, on the GPU:
    the embedding as an `nn.Embedding` (for bitsandbytes' 32-bit override), the rest as tensors."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads, head_dim = config.get("num_key_value_heads", heads), config.get("head_dim", hidden // heads)
    shapes = []
    for _ in range(layers):
        shapes += [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
                   (hidden, heads * head_dim), (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    shapes.append((hidden,))
    if not config.get("tie_word_embeddings", False):
        shapes.append((config["vocab_size"], hidden))
    embedding = torch.nn.Embedding(config["vocab_size"], hidden, device="cuda")
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    return embedding, params


def time_step(name, params, optimizer, steps=3):
    """Median seconds of clipping + `optimizer.step()` over `steps` steps after one, with fresh
    random gradients before each (outside the timing)."""
    seconds = []
    for step in range(1 + steps):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-4
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        torch.cuda.synchronize()
        if step > 0:
            seconds.append(time.perf_counter() - start)
    return {"check": "adam8bit-time", "impl": name, "median_s": float(np.median(seconds)), "steps_s": seconds,
            "params": sum(p.numel() for p in params)}


def time_shape(path):
    import bitsandbytes as bnb
    config = json.load(open(path))
    embedding, params = shape_parameters(config)
    everything = [embedding.weight] + params
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.register_module_override(embedding, "weight", {"optim_bits": 32})
    rows = [time_step("pytorch bnb.optim.AdamW 8-bit", everything, bnb.optim.AdamW(everything, lr=1e-5, weight_decay=0.01, optim_bits=8))]
    torch.cuda.empty_cache()
    rows.append(time_step("pytorch torch.optim.AdamW fused", everything, torch.optim.AdamW(everything, lr=1e-5, weight_decay=0.01, fused=True)))
    shape = os.path.splitext(os.path.basename(path))[0]
    for row in rows:
        row["shape"] = shape
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--results")
    parser.add_argument("--time-shape")
    args = parser.parse_args()
    rows = []
    if args.time_shape and torch.cuda.is_available():
        rows = time_shape(args.time_shape)
    elif not torch.cuda.is_available():
        rows.append({"check": "adam8bit", "case": "all", "skipped": "no GPU: bitsandbytes' 8-bit optimizer runs only as CUDA kernels"})
    else:
        data = json.load(open(os.path.join(ROOT, "crates/trainer/tests/fixtures/adam8bit.json")))
        beta1, beta2, eps = f32(data["beta1"]), f32(data["beta2"]), f32(data["eps"])
        for case in data["cases"]:
            lrs = [f32(s["lr"]) for s in case["steps"]]
            grads = [floats(s["grad"]) for s in case["steps"]]
            init = floats(case["init"])
            if case["kind"] == "8bit":
                states = kernel_8bit(init, grads, lrs, case["weight_decay"], beta1, beta2, eps)
            else:
                states = kernel_32bit(init, grads, lrs, case["weight_decay"], beta1, beta2, eps)
            for t, (step, state) in enumerate(zip(case["steps"], states), start=1):
                if "param" not in step:
                    continue
                label, lr = f"{case['name']} step {t}", max(lrs)
                if case["kind"] == "8bit":
                    rows.append(compare(label, lr, state[0], floats(step["param"]), state[1:3], [step["state1"], step["state2"]],
                                        state[3:5], [floats(step["absmax1"]), floats(step["absmax2"])]))
                else:
                    rows.append(compare(label, lr, state[0], floats(step["param"])))
        # A larger case: 64 blocks, three steps, kernel against the transcription.
        rng = np.random.default_rng(1)
        n, lrs, wd = 64 * golden.BLOCK, [f32(1e-3), f32(2e-3), f32(5e-4)], f32(0.01)
        init = (rng.standard_normal(n) * 0.02).astype(f32)
        grads = golden.gradients(rng, n, len(lrs))
        states = kernel_8bit(init, grads, lrs, wd, beta1, beta2, eps)
        p, s1, s2 = init.copy(), np.zeros(n, np.int64), np.zeros(n, np.int64)
        a1, a2 = np.zeros(64, f32), np.zeros(64, f32)
        for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
            golden.update_8bit(p, g, s1, s2, a1, a2, beta1, beta2, eps, t, lr, wd)
        last = states[-1]
        rows.append(compare("random 64 blocks step 3", max(lrs), last[0], p, last[1:3], [s1, s2], last[3:5], [a1, a2]))
    for row in rows:
        print(json.dumps(row))
    if args.results:
        with open(args.results, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    sys.exit(0 if all(r.get("pass", True) for r in rows) else 1)


if __name__ == "__main__":
    main()
