"""Generates the small GGUF files and transformers' reference outputs used by the Rust GGUF reader's
tests (crates/models/tests/gguf.rs). Deterministic: rerunning rewrites identical files.

Written with the `gguf` package (llama.cpp's gguf-py) into crates/models/tests/fixtures/gguf/:

* quants.gguf: for each block format (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
  Q4_K, Q5_K, Q6_K), a tensor `<TYPE>` of 2 x 512 values in that format (random bytes with finite
  f16 scales: dequantisation is defined on any bytes), and `<TYPE>.expected`, F32, what
  gguf.quants.dequantize (the numpy port of ggml's dequantisers) makes of it.
* tiny-llama.gguf: a random 2-layer Llama laid out as llama.cpp's convert_hf_to_gguf.py writes one:
  llama.* hyper-parameters, its tensor names, Q and K rows permuted, the weights in a mix of block
  formats; a GPT-2 style BPE tokenizer (the data crate's tiny-chatml one, plus one user-defined
  token) with tokenizer.ggml.* keys and a chat template.
* tiny-llama.reference.json: what transformers makes of tiny-llama.gguf (it dequantises and undoes
  the Q/K permutation with its own code): the config it derives, the token ids of test strings,
  the special tokens, and float32 logits of a prompt.
* tokenizer-bos.gguf + tokenizer-bos.reference.json: the same tokenizer with add_bos_token = true
  and a llama3-style pre-tokenizer (`tokenizer.ggml.pre = llama-bpe`), no tensors, and transformers'
  ids for the test strings.

usage: make_gguf_fixtures.py [--out crates/models/tests/fixtures/gguf]   (reference venv: scripts/reference_env.sh)
"""
import argparse
import json
import os
import tempfile

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "crates/data/tests/fixtures/tokenization/tiny-chatml")
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
USER_DEFINED = "<think>"
ROPE_THETA = 50000.0  # not the default, so a lost value shows
TEST_STRINGS = [
    "Hello world! How are you today?",
    "<|im_start|>user\nWhat is 2024 + 17?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "Unicode: café, naïve, 中文, emoji 🙂 and <think>reasoning</think> done.",
    "I'm sure it's what they'd've said; we'll see.",
    "",
]
# (block format, byte offsets of its f16 fields): those are set to finite values, the rest is random.
BLOCK_TYPES = [
    (T.Q4_0, [0]), (T.Q4_1, [0, 2]), (T.Q5_0, [0]), (T.Q5_1, [0, 2]), (T.Q8_0, [0]),
    (T.Q2_K, [80, 82]), (T.Q3_K, [108]), (T.Q4_K, [0, 2]), (T.Q5_K, [0, 2]), (T.Q6_K, [208]),
]


