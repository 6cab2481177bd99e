"""Dataset fixtures and golden mixes for crates/data/tests/mixer.rs and tests/hub.rs.

Writes, under crates/data/tests/fixtures/datasets/:
- ultrachat_mini/data/{train_sft,test_sft}-NNNNN-of-NNNNN.parquet: a few rows shaped like
  HuggingFaceH4/ultrachat_200k (prompt, prompt_id, messages: list<struct<content, role>>), the
  train split in two shards (one snappy with small row groups, one zstd);
- ultrafeedback_mini/data/{train_prefs,test_prefs,train_sft,test_sft}-00000-of-00001.parquet:
  rows shaped like HuggingFaceH4/ultrafeedback_binarized (prompt, prompt_id, chosen, rejected,
  messages, score_chosen, score_rejected);
- local_chat/train_sft.jsonl and local_chat/test_sft.json: JSON Lines and a JSON array, one key
  present in some rows only (datasets fills it with null);
- shuffle_goldens.json: numpy's SeedSequence words, PCG64 raw outputs and
  `default_rng(seed).permutation(n)` for several (seed, n), n up to 100000 (long ones as head, tail
  and the SHA-256 of the little-endian u64 array);
- split_goldens.json: `Dataset.train_test_split(test_size, seed)` index sets and the errors it raises;
- mixer_goldens.json: the rows that the handbook's two mixers produce from these fixtures.

The mixers are re-stated here with `datasets`' own primitives, step for step as the handbook
does them (classic `mix_datasets`: remove columns not in columns_to_keep, select(range(int(frac *
len))) per train split, concatenate in mixer order, shuffle(seed=42); newer `get_dataset` with a
`dataset_mixture`: select_columns, shuffle(seed).select(range(int(len * weight))), concatenate,
shuffle(seed), train_test_split(test_size, seed)). Parquet splits are loaded with
`load_dataset(dir, split=...)` (datasets' own hub-layout resolution); the JSON splits of local_chat
(not names datasets infers) with `load_dataset("json", data_files=...)`.

usage: make_mixer_goldens.py   (run with the reference venv, scripts/reference_env.sh, plus
        `pip install datasets pyarrow`; the outputs are committed, tests do not need Python)
"""
import hashlib
import json
import os
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, concatenate_datasets, load_dataset

FIXTURES = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates/data/tests/fixtures/datasets")
)

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
CONVERSATION = pa.list_(MESSAGE)


def conversation(tag, turns):
    out = []
    for t in range(turns):
        out.append({"content": f"{tag} question {t}", "role": "user"})
        out.append({"content": f"{tag} answer {t}", "role": "assistant"})
    return out


def write_parquet(path, rows, schema, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    # store_schema=False: no pyarrow schema blob in the footer, to keep the fixtures small.
    pq.write_table(table, path, store_schema=False, **kwargs)


def make_ultrachat():
    root = os.path.join(FIXTURES, "ultrachat_mini", "data")
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", CONVERSATION)])

    def rows(split, n, offset=0):
        out = []
        for i in range(offset, offset + n):
            tag = f"uc-{split}-{i}"
            out.append({"prompt": f"{tag} question 0", "prompt_id": f"{i:04x}", "messages": conversation(tag, 1 + i % 2)})
        return out

    write_parquet(os.path.join(root, "train_sft-00000-of-00002.parquet"), rows("train", 7), schema, row_group_size=3)
    write_parquet(os.path.join(root, "train_sft-00001-of-00002.parquet"), rows("train", 5, 7), schema, compression="zstd")
    write_parquet(os.path.join(root, "test_sft-00000-of-00001.parquet"), rows("test", 4), schema)


def make_ultrafeedback():
    root = os.path.join(FIXTURES, "ultrafeedback_mini", "data")
    schema = pa.schema([
        ("prompt", pa.string()), ("prompt_id", pa.string()),
        ("chosen", CONVERSATION), ("rejected", CONVERSATION), ("messages", CONVERSATION),
        ("score_chosen", pa.float64()), ("score_rejected", pa.float64()),
    ])

    def rows(split, n):
        out = []
        for i in range(n):
            tag = f"uf-{split}-{i}"
            prompt = f"{tag} question 0"
            chosen = [{"content": prompt, "role": "user"}, {"content": f"{tag} good answer", "role": "assistant"}]
            rejected = [{"content": prompt, "role": "user"}, {"content": f"{tag} bad answer", "role": "assistant"}]
            out.append({
                "prompt": prompt, "prompt_id": f"{1000 + i:04x}", "chosen": chosen, "rejected": rejected,
                "messages": chosen, "score_chosen": 6.0 + (i % 5) * 0.75, "score_rejected": 1.5 + (i % 3) * 0.25,
            })
        return out

    for split, n in [("train_prefs", 10), ("test_prefs", 3), ("train_sft", 8), ("test_sft", 3)]:
        write_parquet(os.path.join(root, f"{split}-00000-of-00001.parquet"), rows(split, n), schema)


def make_local_chat():
    root = os.path.join(FIXTURES, "local_chat")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "train_sft.jsonl"), "w") as f:
        for i in range(6):
            row = {"messages": conversation(f"lc-train-{i}", 1), "prompt": f"lc-train-{i} question 0"}
            if i % 2 == 0:
                row["source"] = f"s{i}"
            f.write(json.dumps(row) + "\n")
            if i == 2:
                f.write("\n")  # blank lines are skipped
    test = [{"messages": conversation(f"lc-test-{i}", 2), "prompt": f"lc-test-{i} question 0"} for i in range(2)]
    with open(os.path.join(root, "test_sft.json"), "w") as f:
        json.dump(test, f, indent=1)


