"""Node attribution over spliced SAEs: how much of a task's metric each latent and each SAE error carries.

A node's effect is what patching it alone from its clean to its corrupted value takes away,

    effect(n) = mean over prompts of  m(clean) - m(clean with n at its corrupted value),

the sign convention of `patching.py` (a node the task needs has a positive effect). Estimated, with
Δn = n_corrupt - n_clean and m the task metric at the last position:

* attribution patching: -Δn · ∂m/∂n at the clean run. One clean forward and backward for every site at
  once, one corrupted forward.
* integrated gradients: -Δn · (mean over α of ∂m/∂n at n_clean + α Δn), one site at a time with the other
  sites computed as usual (Marks et al. 2024); the midpoint rule over `steps` values of α. Per site, `steps`
  forwards and backwards. Summed over a site's nodes it is m(clean) - m(site patched), up to the rule's
  error (completeness).

Latent effects are per (position, latent) [pos, d_sae]; an error node's per position [pos], summed over
d_in. Both are averaged over prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .splice import SiteNodes, SplicedModel
from .tasks import Task, task_metric


@dataclass
class NodeEffects:
    """Estimated effects of every node of every spliced site, and what they cost."""

    method: str
    latents: dict[str, Tensor]  # hookpoint -> [pos, d_sae]
    errors: dict[str, Tensor]  # hookpoint -> [pos]
    forwards: int  # forward passes, each over all prompts
    backwards: int
    seconds: float


def site_values(spliced: SplicedModel, tokens: Tensor) -> dict[str, SiteNodes]:
    """Every site's node values on `tokens` [prompts, pos], without gradients."""
    with torch.no_grad():
        return spliced.run(tokens)[1]


def attribution_patching_nodes(spliced: SplicedModel, task: Task) -> NodeEffects:
    """Attribution patching of every latent and error node (the first-order estimate)."""
    started = time.perf_counter()
    corrupt = site_values(spliced, task.corrupted_tokens)
    logits, clean = spliced.run(task.clean_tokens)
    grads = _gradients(task_metric(task, logits[:, -1]).sum(), clean)
    latents, errors = {}, {}
    for h, nodes in clean.items():
        latents[h], errors[h] = _effects(nodes, corrupt[h], *grads[h])
    return NodeEffects("attribution_patching", latents, errors, 2, 1, time.perf_counter() - started)


def integrated_gradients_nodes(spliced: SplicedModel, task: Task, steps: int = 10) -> NodeEffects:
    """Integrated gradients of every latent and error node, site by site, over `steps` points."""
    if steps < 1:
        raise ValueError(f"integrated gradients needs steps >= 1, got {steps}")
    started = time.perf_counter()
    clean = site_values(spliced, task.clean_tokens)
    corrupt = site_values(spliced, task.corrupted_tokens)
    latents, errors = {}, {}
    for h in spliced.hookpoints:
        grad_latents = torch.zeros_like(clean[h].latents)
        grad_error = torch.zeros_like(clean[h].error)
        for step in range(steps):
            alpha = (step + 0.5) / steps

            def on_the_path(_: SiteNodes, h: str = h, alpha: float = alpha) -> SiteNodes:
                return SiteNodes(
                    torch.lerp(clean[h].latents, corrupt[h].latents, alpha),
                    torch.lerp(clean[h].error, corrupt[h].error, alpha),
                )

            logits, nodes = spliced.run(task.clean_tokens, {h: on_the_path})
            g_latents, g_error = _gradients(task_metric(task, logits[:, -1]).sum(), {h: nodes[h]})[h]
            grad_latents += g_latents / steps
            grad_error += g_error / steps
        latents[h], errors[h] = _effects(clean[h], corrupt[h], grad_latents, grad_error)
    runs = len(spliced.hookpoints) * steps
    return NodeEffects("integrated_gradients", latents, errors, 2 + runs, runs, time.perf_counter() - started)


def _gradients(metric: Tensor, sites: dict[str, SiteNodes]) -> dict[str, tuple[Tensor, Tensor]]:
    """∂metric/∂latents and ∂metric/∂error of each site (autograd.grad: the model's weights get none)."""
    inputs = [t for nodes in sites.values() for t in (nodes.latents, nodes.error)]
    grads = torch.autograd.grad(metric, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
    return {h: (grads[2 * i], grads[2 * i + 1]) for i, h in enumerate(sites)}


def _effects(
    clean: SiteNodes, corrupt: SiteNodes, grad_latents: Tensor, grad_error: Tensor
) -> tuple[Tensor, Tensor]:
    """-Δn · gradient, averaged over prompts: latents [pos, d_sae], error [pos]."""
    latents = -((corrupt.latents - clean.latents.detach()) * grad_latents).mean(0)
    error = -((corrupt.error - clean.error.detach()) * grad_error).sum(-1).mean(0)
    return latents.detach(), error.detach()
