"""Generates LoRA adapters with Hugging Face PEFT and the logits PEFT computes with them, for the
Rust parity tests of alignment-peft (crates/peft/tests/peft_parity.rs). Deterministic: rerunning
rewrites identical files.

Each case wraps one of the tiny base models of crates/models/tests/fixtures with
`get_peft_model(LoraConfig(...))` (PEFT's own init: A kaiming-uniform, B zeros), then overwrites
every lora_B with seeded N(0, 0.05²) values (and adds such noise to the trained copies of the
`modules_to_save` case) so the adapter is not a no-op, saves the adapter with
`save_pretrained` (adapter_model.safetensors + adapter_config.json; PEFT's README.md is dropped) and
writes reference.json with the logits of the adapted model (eval mode, float32) on the base
fixture's reference batch (input_ids, attention_mask, position_ids: row 1 left-padded) and of the
merged model (`merge_and_unload`).

The NF4 goldens (crates/peft/tests/fixtures/nf4) come from scripts/make_nf4_goldens.py.

usage: make_peft_goldens.py [--out crates/peft/tests/fixtures]
       (run with the interpreter printed by `bash scripts/reference_env.sh`)
"""
import argparse
import json
import os
import shutil
import tempfile

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM

BASES = "crates/models/tests/fixtures"

CASES = {
    # The plain case: two attention projections, scaling alpha / r = 2.
    "tiny-llama-lora": dict(base="tiny-llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    # rsLoRA (scaling alpha / sqrt(r)) on every linear layer but lm_head ("all-linear").
    "tiny-llama-rslora-all-linear": dict(base="tiny-llama", r=8, lora_alpha=16, target_modules="all-linear",
                                         use_rslora=True),
    # Gemma: tied embeddings, GELU, head_dim != hidden / heads; attention and MLP targets mixed.
    "tiny-gemma-lora": dict(base="tiny-gemma", r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]),
    # modules_to_save: trained copies of the embedding, the head and, by PEFT's plain suffix match,
    # every norm ("norm" also names input_layernorm and post_attention_layernorm).
    # DoRA: trained magnitudes on attention and MLP projections.
    "tiny-llama-dora": dict(base="tiny-llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            use_dora=True),
    "tiny-llama-modules-to-save": dict(base="tiny-llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       modules_to_save=["embed_tokens", "lm_head", "norm"]),
}


def logits(model, ref):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ref["input_ids"]), attention_mask=torch.tensor(ref["attention_mask"]),
                    position_ids=torch.tensor(ref["position_ids"])).logits
    return out.tolist()


def make(name, case, out_root):
    case = dict(case)
    base_dir = os.path.join(BASES, case.pop("base"))
    with open(os.path.join(base_dir, "reference.json")) as f:
        ref = json.load(f)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **case)
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                w = module.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
        # DoRA's magnitudes moved away from their initial norms (by up to ±10 %), so that they matter.
        magnitude_gen = torch.Generator().manual_seed(2468)
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                m = module.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.1 * (torch.rand(m.shape, generator=magnitude_gen) * 2 - 1))
        # The saved modules' trained copies moved away from the base, so that they matter.
        saved_gen = torch.Generator().manual_seed(4321)
        for module_name, module in model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                w = module.modules_to_save["default"].weight
                w.add_(torch.randn(w.shape, generator=saved_gen) * 0.05)
    model.eval()
    adapted = logits(model, ref)

    out_dir = os.path.join(out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        os.makedirs(out_dir)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(os.path.join(tmp, f), os.path.join(out_dir, f))
    # The saved config records the base model's path; keep it repository-relative.
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = base_dir
    if isinstance(saved["target_modules"], list):
        saved["target_modules"] = sorted(saved["target_modules"])
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")

    merged = logits(model.merge_and_unload(), ref)
    result = dict(
        transformers_version=transformers.__version__, peft_version=peft.__version__, torch_version=torch.__version__,
        base=base_dir, input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
        position_ids=ref["position_ids"], logits=adapted, merged_logits=merged,
        notes="logits at positions where attention_mask is 0 are padding and must be ignored",
    )
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(result, f, separators=(",", ":"))
    print(out_dir)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="crates/peft/tests/fixtures")
    args = parser.parse_args()
    for name, case in CASES.items():
        make(name, case, args.out)


if __name__ == "__main__":
    main()
