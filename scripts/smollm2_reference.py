"""Reference outputs of transformers on the converted SmolLM2-135M-Instruct directory, for the
Rust parity test (tests/smollm2_parity.rs). Written next to the model in the cache, not committed.

usage: smollm2_reference.py --model DIR --out FILE.json
Output JSON:
  transformers_version, torch_version,
  prompt_text   apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
  input_ids     apply_chat_template(..., tokenize=True) (checked equal to tokenizing prompt_text
                without special tokens),
  last_logits   float32 logits over the whole vocabulary at the last prompt position,
  logits_rows   per prompt position: top_ids, top_values (5 each, descending), logsumexp, max_abs,
  greedy_ids    20 argmax tokens with the KV cache, not stopped at EOS (checked against
                generate(do_sample=False, use_cache=True) up to where that stops),
  greedy_text   greedy_ids decoded (special tokens kept),
  seconds       wall time of the whole computation.
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
GREEDY_TOKENS = 20


def chat_ids(tokenizer):
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = chat_ids(tokenizer)
    retokenized = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == retokenized, (ids, retokenized)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0]
        # Argmax steps with the KV cache and no stopping at EOS, so all of them can be compared.
        out = model(input_ids=input_ids, use_cache=True)
        greedy = []
        for _ in range(GREEDY_TOKENS):
            token = out.logits[0, -1].argmax()
            greedy.append(int(token))
            out = model(input_ids=token.view(1, 1), cache=out.cache, use_cache=True)
        generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   use_cache=True, max_new_tokens=GREEDY_TOKENS)[0, len(ids):].tolist()
    assert generated == greedy[:len(generated)], (generated, greedy)
    top = logits.topk(5, dim=-1)
    lse = torch.logsumexp(logits, -1)
    max_abs = logits.abs().amax(-1)
    rows = [
        {"top_ids": top.indices[t].tolist(), "top_values": top.values[t].tolist(), "logsumexp": float(lse[t]),
         "max_abs": float(max_abs[t])}
        for t in range(logits.shape[0])
    ]
    result = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt_text": text,
        "input_ids": ids,
        "last_logits": logits[-1].tolist(),
        "logits_rows": rows,
        "greedy_ids": greedy,
        "greedy_text": tokenizer.decode(greedy),
        "seconds": round(time.time() - start, 2),
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(result, f)
    os.chmod(f.name, 0o644)
    os.replace(f.name, args.out)
    print(f"{len(ids)} prompt tokens; reference computed in {result['seconds']:.1f}s; "
          f"greedy: {result['greedy_text']!r}", flush=True)
    print(args.out)


if __name__ == "__main__":
    main()
