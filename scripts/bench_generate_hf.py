"""transformers' side of the generation benchmark (examples/bench_generate.rs) and of the batched
generation parity test: greedy `generate` on left-padded batches of the given prompt ids.

usage: bench_generate_hf.py --model DIR --request FILE.json --out FILE.json
Request JSON: {"prompts": [[ids...], ...], "batch_sizes": [1, 8], "new_tokens": 64, "repeats": 2,
               "threads": 0 (torch default)}
  For each batch size b, the first b prompts are left-padded (pad = eos) and generated greedily for
  exactly new_tokens tokens (no stopping at EOS, so both sides produce the same number of tokens),
  with the KV cache, float32, transformers' default attention. The first run warms up; the best of
  `repeats` timed runs is reported (repeats 0: one run, no warm-up, for tests that need the tokens).
Output JSON: {"transformers_version", "torch_version", "threads",
              "runs": [{"batch_size", "seconds", "tokens_per_second", "tokens": [[ids...], ...]}]}
"""
import argparse
import json
import os
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.request) as f:
        request = json.load(f)
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    pad = model.config.eos_token_id
    # Never stop at EOS: both sides generate exactly new_tokens tokens.
    model.generation_config.eos_token_id = None
    pad = pad[0] if isinstance(pad, list) else pad
    new_tokens = int(request["new_tokens"])
    runs = []
    for batch_size in request["batch_sizes"]:
        prompts = request["prompts"][:batch_size]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def run():
            with torch.no_grad():
                return model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, do_sample=False, use_cache=True,
                    max_new_tokens=new_tokens, pad_token_id=pad,
                    temperature=None, top_p=None, top_k=None,
                )

        repeats = int(request.get("repeats", 1))
        if repeats > 0:
            run()  # warm-up
        best = None
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        tokens = out[:, width:].tolist()
        runs.append({"batch_size": batch_size, "seconds": best, "tokens_per_second": batch_size * new_tokens / best,
                     "tokens": tokens})
        print(f"transformers batch {batch_size}: {batch_size * new_tokens / best:.1f} tokens/s", flush=True)
    result = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
              "threads": torch.get_num_threads(), "runs": runs}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(result, f)
    os.replace(f.name, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
