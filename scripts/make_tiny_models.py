"""Generates the tiny random checkpoints and transformers' reference outputs used by the Rust
parity tests (crates/models/tests/parity.rs). Deterministic: rerunning rewrites identical files.

For each case: config.json + model.safetensors (save_pretrained) and reference.json with
  input_ids, attention_mask, position_ids ([2][12]; row 1 left-padded by 3 with pad id 0;
  positions offset by 300 in the llama3 case),
  logits ([2][12][vocab], float32; positions where attention_mask is 0 are not compared),
  greedy (8 argmax tokens from row 0, KV cache, no EOS stop; checked against
  model.generate(do_sample=False, use_cache=True)), notes.
The Mistral case is checked to really apply its sliding window (its logits differ from the same
weights with the window disabled, from the first position the window cuts off).

usage: make_tiny_models.py [--out crates/models/tests/fixtures]
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    "tiny-llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0)),
    "tiny-llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # eager attention so transformers applies the sliding window (4 < 12 tokens, so it matters).
    "tiny-mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=4, attn_implementation="eager")),
    # head_dim 32 != hidden/heads, tanh-GELU, tied embeddings, (1 + w) norms.
    "tiny-gemma": lambda: GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=32, hidden_activation="gelu_pytorch_tanh")),
}


def round_floats(x, digits=7):
    if isinstance(x, list):
        return [round_floats(v, digits) for v in x]
    return float(f"{x:.{digits}g}")


# Positions start here in the batch, so that the llama3 case exercises its rescaled
# low/medium frequencies (wavelengths beyond 16 positions) rather than only position < 12.
POSITION_OFFSET = {"tiny-llama3-rope": 300}
EXTRA_NOTES = {
    "tiny-llama3-rope": "; here position_ids are offset by 300 so the llama3-rescaled frequencies matter "
                        "(greedy starts at position 0)",
}


NOTES = ("logits at positions where attention_mask is 0 are padding and must be ignored when comparing; "
         "position_ids = cumsum(attention_mask) - 1 clipped at 0 (as generate does for left padding)")


def greedy_reference(model, ids, steps=8):
    """Argmax decoding with the KV cache, not stopped at EOS; agrees with generate() up to its stop."""
    out = model(input_ids=ids, use_cache=True)
    greedy = []
    for _ in range(steps):
        token = out.logits[0, -1].argmax()
        greedy.append(int(token))
        out = model(input_ids=token.view(1, 1), cache=out.cache, use_cache=True)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                               max_new_tokens=steps, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert generated == greedy[:len(generated)], (generated, greedy)
    return greedy


def check_sliding_window(model, ids, window):
    """Asserts transformers applies the window: positions < window agree with a windowless run,
    later ones do not. Returns the first position whose logits differ."""
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    with torch.no_grad():
        windowed = model(input_ids=ids).logits
        model.config.sliding_window = None
        try:
            full = model(input_ids=ids).logits
        finally:
            model.config.sliding_window = window
    differs = (windowed - full).abs().amax(-1)[0] > 1e-6
    first = int(differs.nonzero()[0]) if differs.any() else None
    assert first is not None and not differs[:window].any() and differs[first:].all(), differs.tolist()
    return first


def reference(model, out_dir, position_offset=0, notes=""):
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [0, 0, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18]])
    mask = torch.tensor([[1] * 12, [0, 0, 0] + [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + position_offset
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        greedy = greedy_reference(model, ids[:1])
    result = {
        "transformers_version": transformers.__version__,
        "notes": NOTES + notes,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "position_ids": positions.tolist(),
        "logits": round_floats(logits.tolist()),
        "greedy": greedy,
    }
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(result, f, separators=(",", ":"))
    return result


def save(model, out_dir, **kwargs):
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    for extra in ("generation_config.json",):
        path = os.path.join(out_dir, extra)
        if os.path.exists(path):
            os.remove(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "crates/models/tests/fixtures"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    for name, build in CASES.items():
        torch.manual_seed(0)
        model = build().eval()
        out_dir = os.path.join(args.out, name)
        save(model, out_dir)
        extra = EXTRA_NOTES.get(name, "")
        if name == "tiny-mistral":
            first = check_sliding_window(model, torch.arange(3, 15).view(1, 12), model.config.sliding_window)
            extra = (f"; eager attention, checked that the sliding window ({model.config.sliding_window}) "
                     f"changes the logits from position {first} on")
        result = reference(model, out_dir, POSITION_OFFSET.get(name, 0), extra)
        summary(name, model, out_dir, result)

    # Sharded bf16 checkpoint: the llama weights rounded to bf16, saved in several shards; the
    # reference runs the bf16-rounded weights in float32.
    torch.manual_seed(0)
    model = CASES["tiny-llama"]().eval()
    out_dir = os.path.join(args.out, "tiny-llama-sharded-bf16")
    save(model.to(torch.bfloat16), out_dir, max_shard_size="40KB")
    # Round-trip check: loading the saved shards into float32 gives exactly the weights used.
    reloaded = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    model = model.to(torch.float32)
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    result = reference(model, out_dir, 0, "; weights are stored in bfloat16, logits computed from them upcast to float32")
    shards = [f for f in os.listdir(out_dir) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")), shards
    summary("tiny-llama-sharded-bf16", model, out_dir, result)
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.out) for f in files)
    print(f"total fixture size: {total / 1e6:.2f} MB in {os.path.abspath(args.out)}")


def summary(name, model, out_dir, result):
    files = sorted(os.listdir(out_dir))
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {len(files)} files, "
          f"{size / 1e3:.0f} kB, greedy {result['greedy']}")


if __name__ == "__main__":
    main()
