"""Reference log-likelihoods for the evaluation tests (tests/evaluation_smollm2.rs): what
lm-evaluation-harness' HFLM computes for `loglikelihood` requests, with transformers on the given
model directory (float32).

It restates the harness' steps (lm_eval/api/model.py `loglikelihood` and `_encode_pair`,
lm_eval/models/huggingface.py `tok_encode` and `_loglikelihood_tokens`) rather than importing the
harness, which is not in the reference environment:
  - empty context: the continuation is tokenized without special tokens and the prefix token
    (BOS, else EOS) is the context (or the continuation's first token when it is that token);
  - otherwise trailing spaces of the context move to the continuation, `context + continuation` and
    `context` are tokenized (special tokens added unless the text starts with the BOS text) and the
    continuation is what follows the context's tokens;
  - the model reads (context + continuation)[-(max_length + 1):][:-1]; the log-likelihood is the sum
    of log_softmax(logits) over the continuation tokens, `is_greedy` whether each is the argmax.

usage: loglikelihood_reference.py --model DIR --request FILE.json --out FILE.json
Request JSON: {"requests": [[context, continuation], ...]}
Output JSON: {"transformers_version", "results": [{"context_ids", "continuation_ids", "logprob", "is_greedy"}]}
"""
import argparse
import json
import os
import tempfile

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.request) as f:
        requests = json.load(f)["requests"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    max_length = model.config.max_position_embeddings
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def tok_encode(text):
        add = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        return tokenizer.encode(text, add_special_tokens=add)

    results = []
    for context, continuation in requests:
        if context == "":
            cont = tokenizer.encode(continuation, add_special_tokens=False)
            ctx, cont = ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
        else:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces > 0:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            whole = tok_encode(context + continuation)
            ctx = tok_encode(context)
            cont = whole[len(ctx):]
        inp = torch.tensor([(ctx + cont)[-(max_length + 1):][:-1]])
        with torch.no_grad():
            logprobs = F.log_softmax(model(inp).logits[0], dim=-1)
        scored = logprobs[-len(cont):]
        target = torch.tensor(cont)
        logprob = float(scored.gather(1, target[:, None]).sum())
        greedy = bool((scored.argmax(-1) == target).all())
        results.append({"context_ids": ctx, "continuation_ids": cont, "logprob": logprob, "is_greedy": greedy})
    out = {"transformers_version": transformers.__version__, "results": results}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        json.dump(out, f)
    os.replace(f.name, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
