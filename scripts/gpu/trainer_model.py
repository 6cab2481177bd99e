#!/usr/bin/env python3
"""A model for the example binaries' runs on the device (device_run.sh's `run_trainer`): the
shape of a scripts/gpu/shapes/*.json file, initialised by transformers under a fixed seed and
saved in Hugging Face layout (f32 safetensors), with SmolLM2's tokenizer files beside it, so that
`zephyr_sft`/`zephyr_dpo` load it as they load any local model. Real weights do not fit the
device's 64 MiB carry (SmolLM2-135M in f32 is 540 MB); transformers and torch are on the device.

    python3 trainer_model.py --shape shapes/smollm2-tiny.json --tokenizer DIR --out DIR [--seed 0]

The shape's vocabulary must be the tokenizer's (49152 for SmolLM2's): the loop refuses token ids
beyond the model's embedding.
"""

import argparse
import json
import os
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True)
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with open(args.shape) as f:
        shape = json.load(f)
    shape.pop("torch_dtype", None)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.out, safe_serialization=True)
    copied = []
    for name in TOKENIZER_FILES:
        source = os.path.join(args.tokenizer, name)
        if os.path.isfile(source):
            shutil.copy(source, os.path.join(args.out, name))
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise SystemExit(f"error: {args.tokenizer}: no tokenizer.json")
    parameters = sum(t.numel() for t in model.parameters())
    print(f"{args.out}: {parameters / 1e6:.1f} M parameters ({os.path.basename(args.shape)}, seed {args.seed}), tokenizer files {', '.join(copied)}")


if __name__ == "__main__":
    main()
