"""Feature circuits: the nodes that carry a task, and how honest the choice is (Marks et al. 2024).

A circuit is a set of nodes of the spliced sites: latents at (position, latent) and SAE errors at a
position. It is chosen from node estimates (`feature_attribution.py`) by threshold or as the top N, and
judged by ablating nodes with the other sites' nodes computed as usual:

    faithfulness(C)  = (m(C) - m(∅)) / (m(M) - m(∅))   every node outside C ablated (1: the whole model)
    completeness(C)  = (m(M∖C) - m(∅)) / (m(M) - m(∅))  the nodes of C ablated (0: C holds all of it)

with m the mean task metric, M the model (nothing ablated) and ∅ every node ablated. Ablation replaces a
node's value by its mean over the corrupted prompts at that position ("mean") or by its value on the
paired corrupted prompt ("resample"), as `patching.py` does for heads. Two controls at equal N, the
comparison of Marks et al.: the same number of random nodes at each site, drawn among those active on
the task's prompts (`random_like`); and the whole procedure on the raw basis, where each site's
dimensions are the nodes (`raw_basis`, an exact dictionary with no error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sae.config import SAEConfig
from sae.model import SparseAutoencoder

from .feature_attribution import NodeEffects, site_values
from .splice import SiteNodes, SplicedModel
from .tasks import Task, task_metric

ABLATIONS = ("mean", "resample")
ERROR = -1  # the latent index of an error node


class Node(NamedTuple):
    """A latent (latent >= 0) or an SAE error (latent == ERROR) of one site at one position."""

    site: str
    position: int
    latent: int


@dataclass
class SiteMask:
    """Which of one site's nodes a circuit holds: latents [pos, d_sae] and errors [pos], bool."""

    latents: Tensor
    error: Tensor


Circuit = dict[str, SiteMask]


def ranked_nodes(effects: NodeEffects, n: int | None = None, threshold: float | None = None) -> list[Node]:
    """Nodes by decreasing estimated effect: the top `n`, or those with effect >= `threshold`, or both.

    A node's effect is the metric it carries (positive: the task needs it); nodes that work against the
    task rank last, as in Marks et al., who keep nodes above a threshold."""
    values, owners = [], []
    for h in effects.latents:
        values += [effects.latents[h].flatten(), effects.errors[h]]
        owners += [(h, effects.latents[h].shape[1]), (h, ERROR)]
    flat = torch.cat(values)
    order = flat.argsort(descending=True)
    if threshold is not None:
        order = order[flat[order] >= threshold]
    if n is not None:
        order = order[:n]
    starts = torch.tensor([0] + [len(v) for v in values]).cumsum(0)
    nodes = []
    for index in order.tolist():
        block = int(torch.searchsorted(starts, index, right=True)) - 1
        (site, width), offset = owners[block], index - int(starts[block])
        nodes.append(Node(site, offset, ERROR) if width == ERROR else Node(site, *divmod(offset, width)))
    return nodes


def circuit_of(nodes: Sequence[Node], spliced: SplicedModel, positions: int) -> Circuit:
    """The masks of `nodes` over every spliced site (positions: the prompts' length)."""
    circuit = {
        h: SiteMask(
            torch.zeros(positions, sae.cfg.d_sae, dtype=torch.bool), torch.zeros(positions, dtype=torch.bool)
        )
        for h, sae in spliced.saes.items()
    }
    for site, position, latent in nodes:
        if latent == ERROR:
            circuit[site].error[position] = True
        else:
            circuit[site].latents[position, latent] = True
    return circuit


def random_like(
    circuit: Circuit, clean: dict[str, SiteNodes], corrupt: dict[str, SiteNodes], seed: int, first: int = 1
) -> Circuit:
    """As many latents and errors at each site as `circuit` has, drawn at random among that site's latents
    active on some prompt (clean or corrupted) and its positions from `first` (the spliced ones) on."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {}
    for h, mask in circuit.items():
        active = ((clean[h].latents != 0) | (corrupt[h].latents != 0)).any(0)  # [pos, d_sae]
        active[:first] = False
        pool = active.flatten().nonzero().squeeze(1)
        chosen = pool[torch.randperm(len(pool), generator=generator)[: int(mask.latents.sum())]]
        latents = torch.zeros_like(mask.latents).flatten()
        latents[chosen] = True
        n_errors = int(mask.error.sum())
        spliced_positions = torch.arange(first, len(mask.error))
        error = torch.zeros_like(mask.error)
        error[spliced_positions[torch.randperm(len(spliced_positions), generator=generator)[:n_errors]]] = (
            True
        )
        drawn[h] = SiteMask(latents.view_as(mask.latents), error)
    return drawn


def ablation_nodes(corrupt: dict[str, SiteNodes], ablation: str) -> dict[str, SiteNodes]:
    """What an ablated node becomes on each clean prompt, from the nodes of the paired corrupted prompts
    (`site_values(spliced, task.corrupted_tokens)`): [prompts, pos, ...] per site."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; known: {', '.join(ABLATIONS)}")
    if ablation == "resample":
        return corrupt
    n = len(next(iter(corrupt.values())).latents)
    return {
        h: SiteNodes(
            site.latents.mean(0, keepdim=True).expand(n, -1, -1),
            site.error.mean(0, keepdim=True).expand(n, -1, -1),
        )
        for h, site in corrupt.items()
    }


