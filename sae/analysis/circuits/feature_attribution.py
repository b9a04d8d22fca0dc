"""Node attribution over spliced SAEs: how much of a task's metric each latent and each SAE error carries.

A node's effect is what patching it alone from its clean to its corrupted value takes away,

    effect(n) = mean over prompts of  m(clean) - m(clean with n at its corrupted value),

the sign convention of `patching.py` (a node the task needs has a positive effect). Estimated, with
Δn = n_corrupt - n_clean and m the task metric at the last position:

* attribution patching: -Δn · ∂m/∂n at the clean run. One clean forward and backward for every site at
  once, one corrupted forward.
* RelP: attribution patching with the gradient taken under RelP's propagation rules (`lrp.py`); the
  same two forwards and one backward.
* integrated gradients: -Δn · (mean over α of ∂m/∂n at n_clean + α Δn), one site at a time with the other
  sites computed as usual (Marks et al. 2024); the midpoint rule over `steps` values of α. Per site, `steps`
  forwards and backwards. Summed over a site's nodes it is m(clean) - m(site patched), up to the rule's
  error (completeness).

Latent effects are per (position, latent) [pos, d_sae]; an error node's per position [pos], summed over
d_in. Both are averaged over prompts.

Heads (Kissane et al. 2024): at a site that reads every head's `hook_z` concatenated, x̂ is linear in
the latents and splits by head, so each estimate splits too: head h gets -Δx̂_h · g_h from the latents and
-Δε_h · g_h from the error (g = the estimate's gradient at the site's output). The latent parts summed over
heads are the latents' estimates summed; with the error parts, they are the head's own attribution of
`hook_z` (a test checks both). `patching_check` compares every estimate with real patching of a sample of
latents per site, as RelP's paper does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sae.model import SparseAutoencoder

from .lrp import quiet_norm_edits, relp_hooks
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
    # sites that read every head's hook_z: hookpoint -> [pos, heads], the latents' part and the error's
    head_latents: dict[str, Tensor] = field(default_factory=dict)
    head_errors: dict[str, Tensor] = field(default_factory=dict)

    def heads(self, hookpoint: str) -> Tensor:
        """[heads]: each head's estimated effect at a hook_z site (latents and error, over positions)."""
        if hookpoint not in self.head_latents:
            raise KeyError(f"{hookpoint} is not a spliced site that reads every head (hook_layout='heads')")
        return (self.head_latents[hookpoint] + self.head_errors[hookpoint]).sum(0)


def site_values(spliced: SplicedModel, tokens: Tensor) -> dict[str, SiteNodes]:
    """Every site's node values on `tokens` [prompts, pos], without gradients."""
    with torch.no_grad():
        return spliced.run(tokens, last_position=True)[1]


def attribution_patching_nodes(spliced: SplicedModel, task: Task) -> NodeEffects:
    """Attribution patching of every latent and error node (the first-order estimate)."""
    return _first_order(spliced, task, "attribution_patching", rules=False)


def relp_nodes(spliced: SplicedModel, task: Task) -> NodeEffects:
    """RelP of every latent and error node: attribution patching under LRP's rules."""
    return _first_order(spliced, task, "relp", rules=True)


def _first_order(spliced: SplicedModel, task: Task, method: str, rules: bool) -> NodeEffects:
    started = time.perf_counter()
    corrupt = site_values(spliced, task.corrupted_tokens)
    with quiet_norm_edits():
        hooks = relp_hooks(spliced.model) if rules else ()
        logits, clean = spliced.run(task.clean_tokens, extra_hooks=hooks, last_position=True)
        grads = node_gradients(task_metric(task, logits[:, -1]).sum(), clean)
    effects = NodeEffects(method, {}, {}, 2, 1, 0.0)
    for h, nodes in clean.items():
        _add_site(effects, spliced, h, nodes, corrupt[h], *grads[h])
    effects.seconds = time.perf_counter() - started
    return effects


