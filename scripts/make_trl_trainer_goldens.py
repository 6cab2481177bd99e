"""Golden outputs of TRL 1.16's own trainers on the repo's tiny-chat test rows, for
tests/trl_trainers.rs: what `SFTTrainer`, `DPOTrainer` and `ORPOTrainer` make of every row (token
ids, labels, prompt/completion split, truncation, dropped rows) and the metrics their
`evaluate()` returns.

This is what today's handbook does (`scripts/sft.py`, `scripts/dpo.py`, `scripts/orpo.py`): hand
the trainers the dataset rows as they are — conversations, no handbook formatting — and evaluate.
Here on CPU, with SmolLM2-135M-Instruct's tokenizer and two chat templates: SmolLM2's own (which
adds a default system prompt) and the handbook's Zephyr template.

Rows handed to TRL (the Rust test rebuilds them from data/tiny-chat/test_*.jsonl by `rows`):
- `messages`: `{"messages": ...}`, the handbook's `columns: [messages]`;
- `prompt-completion`: `{"prompt": messages[:-1], "completion": messages[-1:]}`;
- `chosen-rejected`: `{"chosen": ..., "rejected": ...}`, the handbook's `columns: [chosen, rejected]`
  (implicit prompt: TRL extracts it);
- `explicit-prompt`: `{"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}`.

Models. Two small Llamas with SmolLM2's vocabulary (`tiny-policy`, `tiny-reference`: hidden 32, 2
layers) whose weights are a counter-based hash of (seed, tensor index, element index)
(`hashed_weights`; the Rust test writes the same safetensors without Python), on every row; and
the real SmolLM2-135M-Instruct (scripts/convert_smollm2.py) on the first rows with its own
template. DPO's reference model is `tiny-reference`. Token ids are checked on every row; metrics
(`metrics`, null for token-only cases) on the first `metric_rows` rows, to keep the Rust test fast.
All in float32 (`bf16=False`, which TRL's configs otherwise default to, autocasting on CPU too).

`assistant_only_loss`: TRL 1.16 refuses templates without `{% generation %}` markers it has no
training variant of (SmolLM2's, Zephyr), so TRL gets the same templates with markers around what
an assistant turn adds after the generation prompt (checked to render byte-identical text); the
Rust test gives its runs the same marked templates (the data crate's chat-template fixtures).

Compact encoding (asserted against TRL's output here): per template, `sft_ids` holds each row's
tokenized conversation; an SFT case's example is `{"span": [start, end]}` (the slice of those ids
TRL kept, omitted when whole) and `labels`, the [start, end) ranges where the label is the token
id (elsewhere -100). `dpo_ids` holds each row's `prompt_ids`/`chosen_ids`/`rejected_ids`; a DPO
case lists the rows TRL kept. `orpo` holds each row's `ORPOTrainer.tokenize_row` prompt and
answers (labels are -100 on the prompt, the ids on the answer); a case lists each kept row's
answer lengths after truncation.

usage: make_trl_trainer_goldens.py [--smollm2 DIR]   (reference venv: scripts/reference_env.sh)
writes tests/fixtures/trl_trainers.json
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import datasets
import numpy as np
import peft
import torch
import transformers
import trl
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tokenization_goldens import CHATML, CHATML_GENERATION, ZEPHYR, ZEPHYR_GENERATION  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "data/tiny-chat")
OUT = os.path.join(ROOT, "tests/fixtures/trl_trainers.json")
# SmolLM2's template (its tokenizer's own) and the handbook's Zephyr template, each with an
# equivalent marked with {% generation %} for assistant_only_loss.
TEMPLATES = {"smollm2": (None, CHATML_GENERATION), "zephyr": (ZEPHYR, ZEPHYR_GENERATION)}
# Metrics are taken on the first rows only (the tiny models' 49152-entry vocabulary makes each
# token cost milliseconds on the Rust side's CPU backend): 8 rows in batches of 6 (a full batch
# and a partial one, so the batch averaging is exercised). Token ids are checked on every row.
METRIC_ROWS, EVAL_BATCH = 8, 6
PACKED_EVAL_BATCH = 3  # the packed rows of the METRIC_ROWS conversations make several batches
ROW_HEAD = 6  # tokens recorded from the start of each shuffled packed row
LORA_DROPOUT = 0.05  # the handbook's LoRA recipes'
SMOLLM2_ROWS, SMOLLM2_BATCH = 3, 2  # the real 135M model: 3 rows, batches of 2 and 1
BETA = 0.1

# The tiny models: Llama, SmolLM2's vocabulary and special tokens, tied embeddings.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0)
TINY_SEEDS = {"tiny-policy": 1, "tiny-reference": 2}


def tensor_specs(config):
    """(name, shape, scale, offset) in the order that numbers the tensors: value = offset + scale * u, u in [-1, 1)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    specs = [("model.embed_tokens.weight", [v, h], 1.0, 0.0)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", [h], 0.1, 1.0),
            (p + "self_attn.q_proj.weight", [h, h], 0.5, 0.0),
            (p + "self_attn.k_proj.weight", [kv, h], 0.5, 0.0),
            (p + "self_attn.v_proj.weight", [kv, h], 0.5, 0.0),
            (p + "self_attn.o_proj.weight", [h, h], 0.5, 0.0),
            (p + "post_attention_layernorm.weight", [h], 0.1, 1.0),
            (p + "mlp.gate_proj.weight", [i, h], 0.5, 0.0),
            (p + "mlp.up_proj.weight", [i, h], 0.5, 0.0),
            (p + "mlp.down_proj.weight", [h, i], 0.5, 0.0),
        ]
    specs.append(("model.norm.weight", [h], 0.1, 1.0))
    return specs


