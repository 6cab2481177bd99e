"""Golden values for crates/objectives (tests/goldens.rs): losses, logged metrics and gradients
w.r.t. the policy logits, computed by TRL's own code on fixed random logits.

What is called, per objective (trl==1.16.0, transformers==5.24.0, torch==2.9.1):
- the log-prob helper: `ORPOTrainer.get_batch_logps` (trl/experimental/orpo/orpo_trainer.py), which
  shifts labels and calls `trl.trainer.utils.selective_log_softmax`; the per-token statistics
  (entropy, mean logit, top-1) come from TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`,
  `trl.kernels.chunked_logprob.ChunkedLogProbFunction`, torch path on CPU).
- SFT/CPT: `SFTTrainer.compute_loss` (trl/trainer/sft_trainer.py), called unbound on a stand-in
  `self`, for the token mean and for a `num_items_in_batch` normaliser; the `sum` reduction is
  transformers' `ForCausalLMLoss` with `num_items_in_batch=1`, i.e. the summed token cross entropy
  that open-instruct's `reduce_loss: sum` computes with `CrossEntropyLoss(reduction="sum")`.
- DPO: `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py), called unbound on a stand-in `self`,
  with precomputed reference log-probs (`precompute_ref_log_probs=True` path).
- ORPO: `ORPOTrainer.get_batch_loss_metrics` (trl/experimental/orpo/orpo_trainer.py), unbound, which
  runs the real `concatenated_forward`, `get_batch_logps` and `odds_ratio_loss`.

The "model" is a stand-in whose logits are a leaf tensor: the fused LM head multiplies the "hidden
states" (the logits) by an identity `lm_head.weight`, which is exact in float32, so the gradient
TRL's kernels return for the hidden states is the gradient w.r.t. the logits.

usage: make_objective_goldens.py  (writes crates/objectives/tests/fixtures/objectives.json)
"""
import importlib.metadata
import json
import os
import types
from collections import defaultdict
from types import SimpleNamespace

import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

IGNORE = -100
B, T, V = 3, 7, 11
torch.manual_seed(0)


class StandInLm(torch.nn.Module):
    """Looks enough like a transformers causal LM for TRL's fused head: `base_model(...)` returns the
    leaf logits as `last_hidden_state`, `lm_head` is the identity, `forward` returns `.logits`."""

    def __init__(self, logits, fused_outputs):
        super().__init__()
        self.leaf = logits
        self.lm_head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(V))
        self.lm_head.weight.requires_grad_(False)
        text_config = SimpleNamespace(model_type="stand_in")
        self.config = SimpleNamespace(get_text_config=lambda: text_config)
        add_fused_lm_head(self, outputs=fused_outputs)

    def base_model(self, *args, **kwargs):  # noqa: D401 - the backbone
        return SimpleNamespace(last_hidden_state=self.leaf)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, *args, **kwargs):
        return SimpleNamespace(logits=self.leaf)


def identity_accelerator():
    return SimpleNamespace(
        device=torch.device("cpu"),
        gather_for_metrics=lambda x: x,
        gather=lambda x: x,
        parallelism_config=None,
        num_processes=1,
    )


def flat(t):
    return [float(f"{v:.9g}") for v in t.detach().reshape(-1).tolist()]


def leaf(x):
    return x.detach().clone().requires_grad_(True)


