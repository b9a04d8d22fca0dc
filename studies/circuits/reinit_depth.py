"""Why do the codebook methods score an untrained toy's layer-0 heads above its layer-1 heads?

    python studies/circuits/reinit_depth.py --out studies/circuits/results/reinit_depth

The hypothesis under test: layer-0 heads read the (corrupted) tokens directly, so their outputs change
more between a clean prompt and its corrupted partner than layer-1 outputs do, and the codebook score
(total variation between the code frequencies of clean and corrupted prompts) follows that change.

For each toy and seed, on the independently initialised untrained model the study uses (seed s + 10,000)
and the study's prompts (induction_task(100, seed=1000 + s)), per head:
* `relative_change_mean`: mean over prompts of ||m_clean − m_corrupt|| / mean over prompts of ||m_clean||,
  m = the head's output averaged over positions (what `codebook_overlap` codes);
* `relative_change_positions`: the same with one vector per position (what `codebook_overlap_positions`
  codes), averaged over prompts and positions;
* `relative_spread`: the head's clean outputs' root-mean-square distance from their mean, over the mean
  norm (a head whose outputs hardly vary collapses onto one code set whatever the corruption does);
* the codebook methods' scores themselves (`positives_from="all"`, as in the control), and the same
  scores with every head's vectors divided by that head's mean clean norm (`..._norms_equalised`): an
  intervention that leaves the relative change and spread as they are but removes the norm difference
  between layers (layer-1 outputs are larger), to tell the two apart.
Reported: per-layer means, and how well each measurement predicts the score ordering: the fraction of
(layer-0, layer-1) head pairs ordered layer 0 first, and Spearman correlations over all heads and within
layers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from sae.analysis.circuits.activations import collect_head_results
from sae.analysis.circuits.controls import run_on_untrained
from sae.io import atomic_write_bytes, atomic_write_json

from study import REINIT_SEED_OFFSET  # the control proper for toy seed s is seed s + this
from toy_induction import TOYS, induction_task, train_induction_model
from variants import COMPARED_CODE_METHODS

CODEBOOK_METHODS = ("codebook_overlap", "codebook_overlap_positions")


def relative_change(clean: Tensor, corrupted: Tensor) -> Tensor:
    """clean, corrupted [prompts, (pos,) layers, heads, d_model], prompt i paired with prompt i ->
    [layers, heads]: mean ||clean − corrupted|| / mean ||clean|| over prompts (and positions)."""
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean and corrupted shapes differ: {tuple(clean.shape)} vs {tuple(corrupted.shape)}"
        )
    change = (clean - corrupted).norm(dim=-1)
    size = clean.norm(dim=-1)
    dims = tuple(range(change.ndim - 2))  # every axis but layers, heads
    return change.mean(dims) / size.mean(dims)


def relative_spread(vectors: Tensor) -> Tensor:
    """vectors [prompts, layers, heads, d_model] -> [layers, heads]: RMS distance from the mean over prompts,
    divided by the mean norm."""
    centred = vectors - vectors.mean(0, keepdim=True)
    return centred.pow(2).sum(-1).mean(0).sqrt() / vectors.norm(dim=-1).mean(0)


def spearman(x: Tensor, y: Tensor) -> float:
    """Rank correlation of two flat tensors (average ranks for ties)."""

    def ranks(v: Tensor) -> Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for value in v.unique():  # average the ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x.flatten().double()), ranks(y.flatten().double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denominator) if denominator > 0 else float("nan")


def layer0_first(values: Tensor) -> float:
    """[2, heads] -> the fraction of (layer-0 head, layer-1 head) pairs with the layer-0 value larger
    (ties count half): 1 = layer 0 always above, 0.5 = no depth ordering."""
    if values.shape[0] != 2:
        raise ValueError(f"expects 2 layers, got {values.shape[0]}")
    difference = values[0][:, None] - values[1][None, :]
    return float(((difference > 0).float() + 0.5 * (difference == 0).float()).mean())


def measure_seed(toy: str, seed: int, work: Path, n_prompts: int = 100) -> dict:
    """Every measurement on the untrained toy (seed + REINIT_SEED_OFFSET) with the study's prompts."""
    from sae.lm import load_model

    directory = work / f"{toy}_{seed}"
    train_induction_model(directory, seed=REINIT_SEED_OFFSET + seed, trained=False, **TOYS[toy])
    model = load_model(str(directory))
    task = induction_task(n_prompts, seed=1000 + seed)
    clean_all = collect_head_results(model, task.clean_tokens, "all")  # [prompts, pos, layers, heads, d]
    corrupted_all = collect_head_results(model, task.corrupted_tokens, "all")
    clean_mean, corrupted_mean = clean_all.mean(1), corrupted_all.mean(1)
    measured = {
        "relative_change_mean": relative_change(clean_mean, corrupted_mean),
        "relative_change_positions": relative_change(clean_all, corrupted_all),
        "relative_spread": relative_spread(clean_mean),
        "norm_mean": clean_mean.norm(dim=-1).mean(0),
    }
    methods = {name: COMPARED_CODE_METHODS[name] for name in CODEBOOK_METHODS}
    scores = {name: run_on_untrained(m, model, task, seed).scores for name, m in methods.items()}
    scale = clean_mean.norm(dim=-1).mean(0)[..., None]  # [layers, heads, 1]: each head's mean clean norm
    vectors = {"mean": (clean_mean, corrupted_mean), "all": (clean_all, corrupted_all)}
    for name, m in methods.items():
        clean, corrupted = vectors[m.positions]
        scores[f"{name}_norms_equalised"] = m.scores(clean / scale, corrupted / scale, seed)[0]
    result = {
        "toy": toy,
        "seed": seed,
        "model_seed": REINIT_SEED_OFFSET + seed,
        "per_head": {k: v.tolist() for k, v in {**measured, **scores}.items()},
        "layer_means": {k: v.mean(1).tolist() for k, v in {**measured, **scores}.items()},
        "layer0_first": {k: layer0_first(v) for k, v in {**measured, **scores}.items()},
        "spearman": {},
    }
    for name, score in scores.items():
        for key, value in measured.items():
            result["spearman"][f"{key} vs {name}"] = {
                "all_heads": spearman(value, score),
                "within_layer": [spearman(value[L], score[L]) for L in range(value.shape[0])],
            }
    return result