def u64_sha256(values):
    return hashlib.sha256(np.asarray(values, dtype="<u8").tobytes()).hexdigest()


def shuffle_goldens():
    seeds = [0, 1, 42, 1234, 2**32 + 7, 2**63 + 5]
    out = {"seed_sequence": [], "raw": [], "permutations": []}
    for seed in seeds:
        out["seed_sequence"].append({"seed": seed, "words": np.random.SeedSequence(seed).generate_state(4, np.uint64).tolist()})
        out["raw"].append({"seed": seed, "values": np.random.PCG64(seed).random_raw(6).tolist()})
        for n in [0, 1, 2, 3, 10, 1000, 100000]:
            perm = np.random.default_rng(seed).permutation(n).tolist()
            entry = {"seed": seed, "n": n, "sha256": u64_sha256(perm)}
            if n <= 10:
                entry["full"] = perm
            else:
                entry["head"] = perm[:40]
                entry["tail"] = perm[-10:]
            out["permutations"].append(entry)
    return out


def split_goldens():
    cases = [(10, 0.2, 42), (7, 0.25, 0), (100, 0.1, 1234), (5, 2, 3), (3, 0.5, 42), (1000, 0.05, 42), (2, 0.5, 7)]
    errors = [(1, 0.5, 0), (10, 1.0, 0), (10, 0.0, 0), (10, 10, 0), (10, 0, 0)]
    out = {"cases": [], "errors": []}
    for n, test_size, seed in cases:
        ds = Dataset.from_dict({"i": list(range(n))})
        split = ds.train_test_split(test_size=test_size, seed=seed)
        train, test = list(split["train"]["i"]), list(split["test"]["i"])
        case = {"n": n, "test_size": test_size, "seed": seed, "n_train": len(train), "n_test": len(test)}
        if n <= 100:
            case.update(train=train, test=test)
        else:
            case.update(train_head=train[:20], test_head=test[:20], train_sha256=u64_sha256(train),
                        test_sha256=u64_sha256(test))
        out["cases"].append(case)
    for n, test_size, seed in errors:
        ds = Dataset.from_dict({"i": list(range(n))})
        try:
            ds.train_test_split(test_size=test_size, seed=seed)
        except ValueError as e:
            out["errors"].append({"n": n, "test_size": test_size, "seed": seed, "message": str(e)})
        else:
            raise AssertionError(f"train_test_split({n}, {test_size}) did not fail")
    return out


def load_split(dataset_id, split):
    path = os.path.join(FIXTURES, dataset_id)
    if dataset_id == "local_chat":
        files = sorted(f for f in os.listdir(path) if f.split(".")[0] == split)
        return load_dataset("json", data_files=[os.path.join(path, f) for f in files], split="train")
    return load_dataset(path, split=split)


def classic_mix(dataset_mixer, splits, columns_to_keep, shuffle):
    """The handbook's mix_datasets, one train split per dataset."""
    train, test, fracs = [], [], []
    for ds_id, frac in dataset_mixer.items():
        fracs.append(frac)
        for split in splits:
            ds = load_split(ds_id, split)
            ds = ds.remove_columns([c for c in ds.column_names if c not in columns_to_keep])
            if "train" in split:
                train.append(ds)
            elif "test" in split:
                test.append(ds)
            else:
                raise ValueError(split)
    out = {}
    if train:
        subsets = [ds.select(range(int(frac * len(ds)))) for ds, frac in zip(train, fracs)]
        mixed = concatenate_datasets(subsets)
        out["train"] = mixed.shuffle(seed=42) if shuffle else mixed
    if test:
        mixed = concatenate_datasets(test)
        out["test"] = mixed.shuffle(seed=42) if shuffle else mixed
    return out


