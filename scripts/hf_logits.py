"""Loads a Hugging Face model directory with transformers (CPU, float32) and writes the logits
for the given token ids as JSON. Used by the Rust tests to prove that what we save, transformers
loads and computes identically.

usage: hf_logits.py --model DIR --ids 1,5,9 --out FILE.json
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated token ids (one row)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[int(i) for i in args.ids.split(",")]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    with open(args.out, "w") as f:
        json.dump({"logits": logits.tolist()}, f)
    print(args.out)


if __name__ == "__main__":
    main()
