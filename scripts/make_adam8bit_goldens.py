"""Golden values for `optim: adamw_bnb_8bit` (crates/trainer/tests/adam8bit.rs): bitsandbytes'
AdamW with 8-bit block-wise moments, as transformers' Trainer builds it (`bnb.optim.AdamW`,
`optim_bits=8`, `min_8bit_size=4096`, `percentile_clipping=100`, `block_wise=True`).

bitsandbytes runs that update only as CUDA kernels (`kOptimizerStatic8bit2StateBlockwise` and, for
parameters under 4096 elements and embeddings, `kOptimizer32bit2State`, csrc/kernels.cu). This
script transcribes both, operation by operation in float32 (numpy scalars, no fused multiply-add),
on a CPU:
  * the quantisation maps are bitsandbytes' own (`bitsandbytes.functional.create_dynamic_map`);
  * 8-bit: per block of 256, dequantise the codes (`map[code] * absmax`), update the moments,
    take each block's new absolute maximum (the last, partial block's padding takes part, as in
    the kernel: code 128 and 0, gradient 0), update the parameter from the unquantised moments
    (`p += step_size * m / (sqrt(v) + correction2 * eps)`, then `p *= 1 - lr * wd`), quantise
    `m / absmax` and `v / absmax` with the kernel's binary search (`quantize_2D`) and keep the
    sign of `m` (one code further when the nearest code has the other sign);
  * 32-bit: the same update on float32 moments.
The kernels' fast intrinsics (`__powf`, `__fdividef`) and nvcc's fused multiply-adds are exact
float32 operations here, so the GPU may differ from these values by an ulp and, rarely, a code.

It also runs bitsandbytes' pure-torch reference of the 8-bit update
(`optimizer_update_8bit_blockwise_pytorch`, nearest code by argmin, no sign rule, decay before the
update) on the same inputs and prints how far its parameters end from the transcription's: a check
that the transcription is bitsandbytes' algorithm, not a bound the Rust test uses.

usage: make_adam8bit_goldens.py  (writes crates/trainer/tests/fixtures/adam8bit.json)
"""
import json
import math
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # the reference's helpers are @torch.compile'd

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F

f32 = np.float32
BLOCK = 256
SIGNED = F.create_dynamic_map(signed=True).numpy().astype(f32)
UNSIGNED = F.create_dynamic_map(signed=False).numpy().astype(f32)


def quantize_2d(code, signed, x):
    """csrc/kernels.cu `quantize_2D<SIGNED>`: binary search over the sorted map, then the nearer
    of the two neighbours by their midpoint."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = f32(-1.0 if signed else 0.0), f32(1.0)
    val = code[127]
    for i in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = code[pivot]
    if x > val:
        midpoint = (upper + val) * f32(0.5)
        return upper_pivot if x > midpoint else pivot
    midpoint = (lower + val) * f32(0.5)
    return lower_pivot if x < midpoint else pivot


def corrections(beta1, beta2, step, lr):
    """The kernels' bias corrections and step size, from exactly rounded powers."""
    c1 = f32(1.0 - float(beta1) ** step)
    c2 = f32(math.sqrt(1.0 - float(beta2) ** step))
    return c1, c2, (-lr * c2) / c1


def update_8bit(p, g, s1c, s2c, am1, am2, beta1, beta2, eps, step, lr, wd):
    """kOptimizerStatic8bit2StateBlockwise<float, ADAM, 256, 1>, in place."""
    _, c2, step_size = corrections(beta1, beta2, step, lr)
    n = len(p)
    one = f32(1.0)
    for b in range((n + BLOCK - 1) // BLOCK):
        start = b * BLOCK
        valid = min(BLOCK, n - start)
        s1 = np.zeros(BLOCK, f32)
        s2 = np.zeros(BLOCK, f32)
        new1 = new2 = f32(-np.finfo(f32).max)
        for j in range(BLOCK):
            gv, c1j, c2j = (g[start + j], s1c[start + j], s2c[start + j]) if j < valid else (f32(0), 128, 0)
            if np.isfinite(gv):
                v = UNSIGNED[c2j] * am2[b]
                v = v * beta2 + (one - beta2) * gv * gv
                m = SIGNED[c1j] * am1[b]
                m = m * beta1 + (one - beta1) * gv
            else:
                m = v = f32(0)
            s1[j], s2[j] = m, v
            new1 = np.fmax(new1, abs(m))
            new2 = np.fmax(new2, abs(v))
        am1[b], am2[b] = new1, new2
        for j in range(valid):
            i = start + j
            if np.isfinite(g[i]):
                p[i] = p[i] + step_size * (s1[j] / (np.sqrt(s2[j]) + c2 * eps))
                if wd > 0:
                    p[i] = p[i] * (one - lr * wd)
            with np.errstate(invalid="ignore", divide="ignore"):
                code1 = quantize_2d(SIGNED, True, s1[j] / new1)
                code2 = quantize_2d(UNSIGNED, False, s2[j] / new2)
            if np.signbit(SIGNED[code1]) != np.signbit(s1[j]):
                code1 = (code1 + 1) & 0xFF if s1[j] > 0 else (code1 - 1) & 0xFF
            s1c[i], s2c[i] = code1, code2


def update_32bit(p, g, m, v, beta1, beta2, eps, step, lr, wd):
    """kOptimizer32bit2State<float, ADAM> (no update norm, gnorm_scale 1), in place."""
    _, c2, step_size = corrections(beta1, beta2, step, lr)
    one = f32(1.0)
    for i in range(len(p)):
        m[i] = m[i] * beta1 + ((one - beta1) * g[i])
        v[i] = v[i] * beta2 + ((one - beta2) * (g[i] * g[i]))
        p[i] = p[i] + (step_size * (m[i] / (np.sqrt(v[i]) + (eps * c2))))
        if wd > 0:
            p[i] = p[i] * (one - lr * wd)


def gradients(rng, n, steps, zero_block=None, nan_at=None):
    """Gradients spanning three decades, optionally one block zero
    for the first two steps and one non-finite element."""
    out = []
    for s in range(steps):
        g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0, n)).astype(f32)
        if zero_block is not None and s < 2:
            g[zero_block * BLOCK:(zero_block + 1) * BLOCK] = 0
        if nan_at is not None and s == 1:
            g[nan_at] = np.nan
        out.append(g)
    return out


