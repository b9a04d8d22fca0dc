"""How well edge attribution estimates actual edge patching on the toy induction models.

    python studies/circuits/edge_check.py --out studies/circuits/results/edge_check --seeds 0 1 2

Per seed: train the 2-layer toy, then for every edge (layer-0 head -> layer-1 head, any head -> logits)
compare the attribution-patching and EAP-IG estimates with (a) patching the edge 1% of the way to its
corrupted value, divided by 0.01 (the directional derivative: checks the gradients) and (b) patching it
fully (checks the linear approximation). Pearson r of the signed values and Spearman rho of |values|;
OUT/report.json holds every estimate and effect, OUT/table.md the README's table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sae.analysis.circuits.edges import attribution_patching_edges, eap_ig_edges, edge_patching_effects
from sae.io import atomic_write_bytes, atomic_write_json

from toy_induction import TOYS, induction_task, train_induction_model

METHODS = ("attribution_patching", "eap_ig")  # their edge versions: the `<name>_edges` methods


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return _pearson(a.argsort().argsort().float(), b.argsort().argsort().float())


def check_seed(seed: int, work: Path, n_prompts: int = 40, toy: str = "2l4h") -> dict:
    from sae.lm import load_model

    train_induction_model(work / f"toy_{seed}", steps=1000, seed=seed, **TOYS[toy])
    model = load_model(str(work / f"toy_{seed}"))
    task = induction_task(n_prompts, seed=2000 + seed)
    estimates = dict(
        zip(METHODS, (attribution_patching_edges(model, task), eap_ig_edges(model, task)), strict=True)
    )
    valid = estimates["attribution_patching"].details["edge_valid"]
    pairs = [tuple(p) for p in valid.nonzero().tolist()]
    small = edge_patching_effects(model, task, pairs, scale=0.01) / 0.01
    full = edge_patching_effects(model, task, pairs)
    result = {"seed": seed, "toy": toy, "edges": len(pairs), "full_patching_effects": full.tolist()}
    for name, run in estimates.items():
        e = torch.stack([run.details["edge_estimates"][u, v] for u, v in pairs])
        result[name] = {
            "pearson_vs_small_patch": _pearson(e, small),
            "pearson_vs_full_patch": _pearson(e, full),
            "spearman_abs_vs_full_patch": _spearman(e.abs(), full.abs()),
            "estimates": e.tolist(),
            "seconds": run.seconds,
            "forward_prompts": run.forward_prompts,
            "backward_prompts": run.backward_prompts,
        }
    return result


def results_table(results: list[dict]) -> str:
    """Markdown: one row per seed and method."""
    header = [
        "seed",
        "method",
        "r vs 1% patch (derivative)",
        "r vs full patch",
        "Spearman abs vs full patch",
        "forward / backward prompts",
        "seconds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in results:
        for name in METHODS:
            m = r[name]
            cells = [
                str(r["seed"]),
                f"{name}_edges",
                f"{m['pearson_vs_small_patch']:.3f}",
                f"{m['pearson_vs_full_patch']:.3f}",
                f"{m['spearman_abs_vs_full_patch']:.3f}",
                f"{m['forward_prompts']} / {m['backward_prompts']}",
                f"{m['seconds']:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--toy", default="2l4h", choices=list(TOYS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results = [check_seed(s, Path(work), toy=args.toy) for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    atomic_write_json(out / "report.json", {"args": vars(args), "per_seed": results})
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    print(table)


if __name__ == "__main__":
    main()