def integrated_gradients_nodes(spliced: SplicedModel, task: Task, steps: int = 10) -> NodeEffects:
    """Integrated gradients of every latent and error node, site by site, over `steps` points."""
    if steps < 1:
        raise ValueError(f"integrated gradients needs steps >= 1, got {steps}")
    started = time.perf_counter()
    clean = site_values(spliced, task.clean_tokens)
    corrupt = site_values(spliced, task.corrupted_tokens)
    effects = NodeEffects("integrated_gradients", {}, {}, 2 + len(spliced.hookpoints) * steps, 0, 0.0)
    effects.backwards = effects.forwards - 2
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

            logits, nodes = spliced.run(task.clean_tokens, {h: on_the_path}, last_position=True)
            g_latents, g_error = node_gradients(task_metric(task, logits[:, -1]).sum(), {h: nodes[h]})[h]
            grad_latents += g_latents / steps
            grad_error += g_error / steps
        _add_site(effects, spliced, h, clean[h], corrupt[h], grad_latents, grad_error)
    effects.seconds = time.perf_counter() - started
    return effects


NODE_METHODS = ("integrated_gradients", "attribution_patching", "relp")


def node_effects(spliced: SplicedModel, task: Task, method: str, steps: int = 10) -> NodeEffects:
    """Every node's estimated effect by `method`, one of NODE_METHODS (`steps`: integrated gradients')."""
    if method == "integrated_gradients":
        return integrated_gradients_nodes(spliced, task, steps)
    if method == "attribution_patching":
        return attribution_patching_nodes(spliced, task)
    if method == "relp":
        return relp_nodes(spliced, task)
    raise ValueError(f"unknown node method {method!r}; known: {', '.join(NODE_METHODS)}")