def mixture_mix(mixture):
    """The newer handbook's get_dataset for a dataset_mixture."""
    seed = mixture.get("seed", 0)
    parts = []
    for entry in mixture["datasets"]:
        ds = load_split(entry["id"], entry.get("split", "train"))
        if entry.get("columns") is not None:
            ds = ds.select_columns(entry["columns"])
        weight = entry.get("weight", 1.0)
        if weight is not None:
            ds = ds.shuffle(seed=seed).select(range(int(len(ds) * weight)))
        parts.append(ds)
    combined = concatenate_datasets(parts).shuffle(seed=seed)
    if mixture.get("test_split_size") is not None:
        split = combined.train_test_split(test_size=mixture["test_split_size"], seed=seed)
        return {"train": split["train"], "test": split["test"]}
    return {"train": combined}


def mixer_goldens():
    scenarios = [
        ("classic_three_sources", "mixer", {
            "dataset_mixer": {"ultrachat_mini": 0.5, "ultrafeedback_mini": 0.3, "local_chat": 1.0},
            "dataset_splits": ["train_sft", "test_sft"], "columns_to_keep": ["messages"], "shuffle": True}),
        ("classic_null_filled_columns", "mixer", {
            "dataset_mixer": {"ultrafeedback_mini": 0.7, "ultrachat_mini": 1.0},
            "dataset_splits": ["train_sft", "test_sft"],
            "columns_to_keep": ["messages", "prompt", "score_chosen"], "shuffle": True}),
        ("classic_prefs_only", "mixer", {
            "dataset_mixer": {"ultrafeedback_mini": 1.0},
            "dataset_splits": ["train_prefs", "test_prefs"],
            "columns_to_keep": ["chosen", "rejected", "prompt"], "shuffle": True}),
        ("mixture_weights_test_fraction", "mixture", {
            "datasets": [
                {"id": "ultrachat_mini", "split": "train_sft", "columns": ["messages"], "weight": 0.5},
                {"id": "ultrafeedback_mini", "split": "train_prefs", "columns": ["messages"], "weight": 0.7},
                {"id": "local_chat", "split": "train_sft", "columns": ["messages"]},
            ],
            "seed": 42, "test_split_size": 0.25}),
        ("mixture_default_seed_test_count", "mixture", {
            "datasets": [
                {"id": "ultrafeedback_mini", "split": "train_sft", "columns": ["prompt", "messages"], "weight": None},
                {"id": "ultrachat_mini", "split": "train_sft", "columns": ["messages", "prompt"], "weight": 0.3},
            ],
            "test_split_size": 3}),
        ("mixture_no_test_split", "mixture", {
            "datasets": [{"id": "ultrachat_mini", "split": "test_sft", "weight": 1.0}],
            "seed": 7}),
    ]
    out = []
    for name, kind, config in scenarios:
        if kind == "mixer":
            mixed = classic_mix(config["dataset_mixer"], config["dataset_splits"], config["columns_to_keep"], config["shuffle"])
        else:
            mixed = mixture_mix(config)
        entry = {"name": name, "kind": kind, "config": config}
        for split, ds in mixed.items():
            entry[split] = {"columns": ds.column_names, "rows": ds.to_list()}
        out.append(entry)
    return out


def main():
    for name in ["ultrachat_mini", "ultrafeedback_mini", "local_chat"]:
        shutil.rmtree(os.path.join(FIXTURES, name), ignore_errors=True)
    os.makedirs(FIXTURES, exist_ok=True)
    make_ultrachat()
    make_ultrafeedback()
    make_local_chat()
    datasets.disable_caching()
    versions = {"numpy": np.__version__, "datasets": datasets.__version__, "pyarrow": pa.__version__}
    for name, payload in [("shuffle_goldens.json", shuffle_goldens()), ("split_goldens.json", split_goldens()),
                          ("mixer_goldens.json", mixer_goldens())]:
        with open(os.path.join(FIXTURES, name), "w") as f:
            json.dump({"generated_by": "scripts/make_mixer_goldens.py", "versions": versions, **(
                payload if isinstance(payload, dict) else {"scenarios": payload})}, f, separators=(",", ":"))
            f.write("\n")
    print("wrote", FIXTURES)


if __name__ == "__main__":
    main()
