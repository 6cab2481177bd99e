"""The types TRL 1.16's trainers give a QLoRA model's trainable parameters, and the types their
saved adapter holds, for tests/qlora_bf16_adapters.rs.

TRL's `SFTTrainer` and `DPOTrainer` cast every trainable parameter of a quantized model to bf16
after wrapping it in PEFT (the QLoRA paper's advice), except DoRA's magnitude vector; an
unquantized model's adapters stay in f32 (PEFT's `autocast_adapter_dtype`). This builds each
trainer on the repo's tiny Llama (crates/models/tests/fixtures/tiny-llama), 4-bit quantized by
bitsandbytes on the CPU (NF4, bf16 compute, as the handbook's QLoRA recipes), with four adapter
configurations, and records per kind of trainable parameter (`lora_A`, `lora_B`,
`lora_magnitude_vector`, `modules_to_save`) the type it trains in, and the types of the tensors
`save_model` writes to adapter_model.safetensors.

usage: make_trl_qlora_goldens.py   (reference venv: scripts/reference_env.sh)
writes tests/fixtures/trl_qlora_dtypes.json
"""
import json
import os
import tempfile

import datasets
import peft
import torch
import transformers
import trl
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "crates/models/tests/fixtures/tiny-llama")
TOKENIZER = os.path.join(ROOT, "crates/data/tests/fixtures/tokenization/tiny-chatml")
OUT = os.path.join(ROOT, "tests/fixtures/trl_qlora_dtypes.json")

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def model(quantized):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quantization if quantized else None, device_map="cpu")


def lora(**extra):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", **extra)


def kind(name):
    """The kind of a trainable parameter or saved tensor; a module saved whole is named
    `...modules_to_save...` in training and by its own name in the adapter file."""
    for k in ("lora_magnitude_vector", "lora_A", "lora_B"):
        if k in name:
            return k
    return "modules_to_save"


def dtypes(named):
    """{kind: dtype} over `named` ((name, dtype) pairs), each kind's dtypes agreeing."""
    out = {}
    for name, dtype in named:
        k, d = kind(name), str(dtype).replace("torch.", "")
        assert out.setdefault(k, d) == d, f"{k}: {out[k]} and {d}"
    return out


def case(trainer_kind, quantized, config):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, report_to=[], bf16=True, use_cpu=True, max_steps=1, per_device_train_batch_size=1)
        if trainer_kind == "sft":
            data = datasets.Dataset.from_list([{"messages": CONVERSATION}] * 2)
            trainer = SFTTrainer(model=model(quantized), args=SFTConfig(**common), train_dataset=data, processing_class=tok,
                                 peft_config=config)
        else:
            data = datasets.Dataset.from_list([{"prompt": CONVERSATION[:1], "chosen": CONVERSATION[1:],
                                                "rejected": [{"role": "assistant", "content": "Bye."}]}] * 2)
            trainer = DPOTrainer(model=model(quantized), args=DPOConfig(**common), train_dataset=data, processing_class=tok,
                                 peft_config=config)
        trained = dtypes((n, p.dtype) for n, p in trainer.model.named_parameters() if p.requires_grad)
        trainer.save_model(out)
        with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
            saved = dtypes((n, f.get_slice(n).get_dtype()) for n in f.keys())
    return {"trained": trained, "saved": {k: v.lower().replace("bf16", "bfloat16").replace("f32", "float32") for k, v in saved.items()}}


def main():
    torch.manual_seed(0)
    cases = {
        "sft-qlora": case("sft", True, lora()),
        "dpo-qlora": case("dpo", True, lora()),
        "sft-qlora-dora": case("sft", True, lora(use_dora=True)),
        "sft-qlora-saved-head": case("sft", True, lora(modules_to_save=["lm_head"])),
        "sft-lora": case("sft", False, lora()),
    }
    golden = {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__, "cases": cases}
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(golden, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
