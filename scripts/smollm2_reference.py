"""Reference outputs of transformers on the converted SmolLM2-135M-Instruct directory, for the
Rust parity test (tests/smollm2_parity.rs). Written next to the model in the cache, not committed.

usage: smollm2_reference.py --model DIR --out FILE.json
Output JSON: prompt_text, input_ids, last_logits (full vocabulary at the last prompt position),
logits_rows (per position: top_ids, top_values (5 each), logsumexp), greedy_ids (20 argmax tokens, not stopped at EOS),
greedy_text, transformers_version.
"""
import argparse
import json
import os
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        # 20 argmax steps with the KV cache and no stopping at EOS, so all 20 tokens are compared.
        out = model(input_ids=ids, use_cache=True)
        greedy = []
        for _ in range(20):
            token = out.logits[0, -1].argmax()
            greedy.append(int(token))
            out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    top = logits.topk(5, dim=-1)
    rows = [
        {"top_ids": top.indices[t].tolist(), "top_values": top.values[t].tolist(), "logsumexp": float(torch.logsumexp(logits[t], -1))}
        for t in range(logits.shape[0])
    ]
    new = torch.tensor(greedy)
    result = {
        "transformers_version": transformers.__version__,
        "prompt_text": text,
        "input_ids": ids[0].tolist(),
        "last_logits": logits[-1].tolist(),
        "logits_rows": rows,
        "greedy_ids": new.tolist(),
        "greedy_text": tokenizer.decode(new),
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(result, f)
    os.replace(f.name, args.out)
    print(f"reference computed in {time.time() - start:.1f}s: {result['greedy_text']!r}", flush=True)
    print(args.out)


if __name__ == "__main__":
    main()
