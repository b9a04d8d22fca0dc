"""Does the model do the tasks? The README's "Tasks on Gemma 3 270M" table: per task, how many clean and
corrupted prompts it solves (metric > 0) and the mean metric of each.

    python studies/circuits/task_check.py --model gemma-3-270m --prompts 40 --out studies/circuits/results

Writes OUT/task_check.md (and prints it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sae.analysis.circuits.activations import last_logits_with_ablation
from sae.analysis.circuits.tasks import TASK_NAMES, build_task, task_metric, task_solved
from sae.io import atomic_write_bytes

# the tasks posed to Gemma (the two-digit-year greater-than needs a tokenizer with whole-number tokens)
GEMMA_TASKS = ["ioi", "greater_than_digits", "docstring"]


def task_check_table(model, task_names: list[str], n_prompts: int, seed: int = 0) -> str:
    """Markdown: one row per task, clean and corrupted prompts solved and their mean metric."""
    nothing = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    lines = [
        "| task | metric | clean solved | clean metric | corrupted solved | corrupted metric |",
        "|" + " --- |" * 6,
    ]
    for name in task_names:
        task = build_task(name, model, n_prompts, seed)
        cells = [name, task.metric]
        for tokens in (task.clean_tokens, task.corrupted_tokens):
            logits = last_logits_with_ablation(model, tokens, nothing, None)
            solved = int(task_solved(task, logits).sum())
            cells += [f"{solved} / {len(task)}", f"{float(task_metric(task, logits).mean()):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tasks", nargs="+", default=GEMMA_TASKS, choices=TASK_NAMES)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory for task_check.md")
    args = parser.parse_args(argv)
    from sae.lm import load_model

    table = task_check_table(load_model(args.model), args.tasks, args.prompts, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "task_check.md", (table + "\n").encode())
    print(table)


if __name__ == "__main__":
    main()
