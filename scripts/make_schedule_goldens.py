"""Goldens for crates/trainer/tests/schedules.rs: the learning rate at every step of transformers' own
schedulers (`transformers.get_scheduler` with `scheduler_specific_kwargs`, as the Trainer builds them
from `lr_scheduler_type` + `lr_scheduler_kwargs`), warmup steps as the Trainer derives them.

Run: `$(bash scripts/reference_env.sh) scripts/make_schedule_goldens.py > crates/trainer/tests/fixtures/schedules.json`
"""
import json, math
import torch
from transformers import get_scheduler
cases = [
  ("cosine_with_min_lr", {"min_lr_rate": 0.1}, 40, 0.1, 0),
  ("cosine_with_min_lr", {"min_lr": 2e-5, "num_cycles": 1.0}, 30, 0.0, 5),
  ("inverse_sqrt", {}, 50, 0.0, 100),
  ("inverse_sqrt", {}, 20, 0.0, 0),
  ("inverse_sqrt", {"timescale": 7}, 20, 0.2, 0),
  ("constant_with_warmup", {}, 20, 0.25, 0),
  ("cosine", {"num_cycles": 1.5}, 25, 0.1, 0),
  ("linear", {}, 13, 0.3, 0),
]
out = []
for name, kw, total, ratio, wsteps in cases:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-4)
    warm = wsteps if wsteps > 0 else int(math.ceil(total * ratio))
    sch = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total, scheduler_specific_kwargs=kw)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"]); opt.step(); sch.step()
    out.append({"name": name, "kwargs": kw, "total_steps": total, "warmup_ratio": ratio, "warmup_steps": wsteps, "peak_lr": 1e-4, "lrs": lrs})
print(json.dumps(out, indent=1))
