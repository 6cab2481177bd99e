"""Fixture for crates/trainer/tests/recipes.rs: the field names of the configs a handbook recipe
is parsed into with TRL 1.16 (ModelConfig, ScriptArguments, SFTConfig, DPOConfig, ORPOConfig;
the trainer configs include transformers' TrainingArguments). Every one must be a recipe key,
acting, named as inert, or refused by name when set to what is not built.

Run: `$(bash scripts/reference_env.sh) scripts/make_trl_config_keys.py > crates/trainer/tests/fixtures/trl_config_keys.json`
"""
import dataclasses
import json
import os
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")

import transformers  # noqa: E402
import trl  # noqa: E402
from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig  # noqa: E402
from trl.experimental.orpo import ORPOConfig  # noqa: E402

configs = {c.__name__: sorted(f.name for f in dataclasses.fields(c) if not f.name.startswith("_"))
           for c in (ModelConfig, ScriptArguments, SFTConfig, DPOConfig, ORPOConfig)}
print(json.dumps({"about": f"scripts/make_trl_config_keys.py with trl {trl.__version__}, transformers {transformers.__version__}",
                  "configs": configs}, indent=1))
