"""sae-cache CONFIG [--set section.key=value ...]   (or: python -m cache ...)

Builds (or resumes) the activation cache of a run config's [model], [data] and [cache] sections;
`torchrun --nproc_per_node N -m cache CONFIG` does it with N processes, each caching its own shards.
`sae-cache --verify DIR` checks every shard's checksum.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cache import CacheError, build_cache, read_manifest, verify_cache
from sae.cli.run_config import load_run_config
from sae.distributed import Distributed
from sae.typed_config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sae-cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", help="run config TOML (its [model], [data] and [cache] sections)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    parser.add_argument(
        "--verify", metavar="DIR", help="check the manifest and every shard checksum of a cache"
    )
    args = parser.parse_args(argv)
    if args.verify is not None and (args.config is not None or args.set):
        parser.error("--verify DIR takes no config")
    try:
        if args.verify:
            manifest = verify_cache(args.verify)
            print(
                f"{args.verify}: OK, {len(manifest['shards'])} shards, {manifest['tokens']} tokens, "
                f"complete={manifest['complete']}"
            )
            return 0
        run = load_run_config(args.config, args.set)
        # Under torchrun each rank caches a disjoint set of shards and rank 0 merges the manifests.
        dist = Distributed.from_env(torch.device(run.model.device).type)
        run.model.device = str(dist.device(torch.device(run.model.device)))
        cache_dir = build_cache(run, progress=dist.is_main, dist=dist)
        if dist.is_main:
            manifest = read_manifest(cache_dir)
            print(f"{cache_dir}: {manifest['tokens']} tokens in {len(manifest['shards'])} shards")
            print(json.dumps(manifest["norm_stats"], indent=2))
        return 0
    except (CacheError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
