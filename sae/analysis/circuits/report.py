"""A circuit report: score every head on a task with each method, evaluate against a ground truth, write
OUT/report.json and a layer × head heatmap per method (`sae-analyze circuits` runs `write_report`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from sae.io import atomic_write_bytes, atomic_write_json

from . import ground_truth, tasks
from .activations import last_logits_with_ablation
from .controls import reinitialised_copy, run_on_shuffled_labels, run_on_untrained
from .evaluation import CHANCE_BAND, evaluate, near_chance, roc_auc, top_k_mask
from .methods import CODE_METHODS, WEIGHT_READING_METHODS, run_method
from .patching import (
    ablation_reference,
    circuit_faithfulness,
    exhaustive_head_patching,
    ground_truth_from_effects,
)
from .tasks import build_task, task_metric, task_solved


def write_report(options) -> dict:
    """`options` as `sae.cli.circuits.CircuitsOptions`: task, model, methods, ground_truth, prompts, seed,
    dtype, device, out, controls. Returns the report it writes."""
    from sae.lm import load_model

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(options.model, options.dtype, options.device)
    task = build_task(options.task, model, options.prompts, options.seed)
    nothing = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    clean_logits = last_logits_with_ablation(model, task.clean_tokens, nothing, None)
    corrupted_logits = last_logits_with_ablation(model, task.corrupted_tokens, nothing, None)
    check = {
        "clean_solved": float(task_solved(task, clean_logits).float().mean()),
        "corrupted_solved": float(task_solved(task, corrupted_logits).float().mean()),
        "clean_metric": float(task_metric(task, clean_logits).mean()),
        "corrupted_metric": float(task_metric(task, corrupted_logits).mean()),
    }
    print(
        f"{options.task}: the model solves {check['clean_solved']:.0%} of clean and "
        f"{check['corrupted_solved']:.0%} of corrupted prompts"
    )
    truth, truth_info = _ground_truth(options, model, task, check)
    report = {
        "options": dict(vars(options)),
        "task_check": check,
        "ground_truth": truth_info,
        "methods": {},
    }
    reference = ablation_reference(model, task, "resample") if truth is not None else None
    reinit = None  # the re-initialised copy, made once when the first control needs it
    for name in options.methods:
        started = time.perf_counter()
        scores = run_method(name, model, task, options.seed)
        entry = {
            "scores": scores.scores.tolist(),
            "seconds": scores.seconds,
            "forward_prompts": scores.forward_prompts,
            "backward_prompts": scores.backward_prompts,
            "details": {k: v for k, v in scores.details.items() if isinstance(v, (int, float, type(None)))},
        }
        if "edge_estimates" in scores.details:
            entry["top_edges"] = top_edges(
                scores.details["edge_estimates"], scores.details["edge_valid"], model.cfg.n_heads
            )
        if truth is not None:
            entry["evaluation"] = evaluate(scores.scores, truth)
            # the circuit this method would report (its top |truth| heads), everything else resample-ablated
            found = top_k_mask(scores.scores, int(truth.sum()))
            entry["faithfulness_at_k"] = circuit_faithfulness(model, task, found, "resample", reference)
            if options.controls:
                reinit = reinit or reinitialised_copy(model, seed=options.seed)
                entry["controls"] = control_aucs(name, model, reinit, task, truth, options.seed)
        report["methods"][name] = entry
        atomic_write_bytes(out / f"{name}.png", heatmap_png(scores.scores, f"{options.task}: {name}", truth))
        auc = entry.get("evaluation", {}).get("roc_auc")
        print(
            f"{name}: {time.perf_counter() - started:.1f} s"
            + (f", ROC AUC {auc:.3f}" if auc is not None else "")
        )
    atomic_write_json(out / "report.json", report)
    print(f"wrote {out / 'report.json'}")
    return report


def control_aucs(name: str, model, reinit_model, task: tasks.Task, truth: torch.Tensor, seed: int) -> dict:
    """The method's AUC against `truth` on shuffled prompt labels (code methods only: the baselines have no
    positive/negative prompts, see controls.py) and on `reinit_model` (methods that read weights), and
    whether each is inside CHANCE_BAND (one draw each, so noisier than a study's mean over seeds;
    `near_chance` is None for a method no control applies to)."""
    aucs = {}
    if name in CODE_METHODS:
        aucs["shuffled_labels_auc"] = roc_auc(run_on_shuffled_labels(name, model, task, seed).scores, truth)
    if name in WEIGHT_READING_METHODS:
        aucs["reinit_auc"] = roc_auc(run_on_untrained(name, reinit_model, task, seed).scores, truth)
    verdict = all(near_chance(auc) for auc in aucs.values()) if aucs else None
    return aucs | {"near_chance": verdict, "chance_band": list(CHANCE_BAND)}


def _ground_truth(options, model, task, check) -> tuple[torch.Tensor | None, dict]:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if options.ground_truth != "patching":
        mask = ground_truth.head_mask(options.ground_truth, n_layers, n_heads)
        return mask, {"source": options.ground_truth, "heads": mask.int().tolist()}
    run = exhaustive_head_patching(model, task, "resample")
    mask = ground_truth_from_effects(run.details["effects"], check["clean_metric"], check["corrupted_metric"])
    info = {
        "source": "exhaustive resample patching, |effect| >= 10% of the clean-corrupted gap",
        "effects": run.details["effects"].tolist(),
        "heads": mask.int().tolist(),
        "seconds": run.seconds,
    }
    if mask.all() or not mask.any():
        print(f"ground truth from patching has {int(mask.sum())} of {mask.numel()} heads: no evaluation")
        return None, info | {"error": "ground truth has a single class"}
    return mask, info


def top_edges(estimate: torch.Tensor, valid: torch.Tensor, n_heads: int, n: int = 20) -> list[dict]:
    """The n edges with the largest |estimate| as {"from": "L.h" or "input", "to": "L.h" or "logits",
    "estimate"} (edge matrices as in edges.edge_index: the last row is the input, the last column the
    logits)."""
    magnitude = (estimate.abs() * valid).flatten()
    order = magnitude.argsort(descending=True)[: min(n, int(valid.sum()))]
    width = estimate.shape[1]

    def node(index: int, last: str) -> str:
        return last if index == width - 1 else f"{index // n_heads}.{index % n_heads}"

    return [
        {
            "from": node(int(i) // width, "input"),
            "to": node(int(i) % width, "logits"),
            "estimate": float(estimate.flatten()[i]),
        }
        for i in order
    ]


def heatmap_png(scores: torch.Tensor, title: str, truth: torch.Tensor | None = None) -> bytes:
    """A layer × head heatmap of scores [layers, heads]; ground-truth heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_heads = scores.shape
    figure, axis = plt.subplots(figsize=(1 + 0.5 * n_heads, 1 + 0.4 * n_layers))
    image = axis.imshow(scores.numpy(), cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axis, label="score")
    if truth is not None:
        for layer, head in truth.nonzero().tolist():
            axis.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    axis.set_xticks(range(n_heads))
    axis.set_yticks(range(n_layers))
    axis.set(
        xlabel="head", ylabel="layer", title=title + (" (red: ground truth)" if truth is not None else "")
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
