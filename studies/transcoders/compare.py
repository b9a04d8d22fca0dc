"""Transcoders against SAEs on the same MLP at equal L0 (Paulo et al. 2025's comparison), on Gemma 3 270M.

Three runs of `train.py` share one cache of block 6's MLP input and output (one forward per batch):
a TopK SAE on the MLP output, a TopK transcoder from the MLP input to its output, and a skip transcoder;
each k = 32 and 8,192 latents, each evaluated by splicing its output in place of the MLP's output
(CE recovered against the MLP zero-ablated; FVU of the MLP output). Then sparsify's own transcoder
(`SparseCoder(transcode=True)`, its defaults: signum, zero decoder) on the same batches in the same
order, evaluated the same way; and the autointerp embedding score (`sae-analyze autointerp --scorers
embedding`, Gemma 3 270M explaining, MiniLM scoring) of 100 latents of each of ours, drawn with a fixed
seed among those that fire at least 10 times in the 131,072 tokens the explainer reads.

    python studies/transcoders/compare.py                 # ~60 min on a 2-core CPU
    python studies/transcoders/compare.py --tokens 200000 --eval-tokens 2048 --latents 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import sae
from cache import PairedReader, read_manifest
from cache.reader import load_activations
from sae.cli.run_config import load_run_config
from sae.cli.train import evaluate_saved
from sae.lm import load_model

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAYER = 6
MLP_IN, MLP_OUT = f"blocks.{LAYER}.mlp.hook_in", f"blocks.{LAYER}.mlp.hook_out"

RUNS = {
    "sae on the MLP output": [f"sae.hookpoint={MLP_OUT}"],
    "transcoder": [f"sae.hookpoint={MLP_IN}", f"sae.output_hookpoint={MLP_OUT}"],
    "skip transcoder": [
        f"sae.hookpoint={MLP_IN}",
        f"sae.output_hookpoint={MLP_OUT}",
        "sae.skip_connection=true",
    ],
}


D_SAE, K = 8192, 32
AUTOINTERP_TOKENS, MIN_FIRINGS = 131_072, 10


def common_sets(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"cache.dir={Path(args.out) / 'cache'}",
        f'cache.hookpoints=["{MLP_IN}", "{MLP_OUT}"]',
        f"cache.tokens={args.tokens}",
        f"eval.tokens={args.eval_tokens}",
        f"train.out_dir={out}",
    ]


def run(name: str, sets: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / name.replace(" ", "_")
    command = [sys.executable, "train.py"] + [a for s in common_sets(args, out) + sets for a in ("--set", s)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    report = json.loads((out / "report.json").read_text())
    metrics = json.loads((Path(report["sae"]["dir"]) / "metrics.json").read_text())
    keys = ["ce_loss_recovered", "delta_lm_loss", "kl_clean_spliced", "fvu", "l0", "dead_fraction", "tokens"]
    return {k: report["eval"][k] for k in keys} | {
        "ce_loss_clean": report["eval"]["ce_loss_clean"],
        "ce_loss_zero_ablation": report["eval"]["ce_loss_zero_ablation"],
        "train_tokens_per_second": metrics["tokens_per_second_this_run"],
        "dir": report["sae"]["dir"],
    }


def run_sparsify(args: argparse.Namespace) -> dict:
    """sparsify's transcoder as its Trainer makes one (SparseCoder(transcode=True): zero decoder, free
    decoder norms, encoder bias centring the inputs, b_dec the outputs' mean; signum under schedule-free
    momentum 0.95 at its default lr), on our transcoder's batches in their order; saved in sparsify's
    layout and evaluated by our eval, as train.py evaluates ours."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # no triton on CPU: its plain-PyTorch path
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    out = Path(args.out) / "sparsify_transcoder"
    config = load_run_config(None, common_sets(args, out) + RUNS["transcoder"])
    cache_dir = Path(config.cache.dir)
    folder = out / f"layers.{LAYER}.mlp"  # sparsify's name for the module: -> mlp.hook_in -> mlp.hook_out
    timing = out / "timing.json"
    if not timing.exists():
        reader = PairedReader(
            cache_dir, MLP_IN, MLP_OUT, batch_size=config.train.batch_size, seed=config.train.seed
        )
        torch.manual_seed(config.train.seed)
        coder = SparseCoder(reader.d_in, SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True))
        optimizer = ScheduleFreeWrapper(
            SignSGD(coder.parameters(), lr=5e-3 / (D_SAE / 2**14) ** 0.5), momentum=0.95
        )
        optimizer.train()
        started, tokens = time.perf_counter(), 0
        for step, (x, y) in enumerate(reader.batches()):
            x, y = x.float(), y.float()
            if step == 0:
                with torch.no_grad():
                    coder.encoder.bias.copy_(-x.mean(0) @ coder.encoder.weight.T)
                    coder.b_dec.copy_(y.mean(0))
            coder(x, y).fvu.backward()
            optimizer.step()
            optimizer.zero_grad()
            tokens += len(x)
        seconds = time.perf_counter() - started
        optimizer.eval()  # schedule-free: the averaged weights, as sparsify saves them
        coder.save_to_disk(folder)
        timing.write_text(json.dumps({"tokens": tokens, "seconds": seconds}) + "\n")
    manifest = read_manifest(cache_dir)
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    result = evaluate_saved(config, model, manifest, folder)
    train = json.loads(timing.read_text())
    keys = ["ce_loss_recovered", "delta_lm_loss", "kl_clean_spliced", "fvu", "l0", "dead_fraction", "tokens"]
    return {k: result[k] for k in keys} | {
        "ce_loss_clean": result["ce_loss_clean"],
        "ce_loss_zero_ablation": result["ce_loss_zero_ablation"],
        "train_tokens_per_second": train["tokens"] / train["seconds"],
        "dir": str(folder),
    }