@torch.no_grad()
def metric_with(
    spliced: SplicedModel, task: Task, keep: Circuit | None, ablated: dict[str, SiteNodes]
) -> float:
    """Mean metric with every node outside `keep` ablated (keep=None: nothing ablated)."""
    interventions = {}
    if keep is not None:
        for h, mask in keep.items():

            def ablate(site: SiteNodes, mask: SiteMask = mask, h: str = h) -> SiteNodes:
                return SiteNodes(
                    torch.where(mask.latents, site.latents, ablated[h].latents),
                    torch.where(mask.error[:, None], site.error, ablated[h].error),
                )

            interventions[h] = ablate
    logits, _ = spliced.run(task.clean_tokens, interventions, last_position=True)
    return float(task_metric(task, logits[:, -1]).mean())


def complement(circuit: Circuit) -> Circuit:
    return {h: SiteMask(~m.latents, ~m.error) for h, m in circuit.items()}


@dataclass
class Curves:
    """Faithfulness and completeness over circuit sizes, the random-node control at each size."""

    ablation: str
    sizes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    random_faithfulness: list[float]  # mean over `random_draws`
    random_completeness: list[float]
    metric_model: float
    metric_empty: float
    random_draws: int
    forwards: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def curves(
    spliced: SplicedModel,
    task: Task,
    effects: NodeEffects,
    sizes: Sequence[int],
    ablation: str = "mean",
    random_draws: int = 3,
    seed: int = 0,
) -> Curves:
    """Faithfulness and completeness of the top-N circuits by `effects` for each N in `sizes`, beside N
    random active nodes at the same sites. 2 + 2·len(sizes)·(1 + random_draws) forwards."""
    corrupt = site_values(spliced, task.corrupted_tokens)
    ablated = ablation_nodes(corrupt, ablation)
    clean = site_values(spliced, task.clean_tokens)
    positions = task.clean_tokens.shape[1]
    nothing = circuit_of([], spliced, positions)
    full, empty = metric_with(spliced, task, None, ablated), metric_with(spliced, task, nothing, ablated)
    if full == empty:
        raise ValueError(f"ablating every node leaves the {task.name} metric unchanged: nothing to explain")

    def scaled(m: float) -> float:
        return (m - empty) / (full - empty)

    ranked = ranked_nodes(effects, n=max(sizes))
    result = Curves(ablation, list(sizes), [], [], [], [], full, empty, random_draws, 2)
    for n in sizes:
        circuit = circuit_of(ranked[:n], spliced, positions)
        result.faithfulness.append(scaled(metric_with(spliced, task, circuit, ablated)))
        result.completeness.append(scaled(metric_with(spliced, task, complement(circuit), ablated)))
        draws = [random_like(circuit, clean, corrupt, seed + i, spliced.first) for i in range(random_draws)]
        faithful = [scaled(metric_with(spliced, task, c, ablated)) for c in draws]
        complete = [scaled(metric_with(spliced, task, complement(c), ablated)) for c in draws]
        result.random_faithfulness.append(sum(faithful) / max(len(draws), 1))
        result.random_completeness.append(sum(complete) / max(len(draws), 1))
        result.forwards += 2 * (1 + random_draws)
    return result


def raw_basis(hookpoint: str, d_in: int, hook_layout: str = "flat") -> SparseAutoencoder:
    """The site's own dimensions as an exact dictionary: latents relu(x) and relu(-x) [2·d_in], decoder
    rows +e_i and -e_i, so x̂ = x and the error is zero. Spliced like any SAE, it runs the circuit
    procedure on neurons / residual dimensions (the baseline of Marks et al.)."""
    cfg = SAEConfig("relu", d_in, 2 * d_in, hookpoint=hookpoint, hook_layout=hook_layout)
    eye = torch.eye(d_in)
    signed = torch.cat([eye, -eye])  # [2·d_in, d_in]
    return SparseAutoencoder.from_tensors(
        cfg,
        {
            "W_enc": signed,
            "b_enc": torch.zeros(2 * d_in),
            "W_dec": signed.clone(),
            "b_dec": torch.zeros(d_in),
        },
        "raw basis",
    )
