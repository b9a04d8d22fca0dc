"""`sae-analyze feature-circuit --task ioi --model gemma-3-270m --saes SAE [SAE ...] --out OUT`: the latents
and SAE errors that carry a task, the edges between them, faithfulness and completeness curves against
random latents and the raw basis, head estimates from hook_z SAEs, and an interactive graph
(OUT/report.json, OUT/curves.png, OUT/graph.html)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae.analysis.circuits.feature_attribution import NODE_METHODS
from sae.analysis.circuits.feature_circuit import ABLATIONS
from sae.analysis.circuits.tasks import TASK_NAMES
from sae.cli.common import Subcommand
from sae.typed_config import ConfigError, option


@dataclass
class FeatureCircuitOptions:
    task: Literal[TASK_NAMES] = option(help="the task (clean and corrupted prompts and a metric)")
    model: str = option(help="gemma-3-270m, a local Hugging Face folder, or a hub name")
    saes: list[str] = option(
        metavar="SAE", help="SAEs to splice (any that sae.load reads), one per hookpoint"
    )
    out: str = option(help="directory for report.json, curves.png and graph.html")
    method: Literal[NODE_METHODS] = option("integrated_gradients", help="how node effects are estimated")
    steps: int = option(10, help="integrated-gradients steps")
    prompts: int = option(40, help="prompts of the task")
    seed: int = option(0, help="seed of the prompts and of the random-node control")
    sizes: list[int] = option(
        default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500],
        metavar="N",
        help="circuit sizes of the faithfulness and completeness curves",
    )
    ablations: list[Literal[ABLATIONS]] = option(
        default_factory=lambda: ["mean", "resample"], metavar="ABLATION", help="mean and/or resample"
    )
    random_draws: int = option(3, help="random-node circuits per size (the control)")
    raw_basis: bool = option(True, help="run the same procedure on the sites' own dimensions")
    graph_nodes: int = option(30, help="the top nodes drawn in the graph, with their edges")
    edges_per_node: int = option(8, help="edges kept into each graph node")
    check_per_site: int = option(
        0, help="> 0: patch this many latents per site for real and correlate the estimates with it"
    )
    compare: list[Literal[NODE_METHODS]] = option(
        default_factory=lambda: list(NODE_METHODS),
        metavar="METHOD",
        help="the methods the patching check judges beside --method",
    )
    explanations: list[str] = option(
        default_factory=list, metavar="HOOKPOINT=FILE", help="autointerp explanations.jsonl of a site's SAE"
    )
    dashboards: list[str] = option(
        default_factory=list, metavar="DIR", help="sae-analyze dashboard output of each SAE (in --saes order)"
    )
    dtype: Literal["float32", "bfloat16"] = option("float32", help="the model's dtype")
    device: str = option("cpu", help="torch device")

    def __post_init__(self) -> None:
        if not self.saes:
            raise ConfigError("--saes: give at least one SAE")
        if min(self.sizes, default=0) < 1:
            raise ConfigError(f"--sizes must be positive, got {self.sizes}")


def run_feature_circuit(opts: FeatureCircuitOptions) -> int:
    from sae.analysis.circuits.feature_report import write_feature_circuit

    write_feature_circuit(opts)
    return 0


SUBCOMMAND = Subcommand(
    FeatureCircuitOptions,
    run_feature_circuit,
    "find the latents (and SAE errors) a task uses, and their edges",
)
