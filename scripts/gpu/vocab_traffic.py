#!/usr/bin/env python3
"""Bytes a training step moves over vocabulary-sized tensors, counted from a libtorch trace.

    python3 vocab_traffic.py --vocab 128256 PATH [PATH ...]
    python3 vocab_traffic.py --min-elements 100000 PATH [PATH ...]

The second form counts every tensor of at least that many elements instead (the products and
the attention kernels left out: both implementations run the same ones), and names each copy by
the operator it runs in (`aten::copy_ (in aten::to)`: a cast), to find where one step moves more
bytes than the other outside its products.

Each PATH is a `trace.json` written by `bench_train train --profile` (ours on a `tch-*` backend)
or `torch_baseline.py --profile` (PyTorch), on the CPU or a GPU: the operators are the same. For
every operator that computes (no operator nested in it computes; views and allocations do not)
and has an input whose last dimension is the vocabulary, the bytes of its inputs of a million
elements or more are read and, unless it reduces, the largest of them written (`copy_`: its
source read and its destination written; `fill_`/`zero_`: written only; `gather` and
`nll_loss`: nothing vocabulary-sized, they read one element a row; a binary operator with
an `out=` tensor, a third operand of the first's size: its inputs read and that tensor written;
an in-place scatter: only its few scattered values, nothing vocabulary-sized). The head's
products are left out: both implementations run the same ones; a batched product of rows
`[rows, 1, vocab]` (a dot product per row, as the statistics' entropy) is a reduction, read
only. Copies torch makes inside an operator that reads or writes another type than it computes
in (`log_softmax(z_bf16, dtype=float)`, `mean(dtype=float)`, a product into a bf16 `out=`, a
bf16 scatter) are counted, and their total printed apart: on the CPU torch converts through a
temporary, on CUDA the same kernels convert as they read and write, so the total less them is
what a GPU moves. What the loss and its statistics cost
beyond the products, as memory traffic: docs/performance.md, "The profile read again".
"""

import argparse
import collections
import json

# Operators that create views or allocate, never computing.
VIEWS = {
    "aten::as_strided", "aten::view", "aten::transpose", "aten::t", "aten::reshape", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::detach", "detach", "aten::resolve_conj", "aten::resolve_neg", "aten::select", "aten::slice",
    "aten::unsqueeze", "aten::narrow", "aten::expand", "aten::alias", "aten::_unsafe_view", "aten::permute", "aten::squeeze",
    "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::to", "aten::_reshape_alias", "aten::contiguous",
    "aten::expand_as", "aten::view_as", "aten::unbind", "aten::split", "aten::chunk", "aten::clone", "aten::_to_copy",
    "aten::zeros", "aten::zeros_like", "aten::ones_like", "aten::full", "aten::flatten", "aten::split_with_sizes",
}
# Operators that reduce over the vocabulary, by their name without `aten::` (`softmax` is not `max`).
REDUCTIONS = {"max", "min", "sum", "amax", "argmax", "mean", "logsumexp", "all", "any", "bmm"}
# Operators that read one element a row, where the index or target says.
PICKING = {"aten::gather", "aten::nll_loss", "aten::nll_loss_forward", "aten::nll_loss_nd"}
# Operators whose CPU kernels convert through temporaries where CUDA's convert in the kernel.
CONVERTING = {"aten::log_softmax", "aten::softmax", "aten::mean", "aten::sum", "aten::mul", "aten::scatter_"}
# Binary operators, whose third tensor operand is an `out=` destination.
BINARY = {"aten::mul", "aten::add", "aten::sub", "aten::div"}
ELEMENT_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1}