# ---- shared inputs ---------------------------------------------------------------------------
# Rows: [prompt | completion | padding]. Position 0 is always prompt (so TRL's IPO length, the
# unshifted completion_mask sum, equals the number of scored labels).
def make_rows(prompt_lens, completion_lens):
    ids = torch.randint(0, V, (len(prompt_lens), T))
    completion = torch.zeros(len(prompt_lens), T, dtype=torch.long)
    attention = torch.zeros(len(prompt_lens), T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        completion[i, p : p + c] = 1
        attention[i, : p + c] = 1
    ids = ids.masked_fill(attention == 0, 0)  # pad token 0
    return ids, attention, completion


chosen_ids, chosen_attn, chosen_comp = make_rows([2, 1, 3], [5, 4, 2])
rejected_ids, rejected_attn, rejected_comp = make_rows([2, 1, 3], [3, 6, 4])
ids = torch.cat([chosen_ids, rejected_ids])
attn = torch.cat([chosen_attn, rejected_attn])
comp = torch.cat([chosen_comp, rejected_comp])
labels = ids.masked_fill(comp == 0, IGNORE)  # completion-only labels, as DPOTrainer builds them
full_labels = ids.masked_fill(attn == 0, IGNORE)  # prompt + completion, ORPO's NLL labels

logits = torch.randn(2 * B, T, V) * 2.0
# Make chosen row 0 confident about its own next tokens, so its mean log-prob is above -ln 2 and
# ORPO's log1mexp takes its other branch.
for t in range(T - 1):
    if labels[0, t + 1] != IGNORE:
        logits[0, t, labels[0, t + 1]] += 8.0

fixture = {
    "versions": {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": importlib.metadata.version("trl"),
    },
    "shape": [B, T, V],
    "logits": flat(logits),  # [2B, T, V]: chosen rows, then rejected rows
    "labels": labels.reshape(-1).tolist(),  # [2B, T] completion-only labels
    "full_labels": full_labels.reshape(-1).tolist(),  # [2B, T] prompt+completion labels
}

# ---- sequence log-probs ------------------------------------------------------------------------
x = leaf(logits)
logps_sum = ORPOTrainer.get_batch_logps(x, labels, average_log_prob=False)
weights = torch.randn(2 * B)
(logps_sum * weights).sum().backward()
with torch.no_grad():
    fused = StandInLm(logits.clone(), ("log_probs", "entropy", "mean_logits", "is_top1"))(
        input_ids=ids, labels=labels, fused_lm_head=True
    )
    mask = fused.label_mask.float()
fixture["sequence_logps"] = {
    "sum": flat(logps_sum),
    "num_tokens": flat(mask.sum(1)),
    "mean_logits": flat((fused.mean_logits * mask).sum(1) / mask.sum(1).clamp(min=1)),
    "mean_logits_all": flat(logits[:, :-1, :].mean(dim=(1, 2))),
    "entropy_sum": flat((fused.entropy * mask).sum(1)),
    "num_correct": flat(fused.is_top1.float().sum(1)),
    "grad_weights": flat(weights),
    "grad": flat(x.grad),
}


# ---- SFT / CPT ---------------------------------------------------------------------------------
def sft(num_items_in_batch):
    x = leaf(logits[:B])
    model = StandInLm(x, ("log_probs", "entropy", "is_top1"))
    model.train()
    self = SimpleNamespace(
        model=model,
        aux_loss_enabled=False,
        accelerator=identity_accelerator(),
        compute_loss_func=None,
        label_smoother=None,
        args=SimpleNamespace(loss_type="nll", average_tokens_across_devices=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        get_tp_size=lambda: 1,
    )
    inputs = {"input_ids": ids[:B], "attention_mask": attn[:B], "labels": full_labels[:B]}
    loss = SFTTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in self._metrics["train"].items()}
    metrics["loss"] = loss.item()
    return {"loss": loss.item(), "metrics": metrics, "grad": flat(x.grad)}


x = leaf(logits[:B])
sum_loss = ForCausalLMLoss(x, full_labels[:B], V, num_items_in_batch=torch.tensor(1))
sum_loss.backward()
fixture["sft"] = {
    "mean": sft(None),
    "num_items_in_batch": 20,
    "normalized": sft(torch.tensor(20)),
    "sum": {"loss": sum_loss.item(), "grad": flat(x.grad)},
}

# ---- DPO ---------------------------------------------------------------------------------------
with torch.no_grad():
    policy = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
# Reference log-probs chosen so the pairs' log-ratio margins are about -3, 1.5 and 12 (the hinge
# is then clipped for some pairs at both betas).
margins = torch.tensor([-3.0, 1.5, 12.0])
ref_chosen = policy[:B] - margins / 2 + 0.3 * torch.randn(B)
ref_rejected = policy[B:] + margins / 2 + 0.3 * torch.randn(B)
fixture["reference_chosen"] = flat(ref_chosen)
fixture["reference_rejected"] = flat(ref_rejected)
ref_chosen = torch.tensor(fixture["reference_chosen"])
ref_rejected = torch.tensor(fixture["reference_rejected"])


def dpo(loss_type, beta, label_smoothing):
    x = leaf(logits)
    model = StandInLm(x, ("log_probs", "entropy", "mean_logits", "is_top1"))
    model.train()
    self = SimpleNamespace(
        model=model,
        accelerator=identity_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": comp,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in self._metrics["train"].items()}
    metrics["loss"] = loss.item()
    return {
        "loss_type": loss_type,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "loss": loss.item(),
        "metrics": metrics,
        "grad": flat(x.grad),
    }


fixture["dpo"] = [
    dpo(loss_type, beta, ls)
    for loss_type, smoothings in [("sigmoid", [0.0]), ("hinge", [0.0]), ("ipo", [0.0]), ("robust", [0.0, 0.1])]
    for beta in [0.1, 0.5]
    for ls in smoothings
]
# TRL 1.16 reads label_smoothing only in the robust (and exo_pair) losses: sigmoid with 0.1 is sigmoid.
ls_sigmoid = dpo("sigmoid", 0.1, 0.1)
assert ls_sigmoid["loss"] == fixture["dpo"][0]["loss"], "TRL 1.16 sigmoid ignores label_smoothing"


# ---- ORPO --------------------------------------------------------------------------------------
def orpo(beta):
    x = leaf(logits)
    model = StandInLm(x, ("log_probs",))
    model.train()
    self = SimpleNamespace(
        beta=beta,
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=False,
        accelerator=identity_accelerator(),
    )
    self.concatenated_inputs = ORPOTrainer.concatenated_inputs
    self.get_batch_logps = ORPOTrainer.get_batch_logps
    self.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, self)
    self.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, self)
    batch = {
        "chosen_input_ids": ids[:B],
        "chosen_attention_mask": attn[:B],
        "chosen_labels": labels[:B],
        "rejected_input_ids": ids[B:],
        "rejected_attention_mask": attn[B:],
        "rejected_labels": labels[B:],
    }
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(self, model, batch, train_eval="train")
    loss.backward()
    metrics["loss"] = loss.item()
    return {"beta": beta, "loss": loss.item(), "metrics": metrics, "grad": flat(x.grad)}


fixture["orpo"] = [orpo(0.1), orpo(0.5)]

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/objectives/tests/fixtures/objectives.json")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    json.dump(fixture, f, separators=(",", ":"))
    f.write("\n")
print(os.path.normpath(out))
