"""Golden values for the trainer's AdamW + global-norm clipping (crates/trainer/tests/optimizer.rs):
torch.optim.AdamW with transformers' parameter grouping (no weight decay for norm weights) and
torch.nn.utils.clip_grad_norm_, on a toy model, for a few steps with a changing learning rate.

Toy model: proj.weight W [3, 4], norm.weight n [4]; loss = sum((x Wᵀ)²) + sum(n * y), x [2, 4], y [4].
The same for `optim: rmsprop`: torch.optim.RMSprop with transformers' arguments (lr and the
per-group weight decay only: alpha 0.99, eps 1e-8, no momentum).
usage: make_optimizer_goldens.py  (writes crates/trainer/tests/fixtures/{adamw,rmsprop}.json)
"""
import json
import os

import torch

def run(make_optimizer, name):
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    n = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    init = {"proj": W.detach().flatten().tolist(), "norm": n.detach().tolist(), "x": x.flatten().tolist(), "y": y.tolist()}
    lrs = [1e-2, 5e-3, 2e-2]
    opt = make_optimizer([{"params": [W], "weight_decay": 0.1}, {"params": [n], "weight_decay": 0.0}], lrs[0])
    steps = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = ((x @ W.T) ** 2).sum() + (n * y).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([W, n], max_norm=0.5)
        opt.step()
        steps.append({"lr": lr, "loss": loss.item(), "grad_norm": norm.item(),
                      "proj": W.detach().flatten().tolist(), "norm": n.detach().tolist()})
    out = os.path.join(os.path.dirname(__file__), "..", f"crates/trainer/tests/fixtures/{name}.json")
    with open(out, "w") as f:
        json.dump({"torch_version": torch.__version__, "weight_decay": 0.1, "max_grad_norm": 0.5, "init": init, "steps": steps}, f, indent=1)
    print(out)


run(lambda groups, lr: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8), "adamw")
run(lambda groups, lr: torch.optim.RMSprop(groups, lr=lr), "rmsprop")