def computing_operators(path):
    """The trace's operators that compute (none of the operators nested in them computes), each
    with the name of the outermost operator it is nested in (its own where none)."""
    with open(path) as f:
        ops = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    threads = collections.defaultdict(list)
    for op in ops:
        threads[op["tid"]].append(op)
    out = []
    for items in threads.values():
        items.sort(key=lambda e: (e["ts"], -e["dur"]))
        outermost, outer_end = None, -1.0
        for i, op in enumerate(items):
            if op["ts"] >= outer_end and not op["name"].startswith(("autograd::", "Optimizer", "ProfilerStep")):
                outermost, outer_end = op["name"], op["ts"] + op["dur"]
            end, j, nested = op["ts"] + op["dur"], i + 1, False
            while j < len(items) and items[j]["ts"] < end:
                if items[j]["name"] not in VIEWS:
                    nested = True
                    break
                j += 1
            if not nested and op["name"] not in VIEWS and "Backward" not in op["name"] and not op["name"].startswith(("autograd::", "Optimizer", "ProfilerStep")):
                out.append((op, outermost))
    return out


def tensors(op):
    """(elements, bytes) of each tensor input, in order."""
    args = op.get("args", {})
    out = []
    for dims, kind in zip(args.get("Input Dims", []), args.get("Input type", [])):
        if isinstance(dims, list) and dims and all(isinstance(x, int) for x in dims):
            elements = 1
            for x in dims:
                elements *= x
            out.append((dims, elements, elements * ELEMENT_BYTES.get(kind, 4)))
    return out


def traffic(path, vocab, min_elements=1_000_000):
    """(bytes read, bytes written, {operator: bytes}, bytes of the CPU's converting copies) over
    vocabulary-sized tensors, or over every tensor of `min_elements` or more when `vocab` is
    `None` (products and attention kernels left out, copies named by their outermost operator)."""
    read = written = converting = 0
    per = collections.Counter()
    for op, outermost in computing_operators(path):
        inputs = tensors(op)
        if vocab is not None and not any(dims[-1] == vocab for dims, _, _ in inputs):
            continue
        row_dot = vocab is not None and op["name"] == "aten::bmm" and len(inputs[0][0]) == 3 and inputs[0][0][1] == 1
        if "mm" in op["name"] and not row_dot:
            continue
        if vocab is None and ("scaled_dot_product" in op["name"] or "flash" in op["name"]):
            continue
        large = [b for _, n, b in inputs if n >= min_elements]
        if op["name"] == "aten::copy_" and len(inputs) == 2:
            r, w = inputs[1][2], inputs[0][2]
        elif op["name"] in ("aten::fill_", "aten::zero_"):
            r, w = 0, max(large, default=0)
        elif op["name"] in BINARY and len(inputs) == 3 and inputs[2][0] == inputs[0][0]:
            r, w = sum(b for _, n, b in inputs[:2] if n >= 1_000_000), inputs[2][2]
        elif (op["name"].startswith("aten::scatter") and op["name"].endswith("_")) or op["name"] in PICKING:
            r, w = 0, 0
        else:
            r = sum(large)
            w = 0 if op["name"].split("::")[-1] in REDUCTIONS else max(large, default=0)
        read += r
        written += w
        if r + w:
            copy_in = vocab is None and op["name"] == "aten::copy_" and outermost != op["name"]
            per[f"aten::copy_ (in {outermost})" if copy_in else op["name"]] += r + w
        if op["name"] == "aten::copy_" and outermost in CONVERTING:
            converting += r + w
    return read, written, per, converting


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+")
    p.add_argument("--vocab", type=int, help="the vocabulary size (the logits' last dimension); without it, every tensor")
    p.add_argument("--min-elements", type=int, default=1_000_000, help="the smallest tensor counted")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    for path in args.traces:
        read, written, per, converting = traffic(path, args.vocab, args.min_elements)
        over = f"[..., {args.vocab}] tensors" if args.vocab is not None else f"tensors of {args.min_elements} elements or more"
        print(f"{path}: {(read + written) / 1e6:.0f} MB over {over} (read {read / 1e6:.0f}, written {written / 1e6:.0f})")
        if converting:
            print(f"  of which {converting / 1e6:.0f} MB copies inside converting operators (CPU only): {(read + written - converting) / 1e6:.0f} MB on a GPU")
        for name, total in per.most_common(args.top):
            print(f"  {total / 1e6:8.0f} MB  {name}")


if __name__ == "__main__":
    main()
