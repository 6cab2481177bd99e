#!/usr/bin/env python3
"""PyTorch's side of `bench_train train`: the same model shape, batch, sequence length,
gradient accumulation and random tokens, trained the way the Hugging Face Trainer does with
`bf16: true` (fp32 master weights, bf16 autocast, SDPA attention, fused AdamW). Prints one JSON
line with the same fields as ours, so scripts/gpu/report.py can put them side by side.

    python3 torch_baseline.py --shape shapes/llama-3.2-1b.json --task sft --seq 1024 --batch 4

Tasks: `sft` (causal-LM loss on every token, transformers' `ForCausalLMLoss`), `dpo` (TRL's
concatenated chosen+rejected forward, summed completion log-probs via its
`selective_log_softmax`, sigmoid loss against fixed reference log-probs, as with
`precompute_ref_log_probs`), `lora` (PEFT r=16, alpha 32, all linear layers; under
`bf16-autocast` the frozen base in bf16, as the handbook's LoRA recipes load it with
`torch_dtype: bfloat16`, PEFT's adapters f32, as its `autocast_adapter_dtype` makes them), `qlora`
(the same on a bitsandbytes NF4 base: skipped, bitsandbytes is not on the GPU machine).
Runs on the GPU when there is one, else on the CPU (the dry run).

`--cuda-graph`: the whole step (forward, backward, clipping, AdamW) captured once as a CUDA graph
and replayed, as PyTorch's "whole-network capture" recipe does it (warm-up on a side stream,
`capturable` fused AdamW, autocast's weight cache off, the same static batch every step): the
host issues one launch a step instead of thousands, so against the eager run in the same call
it measures what the host costs a step — what replaying our own step as a graph would save
(docs/performance.md, "The next lever"). CUDA only; elsewhere the line says it was skipped.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True)
    p.add_argument("--task", default="sft", choices=["sft", "dpo", "lora", "qlora"])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", default="bf16-autocast", choices=["bf16-autocast", "bf16", "f32"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the Trainer's torch_compile)")
    p.add_argument("--cuda-graph", action="store_true", help="capture the whole step once as a CUDA graph and replay it (CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", help="folder: the timed steps under torch.profiler, written as trace.json (as bench_train's --profile)")
    return p.parse_args()


def flops_per_token(c, seq):
    """PaLM's convention, as bench_train's `flops_per_token`."""
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q = c["num_attention_heads"] * head_dim
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * i
    return 6.0 * (layers * per_layer + v * h) + 12.0 * layers * q * seq


def selective_log_softmax(logits, index):
    """TRL's `selective_log_softmax`: log-softmax values of the `index` tokens, row by row to
    keep memory down (logsumexp for fp32/fp64, log_softmax for lower precision)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    out = []
    for row_logits, row_labels in zip(logits, index):
        row = F.log_softmax(row_logits, dim=-1)
        out.append(row.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def capture(step_body, optimizer, warmup):
    """PyTorch's whole-network capture: `warmup` eager steps on a side stream (lazy
    initialisation, cuBLAS workspaces, the optimizer's state), the gradients set to None so that
    the captured backward pass allocates them from the graph's pool, then one step captured.
    Returns the graph, the loss tensor its replays write, and the seconds capture took. The
    captured step does not run: replays do."""
    start = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            step_body()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_total = step_body()
    torch.cuda.synchronize()
    return graph, static_total, time.perf_counter() - start


def main():
    args = parse()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(args.shape) as f:
        shape = json.load(f)
    config = AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    config.architectures = shape.get("architectures")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.task == "lora" and args.precision == "bf16-autocast":
        # The frozen base needs no f32 master copy: the handbook's LoRA recipes load it in bf16.
        dtype = torch.bfloat16
    load_start = time.perf_counter()
    if args.cuda_graph and device.type != "cuda":
        print(json.dumps({"impl": "torch", "backend": f"torch-{device.type}-{args.precision}-graph", "task": args.task, "shape": os.path.basename(args.shape)[:-5], "seq": args.seq, "batch": args.batch, "skipped": "CUDA graphs need a CUDA device"}))
        return
    if args.task == "qlora":
        # bitsandbytes is not on the GPU machine (and its wheel would not fit the upload beside the
        # binaries): QLoRA is compared with its arithmetic memory bound instead (report.py).
        print(json.dumps({"impl": "torch", "task": args.task, "shape": os.path.basename(args.shape)[:-5], "seq": args.seq, "batch": args.batch, "skipped": "PyTorch QLoRA needs bitsandbytes"}))
        return
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa").to(device)
    if args.task in ("lora",):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.task == "lora":
            model.enable_input_require_grads()
    if args.compile:
        model = torch.compile(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    # A captured step reads AdamW's step counts from the device (`capturable`): a count on the
    # host would be baked into the graph at its value during capture.
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=fused, capturable=args.cuda_graph)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - load_start

    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(1000)

    def tokens(n, rows):
        return torch.randint(1, vocab, (rows, n), generator=gen).to(device)

    # Autocast's cache of bf16 weights must be off under capture (torch.cuda.graph's notes): each
    # use casts its weight again, which the eager run's cache saves.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-autocast", cache_enabled=not args.cuda_graph)
    if args.task == "dpo":
        prompt_len = args.seq // 2
        micro = []
        for _ in range(args.accum):
            prompt = tokens(prompt_len, args.batch)
            chosen = torch.cat([prompt, tokens(args.seq - prompt_len, args.batch)], dim=1)
            rejected = torch.cat([prompt, tokens(args.seq - prompt_len, args.batch)], dim=1)
            ids = torch.cat([chosen, rejected], dim=0)  # concatenated_forward: chosen rows, then rejected rows
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, prompt_len:] = True
            micro.append((ids, mask))
        ref = torch.tensor([-float(args.seq), -float(args.seq) * 1.1], device=device)
        tokens_per_step = 2 * args.batch * args.seq * args.accum

        def micro_loss(ids, mask):
            logits = model(input_ids=ids).logits[:, :-1]
            labels = ids[:, 1:]
            logps = selective_log_softmax(logits, labels)
            logps = (logps * mask[:, 1:]).sum(-1)
            n = ids.shape[0] // 2
            chosen, rejected = logps[:n], logps[n:]
            margin = (chosen - ref[0]) - (rejected - ref[1])
            return -F.logsigmoid(0.1 * margin).mean()
    else:
        micro = [(tokens(args.seq, args.batch), None) for _ in range(args.accum)]
        tokens_per_step = args.batch * args.seq * args.accum

        def micro_loss(ids, _mask):
            return model(input_ids=ids, labels=ids).loss

    def step_body():
        """One optimizer step over the micro-batches; returns the summed loss (on the device)."""
        total = torch.zeros((), device=device)
        for ids, mask in micro:
            with autocast:
                loss = micro_loss(ids, mask) / args.accum
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return total

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_seconds, losses = [], []
    profiler = None
    graph = None
    if args.cuda_graph:
        try:
            graph, static_total, capture_seconds = capture(step_body, optimizer, max(args.warmup, 1))
        except Exception as e:  # a capture that fails says why in the report, not as a crash
            line = {"impl": "torch", "backend": f"torch-cuda-{args.precision}-graph", "task": args.task, "shape": os.path.basename(args.shape)[:-5], "seq": args.seq, "batch": args.batch}
            print(json.dumps({**line, "error": f"capture failed: {type(e).__name__}: {e}"}), flush=True)
            return 1
        # The warm-up ran before and during capture: every step below replays the graph.
        for step in range(args.steps):
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - start)
            losses.append(float(static_total))
    for step in range(0 if graph else args.warmup + args.steps):
        if step == args.warmup and args.profile:
            # What bench_train's --profile records on libtorch: operators with input shapes, and
            # on CUDA every kernel with its device time.
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            profiler.start()
        start = time.perf_counter()
        total = step_body()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(float(total))
        if step >= args.warmup:
            step_seconds.append(elapsed)

    if profiler is not None:
        profiler.stop()
        os.makedirs(args.profile, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(args.profile, "trace.json"))

    med = statistics.median(step_seconds)
    tps = tokens_per_step / med
    flops = flops_per_token(shape, args.seq)
    tflops = tps * flops / 1e12
    n_params = sum(p.numel() for p in model.parameters())
    line = {
        "impl": "torch",
        "backend": f"torch-{device.type}-{args.precision}" + ("-compile" if args.compile else "") + ("-gc" if args.grad_checkpointing else "") + ("-graph" if graph else ""),
        "shape": os.path.basename(args.shape)[:-5],
        "task": args.task,
        "seq": args.seq,
        "batch": args.batch,
        "accum": args.accum,
        "params": n_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "median_step_seconds": med,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": tps,
        "flops_per_token": flops,
        "achieved_tflops": tflops,
        "mfu": tflops / args.peak_tflops,
        "losses": losses,
        "torch": torch.__version__,
        "profile": os.path.join(args.profile, "trace.json") if args.profile else None,
    }
    if graph is not None:
        line["capture_seconds"] = capture_seconds
    if device.type == "cuda":
        line["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        line["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
