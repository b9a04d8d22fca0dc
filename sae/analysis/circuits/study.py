"""Multi-seed evaluation of every method on toy induction models: the README's results table.

    python -m sae.analysis.circuits.study --out sae/analysis/circuits/results/induction --seeds 0 1 2 3 4
    python -m sae.analysis.circuits.study --out DIR --model gemma-3-270m --task ioi --prompts 40

Per seed: train a toy attention-only model (toy_induction.py), take the ground truth from exhaustive
resample patching (heads whose |effect| >= 10% of the clean-corrupted gap, fixed in advance), run every
method, and evaluate. The re-initialised control runs the code methods on the untrained model (which
solves nothing, so all clean prompts are its positives) and scores them against the trained model's
ground truth. `patching_resample` defines the ground truth, so its own AUC of 1 is not a result.
With `--model NAME --task TASK` the table is made for a real model instead (ground truth from exhaustive
resample patching on it, once; methods that do not depend on the seed run once).
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
from .evaluation import evaluate, top_k_mask
from .methods import ALL_METHODS, CODE_METHODS, run_method
from .patching import circuit_faithfulness, exhaustive_head_patching, ground_truth_from_effects
from .tasks import task_metric
from .toy_induction import induction_task, train_induction_model

GROUND_TRUTH_FRACTION = 0.1


def _load(directory: Path):
    return _load_named(str(directory))


def _load_named(name: str):
    from sae.models import load_model

    return load_model(name)


def patching_ground_truth(model, task) -> tuple[torch.Tensor, dict]:
    """Ground truth from exhaustive resample patching: [layers, heads] bool, and how it was made."""
    run = exhaustive_head_patching(model, task, "resample")
    nothing = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    corrupted = float(task_metric(task, last_logits_with_ablation(model, task.corrupted_tokens, nothing, None)).mean())
    truth = ground_truth_from_effects(run.details["effects"], run.details["clean_metric"], corrupted,
                                      GROUND_TRUTH_FRACTION)
    info = {"clean_metric": run.details["clean_metric"], "corrupted_metric": corrupted,
            "effects_resample": run.details["effects"].tolist(), "ground_truth": truth.int().tolist(),
            "ground_truth_seconds": run.seconds}
    if truth.all() or not truth.any():
        info["error"] = f"ground truth has {int(truth.sum())} of {truth.numel()} heads: no AUC possible"
    return truth, info


def evaluate_seed(seed: int, methods: list[str], n_prompts: int, steps: int, work: Path) -> dict:
    """One toy model per seed: train it, find its ground truth, run and evaluate every method."""
    trained_dir, reinit_dir = work / f"trained_{seed}", work / f"reinit_{seed}"
    training = train_induction_model(trained_dir, steps=steps, seed=seed)
    train_induction_model(reinit_dir, seed=seed, trained=False)
    model = _load(trained_dir)
    task = induction_task(n_prompts, seed=1000 + seed)  # prompts never seen in training (fresh seed)
    truth, info = patching_ground_truth(model, task)
    result = {"seed": seed, "training": training, **info, "methods": {}, "reinit_control": {}}
    if "error" in info:
        return result
    for name in methods:
        summary = _summary(run_method(name, model, task, seed), truth)
        # the circuit this method would report: its top |truth| heads, everything else resample-ablated
        found = top_k_mask(torch.tensor(summary["scores"]), int(truth.sum()))
        summary["faithfulness_at_k"] = circuit_faithfulness(model, task, found, "resample")
        result["methods"][name] = summary
    reinit = _load(reinit_dir)
    for name in [m for m in methods if m in CODE_METHODS]:
        result["reinit_control"][name] = _summary(run_method(name, reinit, task, seed, positives_from="all"), truth)
    return result


# Methods whose scores do not depend on the seed: run once, reported for every seed.
DETERMINISTIC = {"patching_resample", "patching_mean", "patching_zero", "attribution_patching", "eap_ig",
                 "layer_index"}


def evaluate_model(model, task, methods: list[str], seeds: list[int]) -> list[dict]:
    """One real model and task: the ground truth once, each seed-dependent method once per seed."""
    truth, info = patching_ground_truth(model, task)
    if "error" in info:
        return [{"seed": s, **info, "methods": {}, "reinit_control": {}} for s in seeds]
    once = {name: _summary(run_method(name, model, task, 0), truth) | {"deterministic": True}
            for name in methods if name in DETERMINISTIC}
    return [{"seed": s, **info, "reinit_control": {},
             "methods": {name: once[name] if name in once else _summary(run_method(name, model, task, s), truth)
                         for name in methods}} for s in seeds]


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
    lines = ["| method | ROC AUC | AUC within layers | P@k | R@k | F1@thr 0.5 | oracle best F1 | faithfulness@k | "
             "shuffled-label AUC | re-init AUC | forward prompts | backward prompts | seconds |", "|" + " --- |" * 13]
    for name in ok[0]["methods"] if ok else []:
        rows = [r["methods"][name] for r in ok]
        reinit = [r["reinit_control"][name]["roc_auc"] for r in ok if name in r["reinit_control"]]
        within = [x["roc_auc_within_layers"] for x in rows if x["roc_auc_within_layers"] is not None]
        cells = [name, _mean_sd([x["roc_auc"] for x in rows]), _mean_sd(within),
                 _mean_sd([x["at_k"]["precision"] for x in rows]),
                 _mean_sd([x["at_k"]["recall"] for x in rows]), _mean_sd([x["at_threshold"]["f1"] for x in rows]),
                 _mean_sd([x["oracle_best_f1"] for x in rows]),
                 _mean_sd([x["faithfulness_at_k"]["faithfulness"] for x in rows if "faithfulness_at_k" in x]),
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
    parser.add_argument("--model", help="a real model instead of the toy induction models (e.g. gemma-3-270m)")
    parser.add_argument("--task", default="ioi", help="with --model: ioi, greater_than, docstring or induction")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        from .cli import build_task

        model = _load_named(args.model)
        per_seed = evaluate_model(model, build_task(args.task, model, args.prompts, 0), args.methods, args.seeds)
    else:
        with tempfile.TemporaryDirectory() as work:
            per_seed = [evaluate_seed(s, args.methods, args.prompts, args.steps, Path(work)) for s in args.seeds]
    table = results_table(per_seed)
    atomic_write_json(out / "report.json", {"args": vars(args), "ground_truth_fraction": GROUND_TRUTH_FRACTION,
                                            "per_seed": per_seed, "table": table})
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
