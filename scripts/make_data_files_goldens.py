"""Goldens for README `configs:` resolution (crates/data/src/data_files.rs), from `datasets` itself.

For each case — a README.md and a list of file paths — the files are created in a temporary
directory and, for each (config, split) query, `datasets.load_dataset_builder(dir, config)` says
which files make up the split (`builder.config.data_files[split]`, relative to the directory) or
which error it raises. Writes crates/data/tests/fixtures/datasets/data_files_goldens.json:

    {"datasets": "<version>", "cases": [{"name", "readme", "files": [...],
      "queries": [{"config": str|null, "split": str, "files": [...]} | {..., "error": kind}]}]}

with `kind` one of `no_default_config` (datasets' "Config name is missing"), `unknown_config`
("BuilderConfig ... not found"), `missing_split` (the config has no such split),
`file_not_found` (a pattern without wildcards that matches nothing).

usage: make_data_files_goldens.py   (run with the reference venv, scripts/reference_env.sh; the
        output is committed, tests do not need Python)
"""
import json
import os
import tempfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "crates", "data", "tests", "fixtures", "datasets", "data_files_goldens.json")
)

SMOLTALK2 = """---
configs:
- config_name: SFT
  data_files:
  - split: OpenThoughts3_1.2M_think
    path: data/SFT/OpenThoughts3_1.2M_think-*
  - split: smoltalk_smollm3_everyday_conversations_no_think
    path: data/SFT/smoltalk_smollm3_everyday_conversations_no_think-*
- config_name: Preference
  data_files:
  - split: llama_3.1_tulu_3_8b_preference_mixture_no_think
    path: data/Preference/llama_3.1_tulu_3_8b_preference_mixture_no_think-*
  - split: tulu_3_8b_pref_personas_think
    path:
    - data/Preference/tulu_3_8b_pref_personas_think-00000-of-00001.parquet
---
# SmolTalk2
"""

SMOLTALK = """---
configs:
- config_name: all
  data_files:
  - split: train
    path: data/all/train-*
  - split: test
    path: data/all/test-*
- config_name: smol-magpie-ultra
  data_files:
  - split: train
    path: data/smol-magpie-ultra/train-*
  - split: test
    path: data/smol-magpie-ultra/test-*
- config_name: by-convention
  data_dir: data/all
---
"""

ULTRAFEEDBACK = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: train_sft
    path: data/train_sft-*
  - split: test_prefs
    path: data/test_prefs-*
---
"""

GLOBS = """---
configs:
- config_name: strings
  default: true
  data_files:
  - "parts/**/*.parquet"
  - extra.parquet
- config_name: one
  data_files: parts/a/*.parquet
- config_name: classes
  data_files:
  - split: train
    path: "parts/[ab]/x-[0-9]*.parquet"
  - split: other
    path: ["parts/?/y.parquet", "**/z.parquet"]
  - split: hidden
    path: ".hidden/*.parquet"
- config_name: missing
  data_files:
  - split: train
    path: parts/none.parquet
- config_name: inside
  data_dir: parts
  data_files:
  - split: train
    path: "a/*"
---
"""

CASES = [
    (
        "smoltalk2",
        SMOLTALK2,
        [
            "data/SFT/OpenThoughts3_1.2M_think-00000-of-00002.parquet",
            "data/SFT/OpenThoughts3_1.2M_think-00001-of-00002.parquet",
            "data/SFT/smoltalk_smollm3_everyday_conversations_no_think-00000-of-00001.parquet",
            "data/Preference/llama_3.1_tulu_3_8b_preference_mixture_no_think-00000-of-00001.parquet",
            "data/Preference/tulu_3_8b_pref_personas_think-00000-of-00001.parquet",
            "data/train-00000-of-00001.parquet",
        ],
        [
            ("SFT", "OpenThoughts3_1.2M_think"),
            ("SFT", "smoltalk_smollm3_everyday_conversations_no_think"),
            ("Preference", "llama_3.1_tulu_3_8b_preference_mixture_no_think"),
            ("Preference", "tulu_3_8b_pref_personas_think"),
            (None, "train"),
            ("RL", "train"),
            ("SFT", "train"),
        ],
    ),
    (
        "smoltalk",
        SMOLTALK,
        [
            "data/all/train-00000-of-00002.parquet",
            "data/all/train-00001-of-00002.parquet",
            "data/all/test-00000-of-00001.parquet",
            "data/smol-magpie-ultra/train-00000-of-00001.parquet",
            "data/smol-magpie-ultra/test-00000-of-00001.parquet",
        ],
        [("all", "train"), ("all", "test"), ("smol-magpie-ultra", "test"), ("by-convention", "train"), ("by-convention", "test"), (None, "train")],
    ),
    (
        "ultrafeedback_binarized",
        ULTRAFEEDBACK,
        [
            "data/train_prefs-00000-of-00001.parquet",
            "data/train_sft-00000-of-00002.parquet",
            "data/train_sft-00001-of-00002.parquet",
            "data/test_prefs-00000-of-00001.parquet",
            "data/train-00000-of-00001.parquet",
        ],
        [(None, "train_prefs"), ("default", "train_sft"), (None, "test_prefs"), (None, "train")],
    ),
    (
        "globs",
        GLOBS,
        [
            "parts/a/x-1.parquet",
            "parts/a/x-b.parquet",
            "parts/b/x-2.parquet",
            "parts/b/y.parquet",
            "parts/c/deep/z.parquet",
            "parts/__pycache__/q.parquet",
            ".hidden/h.parquet",
            "parts/.hidden/h.parquet",
            "parts/a/README.md",
            "extra.parquet",
        ],
        [
            (None, "train"),
            ("strings", "train"),
            ("one", "train"),
            ("classes", "train"),
            ("classes", "other"),
            ("classes", "hidden"),
            ("missing", "train"),
            ("inside", "train"),
        ],
    ),
]


def write_parquet(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": ["x"]}), path)


def query(root, config, split):
    try:
        builder = datasets.load_dataset_builder(root, config)
    except ValueError as e:
        if "Config name is missing" in str(e):
            return {"error": "no_default_config"}
        if "not found" in str(e):
            return {"error": "unknown_config"}
        raise
    except FileNotFoundError:
        return {"error": "file_not_found"}
    data_files = builder.config.data_files
    if split not in data_files:
        return {"error": "missing_split"}
    return {"files": [os.path.relpath(f, root).replace(os.sep, "/") for f in data_files[split]]}


def main():
    cases = []
    for name, readme, files, queries in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, name)
            os.makedirs(root)
            with open(os.path.join(root, "README.md"), "w") as f:
                f.write(readme)
            for file in files:
                if file.endswith(".parquet"):
                    write_parquet(os.path.join(root, file))
                else:
                    os.makedirs(os.path.dirname(os.path.join(root, file)), exist_ok=True)
                    open(os.path.join(root, file), "w").close()
            answers = [{"config": config, "split": split, **query(root, config, split)} for config, split in queries]
        cases.append({"name": name, "readme": readme, "files": files, "queries": answers})
    with open(OUT, "w") as f:
        json.dump({"datasets": datasets.__version__, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
