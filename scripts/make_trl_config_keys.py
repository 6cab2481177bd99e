"""Fixture for crates/trainer/tests/recipes.rs: the field names of the configs a handbook recipe
is parsed into with TRL 1.16 (ModelConfig, ScriptArguments, SFTConfig, DPOConfig, ORPOConfig;
the trainer configs include transformers' TrainingArguments). Every one must be a recipe key,
acting, named as inert, or refused by name when set to what is not built.

`defaults`: each trainer config's values as a script sees them when a recipe leaves the key out
(after `__post_init__`), and TrainingArguments' own. Built with `use_cpu=True`, without which
TRL's default `bf16=True` is refused on a machine without a GPU (that flag also turns
`dataloader_pin_memory` off). Values that are not JSON (AcceleratorConfig, ...) are their repr.

Run: `$(bash scripts/reference_env.sh) scripts/make_trl_config_keys.py > crates/trainer/tests/fixtures/trl_config_keys.json`
"""
import dataclasses
import json
import os
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")

import enum  # noqa: E402

import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig  # noqa: E402
from trl.experimental.orpo import ORPOConfig  # noqa: E402

configs = {c.__name__: sorted(f.name for f in dataclasses.fields(c) if not f.name.startswith("_"))
           for c in (ModelConfig, ScriptArguments, SFTConfig, DPOConfig, ORPOConfig)}


def plain(value):
    """`value` as JSON: enums by value, containers element-wise, anything else by repr."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return repr(value)


defaults = {}
for c in (TrainingArguments, SFTConfig, DPOConfig, ORPOConfig):
    instance = c(use_cpu=True)
    defaults[c.__name__] = {f.name: plain(getattr(instance, f.name))
                            for f in dataclasses.fields(c) if f.init and not f.name.startswith("_")}
print(json.dumps({"about": f"scripts/make_trl_config_keys.py with trl {trl.__version__}, transformers {transformers.__version__}",
                  "configs": configs, "defaults": defaults}, indent=1))
