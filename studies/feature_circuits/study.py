"""Heads through attention-output SAEs on Gemma 3 270M: rankings from dictionaries trained by `train.py`
(one TopK SAE per layer's hook_z, `train_saes.sh`) against exhaustive patching, beside the gradient
baselines on the raw heads, for several seeds of SAE training.

    python studies/feature_circuits/study.py heads --task ioi --seeds 0 1 2 3 4
    python studies/feature_circuits/study.py heads --task docstring --seeds 0 1 2 3 4

Head scores, each |estimate| per head, summed over positions and averaged over prompts:
* sae_<method>: the estimate of every latent and error node of the 18 spliced hook_z SAEs, split per head
  (exact: latents + error = the head's own estimate for attribution patching); method = attribution
  patching or RelP over the nodes (integrated gradients with --node-methods, 10 steps);
* sae_<method>_latents: the latents' part alone (what the dictionary explains, without its error);
* oneill_trained / overlap_trained_calibrated: O'Neill & Bui's positive-only-code score and our
  pair-calibrated overlap on per-head codes of the trained dictionaries (`codes.head_codes`), no per-task
  SAE; with the shuffled-label control (clean/corrupted labels swapped at random within pairs);
* the baselines on the raw heads: attribution_patching, relp, eap_ig; and layer_index.
Writes results/<task>/heads.json and heads.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sae.analysis.circuits import evaluation, patching
from sae.analysis.circuits.activations import ForwardCounter, collect_z
from sae.analysis.circuits.codes import head_codes
from sae.analysis.circuits.feature_attribution import node_effects
from sae.analysis.circuits.methods import layer_index_scores, positive_prompts, run_method
from sae.analysis.circuits.scoring import oneill_head_scores, overlap_head_scores, permutation_calibrated
from sae.analysis.circuits.splice import SplicedModel
from sae.analysis.circuits.tasks import build_task, task_metric
from sae.formats import load
from sae.io import atomic_write_json, atomic_write_text
from sae.lm import load_model

HERE = Path(__file__).resolve().parent
SAE_ROOT = Path("out/fc")


def trained_saes(seed: int, root: Path = SAE_ROOT) -> dict[str, object]:
    """hookpoint -> the SAE trained with `seed` by train_saes.sh."""
    found = {}
    for cfg in sorted((root / f"seed{seed}").rglob("cfg.json")):
        sae = load(str(cfg.parent)).eval()
        found[sae.cfg.hookpoint] = sae
    if not found:
        raise FileNotFoundError(
            f"no SAEs under {root / f'seed{seed}'}: run studies/feature_circuits/train_saes.sh"
        )
    return found


def code_scores(model, task, saes: dict, seed: int) -> dict[str, torch.Tensor]:
    """O'Neill's score and the pair-calibrated overlap on per-head codes of the trained dictionaries, and
    both on shuffled labels."""
    counter = ForwardCounter()
    solved, _ = positive_prompts(model, task, counter)
    z_pos = collect_z(model, task.clean_tokens[solved])  # [prompts, pos, layers, heads, d_head]
    z_neg = collect_z(model, task.corrupted_tokens)
    layers = range(model.cfg.n_layers)

    def codes_of(z: torch.Tensor) -> torch.Tensor:  # -> [prompts, pos, layers, heads, 1]
        return torch.stack([head_codes(saes[f"blocks.{L}.attn.hook_z"], z[:, :, L]).codes for L in layers], 2)

    pos, neg = codes_of(z_pos), codes_of(z_neg)
    d_sae = next(iter(saes.values())).cfg.d_sae
    result = {
        "oneill_trained": oneill_head_scores(pos, neg, d_sae),
        "overlap_trained_calibrated": permutation_calibrated(
            overlap_head_scores, pos, neg, d_sae, 100, seed, solved
        ),
    }
    # shuffled labels: each pair's clean and corrupted prompt swapped with probability 1/2
    swap = torch.rand(len(solved), generator=torch.Generator().manual_seed(seed)) < 0.5
    neg_of_pos = neg[solved]
    pos_s = torch.where(swap[:, None, None, None, None], neg_of_pos, pos)
    neg_s = neg.clone()
    neg_s[solved] = torch.where(swap[:, None, None, None, None], pos, neg_of_pos)
    result["oneill_trained_shuffled"] = oneill_head_scores(pos_s, neg_s, d_sae)
    result["overlap_trained_calibrated_shuffled"] = permutation_calibrated(
        overlap_head_scores, pos_s, neg_s, d_sae, 100, seed, solved
    )
    return result


def heads(args) -> None:
    out = HERE / "results" / args.task
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("gemma-3-270m", "float32")
    task = build_task(args.task, model, args.prompts, seed=0)
    started = time.perf_counter()
    truth_run = patching.exhaustive_head_patching(model, task, "resample")
    with torch.no_grad():
        corrupted = float(task_metric(task, model(task.corrupted_tokens)[:, -1]).mean())
    truth = patching.ground_truth_from_effects(
        truth_run.details["effects"], truth_run.details["clean_metric"], corrupted
    )
    print(f"ground truth: {int(truth.sum())} heads ({time.perf_counter() - started:.0f} s)")
    rows: dict[str, list[dict]] = {}

    def add(name: str, scores: torch.Tensor, seconds: float) -> None:
        entry = evaluation.evaluate(scores, truth)
        entry["seconds"] = seconds
        rows.setdefault(name, []).append(entry)
        print(f"{name}: AUC {entry['roc_auc']:.3f} ({seconds:.0f} s)")

    for name in ("attribution_patching", "relp", "eap_ig"):
        run = run_method(name, model, task)
        add(name, run.scores, run.seconds)
    add("layer_index", layer_index_scores(model).scores, 0.0)
    for seed in args.seeds:
        saes = trained_saes(seed)
        z_saes = [saes[f"blocks.{L}.attn.hook_z"] for L in range(model.cfg.n_layers)]
        spliced = SplicedModel(model, z_saes)
        for method in args.node_methods:
            effects = node_effects(spliced, task, method, steps=10)
            whole = torch.stack([effects.heads(s.cfg.hookpoint) for s in z_saes])  # [layers, heads]
            latents = torch.stack([effects.head_latents[s.cfg.hookpoint].sum(0) for s in z_saes])
            add(f"sae_{method}", whole.abs(), effects.seconds)
            add(f"sae_{method}_latents", latents.abs(), effects.seconds)
        begun = time.perf_counter()
        for name, scores in code_scores(model, task, saes, seed).items():
            add(name, scores, time.perf_counter() - begun)
    summary = {
        name: {
            key: _mean_sd([r[key] if key != "p_at_k" else r["at_k"]["precision"] for r in runs])
            for key in ("roc_auc", "p_at_k")
        }
        | {"seeds": len(runs), "recall_at_k": _mean_sd([r["at_k"]["recall"] for r in runs])}
        for name, runs in rows.items()
    }
    atomic_write_json(
        out / "heads.json",
        {"args": vars(args), "ground_truth_heads": int(truth.sum()), "runs": rows, "summary": summary},
    )
    lines = [
        f"Gemma 3 270M, {args.task}, {args.prompts} prompts; ground truth: {int(truth.sum())} heads with "
        "|resample-patching effect| >= 10% of the clean-corrupted gap.",
        "",
        "| method | ROC AUC | P@k | R@k | runs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['roc_auc']} | {s['p_at_k']} | {s['recall_at_k']} | {s['seeds']} |")
    atomic_write_text(out / "heads.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    head_parser = commands.add_parser("heads", help="the head table")
    head_parser.add_argument("--task", default="ioi", choices=["ioi", "docstring"])
    head_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    head_parser.add_argument("--prompts", type=int, default=40)
    head_parser.add_argument(
        "--node-methods",
        nargs="+",
        default=["attribution_patching", "relp"],
        choices=["attribution_patching", "relp", "integrated_gradients"],
        help="node estimates split into heads (integrated gradients: 18 x 10 passes per seed)",
    )
    args = parser.parse_args()
    heads(args)


if __name__ == "__main__":
    main()
