"""Golden per-task formatting, tokenization and packing, for crates/data/tests/tokenization_golden.rs
and tests/data_tokenization_golden.rs.

What is reproduced, and by what:

* Formatting (tasks sft / generation / rm / dpo / orpo) follows alignment-handbook v0.4's
  `apply_chat_template` + `maybe_insert_system_message` (src/alignment/data.py, the version with
  the `prompt` column, `orpo` and the leading-BOS strip of chosen/rejected). The handbook is not on
  PyPI, so `handbook_format` below re-states its rules; the rendering itself is transformers'
  `apply_chat_template(..., tokenize=False)`.
* TRL's own path for the rows as today's handbook hands them over (no handbook formatting), the
  default of the Rust runs: `trl_sft` (SFTTrainer on `messages`, on conversational and text
  `prompt`/`completion` rows with its default completion-only loss, and with
  `assistant_only_loss`) and `trl_preference` (`maybe_extract_prompt`, then `DPOTrainer`'s
  tokenization and `ORPOTrainer`'s `maybe_apply_chat_template` + `tokenize_row`), on the pairs
  above and on TRL_ONLY_PAIRS.
* Tokenization is TRL 1.16's own code, called directly:
  - SFT / CPT on the handbook's `text` column: `SFTTrainer._prepare_dataset` (adds the EOS text when
    missing, tokenizes with special tokens, labels = ids, truncates keep_start, drops rows with no
    label), on a stand-in `self`.
  - SFT with `assistant_only_loss=True` on `messages`: the same function, with a ChatML / Zephyr
    template that has `{% generation %}` markers around what the assistant turn adds after the
    generation prompt; labels come from transformers' `return_assistant_tokens_mask`.
  - DPO: `DPOTrainer._prepare_dataset` (string and conversational inputs) and
    `DataCollatorForPreference` (concatenation, truncation keep_start / keep_end, completion mask).
  - ORPO: `trl.experimental.orpo.ORPOTrainer.tokenize_row` (BOS/EOS added when missing, completion
    truncated to max_length - prompt length, labels -100 on the prompt).
  - Packing: `trl.data_utils.pack_dataset(strategy="bfd")`.

Two tokenizers: `tiny` (a small byte-level BPE trained here on the conversations, committed under
crates/data/tests/fixtures/tokenization/tiny-chatml so the data crate's test needs nothing else)
and `smollm2` (SmolLM2-135M-Instruct, transformers' conversion by scripts/convert_smollm2.py; its goldens are
checked by the root package's tests/data_tokenization_golden.rs, which locates the model).

usage: make_tokenization_goldens.py [--smollm2 DIR]   (reference venv: scripts/reference_env.sh)
writes crates/data/tests/fixtures/tokenization/{tiny,smollm2}.json
"""
import argparse
import copy
import json
import os
import random
import subprocess
import sys
import types

import datasets
import transformers
import trl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt, pack_dataset
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.sft_trainer import SFTTrainer

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "crates/data/tests/fixtures/tokenization")
TINY_DIR = os.path.join(FIXTURES, "tiny-chatml")

# The handbook's default (Zephyr) template, DEFAULT_CHAT_TEMPLATE in alignment-handbook's data.py.
ZEPHYR = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
# SmolLM2-135M-Instruct's ChatML template.
CHATML = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# The same two templates rendering the same text, with `{% generation %}` around what an assistant
# turn adds after the generation prompt (also the data crate's chat-template fixtures
# chatml-generation.jinja and zephyr-generation.jinja).
CHATML_GENERATION = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
ZEPHYR_GENERATION = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token + '\n' }}{% endgeneration %}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR}
GENERATION_TEMPLATES = {"chatml": CHATML_GENERATION, "zephyr": ZEPHYR_GENERATION}


def m(role, content):
    return {"role": role, "content": content}


LONG_Q = ("Explain, step by step and with examples, how a transformer language model turns a prompt into "
          "a probability distribution over the next token, covering tokenization, embeddings, attention, "
          "the feed-forward layers, layer normalisation and the final projection onto the vocabulary. ")
LONG_A = ("First the text is split into tokens by a byte-level BPE tokenizer; each token id indexes a row "
          "of the embedding matrix. Rotary position embeddings rotate queries and keys by an angle that "
          "grows with the position, so attention scores depend on relative distance. Each layer applies "
          "causal self-attention, where a token attends only to itself and earlier tokens, followed by a "
          "gated feed-forward block; RMS normalisation precedes both. The last hidden state is multiplied "
          "by the (often tied) embedding matrix to give one logit per vocabulary entry, and a softmax "
          "turns the logits into probabilities. ")

