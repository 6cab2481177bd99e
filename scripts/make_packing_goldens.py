"""Golden packed rows for crates/data/tests/packing_golden.rs: TRL 1.16's `pack_dataset` for each
`packing_strategy` (`bfd`, `bfd_split`, `wrapped`), run as SFTTrainer runs it, through
`datasets.map(batched=True, num_proc=dataset_num_proc)` (contiguous shards, batches of 1000 rows,
each packed on its own).

Example `i` of length `n` is the tokens `i * 4096 + j`, `j < n`, so each packed row is written
compactly as its runs of consecutive tokens of one example, `[i, first j, length]`, beside TRL's
`seq_lengths` (the documents of the row; absent for `wrapped`, whose rows are one sequence each).

usage: $(bash scripts/reference_env.sh) scripts/make_packing_goldens.py
writes crates/data/tests/fixtures/tokenization/packing.json
"""
import json
import os
import random
import sys

import datasets
import trl
from trl.data_utils import pack_dataset

datasets.disable_progress_bars()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates/data/tests/fixtures/tokenization/packing.json")
STRIDE = 4096


def runs(ids):
    """`[example, first offset, length]` for each run of consecutive tokens of one example."""
    out = []
    for t in ids:
        i, j = divmod(t, STRIDE)
        if out and out[-1][0] == i and out[-1][1] + out[-1][2] == j:
            out[-1][2] += 1
        else:
            out.append([i, j, 1])
    return out


def case(name, lengths, seq_length, strategy, num_proc):
    ids = [[i * STRIDE + j for j in range(n)] for i, n in enumerate(lengths)]
    dataset = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    packed = pack_dataset(dataset, seq_length, strategy, {"num_proc": num_proc} if num_proc else {})
    rows = []
    for row in packed:
        assert row["labels"] == row["input_ids"], "labels are packed with the ids"
        rows.append({"runs": runs(row["input_ids"]), "seq_lengths": row.get("seq_lengths")})
    return {"lengths": name, "strategy": strategy, "seq_length": seq_length, "num_proc": num_proc, "rows": rows}


def main():
    rng = random.Random(20261204)
    lists = {
        "hand0": [6, 3, 4, 2, 1],
        "hand1": [5, 5, 5, 3, 3, 3, 2, 2, 8, 1, 7],
        "hand2": [9, 1, 12, 3, 3, 4, 4, 4, 0, 2],
        "hand3": [20, 1, 17, 8, 8],
        "few": [7, 3, 9],
        # Chat-like lengths (log-normal), some longer than a row; more rows than one map batch.
        "chat": [max(1, min(3000, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(1200)],
    }
    cases = []
    for name in ("hand0", "hand1", "hand2", "hand3"):
        for strategy in ("bfd_split", "wrapped"):
            cases.append(case(name, lists[name], 8, strategy, None))
    for strategy in ("bfd", "bfd_split", "wrapped"):
        for num_proc in (None, 3):
            cases.append(case("chat", lists["chat"], 512, strategy, num_proc))
    # More processes than rows: datasets lowers num_proc to the number of rows.
    cases.append(case("few", lists["few"], 8, "bfd_split", 5))
    out = {"about": f"made by scripts/make_packing_goldens.py with trl {trl.__version__}, datasets {datasets.__version__}",
           "stride": STRIDE, "lengths": lists, "cases": cases}
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