def summary_table(results: list[dict]) -> str:
    """Markdown, one row per toy and measurement: layer means and layer-0-first fraction, mean over seeds."""
    keys = list(results[0]["layer_means"])
    lines = [
        "| toy | measurement | layer 0 mean | layer 1 mean | fraction of pairs with layer 0 above | "
        "Spearman with codebook_overlap (all heads) | Spearman with codebook_overlap (within layers) |",
        "|" + " --- |" * 7,
    ]
    for toy in dict.fromkeys(r["toy"] for r in results):
        rows = [r for r in results if r["toy"] == toy]
        for key in keys:
            cells = [
                toy,
                key,
                _mean_sd([r["layer_means"][key][0] for r in rows]),
                _mean_sd([r["layer_means"][key][1] for r in rows]),
                _mean_sd([r["layer0_first"][key] for r in rows]),
            ]
            pair = f"{key} vs codebook_overlap"
            if pair in rows[0]["spearman"]:
                cells += [
                    _mean_sd([r["spearman"][pair]["all_heads"] for r in rows]),
                    _mean_sd([x for r in rows for x in r["spearman"][pair]["within_layer"]]),
                ]
            else:
                cells += ["—", "—"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN (a constant measurement has no rank correlation)
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory for report.json and table.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=list(TOYS))
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        results = [measure_seed(toy, s, Path(work), args.prompts) for toy in args.toys for s in args.seeds]
    table = summary_table(results)
    atomic_write_json(out / "report.json", {"args": vars(args), "per_seed": results, "table": table})
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    print(table)


if __name__ == "__main__":
    main()
