"""`sae-analyze circuits --task ioi --model gemma-3-270m --out OUT`: score every attention head on a task,
evaluate against a ground truth (exhaustive patching on this model, or a published list), and write
OUT/report.json and a layer × head heatmap per method (OUT/<method>.png)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae.analysis.circuits import ground_truth
from sae.analysis.circuits.methods import ALL_METHODS
from sae.analysis.circuits.tasks import TASK_NAMES
from sae.cli.common import Subcommand
from sae.typed_config import option

DEFAULT_METHODS = ["oneill", "codebook_overlap_pair_calibrated", "attribution_patching"]


@dataclass
class CircuitsOptions:
    task: Literal[TASK_NAMES] = option(help="the task (clean and corrupted prompts and a metric)")
    model: str = option(help="gemma-3-270m, a local Hugging Face folder, or a hub name")
    out: str = option(help="directory for report.json and <method>.png")
    methods: list[Literal[tuple(ALL_METHODS)]] = option(
        default_factory=lambda: list(DEFAULT_METHODS),
        metavar="METHOD",
        help=f"methods to run, of: {', '.join(ALL_METHODS)} (default: {' '.join(DEFAULT_METHODS)})",
    )
    ground_truth: str = option(
        "patching",
        help="'patching' (exhaustive resample patching on this model: heads with |effect| >= 10% of the "
        "clean-corrupted gap) or a shipped list: " + ", ".join(ground_truth.available()),
    )
    prompts: int = option(100, help="prompts of the task")
    seed: int = option(0, help="seed of the prompts and of every method")
    dtype: Literal["float32", "bfloat16"] = option("float32", help="the model's dtype")
    device: str = option("cpu", help="torch device")
    controls: bool = option(
        False,
        help="also run each method on shuffled prompt labels (code methods) and on a re-initialised copy of "
        "the model (methods that read weights), and say whether they come out near chance",
    )


def run_circuits(opts: CircuitsOptions) -> int:
    from sae.analysis.circuits.report import write_report

    write_report(opts)
    return 0


SUBCOMMAND = Subcommand(CircuitsOptions, run_circuits, "find the attention heads a task uses")
