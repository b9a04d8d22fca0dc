"""Caching throughput against the bare forward it is built on, measured in the same run.

    python benchmarks/cache_speed.py [CONFIG] [--set section.key=value ...] [--tokens N] [--rounds R]

"bare" is `run_with_cache(tokens, names_filter=hookpoints, stop_at_layer=...)` on pre-tokenized batches,
nothing else. "cache" is the whole caching stage (`build_cache`: tokenizing, the same forward,
BOS removal, casting, shard writes with checksums, manifest updates) into a fresh directory.
The two alternate for `rounds` rounds so that load from other processes affects both alike;
the median round is reported.
Target: cache >= 90% of bare.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

# Before torch loads: on a shared CPU, OpenMP threads spinning at each barrier wait for peers the OS
# has descheduled, and a Gemma forward ran 5-25x slower here under load. Passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import build_cache
from sae.cli.run_config import load_run_config
from sae.data import context_batches, token_contexts
from sae.io import atomic_write_json
from sae.lm import capture, hookpoints_ready, load_model, stop_layer


def bare_forward_seconds(model, batches: list[torch.Tensor], hookpoints: list[str]) -> float:
    stop_at_layer = stop_layer(hookpoints, model.cfg.n_layers)
    started = time.perf_counter()
    for tokens in batches:
        capture(model, tokens, hookpoints, stop_at_layer)
    return time.perf_counter() - started


def caching_seconds(run, model, work_dir: Path) -> float:
    cache_dir = work_dir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    run = replace(run, cache=replace(run.cache, dir=str(cache_dir)))
    started = time.perf_counter()
    build_cache(run, model, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--tokens", type=int, default=65_536, help="tokens per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cache_speed.json")
    args = parser.parse_args()

    run = load_run_config(args.config, args.set)
    run = replace(run, cache=replace(run.cache, tokens=args.tokens))
    model = load_model(run.model.name, run.model.dtype, run.model.device)
    # The bare forward runs the very contexts the cache stage will read (BOS included, as it is computed).
    n_contexts = -(-args.tokens // (run.data.context_size - int(run.cache.exclude_bos)))
    contexts = islice(token_contexts(run.data, model.tokenizer), n_contexts)
    batches = [b.to(run.model.device) for b in context_batches(contexts, run.cache.batch_contexts)]
    kept_tokens = n_contexts * (run.data.context_size - int(run.cache.exclude_bos))

    rounds = []
    # Per-head hook_result is switched on for both sides: the bare forward computes what is cached.
    with hookpoints_ready(model, run.cache.hookpoints), tempfile.TemporaryDirectory() as work_dir:
        bare_forward_seconds(model, batches[:2], run.cache.hookpoints)  # warm-up
        for r in range(args.rounds):
            bare = bare_forward_seconds(model, batches, run.cache.hookpoints)
            cached = caching_seconds(run, model, Path(work_dir))
            rounds.append(
                {
                    "bare_tokens_per_s": kept_tokens / bare,
                    "cache_tokens_per_s": kept_tokens / cached,
                    "ratio": bare / cached,
                }
            )
            print(
                f"round {r + 1}: bare {kept_tokens / bare:,.0f} tok/s, "
                f"cache {kept_tokens / cached:,.0f} tok/s, cache/bare {bare / cached:.1%}"
            )
    # Each round pairs adjacent measurements; the median round is robust to a burst of outside load.
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    result = {
        "model": run.model.name,
        "model_dtype": run.model.dtype,
        "cache_dtype": run.cache.dtype,
        "hookpoints": run.cache.hookpoints,
        "context_size": run.data.context_size,
        "batch_contexts": run.cache.batch_contexts,
        "tokens_per_measurement": kept_tokens,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rounds": rounds,
        "median_round": median,
    }
    atomic_write_json(args.out, result)
    print(
        f"median of {args.rounds} rounds: bare {median['bare_tokens_per_s']:,.0f} tok/s, "
        f"cache {median['cache_tokens_per_s']:,.0f} tok/s, cache/bare {median['ratio']:.1%} (target >= 90%)  "
        f"-> {args.out}"
    )


if __name__ == "__main__":
    main()
