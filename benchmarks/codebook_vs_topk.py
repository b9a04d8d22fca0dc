"""Codebook SAE against TopK at equal k, on the same cached activations, evaluated the same way.

    python benchmarks/codebook_vs_topk.py                  # the default job's cache (Gemma 3 270M, layer 6)
    python benchmarks/codebook_vs_topk.py --set eval.tokens=4096

Both SAEs train on the cache of the default run config (built if missing; `--set` overrides apply) and are
evaluated with the model in the loop on the same held-out tokens: FVU, L0, CE loss recovered, KL.
Then FVU alone on many more held-out tokens, in slices of `eval.tokens` (--fvu-slices of them), as
mean ± sd: one slice of a few thousand tokens is a handful of source files, and which architecture
wins on one slice is close to a coin toss (on 40 slices of the training cache, the codebook SAE
was better on 20 yet worse on average: FVU 0.173 ± 0.061 against 0.134 ± 0.018).
Each architecture uses the learning rate that suits it (TopK: the Gao et al. default; codebook: 1e-3,
better on synthetic data), since a learning rate tuned for one is not a fair setting for the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py: shared CPUs

import torch

import sae
from cache import ActivationReader, build_cache, read_manifest
from sae.cli.run_config import load_run_config
from sae.data import token_batches
from sae.evals import evaluate
from sae.lm import capture, load_model, stop_layer

RUNS = {"topk": None, "codebook": 1e-3}  # architecture -> learning rate (None: the default)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/codebook_vs_topk.json")
    parser.add_argument(
        "--fvu-slices", type=int, default=16, help="held-out slices of eval.tokens for FVU mean ± sd"
    )
    args = parser.parse_args()

    config = load_run_config(args.config, args.set)
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    cache_dir = build_cache(config, model)
    manifest = read_manifest(cache_dir)
    hookpoint = config.sae_hookpoint
    held_out = held_out_tokens(config, model, manifest["contexts"], config.eval.tokens)

    results, trained_saes = {}, {}
    for architecture, lr in RUNS.items():
        reader = ActivationReader(
            cache_dir, hookpoint, batch_size=config.train.batch_size, seed=config.train.seed
        )
        cfg = config.sae_config(d_in=reader.d_in)
        cfg = dataclasses.replace(cfg, architecture=architecture)
        train_cfg = dataclasses.replace(config.train, lr=lr, out_dir=f"out/codebook_vs_topk/{architecture}")
        (trained,) = sae.Trainer([cfg], train_cfg).fit(reader)
        result = evaluate(
            model,
            trained.to(config.model.device),
            held_out,
            exclude_bos=config.cache.exclude_bos,
            dense_threshold=config.train.dense_threshold,
            total_batches=len(held_out),
        )
        results[architecture] = result.to_dict()
        trained_saes[architecture] = trained
        print(architecture, json.dumps(results[architecture]))

    slices = held_out_fvu_slices(
        config,
        model,
        trained_saes,
        skip_contexts=manifest["contexts"] + len(held_out_contexts(held_out)),
        n_slices=args.fvu_slices,
    )
    for architecture, fvus in slices.items():
        results[architecture]["fvu_slices"] = fvus

    lines = [
        f"| architecture (k = {cfg.k}, {cfg.d_sae} latents) "
        "| FVU | L0 | CE loss recovered | KL(clean ‖ spliced) |",
        "|---|---:|---:|---:|---:|",
    ]
    for architecture, r in results.items():
        lines.append(
            f"| {architecture} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['ce_loss_recovered']:.3f} | "
            f"{r['kl_clean_spliced']:.3f} |"
        )
    fvus = {a: torch.tensor(r["fvu_slices"]) for a, r in results.items()}
    lines += [
        "",
        f"FVU on {args.fvu_slices} further held-out slices of {config.eval.tokens:,} tokens:",
        "| architecture | mean | sd | min | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for architecture, f in fvus.items():
        lines.append(f"| {architecture} | {f.mean():.3f} | {f.std():.3f} | {f.min():.3f} | {f.max():.3f} |")
    wins = int((fvus["codebook"] < fvus["topk"]).sum())
    lines.append(f"codebook below TopK on {wins} of {args.fvu_slices} slices")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"cache": str(cache_dir), "tokens": manifest["tokens"], "results": results}, indent=2)
        + "\n"
    )


def held_out_contexts(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [row for batch in batches for row in batch]


def held_out_tokens(config, model, skip_contexts: int, tokens: int) -> list[torch.Tensor]:
    """Token batches of the text right after the cached contexts (as `sae-train`'s eval reads it)."""
    batches = token_batches(
        config.data,
        model.tokenizer,
        tokens,
        config.eval.batch_contexts,
        skip_contexts=skip_contexts,
        exclude_bos=config.cache.exclude_bos,
    )
    return [b.to(config.model.device) for b in batches]


@torch.inference_mode()
def held_out_fvu_slices(
    config, model, saes: dict, skip_contexts: int, n_slices: int
) -> dict[str, list[float]]:
    """FVU of each SAE on `n_slices` consecutive held-out slices of `config.eval.tokens` tokens each."""
    hookpoint = config.sae_hookpoint
    first = 1 if config.cache.exclude_bos else 0
    slice_tokens = config.eval.tokens
    batches = held_out_tokens(config, model, skip_contexts, slice_tokens * n_slices)
    stop = stop_layer([hookpoint], model.cfg.n_layers)
    acts = torch.cat(
        [
            capture(model, b, [hookpoint], stop)[hookpoint][:, first:].flatten(0, 1).float().cpu()
            for b in batches
        ]
    )
    fvus: dict[str, list[float]] = {name: [] for name in saes}
    for part in acts.split(slice_tokens)[:n_slices]:
        variance = (part - part.mean(0)).pow(2).sum()
        for name, model_sae in saes.items():
            fvus[name].append(((part - model_sae.cpu()(part)).pow(2).sum() / variance).item())
    return fvus


if __name__ == "__main__":
    main()