CONVERSATIONS = {
    "single_turn": [m("user", "What is the capital of France?"), m("assistant", "The capital of France is Paris.")],
    "with_system": [m("system", "You are a terse assistant."), m("user", "2+2?"), m("assistant", "4")],
    "multi_turn": [
        m("user", "Name a prime number."), m("assistant", "7 is prime."),
        m("user", "And an even one?"), m("assistant", "2 is the only even prime."),
        m("user", "Thanks!"), m("assistant", "You're welcome."),
    ],
    "system_multi_turn": [
        m("system", "Answer in French."), m("user", "Hello"), m("assistant", "Bonjour !"),
        m("user", "How are you?"), m("assistant", "Je vais bien, merci."),
    ],
    "unicode": [m("user", "Traduis « café » en 日本語 🙂, s'il te plaît."), m("assistant", "コーヒー ☕ — ça se dit « kōhī ».")],
    "emoji_and_rtl": [m("user", "👩‍💻 مرحبا بالعالم"), m("assistant", "שלום עולם 🌍👋🏽")],
    "whitespace": [m("user", "  leading and trailing spaces  "), m("assistant", "\n\nStarts with blank lines\n\tand a tab.\n")],
    "code": [m("user", "Write hello world in Python."), m("assistant", "```python\ndef main():\n    print(\"hello, world\")\n```")],
    "empty_assistant": [m("user", "Say nothing."), m("assistant", "")],
    "special_text_in_content": [m("user", "What does <|im_end|> mean?"), m("assistant", "It ends a turn: <|im_end|>")],
    "long": [m("user", LONG_Q), m("assistant", LONG_A * 2)],
    "long_multi_turn": [m("user", LONG_Q), m("assistant", LONG_A), m("user", "Shorter please."), m("assistant", LONG_A[:200])],
    "assistant_ends_conversation_twice": [m("user", "a"), m("assistant", "b"), m("assistant", "c")],
    "numbers": [m("user", "List 1234567890 and 3.14159."), m("assistant", "1234567890, 3.14159, -42, 1e-9")],
}

PAIRS = {
    "simple": {"chosen": [m("user", "Is the sky blue?"), m("assistant", "Yes, on a clear day.")],
               "rejected": [m("user", "Is the sky blue?"), m("assistant", "No.")]},
    "with_system": {"chosen": [m("system", "Be kind."), m("user", "Rate my poem."), m("assistant", "It has lovely imagery!")],
                    "rejected": [m("system", "Be kind."), m("user", "Rate my poem."), m("assistant", "Bad.")]},
    "multi_turn": {"chosen": [m("user", "Hi"), m("assistant", "Hello!"), m("user", "Tell me a joke."), m("assistant", "Why did the chicken cross the road? To get to the other side.")],
                   "rejected": [m("user", "Hi"), m("assistant", "Hello!"), m("user", "Tell me a joke."), m("assistant", "No jokes today.")]},
    "unicode": {"chosen": [m("user", "¿Dónde está 東京?"), m("assistant", "東京 está en Japón 🇯🇵.")],
                "rejected": [m("user", "¿Dónde está 東京?"), m("assistant", "En Francia.")]},
    "prompt_column": {"prompt": [m("user", "Give me a color.")],
                      "chosen": [m("assistant", "Teal.")],
                      "rejected": [m("assistant", "I refuse.")]},
    "prompt_column_with_system": {"prompt": [m("system", "Reply in one word."), m("user", "Weather?")],
                                  "chosen": [m("assistant", "Sunny.")],
                                  "rejected": [m("assistant", "It is impossible for me to know that.")]},
    "string_prompt_column": {"prompt": "Is water wet?",  # not OpenAI format: the prompt is taken from chosen
                             "chosen": [m("user", "Is water wet?"), m("assistant", "It makes things wet.")],
                             "rejected": [m("user", "Is water wet?"), m("assistant", "Maybe.")]},
    "whitespace": {"chosen": [m("user", "Indent this:"), m("assistant", "\n    indented\n")],
                   "rejected": [m("user", "Indent this:"), m("assistant", " not indented")]},
    "empty_rejected": {"chosen": [m("user", "Say hi."), m("assistant", "Hi!")],
                       "rejected": [m("user", "Say hi."), m("assistant", "")]},
    "long_prompt": {"chosen": [m("user", LONG_Q * 2), m("assistant", "Tokens, embeddings, attention, MLP, logits.")],
                    "rejected": [m("user", LONG_Q * 2), m("assistant", "Magic.")]},
    "long_completion": {"chosen": [m("user", "Explain transformers."), m("assistant", LONG_A)],
                        "rejected": [m("user", "Explain transformers."), m("assistant", LONG_A[:150])]},
    "special_text": {"chosen": [m("user", "Print <|im_start|>"), m("assistant", "<|im_start|>")],
                     "rejected": [m("user", "Print <|im_start|>"), m("assistant", "I cannot.")]},
}