def live_latents(sae_dir: str, cache_dir: Path, count: int, seed: int) -> list[int]:
    """`count` latents drawn with `seed` among those firing >= MIN_FIRINGS times in the first
    AUTOINTERP_TOKENS tokens of the cache (what the explainer reads)."""
    model = sae.load(sae_dir)
    acts = load_activations(cache_dir, model.cfg.hookpoint, max_tokens=AUTOINTERP_TOKENS)
    with torch.no_grad():
        firings = sum((model.encode(chunk.float()) > 0).sum(0) for chunk in acts.split(8192))
    live = (firings >= MIN_FIRINGS).nonzero().flatten()
    chosen = live[torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))[:count]]
    return sorted(chosen.tolist())


def autointerp(name: str, entry: dict, args: argparse.Namespace) -> dict:
    """The embedding score of `args.latents` live latents of one dictionary (real and shuffled control)."""
    cache_dir = Path(args.out) / "cache"
    latents = live_latents(entry["dir"], cache_dir, args.latents, seed=0)
    out = Path(args.out) / "autointerp" / name.replace(" ", "_")
    command = [sys.executable, "analyze.py", "autointerp", entry["dir"], "--cache", str(cache_dir)]
    command += ["--latents", ",".join(map(str, latents)), "--tokens", str(AUTOINTERP_TOKENS)]
    command += ["--scorers", "embedding", "--out", str(out)]
    print("$", " ".join(command[:6]), "--latents <", len(latents), "latents > ...", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    summary = json.loads((out / "summary.json").read_text())
    auroc = summary["scorers"]["embedding"]["auroc"]
    keep = [
        "real",
        "control",
        "real_minus_control",
        "real_minus_control_ci95",
        "real_higher",
        "latents_paired",
    ]
    return {"latents": latents, "explained": summary["explained"]} | {k: auroc[k] for k in keep}


def table(results: dict[str, dict]) -> str:
    head = ["dictionary (k 32, 8,192 latents)", "CE recovered", "Δ LM loss", "KL", "FVU (MLP out)", "L0"]
    head += ["dead", "train tok/s", "embedding AUROC, real − control [95 %]"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        cells = [
            name,
            f"{r['ce_loss_recovered']:.2%}",
            f"{r['delta_lm_loss']:+.4f}",
            f"{r['kl_clean_spliced']:.4f}",
            f"{r['fvu']:.4f}",
            f"{r['l0']:.1f}",
            f"{r['dead_fraction']:.1%}",
            f"{r['train_tokens_per_second']:,.0f}",
            embedding_cell(r.get("autointerp")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def embedding_cell(score: dict | None) -> str:
    if score is None:
        return "not run"
    low, high = score["real_minus_control_ci95"]
    return (
        f"{score['real']:.3f} − {score['control']:.3f} = {score['real_minus_control']:+.3f} "
        f"[{low:+.3f}, {high:+.3f}] ({score['real_higher']}/{score['latents_paired']} higher)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1_000_000, help="cached training tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(REPO / "out" / "transcoders"))
    parser.add_argument("--results", default=str(HERE / "results" / "compare.json"))
    parser.add_argument("--latents", type=int, default=100, help="live latents scored per dictionary")
    parser.add_argument("--no-autointerp", action="store_true")
    args = parser.parse_args()
    results = {name: run(name, sets, args) for name, sets in RUNS.items()}
    results["sparsify transcoder"] = run_sparsify(args)
    if not args.no_autointerp:
        for name in ("sae on the MLP output", "transcoder", "skip transcoder"):
            results[name]["autointerp"] = autointerp(name, results[name], args)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
