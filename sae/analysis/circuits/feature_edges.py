"""Edges between the nodes of spliced SAEs: how much of a node's effect comes through each node below it.

For a downstream node d (a latent or an error at some site) and a node u of a site that computes before
it, attribution patching of the edge (Marks et al. 2024) is

    edge(u -> d) = mean over prompts of  -Δu · ∂(g_d · d)/∂u,      g_d = ∂m/∂d in the spliced model,

with d computed from its site's input and every spliced site between u and d held at its value
(`SplicedModel.run_connected`), so the edge is u's direct effect on d, weighted by what d does for the
metric. An edge to the metric is u's direct effect on it, -Δu · ∂m/∂u with every later site held.

Cost: one clean forward and backward for g, one corrupted forward, one connected forward, and one
backward per downstream node. Memory: one site's gradient [prompts, pos, d_sae] at a time, reduced at
once to the `top` edges by |weight| into each node; nothing is ever dense over all latents of all sites.
Only latents active on some prompt can have an edge (Δu is zero elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .feature_attribution import estimates, node_gradients, site_values
from .feature_circuit import ERROR, Node
from .splice import SplicedModel
from .tasks import Task, task_metric


@dataclass
class Edge:
    upstream: Node
    downstream: Node | None  # None: the metric
    weight: float


@dataclass
class FeatureEdges:
    edges: list[Edge]
    forwards: int
    backwards: int
    seconds: float

    def into(self, node: Node | None) -> list[Edge]:
        return [e for e in self.edges if e.downstream == node]


def feature_edges(
    spliced: SplicedModel, task: Task, downstream: Sequence[Node], top: int = 10
) -> FeatureEdges:
    """The `top` edges into each node of `downstream` from the sites below it, and each such node's edge
    to the metric."""
    started = time.perf_counter()
    corrupt = site_values(spliced, task.corrupted_tokens)
    logits, clean = spliced.run(task.clean_tokens, last_position=True)
    total = node_gradients(task_metric(task, logits[:, -1]).sum(), clean)  # g: every path to the metric
    logits, leaves, computed = spliced.run_connected(task.clean_tokens, last_position=True)
    order = list(leaves)  # the sites in the order the forward computes them
    direct = node_gradients(task_metric(task, logits[:, -1]).sum(), leaves, retain_graph=True)
    edges, backwards = [], 2
    for node in dict.fromkeys(downstream):  # unique, in order
        weights = estimates(leaves[node.site], corrupt[node.site], *direct[node.site])
        edges.append(Edge(node, None, float(_at(weights, node))))
        below = order[: order.index(node.site)]
        if not below:
            continue
        g_latents, g_error = total[node.site]
        if node.latent == ERROR:
            target = (g_error[:, node.position] * computed[node.site].error[:, node.position]).sum()
        else:
            target = (
                g_latents[:, node.position, node.latent]
                * computed[node.site].latents[:, node.position, node.latent]
            ).sum()
        grads = node_gradients(target, {h: leaves[h] for h in below}, retain_graph=True)
        backwards += 1
        candidates: list[Edge] = []
        for h, (g_lat, g_err) in grads.items():
            candidates += _top_edges(h, *estimates(leaves[h], corrupt[h], g_lat, g_err), node, top)
        candidates.sort(key=lambda e: abs(e.weight), reverse=True)
        edges += candidates[:top]
    return FeatureEdges(edges, 3, backwards, time.perf_counter() - started)


def _at(weights: tuple[Tensor, Tensor], node: Node) -> Tensor:
    latents, errors = weights
    return errors[node.position] if node.latent == ERROR else latents[node.position, node.latent]


def _top_edges(site: str, latents: Tensor, errors: Tensor, into: Node, top: int) -> list[Edge]:
    flat = torch.cat([latents.flatten(), errors])
    best = flat.abs().topk(min(top, len(flat))).indices
    width = latents.shape[1]
    edges = []
    for index in best.tolist():
        if flat[index] == 0:
            continue
        if index >= latents.numel():
            upstream = Node(site, index - latents.numel(), ERROR)
        else:
            upstream = Node(site, *divmod(index, width))
        edges.append(Edge(upstream, into, float(flat[index])))
    return edges
