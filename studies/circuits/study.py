"""Multi-seed evaluation of every method (variants.py) on toy induction models or a real model: the
README's results tables.

    python studies/circuits/study.py --out studies/circuits/results/induction --seeds 0 1 2 3 4
    python studies/circuits/study.py --out DIR --model gemma-3-270m --task ioi --prompts 40

Per seed: train a toy attention-only model (toy_induction.py), take the ground truth from exhaustive
resample patching (heads whose |effect| >= 10% of the clean-corrupted gap, fixed in advance), run every
method, and evaluate. The shuffled-label control runs the code methods with clean and corrupted prompts
swapped in each pair with probability 1/2 (the library's controls). The re-initialised control runs the
methods (toys: every one that reads the weights; real models: the code methods unless told) on an
untrained model (which solves nothing, so all clean prompts are its positives) and scores them against
the trained model's ground truth. Two untrained models: `reinit_control` is an independent
initialisation (another seed), the control proper, whose heads have nothing to do with the trained
model's; `init_control` is the trained model's own starting point (same seed), a diagnostic: a head's
circuit role can be seeded by its initial weights, so AUC away from 0.5 there is not by itself an
artefact of the method. `patching_resample`
defines the ground truth, so its own AUC of 1 is not a result.
With `--model NAME --task TASK` the table is made for a real model instead (ground truth from exhaustive
resample patching on it, once; methods that do not depend on the seed run once).
`--extend` adds methods, or controls of methods, to an existing OUT/report.json without recomputing what
it has (toys are trained again from their seeds and must give the same ground truth).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

import torch

from sae.analysis.circuits.activations import last_logits_with_ablation
from sae.analysis.circuits.controls import reinitialised_copy, run_on_shuffled_labels, run_on_untrained
from sae.analysis.circuits.evaluation import evaluate, near_chance, top_k_mask
from sae.analysis.circuits.methods import run_method
from sae.analysis.circuits.patching import (
    AblationReference,
    ablation_reference,
    circuit_faithfulness,
    exhaustive_head_patching,
    ground_truth_from_effects,
)
from sae.analysis.circuits.tasks import TASK_NAMES, build_task, task_metric
from sae.io import atomic_write_bytes, atomic_write_json

from toy_induction import TOYS, induction_task, train_induction_model
from variants import ALL_METHODS, COMPARED_CODE_METHODS, WEIGHT_READING_METHODS, method

GROUND_TRUTH_FRACTION = 0.1
REINIT_SEED_OFFSET = 10_000  # the independent re-initialisation of toy seed s uses seed s + this


def _load(directory: Path):
    return _load_named(str(directory))


def _load_named(name: str):
    from sae.lm import load_model

    return load_model(name)


def task_fingerprint(model_name: str, task) -> str:
    """Identifies a (model, task) pair: the model name and a hash of every token tensor of the task."""
    digest = hashlib.sha256(model_name.encode())
    for t in (task.clean_tokens, task.corrupted_tokens, task.good_tokens, task.bad_tokens):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def patching_ground_truth(
    model, task, cache: Path | None = None, fingerprint: str | None = None
) -> tuple[torch.Tensor, dict]:
    """Ground truth from exhaustive resample patching: [layers, heads] bool, and how it was made.

    With `cache`, the patching effects are read from it when its fingerprint matches (same model name and
    task tokens), else computed and written there; the threshold is applied afresh either way.
    """
    if (
        cache is not None
        and cache.is_file()
        and json.loads(cache.read_text()).get("fingerprint") == fingerprint
    ):
        saved = json.loads(cache.read_text())
        effects, clean, corrupted = (
            torch.tensor(saved["effects_resample"]),
            saved["clean_metric"],
            saved["corrupted_metric"],
        )
        seconds, source = saved["ground_truth_seconds"], f"cached in {cache}"
    else:
        run = exhaustive_head_patching(model, task, "resample")
        nothing = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
        corrupted = float(
            task_metric(task, last_logits_with_ablation(model, task.corrupted_tokens, nothing, None)).mean()
        )
        effects, clean, seconds, source = (
            run.details["effects"],
            run.details["clean_metric"],
            run.seconds,
            "computed",
        )
        if cache is not None:
            atomic_write_json(
                cache,
                {
                    "fingerprint": fingerprint,
                    "effects_resample": effects.tolist(),
                    "clean_metric": clean,
                    "corrupted_metric": corrupted,
                    "ground_truth_seconds": seconds,
                },
            )
    truth = ground_truth_from_effects(effects, clean, corrupted, GROUND_TRUTH_FRACTION)
    info = {
        "clean_metric": clean,
        "corrupted_metric": corrupted,
        "effects_resample": effects.tolist(),
        "ground_truth": truth.int().tolist(),
        "ground_truth_seconds": seconds,
        "ground_truth_source": source,
    }
    if truth.all() or not truth.any():
        info["error"] = f"ground truth has {int(truth.sum())} of {truth.numel()} heads: no AUC possible"
    return truth, info


def with_faithfulness(
    summary: dict, model, task, truth: torch.Tensor, reference: AblationReference, memo: dict
) -> dict:
    """Adds the faithfulness (task metric and KL) of the circuit the method would report: its top |truth|
    heads, everything else resample-ablated. `memo` reuses the result for a circuit already measured."""
    found = top_k_mask(torch.tensor(summary["scores"]), int(truth.sum()))
    key = tuple(found.flatten().tolist())
    if key not in memo:
        memo[key] = circuit_faithfulness(model, task, found, "resample", reference)
    return summary | {"faithfulness_at_k": memo[key]}


def evaluate_seed(
    seed: int,
    methods: list[str],
    n_prompts: int,
    steps: int,
    work: Path,
    toy: str = "2l4h",
    previous: dict | None = None,
) -> dict:
    """One toy model per seed: train it, find its ground truth, run and evaluate every method and its controls
    (shuffled labels for the code methods; re-initialised and own-init models for every method that reads
    the weights).

    `previous` (this seed's result from an earlier run with the same settings) is extended: the models are
    trained again (training is seeded), the ground truth must come out the same, and only what it does not
    have yet runs (methods, or controls of methods it has); what it has is kept as it is.
    """
    trained_dir, reinit_dir, init_dir = (
        work / f"trained_{seed}",
        work / f"reinit_{seed}",
        work / f"init_{seed}",
    )
    training = train_induction_model(trained_dir, steps=steps, seed=seed, **TOYS[toy])
    train_induction_model(reinit_dir, seed=REINIT_SEED_OFFSET + seed, trained=False, **TOYS[toy])
    train_induction_model(init_dir, seed=seed, trained=False, **TOYS[toy])
    model = _load(trained_dir)
    task = induction_task(n_prompts, seed=1000 + seed)  # prompts never seen in training (fresh seed)
    truth, info = patching_ground_truth(model, task)
    if previous is not None:
        _check_same_ground_truth(previous, info)
        result = {
            **previous,
            **{key: dict(previous.get(key, {})) for key in ("methods", *CONTROLS)},
            "extended_effects_max_abs_difference": float(
                (torch.tensor(info["effects_resample"]) - torch.tensor(previous["effects_resample"]))
                .abs()
                .max()
            ),
        }
    else:
        result = {"seed": seed, "training": training, **info, "methods": {}, **{key: {} for key in CONTROLS}}
    if "error" in info:
        return result
    reference, memo = ablation_reference(model, task, "resample"), {}
    for name in methods:
        if name not in result["methods"]:
            result["methods"][name] = with_faithfulness(
                _summary(run_method(method(name), model, task, seed), truth),
                model,
                task,
                truth,
                reference,
                memo,
            )
        if name in COMPARED_CODE_METHODS and name not in result["shuffled_control"]:
            result["shuffled_control"][name] = _summary(
                run_on_shuffled_labels(method(name), model, task, seed), truth
            )
    for key, directory in (("reinit_control", reinit_dir), ("init_control", init_dir)):
        missing = [m for m in methods if m in WEIGHT_READING_METHODS and m not in result[key]]
        untrained = _load(directory) if missing else None
        for name in missing:
            result[key][name] = _summary(run_on_untrained(method(name), untrained, task, seed), truth)
    return result


def _check_same_ground_truth(previous: dict, info: dict) -> None:
    """Extending a toy run is only meaningful on the same models: their ground truths must agree."""
    if previous.get("ground_truth") != info.get("ground_truth"):
        raise ValueError(
            f"seed {previous.get('seed')}: the retrained toy's ground truth {info.get('ground_truth')} "
            f"differs from the run being extended ({previous.get('ground_truth')}): not the same model"
        )


# Per seed, beside "methods": each control's results by method name (evaluate() against the trained model's
# ground truth). "init_control" (the trained toy's own starting weights) is a diagnostic, not a control.
CONTROLS = ("shuffled_control", "reinit_control", "init_control")

# Methods whose scores do not depend on the seed: run once, reported for every seed.
DETERMINISTIC = {
    "patching_resample",
    "patching_mean",
    "patching_zero",
    "attribution_patching",
    "eap_ig",
    "attribution_patching_edges",
    "eap_ig_edges",
    "layer_index",
}


def evaluate_model(
    model,
    task,
    methods: list[str],
    seeds: list[int],
    cache: Path | None = None,
    fingerprint: str | None = None,
    reinit_model=None,
    previous: list[dict] | None = None,
    reinit_methods: list[str] | None = None,
    shuffle_methods: list[str] | None = None,
    save=None,
) -> list[dict]:
    """One real model and task: the ground truth once, each seed-dependent method once per seed, the
    faithfulness of every found circuit, and the controls: shuffled labels for the code methods among
    `shuffle_methods`, and (with `reinit_model`) the re-initialised model for the code methods (or for
    `reinit_methods`, any that read the weights). `previous` (per-seed results of an earlier run on the
    same task) is extended: what it already has is kept, not rerun. `save(per_seed)` is called after every
    seed, so an interrupted run can be resumed with `previous`."""
    reinit_methods = (
        []
        if reinit_model is None
        else [m for m in (reinit_methods or COMPARED_CODE_METHODS) if m in WEIGHT_READING_METHODS]
    )
    shuffle_methods = [m for m in shuffle_methods or [] if m in COMPARED_CODE_METHODS]
    truth, info = patching_ground_truth(model, task, cache, fingerprint)
    if "error" in info:
        return [{"seed": s, **info, "methods": {}, **{key: {} for key in CONTROLS}} for s in seeds]
    old = {r["seed"]: r for r in previous or []}
    if previous and any(r.get("ground_truth") != info["ground_truth"] for r in previous):
        raise ValueError("the run to extend has a different ground truth: not the same model and task")
    reference, memo = ablation_reference(model, task, "resample"), {}
    # the yardstick for every method's faithfulness: the ground-truth circuit's own
    info = info | {
        "ground_truth_faithfulness": circuit_faithfulness(model, task, truth, "resample", reference)
    }

    def summary(name: str, seed: int) -> dict:
        return with_faithfulness(
            _summary(run_method(method(name), model, task, seed), truth), model, task, truth, reference, memo
        )

    def shuffled_summary(name: str, seed: int) -> dict:
        return _summary(run_on_shuffled_labels(method(name), model, task, seed), truth)

    def reinit_summary(name: str, seed: int) -> dict:
        return _summary(run_on_untrained(method(name), reinit_model, task, seed), truth)

    once: dict[tuple[str, str], dict] = {}  # methods that do not depend on the seed run once: (part, name)

    def part(key: str, name: str, seed: int, run) -> dict:
        if name not in DETERMINISTIC:
            return run(name, seed)
        if (key, name) not in once:
            once[key, name] = run(name, 0) | {"deterministic": True}
        return once[key, name]

    per_seed = []
    for s in seeds:
        done = old.get(s, {})
        result = {"seed": s, **info, **{key: dict(done.get(key, {})) for key in ("methods", *CONTROLS)}}
        for name in methods:
            if name not in result["methods"]:
                result["methods"][name] = part("methods", name, s, summary)
            if name in shuffle_methods and name not in result["shuffled_control"]:
                result["shuffled_control"][name] = shuffled_summary(name, s)
            if name in reinit_methods and name not in result["reinit_control"]:
                result["reinit_control"][name] = part("reinit_control", name, s, reinit_summary)
        per_seed.append(result)
        print(f"seed {s} done", flush=True)
        if save is not None:
            save(per_seed + [old[t] for t in seeds if t > s and t in old])
    return per_seed


def _summary(scores, truth) -> dict:
    return {
        "scores": scores.scores.tolist(),
        "seconds": scores.seconds,
        "forward_prompts": scores.forward_prompts,
        "backward_prompts": scores.backward_prompts,
        "details": {k: v for k, v in scores.details.items() if isinstance(v, (int, float, type(None)))},
        **evaluate(scores.scores, truth),
    }


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _seeds_note(control: list, rows: list) -> str:
    """ " (n of m seeds)" when a control ran on fewer seeds than its method (a partly extended study)."""
    return f" ({len(control)} of {len(rows)} seeds)" if 0 < len(control) < len(rows) else ""


def control_verdict(aucs_by_control: dict[str, list[float]]) -> str:
    """ "yes: <controls>" naming the controls that ran when each has its mean AUC inside CHANCE_BAND,
    "no: <control> <mean>" naming those outside it, "not run" when none ran."""
    ran = {name: statistics.mean(aucs) for name, aucs in aucs_by_control.items() if aucs}
    if not ran:
        return "not run"
    outside = [f"{name} {mean:.2f}" for name, mean in ran.items() if not near_chance(mean)]
    return "no: " + ", ".join(outside) if outside else "yes: " + ", ".join(ran)


def results_table(per_seed: list[dict]) -> str:
    """Markdown: one row per method, mean ± sd over seeds; "controls near chance" says whether every control
    that ran for the method has its mean AUC inside CHANCE_BAND (the own-init diagnostic is not a control;
    the `random` row is the random-scorer control, judged by its own AUC)."""
    ok = [r for r in per_seed if "error" not in r]
    with_init = any(r.get("init_control") for r in ok)  # toys: the trained model's own initialisation too
    header = [
        "method",
        "ROC AUC",
        "AUC within layers",
        "P@k",
        "R@k",
        "F1@thr 0.5",
        "oracle best F1",
        "faithfulness@k",
        "KL(M‖C)@k",
        "shuffled-label AUC",
        "re-init AUC",
        *(["own-init AUC"] if with_init else []),
        "controls near chance",
        "forward prompts",
        "backward prompts",
        "seconds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    names = list(dict.fromkeys(name for r in ok for name in r["methods"]))  # a partly extended run: the union

    def control_aucs(key: str, name: str) -> list[float]:
        return [r[key][name]["roc_auc"] for r in ok if name in r.get(key, {})]

    for name in names:
        rows = [r["methods"][name] for r in ok if name in r["methods"]]
        shuffled, reinit = control_aucs("shuffled_control", name), control_aucs("reinit_control", name)
        within = [x["roc_auc_within_layers"] for x in rows if x["roc_auc_within_layers"] is not None]
        cells = [
            name,
            _mean_sd([x["roc_auc"] for x in rows]),
            _mean_sd(within),
            _mean_sd([x["at_k"]["precision"] for x in rows]),
            _mean_sd([x["at_k"]["recall"] for x in rows]),
            _mean_sd([x["at_threshold"]["f1"] for x in rows]),
            _mean_sd([x["oracle_best_f1"] for x in rows]),
            _mean_sd([x["faithfulness_at_k"]["faithfulness"] for x in rows if "faithfulness_at_k" in x]),
            _mean_sd(
                [
                    x["faithfulness_at_k"]["kl_circuit"]
                    for x in rows
                    if "kl_circuit" in x.get("faithfulness_at_k", {})
                ]
            ),
            _mean_sd(shuffled) + _seeds_note(shuffled, rows),
            _mean_sd(reinit) + _seeds_note(reinit, rows),
            *([_mean_sd(control_aucs("init_control", name))] if with_init else []),
            control_verdict(
                {"random scorer": [x["roc_auc"] for x in rows]}
                if name == "random"
                else {"shuffled": shuffled, "re-init": reinit}
            ),
            f"{statistics.mean(x['forward_prompts'] for x in rows):.0f}",
            f"{statistics.mean(x['backward_prompts'] for x in rows):.0f}",
            f"{statistics.mean(x['seconds'] for x in rows):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    truth_faithfulness = [r["ground_truth_faithfulness"] for r in ok if "ground_truth_faithfulness" in r]
    if truth_faithfulness:
        lines += [
            "",
            "Ground-truth circuit itself: faithfulness "
            + _mean_sd([f["faithfulness"] for f in truth_faithfulness])
            + ", KL(M‖C) "
            + _mean_sd([f["kl_circuit"] for f in truth_faithfulness])
            + ", KL(M‖∅) "
            + _mean_sd([f["kl_empty"] for f in truth_faithfulness])
            + ".",
        ]
    failed = [r for r in per_seed if "error" in r]
    if failed:
        lines.append("")
        lines += [f"seed {r['seed']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory for report.json and table.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each toy model")
    parser.add_argument("--toy", default="2l4h", choices=list(TOYS), help="which toy model (without --model)")
    parser.add_argument(
        "--model", help="a real model instead of the toy induction models (e.g. gemma-3-270m)"
    )
    parser.add_argument("--task", default="ioi", choices=TASK_NAMES, help="with --model: the task to pose")
    parser.add_argument(
        "--reinit",
        action="store_true",
        help="with --model: also run the code methods on a re-initialised copy (the control)",
    )
    parser.add_argument(
        "--reinit-methods",
        nargs="+",
        choices=WEIGHT_READING_METHODS,
        help="with --reinit: these methods (default: every code method asked for)",
    )
    parser.add_argument(
        "--shuffle",
        nargs="*",
        choices=list(COMPARED_CODE_METHODS),
        metavar="METHOD",
        help="with --model: also run the shuffled-label control for these code methods (none named: "
        "every code method asked for). Toy runs always run it",
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="keep what OUT/report.json has, run only what it lacks: methods, or controls of methods "
        "(toys: the models are trained again and must give the same ground truth)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extended = json.loads((out / "report.json").read_text()) if args.extend else None
    if (
        extended is not None
    ):  # the extended report keeps the settings of every run that made it, not only this one's
        args.earlier_runs = [
            *extended.get("args", {}).get("earlier_runs", []),
            {k: v for k, v in extended.get("args", {}).items() if k != "earlier_runs"},
        ]
    if args.model:
        model = _load_named(args.model)
        task = build_task(args.task, model, args.prompts, 0)
        previous = extended["per_seed"] if extended is not None else None
        reinit = reinitialised_copy(model, seed=0) if args.reinit else None
        shuffle = None if args.shuffle is None else (args.shuffle or args.methods)
        per_seed = evaluate_model(
            model,
            task,
            args.methods,
            args.seeds,
            out / "ground_truth_cache.json",
            task_fingerprint(args.model, task),
            reinit,
            previous,
            args.reinit_methods,
            shuffle,
            save=lambda partial: write_report(out, args, partial),
        )
    else:
        previous = toy_run_to_extend(extended, out, args) if extended is not None else {}
        with tempfile.TemporaryDirectory() as work:
            per_seed = []
            for s in args.seeds:
                per_seed.append(
                    evaluate_seed(
                        s, args.methods, args.prompts, args.steps, Path(work), args.toy, previous.get(s)
                    )
                )
                write_report(
                    out, args, with_earlier_seeds(previous, per_seed)
                )  # after every seed: shows progress
        per_seed = with_earlier_seeds(previous, per_seed)
    print(write_report(out, args, per_seed))


def with_earlier_seeds(previous: dict[int, dict], per_seed: list[dict]) -> list[dict]:
    """The extended run's seeds, each replaced by this run's result where there is one: seeds this run did not
    (or not yet) reach are kept as they were, in their order."""
    return list(({**previous, **{r["seed"]: r for r in per_seed}}).values())


def toy_run_to_extend(report: dict, out: Path, args: argparse.Namespace) -> dict[int, dict]:
    """The per-seed results of OUT/report.json (`report`) by seed, after checking it was made with the same
    toy settings (a different toy, step count or prompt count would give different models or prompts)."""
    old_args = report["args"]
    for setting in ("toy", "steps", "prompts"):
        if old_args.get(setting, getattr(args, setting)) != getattr(args, setting):
            raise ValueError(
                f"--extend: {out}/report.json was made with --{setting} {old_args[setting]}, "
                f"this run has {getattr(args, setting)}"
            )
    if old_args.get("model"):
        raise ValueError(f"--extend: {out}/report.json is a --model {old_args['model']} run, not a toy run")
    missing = [s for s in args.seeds if s not in {r["seed"] for r in report["per_seed"]}]
    if missing:
        raise ValueError(f"--extend: seeds {missing} are not in {out}/report.json")
    return {r["seed"]: r for r in report["per_seed"]}


def write_report(out: Path, args: argparse.Namespace, per_seed: list[dict]) -> str:
    """report.json and table.md in `out` (atomically; called after every seed of a real-model run)."""
    table = results_table(per_seed)
    atomic_write_json(
        out / "report.json",
        {
            "args": vars(args),
            "ground_truth_fraction": GROUND_TRUTH_FRACTION,
            "per_seed": per_seed,
            "table": table,
        },
    )
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    return table


if __name__ == "__main__":
    main()
