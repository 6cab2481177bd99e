"""Generates the NF4 golden files for crates/peft/tests/nf4.rs. Deterministic: rerunning rewrites
identical files.

bitsandbytes itself needs a GPU build and is not in the reference environment, so this script is a
transcription of its algorithms in torch (float32 throughout), following the CUDA kernels that QLoRA
runs (csrc/kernels.cu):

- `quantize_4bit(quant_type="nf4", blocksize=64)`: per block of 64 values the absmax and, per
  value, the NF4 index chosen with `dQuantizeNF4`'s thresholds from `value * (1 / absmax)`, first
  value of each pair in the high nibble. An all-zero block has `1 / absmax = inf`, `0 * inf = NaN`,
  and NaN passes no threshold: index 0 (the CPU backend's argmin also returns 0 for NaN).
- `compress_statistics=True` (double quantization): `offset = absmax.mean()`, then
  `quantize_blockwise(absmax - offset, blocksize=256)` with the code of `create_dynamic_map()`:
  per block of 256 the absmax (`state2.absmax`) and, per value, `dQuantize<0>` of
  `value * (1 / block absmax)`. Dequantization: `code[q] * state2.absmax + offset`, then
  `NF4_CODE[index] * absmax`.

- `quantize_4bit(quant_type="fp4")`: the same blocks, each value's index by `dQuantizeFP4`'s
  sign bit and binary search against its float pivots, in `get_4bit_type("fp4")`'s code book.

Writes nf4/reference.json (single quantization of a fixed tensor), nf4/fp4.json (the same with
FP4, pivots and their neighbours included) and nf4/double_quant.json (the
dynamic map, the 8-bit block-wise quantization of a vector with a value on every midpoint of the
map, and three tensors quantized with double quantization).

The dynamic map goes through `torch.linspace`, whose float32 rounding depends on the CPU kernel
torch dispatches to (AVX2/AVX-512 builds fuse `start + step * i` into one FMA, the DEFAULT kernel
does not: 42 of the 256 entries differ, by 1-2 ulps); the capability used is recorded in the file.

usage: make_nf4_goldens.py [--out crates/peft/tests/fixtures]
       (run with the interpreter printed by `bash scripts/reference_env.sh`)
"""
import argparse
import json
import os

import torch

# bitsandbytes' NF4 code book (get_4bit_type("nf4")) and dQuantizeNF4's thresholds (ascending).
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]
NF4_THRESHOLDS = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                  -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                  0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                  0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def nf4_quantize(values):
    """quantize_4bit(nf4, blocksize=64): (packed bytes, absmax per block, NF4 index per value)."""
    thresholds = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32)
    absmax, indices = [], []
    for block in values.split(BLOCKSIZE):
        m = block.abs().max()
        absmax.append(m)
        scaled = block * (1.0 / m)
        indices.append((scaled[:, None] > thresholds[None, :]).sum(1))  # dQuantizeNF4: count of `x > t`
    indices = torch.cat(indices).to(torch.uint8)
    padded = torch.cat([indices, torch.zeros(indices.numel() % 2, dtype=torch.uint8)])
    packed = (padded[0::2] << 4) | padded[1::2]
    return packed, torch.stack(absmax), indices


def nf4_dequantize(indices, absmax):
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    return code[indices.long()] * absmax.repeat_interleave(BLOCKSIZE)[: indices.numel()]


# bitsandbytes' FP4 code book, get_4bit_type("fp4"): the values by index, divided by their max.
FP4_DATA = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# dQuantizeFP4's pivots (csrc/kernels.cu), as its float literals.
FP4_PIVOTS = dict(top=0.29166667, high=0.583333, highest=0.8333333, mid_high=0.4166667, low=0.0859375,
                  mid_low=0.20833333, lowest=0.00260417)


def fp4_code():
    data = torch.tensor(FP4_DATA, dtype=torch.float32)
    return data / data.abs().max()


def fp4_index(x):
    """dQuantizeFP4 for every element of x (already scaled by 1 / absmax): the sign bit, then a
    binary search of |x| against float32 pivots, `x > pivot` going up."""
    p = {k: torch.tensor(v, dtype=torch.float32) for k, v in FP4_PIVOTS.items()}
    sign = torch.where(x < 0, 8, 0)
    a = x.abs()
    upper = torch.where(a > p["high"], torch.where(a > p["highest"], 0b0011, 0b0010),
                        torch.where(a > p["mid_high"], 0b0101, 0b0100))
    lower = torch.where(a > p["low"], torch.where(a > p["mid_low"], 0b0111, 0b0110),
                        torch.where(a > p["lowest"], 0b0001, 0b0000))
    return (torch.where(a > p["top"], upper, lower) + sign).to(torch.uint8)


def fp4_quantize(values):
    """quantize_4bit(fp4, blocksize=64): (packed bytes, absmax per block, FP4 index per value)."""
    absmax, indices = [], []
    for block in values.split(BLOCKSIZE):
        m = block.abs().max()
        absmax.append(m)
        indices.append(fp4_index(block * (1.0 / m)))  # all-zero block: NaN passes no pivot -> index 0
    indices = torch.cat(indices)
    padded = torch.cat([indices, torch.zeros(indices.numel() % 2, dtype=torch.uint8)])
    return (padded[0::2] << 4) | padded[1::2], torch.stack(absmax), indices