def node_gradients(
    metric: Tensor, sites: dict[str, SiteNodes], retain_graph: bool = False
) -> dict[str, tuple[Tensor, Tensor]]:
    """∂metric/∂latents and ∂metric/∂error of each site, zero where the metric does not reach them
    (autograd.grad: the model's weights get none)."""
    inputs = [t for nodes in sites.values() for t in (nodes.latents, nodes.error)]
    grads = torch.autograd.grad(metric, inputs, retain_graph=retain_graph, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
    return {h: (grads[2 * i], grads[2 * i + 1]) for i, h in enumerate(sites)}


def _add_site(
    effects: NodeEffects,
    spliced: SplicedModel,
    hookpoint: str,
    clean: SiteNodes,
    corrupt: SiteNodes,
    grad_latents: Tensor,
    grad_error: Tensor,
) -> None:
    """-Δn · gradient, averaged over prompts: latents [pos, d_sae], error [pos]; and per head at a site
    reading every head's hook_z. grad_error is the gradient at the site's output x' [b, t, d_in]."""
    effects.latents[hookpoint], effects.errors[hookpoint] = estimates(
        clean, corrupt, grad_latents, grad_error
    )
    sae = spliced.saes[hookpoint]
    if sae.cfg.hook_layout == "heads" and sae.cfg.hook_head_index is None:
        n_heads = spliced.model.cfg.n_heads
        delta_x_hat = _decoded_change(sae, clean, corrupt.latents)
        g = grad_error.unflatten(-1, (n_heads, -1))
        effects.head_latents[hookpoint] = -(delta_x_hat.unflatten(-1, (n_heads, -1)) * g).sum(-1).mean(0)
        delta_error = (corrupt.error - clean.error.detach()).unflatten(-1, (n_heads, -1))
        effects.head_errors[hookpoint] = -(delta_error * g).sum(-1).mean(0)


def estimates(
    clean: SiteNodes, corrupt: SiteNodes, grad_latents: Tensor, grad_error: Tensor
) -> tuple[Tensor, Tensor]:
    """-Δn · gradient per node, averaged over prompts: latents [pos, d_sae], errors [pos] (summed over
    d_in)."""
    latents = -((corrupt.latents - clean.latents.detach()) * grad_latents).mean(0)
    errors = -((corrupt.error - clean.error.detach()) * grad_error).sum(-1).mean(0)
    return latents.detach(), errors.detach()


@torch.no_grad()
def _decoded_change(sae: SparseAutoencoder, clean: SiteNodes, latents: Tensor) -> Tensor:
    """x̂(latents) - x̂(clean latents) [b, t, d_in] with the clean input's statistics: the change the
    latents make, linear in their change (b_dec, the input mean and the skip path cancel)."""
    stats = sae.input_stats(clean.input)
    return sae.decode(latents, stats) - sae.decode(clean.latents, stats)


@dataclass
class PatchingCheck:
    """Real patching of a sample of latents per site, beside each method's estimates of them."""

    nodes: dict[str, Tensor]  # hookpoint -> [n, 2] (position, latent)
    patched: dict[str, Tensor]  # hookpoint -> [n]: m(clean) - m(that latent alone at its corrupted value)
    estimates: dict[str, dict[str, Tensor]]  # method -> hookpoint -> [n]
    forwards: int

    def pearson(self) -> dict[str, dict[str, float | None]]:
        """method -> site (and "all", the sites pooled) -> Pearson r of estimate and real effect; None
        where the real effects do not vary."""
        table = {}
        for method, per_site in self.estimates.items():
            row = {h: _pearson(per_site[h], self.patched[h]) for h in self.patched}
            row["all"] = _pearson(torch.cat(list(per_site.values())), torch.cat(list(self.patched.values())))
            table[method] = row
        return table


def patching_check(
    spliced: SplicedModel, task: Task, estimates: Sequence[NodeEffects], per_site: int = 16, seed: int = 0
) -> PatchingCheck:
    """Patch `per_site` latents of each site one at a time, from clean to corrupted on every prompt.

    The sample is drawn among the latents whose value differs between clean and corrupted prompts (the
    others have no effect to estimate): half those with the largest mean |change|, half at random from the
    rest, so that the methods are judged on both large and ordinary nodes, chosen without any estimate.
    One forward per latent.
    """
    corrupt = site_values(spliced, task.corrupted_tokens)
    with torch.no_grad():
        logits, clean = spliced.run(task.clean_tokens, last_position=True)
    clean_metric = task_metric(task, logits[:, -1]).mean()
    generator = torch.Generator().manual_seed(seed)
    nodes, patched = {}, {}
    for h in spliced.hookpoints:
        change = (corrupt[h].latents - clean[h].latents).abs().mean(0)  # [pos, d_sae]
        candidates = change.flatten().nonzero().squeeze(1)
        by_change = candidates[change.flatten()[candidates].argsort(descending=True)]
        top, rest = by_change[: per_site // 2], by_change[per_site // 2 :]
        chosen = torch.cat([top, rest[torch.randperm(len(rest), generator=generator)[: per_site - len(top)]]])
        positions, latents = chosen // change.shape[1], chosen % change.shape[1]
        effects = []
        for pos, latent in zip(positions.tolist(), latents.tolist(), strict=True):

            def patch(site: SiteNodes, h=h, pos=pos, latent=latent) -> SiteNodes:
                edited = site.latents.clone()
                edited[:, pos, latent] = corrupt[h].latents[:, pos, latent]
                return SiteNodes(edited, site.error)

            with torch.no_grad():
                logits, _ = spliced.run(task.clean_tokens, {h: patch}, last_position=True)
            effects.append(clean_metric - task_metric(task, logits[:, -1]).mean())
        nodes[h] = torch.stack([positions, latents], 1)
        patched[h] = torch.stack(effects).float().cpu() if effects else torch.zeros(0)
    table = {
        e.method: {h: e.latents[h][nodes[h][:, 0], nodes[h][:, 1]].float().cpu() for h in nodes}
        for e in estimates
    }
    return PatchingCheck(nodes, patched, table, 3 + sum(len(p) for p in patched.values()))


def _pearson(x: Tensor, y: Tensor) -> float | None:
    if len(x) < 3 or y.std() == 0 or x.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])