def hashed_uniform(seed, index, n):
    """u in [-1, 1) for elements 0..n of tensor `index`: splitmix64's finaliser of
    (seed << 48 | index << 32 | element) * 0x9E3779B97F4A7C15, top 53 bits."""
    z = (np.uint64((seed << 48) | (index << 32)) + np.arange(n, dtype=np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53) * 2.0 - 1.0


def hashed_weights(config, seed):
    out = {}
    for index, (name, shape, scale, offset) in enumerate(tensor_specs(config)):
        n = int(np.prod(shape))
        values = (offset + scale * hashed_uniform(seed, index, n)).astype(np.float32)
        out[name] = torch.from_numpy(values.reshape(shape))
    return out


def make_tiny(out, config_dict, seed):
    os.makedirs(out, exist_ok=True)
    LlamaConfig(**config_dict).save_pretrained(out)
    weights = hashed_weights(config_dict, seed)
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    embed = weights["model.embed_tokens.weight"]
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        saved_config = json.load(f)
    return {"seed": seed, "embed_first": [float(x) for x in embed.reshape(-1)[:4]], "embed_sum": float(embed.double().sum()),
            "config": saved_config}


def read_jsonl(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def tokenizer_for(smollm2, template):
    tok = AutoTokenizer.from_pretrained(smollm2)
    if template is not None:
        tok.chat_template = template
    return tok


def common_args(tmp, batch):
    # bf16=False: TRL's configs default to bf16 autocast (on CPU too); ours computes in f32 on the CPU backend.
    return dict(output_dir=tmp, per_device_eval_batch_size=batch, report_to="none", use_cpu=True, seed=42,
                dataloader_num_workers=0, disable_tqdm=True, bf16=False)


def evaluate(trainer, metric_rows):
    if metric_rows is None:
        return None
    metrics = trainer.evaluate()
    drop = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "eval_num_tokens",
            "eval_model_preparation_time")
    out = {k: float(v) for k, v in metrics.items() if k not in drop}
    assert all(math.isfinite(v) for v in out.values()), out
    return out


def with_idx(rows):
    return datasets.Dataset.from_list([dict(r, idx=i) for i, r in enumerate(rows)])


def spans(labels, ids):
    """[start, end) ranges where labels == ids; asserts every other label is -100."""
    out, start = [], None
    for t, (label, token) in enumerate(zip(labels, ids)):
        if label == token:
            if start is None:
                start = t
        else:
            assert label == -100, (label, token)
            if start is not None:
                out.append([start, t])
                start = None
    if start is not None:
        out.append([start, len(ids)])
    return out


def truncation_slice(whole, part):
    """[start, end) of `part` in `whole`: its head (keep_start) or its tail (keep_end)."""
    if whole[:len(part)] == part:
        return [0, len(part)]
    assert whole[len(whole) - len(part):] == part, "TRL's ids are neither the head nor the tail of the row's tokens"
    return [len(whole) - len(part), len(whole)]


class Template:
    """One template's cases and the shared token tables they refer to."""

    def __init__(self, name, tok, marked_tok, rows):
        self.name, self.tok, self.marked_tok, self.rows = name, tok, marked_tok, rows
        self.sft_ids, self.dpo_ids, self.orpo = {}, {}, {}
        self.cases = []

    def sft(self, case, model, rows_kind, max_length, truncation_mode="keep_start", assistant_only=False, metric_rows=None,
            batch=EVAL_BATCH, shuffle=False):
        """SFT on unpacked rows; with `shuffle`, TRL's `shuffle_dataset=True`, whose training rows'
        order (`order`, by row index) is recorded and whose evaluation rows are shuffled too."""
        rows = self.rows[rows_kind]
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(**common_args(tmp, batch), max_length=max_length, truncation_mode=truncation_mode,
                             assistant_only_loss=assistant_only, shuffle_dataset=shuffle)
            tok = self.marked_tok if assistant_only else self.tok
            evals = with_idx(rows[:metric_rows or 1])
            trainer = SFTTrainer(model=model, args=args, train_dataset=with_idx(rows), eval_dataset=evals, processing_class=tok)
            examples = {}
            for r in trainer.train_dataset:
                row = str(r["idx"])
                ids = r["input_ids"]
                if row not in self.sft_ids:
                    assert max_length is None or len(ids) < max_length, "the first SFT case must not truncate"
                    self.sft_ids[row] = ids
                entry = {"labels": spans(r["labels"], ids)}
                if ids != self.sft_ids[row]:
                    entry["span"] = truncation_slice(self.sft_ids[row], ids)
                examples[row] = entry
            shuffled = {}
            if shuffle:
                order = [r["idx"] for r in trainer.train_dataset]
                assert order != sorted(order), "shuffle_dataset left the rows in order"
                shuffled = dict(shuffle_dataset=True, order=order)
            self.add(case, "sft", model, rows_kind, batch, metric_rows, evaluate(trainer, metric_rows), examples=examples,
                     max_length=max_length, truncation_mode=truncation_mode, assistant_only_loss=assistant_only, **shuffled)

    def sft_packed(self, case, model, rows_kind, max_length, strategy, metric_rows, batch, eval_packing=None, shuffle=False):
        """SFT with `packing=True`: TRL packs the evaluation rows too (`eval_packing` unset), so its
        metrics are those of the packed rows: documents kept apart by `bfd` and `bfd_split`
        (padding-free batches, positions per document, each document's first label dropped) and
        sharing attention under `wrapped`. Evaluated in batches of PACKED_EVAL_BATCH packed rows, so
        that `eval_loss` averages several batches, each weighted by its rows of the packed dataset
        (accelerate's `gather_for_metrics` keeps the last batch's remainder), a padding-free batch
        too, although its collator flattens it into one row. With `shuffle` (`shuffle_dataset=True`:
        the rows shuffled before packing and the packed rows again), the packed evaluation rows'
        documents (`seq_lengths`) and first tokens (`row_heads`) are recorded in TRL's order."""
        rows = self.rows[rows_kind][:metric_rows]
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(**common_args(tmp, batch), max_length=max_length, packing=True, packing_strategy=strategy,
                             eval_packing=eval_packing, shuffle_dataset=shuffle)
            evals = datasets.Dataset.from_list(rows)
            trainer = SFTTrainer(model=model, args=args, train_dataset=evals, eval_dataset=evals, processing_class=self.tok)
            packed = trainer.eval_dataset
            assert len(packed) > batch, f"{len(packed)} packed rows make one evaluation batch of {batch}"
            if strategy != "wrapped" and eval_packing is not False:
                assert any(len(r["seq_lengths"]) > 1 for r in packed), "no packed row holds two documents"
            settings = dict(max_length=max_length, packing_strategy=strategy, packed_rows=len(packed))
            if eval_packing is not None:
                settings["eval_packing"] = eval_packing
            if shuffle:
                # Each row's documents (a wrapped row is one) and first tokens, in TRL's order.
                settings.update(shuffle_dataset=True, seq_lengths=[list(r.get("seq_lengths", [len(r["input_ids"])])) for r in packed],
                                row_heads=[list(r["input_ids"][:ROW_HEAD]) for r in packed])
            self.add(case, "sft", model, rows_kind, batch, metric_rows, evaluate(trainer, metric_rows), **settings)

    def dpo(self, case, model, ref, rows_kind, max_length, truncation_mode="keep_start", metric_rows=None, batch=EVAL_BATCH):
        rows = self.rows[rows_kind]
        with tempfile.TemporaryDirectory() as tmp:
            args = DPOConfig(**common_args(tmp, batch), max_length=max_length, truncation_mode=truncation_mode, beta=BETA,
                             loss_type=["sigmoid"])
            evals = with_idx(rows[:metric_rows or 1])
            trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=with_idx(rows), eval_dataset=evals,
                                 processing_class=self.tok)
            kept = []
            for r in trainer.train_dataset:
                row = str(r["idx"])
                ids = {k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                assert self.dpo_ids.setdefault(row, ids) == ids, "DPO's ids differ between cases"
                kept.append(int(row))
            self.add(case, "dpo", model, rows_kind, batch, metric_rows, evaluate(trainer, metric_rows), kept=kept, max_length=max_length,
                     truncation_mode=truncation_mode, beta=BETA)

    def orpo_case(self, case, model, rows_kind, max_length, metric_rows=None, batch=EVAL_BATCH):
        rows = self.rows[rows_kind]
        with tempfile.TemporaryDirectory() as tmp:
            args = ORPOConfig(**common_args(tmp, batch), max_length=max_length, beta=BETA)
            evals = with_idx(rows[:metric_rows or 1])
            trainer = ORPOTrainer(model=model, args=args, train_dataset=with_idx(rows), eval_dataset=evals,
                                  processing_class=self.tok)
            lengths = {}
            for r in trainer.train_dataset:
                row = str(r["idx"])
                entry, answer_lengths = {}, []
                for side in ("chosen", "rejected"):
                    ids, labels = r[f"{side}_input_ids"], r[f"{side}_labels"]
                    prompt_len = sum(1 for label in labels if label == -100)
                    assert labels == [-100] * prompt_len + ids[prompt_len:], "ORPO labels: -100 on the prompt, ids after"
                    entry[f"{side}_prompt"], entry[side] = ids[:prompt_len], ids[prompt_len:]
                    answer_lengths.append(len(ids) - prompt_len)
                if entry["rejected_prompt"] == entry["chosen_prompt"]:
                    del entry["rejected_prompt"]
                entry["prompt"] = entry.pop("chosen_prompt")
                assert answer_lengths[0] > 0 and answer_lengths[1] > 0, "an empty ORPO completion makes TRL's metrics NaN"
                full = self.orpo.setdefault(row, entry)
                for side in ("chosen", "rejected"):
                    assert full[side][:len(entry[side])] == entry[side], "a truncated ORPO answer is a prefix of the whole"
                lengths[row] = answer_lengths
            self.add(case, "orpo", model, rows_kind, batch, metric_rows, evaluate(trainer, metric_rows), answer_lengths=lengths,
                     max_length=max_length, beta=BETA)

    def add(self, case, objective, model, rows_kind, batch, metric_rows, metrics, **settings):
        entry = {"name": f"{self.name}/{case}", "objective": objective, "template": self.name, "model": model.name,
                 "rows": rows_kind, "batch": batch, "metric_rows": metric_rows, **settings, "metrics": metrics}
        print(f"{entry['name']}: {metrics}", file=sys.stderr)
        self.cases.append(entry)


def lora_dropout_in_training(model, tok, rows):
    """The dropout probability of PEFT's `lora_dropout` modules in each trainer's model, LoRA
    configured with `lora_dropout=LORA_DROPOUT`: TRL's DPO and ORPO trainers zero every dropout
    module after wrapping the model (`disable_dropout`, default True); its SFT trainer does not."""
    out = {}
    sft_rows = datasets.Dataset.from_list(rows["messages"][:2])
    pref_rows = datasets.Dataset.from_list(rows["chosen-rejected"][:2])
    for case, make in (
        ("sft", lambda tmp: SFTTrainer(model=copy.deepcopy(model), args=SFTConfig(**common_args(tmp, 1)), train_dataset=sft_rows,
                                       processing_class=tok, peft_config=lora_config())),
        ("dpo", lambda tmp: DPOTrainer(model=copy.deepcopy(model), args=DPOConfig(**common_args(tmp, 1)), train_dataset=pref_rows,
                                       processing_class=tok, peft_config=lora_config())),
        ("dpo disable_dropout false", lambda tmp: DPOTrainer(
            model=copy.deepcopy(model), args=DPOConfig(**common_args(tmp, 1), disable_dropout=False), train_dataset=pref_rows,
            processing_class=tok, peft_config=lora_config())),
        ("orpo", lambda tmp: ORPOTrainer(model=copy.deepcopy(model), args=ORPOConfig(**common_args(tmp, 1)), train_dataset=pref_rows,
                                         processing_class=tok, peft_config=lora_config())),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make(tmp)
            ps = {m.p for name, m in trainer.model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)}
            assert len(ps) == 1, (case, ps)
            out[case] = ps.pop()
            print(f"lora_dropout in training, {case}: {out[case]}", file=sys.stderr)
    return out


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=LORA_DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")


def check_generation_template(tok, marked, rows):
    for r in rows:
        plain = tok.apply_chat_template(r["messages"], tokenize=False)
        with_markers = tok.apply_chat_template(r["messages"], tokenize=False, chat_template=marked)
        assert plain == with_markers, (plain, with_markers)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct directory (default: convert_smollm2.py's)")
    args = parser.parse_args()
    start = time.time()
    smollm2 = args.smollm2 or subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts/convert_smollm2.py")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1]

    base_tok = AutoTokenizer.from_pretrained(smollm2)
    assert base_tok.chat_template == CHATML, "SmolLM2's template changed; update make_tokenization_goldens.CHATML"
    tiny_config = dict(TINY, vocab_size=len(base_tok), bos_token_id=base_tok.bos_token_id,
                       eos_token_id=base_tok.eos_token_id, pad_token_id=base_tok.pad_token_id)
    models, tiny = {}, {}
    with tempfile.TemporaryDirectory() as model_dir:
        for name, seed in TINY_SEEDS.items():
            tiny[name] = make_tiny(os.path.join(model_dir, name), tiny_config, seed)
            models[name] = load_model(os.path.join(model_dir, name))
            models[name].name = name
    policy, reference = models["tiny-policy"], models["tiny-reference"]

    sft_raw, prefs_raw = read_jsonl("test_sft.jsonl"), read_jsonl("test_prefs.jsonl")
    rows = {
        "messages": [{"messages": r["messages"]} for r in sft_raw],
        "prompt-completion": [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in sft_raw],
        "chosen-rejected": [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in prefs_raw],
        "explicit-prompt": [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                            for r in prefs_raw],
    }

    templates = {}
    for name, (template, marked) in TEMPLATES.items():
        tok, marked_tok = tokenizer_for(smollm2, template), tokenizer_for(smollm2, marked)
        check_generation_template(tok, marked, rows["messages"])
        t = templates[name] = Template(name, tok, marked_tok, rows)
        # Metrics where the token checks do not already cover the final sequences (the main cases,
        # and DPO's truncation, which its collator applies); token checks only for the others.
        m = METRIC_ROWS
        t.sft("sft", policy, "messages", 256, metric_rows=m)
        t.sft("sft assistant_only_loss", policy, "messages", 256, assistant_only=True, metric_rows=m)
        t.sft("sft max_length 40", policy, "messages", 40)
        t.sft("sft max_length 40 keep_end", policy, "messages", 40, truncation_mode="keep_end")
        t.sft("sft assistant_only_loss max_length 40", policy, "messages", 40, assistant_only=True)
        t.sft("sft prompt-completion", policy, "prompt-completion", 256, metric_rows=m)
        # `shuffle_dataset`: the evaluation batches hold other rows, so `eval_loss` averages others.
        t.sft("sft shuffle_dataset", policy, "messages", 256, metric_rows=m, shuffle=True)
        # Rows of 160 tokens pair the conversations (66-114 tokens); at 100 the longest is cut
        # (bfd_split: its last piece packed beside another conversation; wrapped: across rows).
        for strategy, length in (("bfd", 160), ("bfd_split", 100), ("wrapped", 100)):
            t.sft_packed(f"sft packed {strategy} max_length {length}", policy, "messages", length, strategy, m, PACKED_EVAL_BATCH)
        # `eval_packing: false`: the evaluation rows stay whole (truncated to max_length, as unpacked SFT).
        t.sft_packed("sft packed bfd eval_packing false max_length 100", policy, "messages", 100, "bfd", m, PACKED_EVAL_BATCH,
                     eval_packing=False)
        # `shuffle_dataset` with packing: shuffled before packing (other rows share a row; wrapped
        # concatenates them in another order) and the packed rows shuffled again.
        for strategy, length in (("bfd", 160), ("wrapped", 100)):
            t.sft_packed(f"sft packed {strategy} shuffle_dataset max_length {length}", policy, "messages", length, strategy, m,
                         PACKED_EVAL_BATCH, shuffle=True)
        t.dpo("dpo", policy, reference, "chosen-rejected", 256, metric_rows=m)
        t.dpo("dpo explicit prompt", policy, reference, "explicit-prompt", 256)
        t.dpo("dpo max_length 48", policy, reference, "chosen-rejected", 48, metric_rows=m)
        t.dpo("dpo max_length 48 keep_end", policy, reference, "chosen-rejected", 48, truncation_mode="keep_end", metric_rows=m)
        t.orpo_case("orpo", policy, "chosen-rejected", 256, metric_rows=m)
        t.orpo_case("orpo explicit prompt", policy, "explicit-prompt", 256)
        t.orpo_case("orpo max_length 80", policy, "chosen-rejected", 80)
        truncated = [n for n, (c, r) in t.cases[-1]["answer_lengths"].items()
                     if c < len(t.orpo[n]["chosen"]) or r < len(t.orpo[n]["rejected"])]
        assert truncated, "the ORPO max_length case truncates nothing"

    # The real model on the first rows, SmolLM2's own template.
    real = load_model(smollm2)
    real.name = "smollm2"
    t = templates["smollm2"]
    n, b = SMOLLM2_ROWS, SMOLLM2_BATCH
    t.sft("SmolLM2-135M sft", real, "messages", 256, metric_rows=n, batch=b)
    t.sft("SmolLM2-135M sft assistant_only_loss", real, "messages", 256, assistant_only=True, metric_rows=n, batch=b)
    t.dpo("SmolLM2-135M dpo", real, reference, "chosen-rejected", 256, metric_rows=n, batch=b)
    t.orpo_case("SmolLM2-135M orpo", real, "chosen-rejected", 256, metric_rows=n, batch=b)

    out = {
        "about": f"made by scripts/make_trl_trainer_goldens.py with trl {trl.__version__}, transformers "
                 f"{transformers.__version__}, torch {torch.__version__}",
        "zephyr_template": ZEPHYR,
        "tiny_models": tiny,
        "reference_model": "tiny-reference",
        "lora_dropout": LORA_DROPOUT,
        "lora_dropout_in_training": lora_dropout_in_training(policy, templates["smollm2"].tok, rows),
        "templates": {name: {"sft_ids": t.sft_ids, "dpo_ids": t.dpo_ids, "orpo": t.orpo} for name, t in templates.items()},
        "cases": [c for t in templates.values() for c in t.cases],
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(out['cases'])} cases) in {time.time() - start:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