# Pairs only TRL's own prompt extraction reads right (the old handbook's split refuses or mangles
# them): completions of several turns, a prompt ending with the assistant's turn (ORPO continues
# it), and text pairs with and without a prompt.
TRL_ONLY_PAIRS = {
    "differ_at_earlier_turn": {
        "chosen": [m("user", "Hi"), m("assistant", "Hello!"), m("user", "Tell me a joke."), m("assistant", "Why did the chicken cross the road?")],
        "rejected": [m("user", "Hi"), m("assistant", "Go away."), m("user", "Tell me a joke."), m("assistant", "No.")]},
    "prompt_ends_with_assistant": {
        "chosen": [m("user", "Name a prime."), m("assistant", "7."), m("user", "Thanks!"), m("assistant", "You're welcome.")],
        "rejected": [m("user", "Name a prime."), m("assistant", "7."), m("user", "Whatever."), m("assistant", "Rude.")]},
    "text_explicit_prompt": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "text_implicit_prompt": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
}

CPT_TEXTS = {
    "plain": "The quick brown fox jumps over the lazy dog.",
    "ends_with_eos": "A document that already ends with the EOS token.<|im_end|>",
    "unicode": "Ünïcödé text — 中文 — emoji 🎉 and newlines\n\nhere.",
    "long": LONG_A * 2,
}

SFT_MAX_LENGTHS = [None, 48]
DPO_SETTINGS = [(None, "keep_start"), (64, "keep_start"), (64, "keep_end"), (24, "keep_start")]
ORPO_MAX_LENGTHS = [1024, 64]


# ---------------------------------------------------------------------------------------------
# alignment-handbook v0.4 formatting, re-stated.

def is_openai_format(messages):
    return (isinstance(messages, list) and all(isinstance(x, dict) for x in messages)
            and all("role" in x and "content" in x for x in messages))


def insert_system(messages, tokenizer):
    """maybe_insert_system_message: an empty system turn first, when the template mentions one."""
    if messages[0]["role"] == "system":
        return
    template = tokenizer.chat_template
    if "system" in template or "<|im_start|>" in template:
        messages.insert(0, {"role": "system", "content": ""})


def strip_bos(text, tokenizer):
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def handbook_format(example, tokenizer, task):
    example = copy.deepcopy(example)
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    if task in ("sft", "generation"):
        messages = example["messages"]
        insert_system(messages, tokenizer)
        return {"text": render(messages, task == "generation")}
    if task == "rm":
        chosen, rejected = example["chosen"], example["rejected"]
        insert_system(chosen, tokenizer)
        insert_system(rejected, tokenizer)
        return {"text_chosen": render(chosen), "text_rejected": render(rejected)}
    assert task in ("dpo", "orpo")
    if "prompt" in example and is_openai_format(example["prompt"]):
        prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    else:
        prompt, chosen, rejected = example["chosen"][:-1], example["chosen"][-1:], example["rejected"][-1:]
    insert_system(prompt, tokenizer)
    return {
        "text_prompt": render(prompt),
        "text_chosen": strip_bos(render(chosen), tokenizer),
        "text_rejected": strip_bos(render(rejected), tokenizer),
    }


# ---------------------------------------------------------------------------------------------
# TRL's code on stand-in trainers.

def sft_prepare(tokenizer, rows, max_length, assistant_only_loss=False, chat_template=None, text_field="text",
                completion_only_loss=False):
    fake = types.SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=completion_only_loss, chat_template=chat_template)
    args = types.SimpleNamespace(dataset_num_proc=None, dataset_text_field=text_field, max_length=max_length,
                                 truncation_mode="keep_start", assistant_only_loss=assistant_only_loss,
                                 shuffle_dataset=False, packing_strategy="bfd", seed=42)
    rows = [dict(r, idx=i) for i, r in enumerate(rows)]
    dataset = datasets.Dataset.from_list(rows)
    out = SFTTrainer._prepare_dataset(fake, dataset, tokenizer, args, False, None, "train")
    return {r["idx"]: r for r in out}


