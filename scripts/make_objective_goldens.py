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
- DPO: `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py), called unbound on a stand-in `self`
  set as `DPOTrainer.__init__` sets it, with precomputed reference log-probs
  (`precompute_ref_log_probs=True` path), for every `loss_type` of TRL 1.16 at two betas, the
  loss-specific settings (label_smoothing, discopop_tau), `loss_type` lists with and without
  `loss_weights`, `use_weighting` (WPO), `ld_alpha` (LD-DPO) and the f-divergences; the gradient
  is taken w.r.t. the per-token log-probs the loss is computed from. Also which loss types TRL
  itself fails on with `use_weighting`, and `DPOTrainer.compute_ref_log_probs` (LD-DPO's
  reference log-probs) on other logits. Written to dpo.json (same inputs as objectives.json).
- ORPO: `ORPOTrainer.get_batch_loss_metrics` (trl/experimental/orpo/orpo_trainer.py), unbound, which
  runs the real `concatenated_forward`, `get_batch_logps` and `odds_ratio_loss`.

The "model" is a stand-in whose logits are a leaf tensor: the fused LM head multiplies the "hidden
states" (the logits) by an identity `lm_head.weight`, which is exact in float32, so the gradient
TRL's kernels return for the hidden states is the gradient w.r.t. the logits.

usage: make_objective_goldens.py  (writes crates/objectives/tests/fixtures/objectives.json and dpo.json)
"""
import contextlib
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
        self.is_gradient_checkpointing = False
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
        autocast=contextlib.nullcontext,
        unwrap_model=lambda m: m,
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


DPO_DEFAULTS = dict(
    beta=0.1,
    label_smoothing=0.0,
    loss_weights=None,
    use_weighting=False,
    ld_alpha=None,
    discopop_tau=0.05,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
)


def dpo_self(model, loss_types, settings, precompute=True, ref_model=None):
    """A stand-in `self` for DPOTrainer methods, set the way DPOTrainer.__init__ sets it (lines 800-830)."""
    return SimpleNamespace(
        model=model,
        ref_model=ref_model,
        accelerator=identity_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=settings["ld_alpha"],
        precompute_ref_logps=precompute,
        f_divergence_type=settings["f_divergence_type"],
        f_alpha_divergence_coef=settings["f_alpha_divergence_coef"],
        loss_types=loss_types,
        loss_weights=settings["loss_weights"] or [1.0] * len(loss_types),
        beta=settings["beta"],
        label_smoothing=settings["label_smoothing"],
        use_weighting=settings["use_weighting"],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=settings["discopop_tau"]),
    )


def dpo(loss_type, **overrides):
    """TRL's DPO loss, metrics and gradient w.r.t. the policy's per-token log-probs for `loss_type`
    (a name or a list)."""
    settings = {**DPO_DEFAULTS, **overrides}
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    if settings["use_weighting"]:
        outputs += ("log_sum_sq_probs",)
    model = StandInLm(leaf(logits), outputs)
    model.train()
    # Keep the per-token log-probs TRL's loss is computed from, to read their gradient.
    fused_forward, seen = model.forward, []

    def forward(*args, **kwargs):
        out = fused_forward(*args, **kwargs)
        out.log_probs.retain_grad()
        seen.append(out.log_probs)
        return out

    model.forward = forward
    self = dpo_self(model, loss_types, settings)
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
    # [2B, T-1]: position t is the log-prob of token t+1. TRL sums every position (the log-probs of
    # unscored ones are 0), so only the scored positions' gradients mean anything.
    (per_token,) = seen
    return {
        "loss_type": loss_types,
        **settings,
        "loss": loss.item(),
        "metrics": metrics,
        "grad_per_token_logps": flat(per_token.grad * comp[:, 1:]),
    }


ALL_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
# Every loss type at both betas (exo_pair needs label_smoothing > 0: TRL raises otherwise).
cases = [
    dpo(loss_type, beta=beta, label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0)
    for loss_type in ALL_LOSS_TYPES
    for beta in [0.1, 0.5]
]
# The loss-specific settings.
cases += [
    dpo("robust", beta=0.1, label_smoothing=0.1),
    dpo("robust", beta=0.5, label_smoothing=0.1),
    dpo("exo_pair", beta=0.1, label_smoothing=0.2),
    dpo("aot", beta=0.5, label_smoothing=0.1),
    dpo("aot_unpaired", beta=0.5, label_smoothing=0.1),
    dpo("discopop", beta=0.5, discopop_tau=0.5),
]
# Combinations (MPO's sigmoid + bco_pair + sft with weights; unweighted lists).
cases += [
    dpo(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dpo(["sigmoid", "ipo"], beta=0.5),
    dpo(["robust", "hinge", "apo_zero"], loss_weights=[0.5, 2.0, -0.25], label_smoothing=0.1),
]
# WPO weighting, LD-DPO and both together (and with the list form).
cases += [
    dpo("sigmoid", use_weighting=True),
    dpo("ipo", beta=0.5, use_weighting=True),
    dpo(["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], use_weighting=True),
    dpo("sigmoid", ld_alpha=0.5),
    dpo("ipo", beta=0.5, ld_alpha=0.0),
    dpo(["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.3),
    dpo("sigmoid_norm", ld_alpha=1.0),
    dpo("sigmoid_norm", beta=0.5, ld_alpha=0.5, use_weighting=True),
]
# The f-divergences.
cases += [
    dpo("sigmoid", f_divergence_type="forward_kl"),
    dpo("sigmoid", f_divergence_type="js_divergence"),
    dpo("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    dpo("ipo", beta=0.5, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5),
    dpo("hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    dpo(["robust", "sft", "discopop"], beta=0.5, label_smoothing=0.1, f_divergence_type="js_divergence"),
]

# TRL 1.16 reads label_smoothing only in robust, exo_pair, aot and aot_unpaired: sigmoid with 0.1 is sigmoid.
assert dpo("sigmoid", label_smoothing=0.1)["loss"] == cases[0]["loss"], "TRL 1.16 sigmoid ignores label_smoothing"

# What TRL 1.16 fails on inside the loss itself: WPO weights are applied in place
# (`per_sequence_loss *= ...`), which breaks autograd for the losses whose last operation keeps its
# output for the backward pass (and `sft`'s expanded scalar). The Rust side refuses these up front.
def weighting_failure(loss_type):
    try:
        dpo(loss_type, label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0, use_weighting=True)
        return None
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0]


weighting_failures = {t: weighting_failure(t) for t in ALL_LOSS_TYPES if t not in ("aot", "aot_unpaired")}
weighting_failures = {t: e for t, e in weighting_failures.items() if e is not None}
print("use_weighting fails in TRL for:", sorted(weighting_failures))


# LD-DPO's reference log-probs: TRL's own `compute_ref_log_probs` (used for precompute_ref_log_probs)
# on other logits, for each alpha.
def reference_ld(ld_alpha):
    with torch.no_grad():
        model = StandInLm(reference_logits.clone(), ("log_probs",))
        model.eval()
        self = dpo_self(model, ["sigmoid"], {**DPO_DEFAULTS, "ld_alpha": ld_alpha})
        chosen, rejected = DPOTrainer.compute_ref_log_probs(self, model, {"input_ids": ids, "attention_mask": attn, "completion_mask": comp})
    return {"ld_alpha": ld_alpha, "chosen": flat(chosen), "rejected": flat(rejected)}


reference_logits = torch.randn(2 * B, T, V) * 2.0
dpo_fixture = {
    "versions": fixture["versions"],
    "note": "inputs (logits, labels, reference log-probs) are those of objectives.json",
    "cases": cases,
    "use_weighting_fails": weighting_failures,
    "reference_logits": flat(reference_logits),
    "reference_ld": [reference_ld(None), reference_ld(0.0), reference_ld(0.4), reference_ld(1.0)],
}


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

fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/objectives/tests/fixtures")
os.makedirs(fixtures, exist_ok=True)
for name, value in [("objectives.json", fixture), ("dpo.json", dpo_fixture)]:
    out = os.path.join(fixtures, name)
    with open(out, "w") as f:
        json.dump(value, f, separators=(",", ":"))
        f.write("\n")
    print(os.path.normpath(out))
