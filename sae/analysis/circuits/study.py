"""Multi-seed evaluation of every method on toy induction models: the README's results table.

    python -m sae.analysis.circuits.study --out results/circuits_induction --seeds 0 1 2 3 4

Per seed: train a toy attention-only model (toy_induction.py), take the ground truth from exhaustive
resample patching (heads whose |effect| >= 10% of the clean-corrupted gap, fixed in advance), run every
method, and evaluate. The re-initialised control runs the code methods on the untrained model (which
solves nothing, so all clean prompts are its positives) and scores them against the trained model's
ground truth. `patching_resample` defines the ground truth, so its own AUC of 1 is not a result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from sae.io import atomic_write_json

from .activations import last_logits_with_ablation
from .evaluation import evaluate
from .methods import ALL_METHODS, CODE_METHODS, run_method
from .patching import exhaustive_head_patching, ground_truth_from_effects
from .tasks import task_metric
from .toy_induction import induction_task, train_induction_model

GROUND_TRUTH_FRACTION = 0.1


def _load(directory: Path):
    from sae.models import load_model

    return load_model(str(directory))


def evaluate_seed(seed: int, methods: list[str], n_prompts: int, steps: int, work: Path) -> dict:
    trained_dir, reinit_dir = work / f"trained_{seed}", work / f"reinit_{seed}"
    training = train_induction_model(trained_dir, steps=steps, seed=seed)
    train_induction_model(reinit_dir, seed=seed, trained=False)
    model = _load(trained_dir)
    task = induction_task(n_prompts, seed=1000 + seed)  # prompts never seen in training (fresh seed)
    truth_run = exhaustive_head_patching(model, task, "resample")
    nothing = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    corrupted = float(task_metric(task, last_logits_with_ablation(model, task.corrupted_tokens, nothing, None)).mean())
    truth = ground_truth_from_effects(truth_run.details["effects"], truth_run.details["clean_metric"], corrupted,
                                      GROUND_TRUTH_FRACTION)
    result = {"seed": seed, "training": training, "clean_metric": truth_run.details["clean_metric"],
              "corrupted_metric": corrupted, "effects_resample": truth_run.details["effects"].tolist(),
              "ground_truth": truth.int().tolist(), "methods": {}, "reinit_control": {}}
    if truth.all() or not truth.any():
        result["error"] = f"ground truth has {int(truth.sum())} of {truth.numel()} heads: no AUC possible"
        return result
    for name in methods:
        scores = run_method(name, model, task, seed)
        result["methods"][name] = _summary(scores, truth)
    reinit = _load(reinit_dir)
    for name in [m for m in methods if m in CODE_METHODS]:
        result["reinit_control"][name] = _summary(run_method(name, reinit, task, seed, positives_from="all"), truth)
    return result


def _summary(scores, truth) -> dict:
    return {"scores": scores.scores.tolist(), "seconds": scores.seconds, "forward_prompts": scores.forward_prompts,
            "backward_prompts": scores.backward_prompts,
            "details": {k: v for k, v in scores.details.items() if isinstance(v, (int, float, type(None)))},
            **evaluate(scores.scores, truth)}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def results_table(per_seed: list[dict]) -> str:
    """Markdown: one row per method, mean ± sd over seeds."""
    ok = [r for r in per_seed if "error" not in r]
    lines = ["| method | ROC AUC | P@k | R@k | F1@thr 0.5 | oracle best F1 | shuffled-label AUC | re-init AUC | "
             "forward prompts | backward prompts | seconds |", "|" + " --- |" * 11]
    for name in ok[0]["methods"] if ok else []:
        rows = [r["methods"][name] for r in ok]
        reinit = [r["reinit_control"][name]["roc_auc"] for r in ok if name in r["reinit_control"]]
        cells = [name, _mean_sd([x["roc_auc"] for x in rows]), _mean_sd([x["at_k"]["precision"] for x in rows]),
                 _mean_sd([x["at_k"]["recall"] for x in rows]), _mean_sd([x["at_threshold"]["f1"] for x in rows]),
                 _mean_sd([x["oracle_best_f1"] for x in rows]),
                 _mean_sd([x["controls"]["shuffled_labels_auc"] for x in rows]), _mean_sd(reinit),
                 f"{statistics.mean(x['forward_prompts'] for x in rows):.0f}",
                 f"{statistics.mean(x['backward_prompts'] for x in rows):.0f}",
                 f"{statistics.mean(x['seconds'] for x in rows):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in per_seed if "error" in r]
    if failed:
        lines.append("")
        lines += [f"seed {r['seed']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for report.json and table.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each toy model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        per_seed = [evaluate_seed(s, args.methods, args.prompts, args.steps, Path(work)) for s in args.seeds]
    table = results_table(per_seed)
    atomic_write_json(out / "report.json", {"args": vars(args), "ground_truth_fraction": GROUND_TRUTH_FRACTION,
                                            "per_seed": per_seed, "table": table})
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