def dpo_prepare(tokenizer, rows, max_length, truncation_mode):
    fake = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    rows = [dict(r, idx=i) for i, r in enumerate(rows)]
    out = DPOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return {r["idx"]: r for r in out}


def dpo_collate(tokenizer, row, max_length, truncation_mode):
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length,
                                         truncation_mode=truncation_mode)
    batch = collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    result = {}
    for i, name in enumerate(("chosen", "rejected")):
        n = int(batch["attention_mask"][i].sum())
        result[f"{name}_input_ids"] = batch["input_ids"][i][:n].tolist()
        result[f"{name}_completion_mask"] = batch["completion_mask"][i][:n].tolist()
    return result


def orpo_tokenize(tokenizer, prompt, chosen, rejected, max_length):
    fake = types.SimpleNamespace(is_encoder_decoder=False, processing_class=tokenizer, max_length=max_length,
                                 padding_value=tokenizer.pad_token_id)
    fake.build_tokenized_answer = types.MethodType(ORPOTrainer.build_tokenized_answer, fake)
    return ORPOTrainer.tokenize_row(fake, {"prompt": prompt, "chosen": chosen, "rejected": rejected})


# ---------------------------------------------------------------------------------------------

def make_tiny_tokenizer():
    """A small byte-level BPE with SmolLM2's special tokens, trained on the conversations."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    corpus = []
    for conv in CONVERSATIONS.values():
        corpus += [x["content"] for x in conv]
    for pair in PAIRS.values():
        corpus += [x["content"] for x in pair["chosen"] + pair["rejected"]]
    corpus += list(CPT_TEXTS.values()) + ["<|user|>\n", "<|assistant|>\n", "<|system|>\n", "system\nassistant\nuser\n"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    os.makedirs(TINY_DIR, exist_ok=True)
    backend.save(os.path.join(TINY_DIR, "tokenizer.json"))
    config = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "model_max_length": 2048, "chat_template": CHATML}
    with open(os.path.join(TINY_DIR, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load(dir_, template):
    tokenizer = AutoTokenizer.from_pretrained(dir_)
    tokenizer.chat_template = template
    return tokenizer


def packing_cases():
    rng = random.Random(1234)
    cases = []
    # Small hand-made sets with ties, plus realistic lengths (log-normal, like chat SFT data).
    hand = [[6, 3, 4, 2, 1], [5, 5, 5, 3, 3, 3, 2, 2, 8, 1, 7], [9, 1, 12, 3, 3, 4, 4, 4, 0, 2]]
    for lengths in hand:
        cases.append({"seq_length": 8, "lengths": lengths})
    for n, seq in [(300, 512), (1000, 256), (1500, 512)]:
        lengths = [max(1, min(3000, int(rng.lognormvariate(5.2, 0.8)))) for _ in range(n)]
        cases.append({"seq_length": seq, "lengths": lengths})
    for case in cases:
        ids = [[i] * n for i, n in enumerate(case["lengths"])]
        packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": ids}), case["seq_length"], "bfd")
        rows = []
        for row in packed:
            members, pos = [], 0
            for n in row["seq_lengths"]:
                members.append(row["input_ids"][pos])
                pos += n
            rows.append(members)
        case["rows"] = rows
        # `datasets.map(batched=True)` packs each batch of 1000 rows on its own.
        case["map_batch_size"] = 1000
    return cases


def goldens(dir_, name):
    tokenizers_ = {t: load(dir_, src) for t, src in TEMPLATES.items()}
    out = {
        "about": f"made by scripts/make_tokenization_goldens.py with transformers {transformers.__version__}, "
                 f"trl {trl.__version__}; tokenizer `{name}`",
        "templates": TEMPLATES,
        "generation_templates": GENERATION_TEMPLATES,
        "conversations": CONVERSATIONS,
        "pairs": PAIRS,
        "cpt_texts": CPT_TEXTS,
        "trl_only_pairs": TRL_ONLY_PAIRS,
        "sft": [], "sft_assistant_only": [], "generation": [], "rm": [], "dpo": [], "orpo": [], "cpt": [],
        "trl_sft": [], "trl_preference": [],
    }
    for tname, tok in tokenizers_.items():
        conv_names = list(CONVERSATIONS)
        texts = [handbook_format({"messages": CONVERSATIONS[c]}, tok, "sft")["text"] for c in conv_names]
        for max_length in SFT_MAX_LENGTHS:
            prepared = sft_prepare(tok, [{"text": t} for t in texts], max_length)
            for i, c in enumerate(conv_names):
                case = {"template": tname, "conversation": c, "max_length": max_length, "text": texts[i]}
                if i in prepared:
                    case.update(input_ids=prepared[i]["input_ids"], labels=prepared[i]["labels"])
                else:
                    case["dropped"] = True
                out["sft"].append(case)
        for c in conv_names:
            gen = handbook_format({"messages": CONVERSATIONS[c]}, tok, "generation")["text"]
            out["generation"].append({"template": tname, "conversation": c, "text": gen})
        # assistant_only_loss on `messages`: the generation-marked template renders the same text.
        gen_tok = load(dir_, GENERATION_TEMPLATES[tname])
        for c in conv_names:
            plain = tok.apply_chat_template(CONVERSATIONS[c], tokenize=False)
            marked = gen_tok.apply_chat_template(CONVERSATIONS[c], tokenize=False)
            assert plain == marked, (tname, c)
        for max_length in SFT_MAX_LENGTHS:
            prepared = sft_prepare(gen_tok, [{"messages": CONVERSATIONS[c]} for c in conv_names], max_length,
                                   assistant_only_loss=True, chat_template=GENERATION_TEMPLATES[tname])
            for i, c in enumerate(conv_names):
                case = {"template": tname, "conversation": c, "max_length": max_length}
                if i in prepared:
                    case.update(input_ids=prepared[i]["input_ids"], labels=prepared[i]["labels"])
                else:
                    case["dropped"] = True
                out["sft_assistant_only"].append(case)

        pair_names = list(PAIRS)
        for p in pair_names:
            out["rm"].append({"template": tname, "pair": p, **handbook_format(PAIRS[p], tok, "rm")})
        formatted = [handbook_format(PAIRS[p], tok, "dpo") for p in pair_names]
        rows = [{"prompt": f["text_prompt"], "chosen": f["text_chosen"], "rejected": f["text_rejected"]} for f in formatted]
        base = dpo_prepare(tok, rows, None, "keep_start")
        settings = {s: dpo_prepare(tok, rows, *s) for s in DPO_SETTINGS}
        for i, p in enumerate(pair_names):
            case = {"template": tname, "pair": p, **formatted[i],
                    "prompt_ids": base[i]["prompt_ids"], "chosen_ids": base[i]["chosen_ids"],
                    "rejected_ids": base[i]["rejected_ids"], "collated": []}
            for (max_length, mode), prepared in settings.items():
                entry = {"max_length": max_length, "truncation_mode": mode, "kept": i in prepared}
                if i in prepared:
                    entry.update(dpo_collate(tok, prepared[i], max_length, mode))
                case["collated"].append(entry)
            out["dpo"].append(case)
            for max_length in ORPO_MAX_LENGTHS:
                f = formatted[i]
                try:
                    row = orpo_tokenize(tok, f["text_prompt"], f["text_chosen"], f["text_rejected"], max_length)
                    keys = ["prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
                    out["orpo"].append({"template": tname, "pair": p, "max_length": max_length, **{k: row[k] for k in keys}})
                except ValueError as e:
                    out["orpo"].append({"template": tname, "pair": p, "max_length": max_length, "error": str(e)})
        # TRL's own path on the rows as they are (today's handbook).
        trl_sft(out, tname, tok, gen_tok)
        for p, pair in list(PAIRS.items()) + list(TRL_ONLY_PAIRS.items()):
            row = maybe_extract_prompt(copy.deepcopy(pair))
            row = {k: row[k] for k in ("prompt", "chosen", "rejected")}
            case = {"template": tname, "pair": p}
            case.update({k: v for k, v in dpo_prepare(tok, [row], None, "keep_start")[0].items()
                         if k in ("prompt_ids", "chosen_ids", "rejected_ids")})
            texts = maybe_apply_chat_template(row, tok)
            case["orpo"] = []
            whole = None
            for max_length in ORPO_MAX_LENGTHS:  # the longest first: the others' ids are its prefixes
                try:
                    o = orpo_tokenize(tok, texts["prompt"], texts["chosen"], texts["rejected"], max_length)
                    if whole is None:
                        whole = o
                        case.update(orpo_chosen_ids=o["chosen_input_ids"], orpo_rejected_ids=o["rejected_input_ids"])
                    case["orpo"].append({"max_length": max_length, **orpo_compact(o, whole)})
                except ValueError as e:
                    case["orpo"].append({"max_length": max_length, "error": str(e)})
            out["trl_preference"].append(case)

    tok = tokenizers_["chatml"]
    names = list(CPT_TEXTS)
    # Text prompt-completion rows (template-free): EOS added to the completion, the prompt masked.
    text_rows = [{"prompt": CPT_TEXTS[n][:len(CPT_TEXTS[n]) // 3], "completion": CPT_TEXTS[n][len(CPT_TEXTS[n]) // 3:]}
                 for n in names]
    for max_length in SFT_MAX_LENGTHS:
        prepared = sft_prepare(tok, text_rows, max_length, completion_only_loss=True)
        for i, n in enumerate(names):
            case = {"template": "chatml", "kind": "text_prompt_completion", "row": text_rows[i], "max_length": max_length}
            if i in prepared:
                case.update(compact_labels(prepared[i]["input_ids"], prepared[i]["labels"]))
            else:
                case["dropped"] = True
            out["trl_sft"].append(case)
    for max_length in SFT_MAX_LENGTHS:
        prepared = sft_prepare(tok, [{"text": CPT_TEXTS[n]} for n in names], max_length)
        for i, n in enumerate(names):
            out["cpt"].append({"text": n, "max_length": max_length, "input_ids": prepared[i]["input_ids"],
                               "labels": prepared[i]["labels"]})
    return out


def compact_labels(input_ids, labels):
    """`input_ids` and `label_mask`, a string with "1" where the label is the id and "0" where it is -100."""
    assert all(label in (token, -100) for token, label in zip(input_ids, labels)) and len(labels) == len(input_ids)
    return {"input_ids": input_ids, "label_mask": "".join("1" if label != -100 else "0" for label in labels)}


def orpo_compact(row, whole):
    """An ORPO row as the lengths of its prompt and its (truncated) sequences, whose ids are prefixes of `whole`'s."""
    entry = {}
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        prompt_len = sum(1 for label in labels if label == -100)
        assert labels == [-100] * prompt_len + ids[prompt_len:]
        assert whole[f"{side}_input_ids"][:len(ids)] == ids
        entry[f"{side}_len"], entry[f"{side}_prompt_len"] = len(ids), prompt_len
    return entry


