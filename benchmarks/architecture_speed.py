"""Training throughput of each architecture alone, ours against dictionary_learning's, on the same batches.

    python benchmarks/architecture_speed.py                 # ~6 min on the 2-core CPU
    python benchmarks/architecture_speed.py --batches 8     # a quick look

The quality side by side (FVU, CE recovered, KL over 16 held-out slices) is benchmarks/architectures.py;
its loop trains our seven architectures together, so its tokens/s is shared. Here each dictionary trains
alone, one after the other, on the first `--batches` batches of 4,096 rows of the default job's cache
(Gemma 3 270M, blocks.6.hook_resid_post; `python train.py` builds it), d_sae 8192, k 32:
- ours: `sae.Trainer` with one `SAEConfig`, default `TrainConfig` (batch 4,096); tokens/s = rows over the
  wall time of `fit`, its initialisation from the data included;
- dictionary_learning 0.1.0 (its venv, `--peer-python`): benchmarks/peer_dictionary_learning.py, its own
  trainers' `update()`; tokens/s over every step including step 0 (`tokens_per_second_all`, which holds
  its geometric-median initialisation), and without step 0;
- sparsify 1.3.3 TopK (signum, its default; fp32) in studies/optimizer_gap's loop, wall time of the loop.
Writes benchmarks/results/architecture_speed.json and prints the table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import sae
from sae.cli.run_config import load_run_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import (  # a sibling script, not a package
    BATCH,
    PEER_PYTHON,
    ROOT,
    cache_rows,
    loadavg,
    machine,
    our_config,
    train_dictionary_learning,
    train_sparsify,
)

OURS = {
    "topk": 32,
    "batchtopk": 32,
    "matryoshka": 32,
    "jumprelu": 32,
    "topafa": 64,
    "relu": None,
    "codebook": 32,
}
PEERS = ["batchtopk", "jumprelu", "matryoshka"]


def ours_alone(batches: list[torch.Tensor], arch: str, out: Path, model_name: str) -> dict:
    cfg = our_config(arch, OURS[arch], model_name)
    started = time.perf_counter()
    sae.Trainer([cfg], sae.TrainConfig(batch_size=BATCH, out_dir=str(out / arch))).fit(batches)
    seconds = time.perf_counter() - started
    rows = sum(len(b) for b in batches)
    return {"tokens": rows, "seconds": seconds, "tokens_per_second": rows / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "architecture_speed")
    parser.add_argument("--peer-python", default=PEER_PYTHON)
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "architecture_speed.json"
    )
    args = parser.parse_args()
    config = load_run_config(None, [])
    _, rows = cache_rows(ROOT / config.cache.dir)
    train_rows = rows[: args.batches * BATCH].clone()
    del rows
    batches = list(train_rows.split(BATCH))
    results = {"command": " ".join(["python benchmarks/architecture_speed.py", *sys.argv[1:]])}
    results |= {
        "machine": machine(),
        "loadavg": {"start": loadavg()},
        "batches": args.batches,
        "rows": len(train_rows),
    }
    results["ours"] = {}
    for arch in OURS:
        results["ours"][arch] = ours_alone(batches, arch, args.out / "ours", config.model.name)
        print(f"ours {arch}: {results['ours'][arch]['tokens_per_second']:,.0f} tok/s", flush=True)
    results["dictionary_learning"] = {}
    for arch in PEERS:  # one at a time, so that each has the cores to itself
        (trained,) = train_dictionary_learning(train_rows, [arch], args.out / "dl", args.peer_python, False)
        results["dictionary_learning"][arch] = trained.train
        print(f"dictionary_learning {arch}: {trained.train['tokens_per_second_all']:,.0f} tok/s", flush=True)
    (trained,) = train_sparsify(train_rows, train_rows[:BATCH], ["signum"], args.out / "sparsify", False)
    results["sparsify"] = {"topk": trained.train}
    results["loadavg"]["end"] = loadavg()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| architecture | ours tok/s | peer | peer tok/s (with its init) | peer, no step 0 | ours / peer |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for arch, ours in results["ours"].items():
        peer_name, peer = None, None
        if arch in results["dictionary_learning"]:
            peer_name, peer = "dictionary_learning", results["dictionary_learning"][arch]
            peer_all, peer_steps = peer["tokens_per_second_all"], peer["tokens_per_second"]
        elif arch == "topk":
            peer_name, peer = "sparsify (signum, fp32)", results["sparsify"]["topk"]
            peer_all = peer_steps = peer["tokens_per_second"]
        mine = ours["tokens_per_second"]
        if peer is None:
            lines.append(f"| {arch} | {mine:,.0f} | none | | | |")
        else:
            figures = f"{peer_all:,.0f} | {peer_steps:,.0f} | {mine / peer_all:.1f}x"
            lines.append(f"| {arch} | {mine:,.0f} | {peer_name} | {figures} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