def make_fp4(out_dir):
    gen = torch.Generator().manual_seed(6)
    pivots = torch.tensor(list(FP4_PIVOTS.values()), dtype=torch.float32)
    # A block with absmax 1 holding every pivot exactly, just above it, and negated (the tie rule
    # and the sign bit); 2 blocks of N(0, 0.02²) weights; an all-zero block; the code book times
    # 0.5 (every index); a short tail of 21 values.
    edges = torch.cat([pivots, torch.nextafter(pivots, torch.ones_like(pivots)), -pivots, torch.tensor([1.0, -0.0])])
    values = torch.cat([edges, torch.zeros(BLOCKSIZE - edges.numel()), torch.randn(128, generator=gen) * 0.02,
                        torch.zeros(64), fp4_code() * 0.5, torch.randn(21, generator=gen)])
    packed, absmax, indices = fp4_quantize(values)
    code = fp4_code()
    dequantized = code[indices.long()] * absmax.repeat_interleave(BLOCKSIZE)[: indices.numel()]
    with open(os.path.join(out_dir, "fp4.json"), "w") as f:
        json.dump(dict(blocksize=BLOCKSIZE, code=f32_list(code), values=f32_list(values), packed=packed.tolist(),
                       absmax=f32_list(absmax), dequantized=f32_list(dequantized)), f, separators=(",", ":"))


def create_dynamic_map():
    """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for i = 0..6 the
    midpoints of linspace(0.1, 1, 2**i + 1) times 10**(i - 6), with both signs, plus 0 and 1."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    data += [0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def dquantize(code, x):
    """dQuantize<0> (non-stochastic) for every element of x: a 7-step binary search over the sorted
    code from index 127, remembering the last index it went up from (lower) and down from (upper),
    then the nearer of the final index and that neighbour, split at their float32 midpoint; a value
    exactly on the midpoint keeps the final index."""
    pivot = torch.full(x.shape, 127)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full(x.shape, -1.0), torch.full(x.shape, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_pivot, lower = torch.where(up, pivot, lower_pivot), torch.where(up, val, lower)
        upper_pivot, upper = torch.where(up, upper_pivot, pivot), torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    below = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, above, below).to(torch.uint8)


def quantize_blockwise(values, code):
    """quantize_blockwise(values, blocksize=256) (kQuantizeBlockwise, General8bit): (codes, absmax)."""
    absmax, codes = [], []
    for block in values.split(NESTED_BLOCKSIZE):
        m = block.abs().max()
        absmax.append(m)
        codes.append(dquantize(code, block * (1.0 / m)))  # all-zero block: NaN -> index 0
    return torch.cat(codes), torch.stack(absmax)


def dequantize_blockwise(codes, absmax, code):
    return code[codes.long()] * absmax.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]


def f32_list(t):
    return t.float().tolist()


def make_single(out_dir):
    gen = torch.Generator().manual_seed(4)
    # 3 full blocks of N(0, 0.02²) weights, one all-zero block, a short odd tail of 37 values,
    # and the code book itself (times 0.5) so every index appears.
    values = torch.cat([torch.randn(192, generator=gen) * 0.02, torch.zeros(64), torch.tensor(NF4_CODE) * 0.5,
                        torch.randn(37, generator=gen)])
    packed, absmax, indices = nf4_quantize(values)
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(dict(blocksize=BLOCKSIZE, values=f32_list(values), packed=packed.tolist(), absmax=f32_list(absmax),
                       dequantized=f32_list(nf4_dequantize(indices, absmax))), f, separators=(",", ":"))


def double_quant_case(name, values, code):
    packed, absmax, indices = nf4_quantize(values)
    offset = absmax.mean()
    codes, state2_absmax = quantize_blockwise(absmax - offset, code)
    absmax_dq = dequantize_blockwise(codes, state2_absmax, code) + offset
    return dict(name=name, values=f32_list(values), packed=packed.tolist(), offset=offset.item(),
                codes=codes.tolist(), state2_absmax=f32_list(state2_absmax),
                dequantized=f32_list(nf4_dequantize(indices, absmax_dq)))


def make_double(out_dir):
    code = create_dynamic_map()
    # 8-bit block-wise: a block of 256 whose absmax is 1 (so values are not rescaled) holding every
    # midpoint of the map (the tie rule), then a shorter block with absmax 1 holding every fifth
    # code point, and random values.
    gen = torch.Generator().manual_seed(5)
    midpoints = (code[:-1] + code[1:]) * 0.5
    blockwise = torch.cat([torch.tensor([1.0]), midpoints, torch.tensor([-1.0]), code[::5],
                           torch.rand(7, generator=gen) * 2 - 1])
    bw_codes, bw_absmax = quantize_blockwise(blockwise, code)

    def weights(n):
        return torch.randn(n, generator=gen) * 0.02

    # Blocks at different scales (one all-zero) so absmax - offset spans both signs.
    scales = torch.tensor([1.0, 0.0, 4.0, 0.25, 2.0]).repeat_interleave(BLOCKSIZE)[: 4 * BLOCKSIZE + 10]
    cases = [
        double_quant_case("normal_200", weights(200), code),
        double_quant_case("mixed_scales_266", weights(scales.numel()) * scales, code),
        # One block: absmax - offset is 0, so the nested block has absmax 0 (code 0 via NaN).
        double_quant_case("single_block_40", weights(40), code),
    ]
    result = dict(
        torch_version=torch.__version__, torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        blocksize=BLOCKSIZE, nested_blocksize=NESTED_BLOCKSIZE, dynamic_map=f32_list(code),
        blockwise=dict(values=f32_list(blockwise), codes=bw_codes.tolist(), absmax=f32_list(bw_absmax)),
        cases=cases,
    )
    with open(os.path.join(out_dir, "double_quant.json"), "w") as f:
        json.dump(result, f, separators=(",", ":"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="crates/peft/tests/fixtures")
    args = parser.parse_args()
    out_dir = os.path.join(args.out, "nf4")
    os.makedirs(out_dir, exist_ok=True)
    make_single(out_dir)
    make_double(out_dir)
    make_fp4(out_dir)
    print(out_dir)


if __name__ == "__main__":
    main()