def trl_sft(out, tname, tok, gen_tok):
    """SFTTrainer on conversations as they are: `messages` (every token labelled) and conversational
    prompt/completion (TRL's default completion-only loss, also with assistant_only_loss)."""
    conv_names = list(CONVERSATIONS)
    kinds = {
        "messages": lambda c: {"messages": CONVERSATIONS[c]},
        "prompt_completion": lambda c: {"prompt": CONVERSATIONS[c][:-1], "completion": CONVERSATIONS[c][-1:]},
    }
    for kind, make in kinds.items():
        rows = [make(c) for c in conv_names]
        # (`messages` with assistant_only_loss is the `sft_assistant_only` section.)
        settings = [(False, n) for n in SFT_MAX_LENGTHS] if kind == "messages" else [(False, None), (True, None), (True, 48)]
        for assistant_only, max_length in settings:
            prepared = sft_prepare(gen_tok if assistant_only else tok, rows, max_length, assistant_only_loss=assistant_only,
                                   chat_template=GENERATION_TEMPLATES[tname] if assistant_only else None,
                                   completion_only_loss=kind == "prompt_completion")
            for i, c in enumerate(conv_names):
                case = {"template": tname, "kind": kind, "conversation": c, "assistant_only_loss": assistant_only,
                        "max_length": max_length}
                if i in prepared:
                    case.update(compact_labels(prepared[i]["input_ids"], prepared[i]["labels"]))
                else:
                    case["dropped"] = True
                out["trl_sft"].append(case)


def write(data, path):
    with open(path, "w") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct directory (default: convert_smollm2.py's)")
    parser.add_argument("--retrain-tiny", action="store_true", help="retrain the committed tiny tokenizer")
    args = parser.parse_args()
    if args.retrain_tiny or not os.path.exists(os.path.join(TINY_DIR, "tokenizer.json")):
        make_tiny_tokenizer()
    smollm2 = args.smollm2 or subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts/convert_smollm2.py")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1]
    tiny = goldens(TINY_DIR, "tiny-chatml")
    tiny["packing"] = packing_cases()
    write(tiny, os.path.join(FIXTURES, "tiny.json"))
    write(goldens(smollm2, "SmolLM2-135M-Instruct"), os.path.join(FIXTURES, "smollm2.json"))


if __name__ == "__main__":
    main()