def lists(a):
    """float32 values as the shortest decimals that read back (through float64, as the test
    reads them) as the same float32; NaN as null (JSON has no NaN)."""
    out = [None if np.isnan(x) else float(str(f32(x))) for x in a]
    assert all(y is None or f32(y) == f32(x) for x, y in zip(a, out))
    return out


def main():
    rng = np.random.default_rng(0)
    beta1, beta2, eps = f32(0.9), f32(0.999), f32(1e-8)
    lrs = [f32(1e-2), f32(5e-3), f32(2e-2), f32(1e-3)]
    cases = []
    # 8-bit: two full blocks and a partial one (8), the second block's gradient zero at first.
    for name, n, wd, zero_block, nan_at in [("blockwise", 520, f32(0.1), 1, None), ("blockwise_nan", 264, f32(0.0), None, 7)]:
        p = (rng.standard_normal(n) * 0.05).astype(f32)
        grads = gradients(rng, n, len(lrs), zero_block, nan_at)
        init = p.copy()
        s1c, s2c = np.zeros(n, np.int64), np.zeros(n, np.int64)
        am1, am2 = np.zeros((n + BLOCK - 1) // BLOCK, f32), np.zeros((n + BLOCK - 1) // BLOCK, f32)
        steps = []
        for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
            update_8bit(p, g, s1c, s2c, am1, am2, beta1, beta2, eps, t, lr, wd)
            state = {"param": lists(p), "state1": s1c.tolist(), "state2": s2c.tolist(), "absmax1": lists(am1), "absmax2": lists(am2)}
            steps.append({"lr": float(lr), "grad": lists(g), **(state if t in (1, len(lrs)) else {})})
        cases.append({"name": name, "kind": "8bit", "weight_decay": float(wd), "init": lists(init), "steps": steps})
        if nan_at is None:
            reference_gap(init, grads, lrs, wd, p, beta1, beta2, eps)
    # 32-bit (parameters under min_8bit_size, and embeddings).
    for name, n, wd in [("full_decay", 40, f32(0.1)), ("full", 40, f32(0.0))]:
        p = (rng.standard_normal(n) * 0.05).astype(f32)
        grads = gradients(rng, n, len(lrs))
        init = p.copy()
        m, v = np.zeros(n, f32), np.zeros(n, f32)
        steps = []
        for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
            update_32bit(p, g, m, v, beta1, beta2, eps, t, lr, wd)
            steps.append({"lr": float(lr), "grad": lists(g), "param": lists(p), "exp_avg": lists(m), "exp_avg_sq": lists(v)})
        cases.append({"name": name, "kind": "32bit", "weight_decay": float(wd), "init": lists(init), "steps": steps})
    out = os.path.join(os.path.dirname(__file__), "..", "crates/trainer/tests/fixtures/adam8bit.json")
    with open(out, "w") as f:
        json.dump({"bitsandbytes_version": bitsandbytes.__version__, "beta1": float(beta1), "beta2": float(beta2), "eps": float(eps),
                   "signed_map": lists(SIGNED), "unsigned_map": lists(UNSIGNED), "cases": cases}, f)
    print(out)


def reference_gap(init, grads, lrs, wd, final, beta1, beta2, eps):
    """bitsandbytes' pure-torch 8-bit update on the same inputs: prints how far its parameters
    end from the transcription's, in units of the largest learning rate (one Adam step moves an
    element by about lr)."""
    from bitsandbytes.backends.triton.kernels_optim import optimizer_update_8bit_blockwise_pytorch

    n = len(init)
    blocks = (n + BLOCK - 1) // BLOCK
    p = torch.tensor(init)
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(blocks), torch.zeros(blocks)
    q1, q2 = torch.tensor(SIGNED), torch.tensor(UNSIGNED)
    for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
        optimizer_update_8bit_blockwise_pytorch(p, torch.tensor(g), s1, s2, float(beta1), float(beta2), 0.0, 0.0, float(eps), t, float(lr),
                                                q1, q2, a1, a2, float(wd), 1.0, False, optimizer_name="adam")
    gap = (p - torch.tensor(final)).abs().max().item() / float(max(lrs))
    print(f"bitsandbytes' pure-torch 8-bit AdamW vs the kernel transcription after {len(lrs)} steps: max |Δp| = {gap:.2e} × lr")
    assert gap < 0.05, "the transcription strays from bitsandbytes' algorithm"


if __name__ == "__main__":
    main()
