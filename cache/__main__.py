"""`python -m cache CONFIG [--set section.key=value ...]` builds (or resumes) a cache;
`torchrun --nproc_per_node N -m cache CONFIG` does it with N processes, each caching its own shards;
`python -m cache --verify DIR` checks every shard's checksum."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before torch loads: on a shared CPU, OpenMP threads spinning at each barrier wait for peers the OS
# has descheduled, and a Gemma forward ran 5-25x slower here under load. Passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sae.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cache", description=__doc__)
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
    if (args.config is None) == (args.verify is None):
        parser.error("give either CONFIG or --verify DIR")

    import torch

    from cache import CacheError, build_cache, verify_cache
    from sae.distributed import Distributed
    from sae.run_config import load_run_config

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
        if not dist.is_main:
            return 0
        from cache import read_manifest

        manifest = read_manifest(cache_dir)
        print(f"{cache_dir}: {manifest['tokens']} tokens in {len(manifest['shards'])} shards")
        print(json.dumps(manifest["norm_stats"], indent=2))
        return 0
    except (CacheError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
