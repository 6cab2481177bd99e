"""TRL's side of the CPU training benchmark (scripts/bench_cpu.sh): TRL 1.16's `SFTTrainer` or
`DPOTrainer` on SmolLM2-135M-Instruct with the repo's SmolLM2 CPU recipe's settings, timed the way
our trainer times itself, printing one JSON line.

Same model (the transformers copy of the GGUF our runs load, scripts/convert_smollm2.py), same
rows (data/tiny-chat, the recipe's split), same template (the recipe's `chat_template`, with its
`{% generation %}` markers for `assistant_only_loss`), same shapes (`max_length`, batch,
gradient accumulation), f32 (`bf16=False`), the recipe's `gradient_checkpointing` (false in the
SmolLM2 CPU recipes, as ours; TRL 1.16 defaults it to true, which this script left on before
2026-12-05, so TRL recomputed every layer in those runs and ours did not), AdamW, clipping at
1.0, no evaluation or saving.
DPO precomputes the reference log-probs before training (`precompute_ref_log_probs=True`), as
ours does, so the timed steps run the policy only.

tokens/s counts real (non-padding) tokens of the forward passes (the collated `attention_mask`;
DPO's holds the chosen and the rejected rows), over the wall time from the end of the warm-up's
last optimizer step to the end of the last one — data collation, forward, backward, clipping and
the optimizer update included, as in our `tokens_per_second`.

usage: bench_cpu_trl.py --task sft|dpo --model DIR --recipe YAML [--steps 12] [--warmup 2]
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import datasets
import torch
import transformers
import trl
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Timer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def counting(trainer_class):
    """`trainer_class` counting each optimizer step's real tokens (summed over its micro-batches)."""

    class Counting(trainer_class):
        step_tokens = []
        _pending = 0
        _micro = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self._pending += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self._micro += 1
            if self._micro % self.args.gradient_accumulation_steps == 0:
                self.step_tokens.append(self._pending)
                self._pending = 0
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=["sft", "dpo"], required=True)
    parser.add_argument("--model", required=True, help="transformers copy of SmolLM2-135M-Instruct")
    parser.add_argument("--recipe", required=True, help="the repo's CPU recipe whose settings to use")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with open(args.recipe, encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    [(data_dir, _fraction)] = recipe["dataset_mixer"].items()
    split = recipe["dataset_splits"][0]
    rows = read_jsonl(os.path.join(REPO, data_dir, f"{split}.jsonl"))
    tok = AutoTokenizer.from_pretrained(args.model)
    if "chat_template" in recipe:
        tok.chat_template = recipe["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=tmp, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=recipe.get("seed", 42),
            dataloader_num_workers=0, max_steps=args.steps, logging_steps=10**6, save_strategy="no", eval_strategy="no",
            per_device_train_batch_size=recipe["per_device_train_batch_size"],
            gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
            learning_rate=recipe["learning_rate"], lr_scheduler_type=recipe["lr_scheduler_type"],
            warmup_steps=recipe.get("warmup_ratio", 0.0), weight_decay=recipe.get("weight_decay", 0.0),
            max_grad_norm=recipe.get("max_grad_norm", 1.0),
            gradient_checkpointing=recipe.get("gradient_checkpointing", False),
        )
        if args.task == "sft":
            config = SFTConfig(**common, max_length=recipe["max_seq_length"], packing=recipe.get("packing", False),
                               assistant_only_loss=recipe.get("assistant_only_loss", False))
            train = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
            trainer = counting(SFTTrainer)(model=model, args=config, train_dataset=train, processing_class=tok,
                                           callbacks=[timer])
        else:
            config = DPOConfig(**common, max_length=recipe["max_length"], beta=recipe["beta"],
                               loss_type=[recipe.get("loss_type", "sigmoid")], precompute_ref_log_probs=True)
            train = datasets.Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
            trainer = counting(DPOTrainer)(model=model, ref_model=None, args=config, train_dataset=train,
                                           processing_class=tok, callbacks=[timer])
        trainer.train()

    tokens = trainer.step_tokens
    ends = timer.ends
    assert len(ends) == args.steps and len(tokens) == args.steps, (len(ends), len(tokens))
    timed = range(args.warmup, args.steps)
    step_seconds = [ends[i] - ends[i - 1] for i in timed]
    timed_tokens = sum(tokens[i] for i in timed)
    print(json.dumps({
        "side": "trl", "task": args.task, "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "threads": torch.get_num_threads(), "steps": len(step_seconds),
        "median_step_s": statistics.median(step_seconds), "tokens": timed_tokens,
        "tokens_per_second": timed_tokens / sum(step_seconds),
    }))


if __name__ == "__main__":
    main()