def random_blocks(rng, qtype, f16_offsets, n_values, scale=1.0):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_values // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in f16_offsets:
        values = (rng.uniform(-1.0, 1.0, size=n_blocks) * scale).astype(np.float16)
        blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def write_quants(path, rng):
    writer = gguf.GGUFWriter(path, "quants-test")
    shape = (2, 512)
    values = rng.standard_normal(shape).astype(np.float32)
    floats = {T.F32: values, T.F16: values.astype(np.float16), T.BF16: gguf.quants.quantize(values, T.BF16)}
    for qtype, data in floats.items():
        writer.add_tensor(qtype.name, data, raw_dtype=qtype if qtype == T.BF16 else None)
        writer.add_tensor(f"{qtype.name}.expected", gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(shape))
    for qtype, offsets in BLOCK_TYPES:
        raw = random_blocks(rng, qtype, offsets, shape[0] * shape[1])
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = raw.reshape(shape[0], shape[1] // block_size * type_size)
        writer.add_tensor(qtype.name, rows, raw_dtype=qtype)
        expected = gguf.quants.dequantize(rows, qtype).astype(np.float32).reshape(shape)
        assert np.isfinite(expected).all(), qtype
        writer.add_tensor(f"{qtype.name}.expected", expected)
    finish(writer)


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute(weights, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: rotary halves interleaved per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tokenizer_metadata(writer, tokens, merges, token_types, add_bos, pre):
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)


def load_tokenizer_parts():
    with open(os.path.join(TOKENIZER_DIR, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tokens.append(USER_DEFINED)
    token_types = [3 if t in special else 4 if t == USER_DEFINED else 1 for t in tokens]
    return tokens, merges, token_types


def hf_tokenizer_reference(directory, name):
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return {
        "encodings": [{"text": s, "ids": tokenizer(s)["input_ids"],
                       "ids_without_special": tokenizer(s, add_special_tokens=False)["input_ids"]} for s in TEST_STRINGS],
        "special_tokens": {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "chat_template": tokenizer.chat_template,
        "vocab_size": len(tokenizer),
    }, tokenizer


def write_tiny_llama(out, rng):
    tokens, merges, token_types = load_tokenizer_parts()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    path = os.path.join(out, "tiny-llama.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("Tiny Llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokenizer_metadata(writer, tokens, merges, token_types, add_bos=False, pre="smollm")

    def add(name, array, qtype):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype in (T.F32,):
            writer.add_tensor(name, array)
        elif qtype == T.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif qtype in (T.Q4_K, T.Q6_K):  # gguf-py has no K-quant quantiser: random blocks of the right size
            raw = random_blocks(rng, qtype, dict(BLOCK_TYPES)[qtype], array.size, scale=0.01)
            writer.add_tensor(name, raw.reshape(array.shape[0], -1), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    add("token_embd.weight", state["model.embed_tokens.weight"], T.Q8_0)
    formats = [
        {"q": T.Q4_0, "k": T.Q4_1, "v": T.Q5_0, "o": T.Q5_1, "gate": T.F16, "up": T.BF16, "down": T.Q4_K},
        {"q": T.Q8_0, "k": T.F16, "v": T.Q4_1, "o": T.Q4_0, "gate": T.Q5_1, "up": T.Q8_0, "down": T.Q6_K},
    ]
    for layer, fmt in enumerate(formats):
        p = f"model.layers.{layer}"
        add(f"blk.{layer}.attn_norm.weight", state[f"{p}.input_layernorm.weight"], T.F32)
        add(f"blk.{layer}.attn_q.weight", permute(state[f"{p}.self_attn.q_proj.weight"], heads, heads), fmt["q"])
        add(f"blk.{layer}.attn_k.weight", permute(state[f"{p}.self_attn.k_proj.weight"], heads, kv_heads), fmt["k"])
        add(f"blk.{layer}.attn_v.weight", state[f"{p}.self_attn.v_proj.weight"], fmt["v"])
        add(f"blk.{layer}.attn_output.weight", state[f"{p}.self_attn.o_proj.weight"], fmt["o"])
        add(f"blk.{layer}.ffn_norm.weight", state[f"{p}.post_attention_layernorm.weight"], T.F32)
        add(f"blk.{layer}.ffn_gate.weight", state[f"{p}.mlp.gate_proj.weight"], fmt["gate"])
        add(f"blk.{layer}.ffn_up.weight", state[f"{p}.mlp.up_proj.weight"], fmt["up"])
        add(f"blk.{layer}.ffn_down.weight", state[f"{p}.mlp.down_proj.weight"], fmt["down"])
    add("output_norm.weight", state["model.norm.weight"], T.F32)
    add("output.weight", state["lm_head.weight"], T.F16)
    finish(writer)

    # transformers' view of the file: its own dequantisation, un-permutation and tokenizer conversion.
    reference, tokenizer = hf_tokenizer_reference(out, "tiny-llama.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="tiny-llama.gguf", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2024 + 17?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([ids])).logits[0]
    config_dict = loaded.config.to_dict()
    reference.update({
        "transformers_version": transformers.__version__,
        "gguf_version": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
        "config": {k: config_dict.get(k) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")},
        "rope_theta": (config_dict.get("rope_parameters") or {}).get("rope_theta", config_dict.get("rope_theta")),
        "prompt": prompt,
        "prompt_ids": ids,
        "logits": [[round(float(x), 7) for x in row] for row in logits],
    })
    with open(os.path.join(out, "tiny-llama.reference.json"), "w") as f:
        json.dump(reference, f, ensure_ascii=False)
        f.write("\n")


def write_tokenizer_bos(out):
    tokens, merges, token_types = load_tokenizer_parts()
    path = os.path.join(out, "tokenizer-bos.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("Tiny tokenizer")
    tokenizer_metadata(writer, tokens, merges, token_types, add_bos=True, pre="llama-bpe")
    finish(writer)
    reference, _ = hf_tokenizer_reference(out, "tokenizer-bos.gguf")
    reference["transformers_version"] = transformers.__version__
    with open(os.path.join(out, "tokenizer-bos.reference.json"), "w") as f:
        json.dump(reference, f, ensure_ascii=False)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(REPO, "crates/models/tests/fixtures/gguf"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    write_quants(os.path.join(args.out, "quants.gguf"), rng)
    write_tiny_llama(args.out, rng)
    write_tokenizer_bos(args.out)
    for name in sorted(os.listdir(args.out)):
        print(f"{os.path.getsize(os.path.join(args.out, name)):>9}  {name}")


if __name__ == "__main__":
    main()
