"""Edge-level attribution: how much each edge of the head graph carries the task.

Nodes: the input (the embeddings, i.e. resid_pre of layer 0), every attention head, and the logits. An
edge u -> v is the direct path from u's output, through the residual stream alone (no layer in between),
into the input of head v in a later layer (or into the unembedding, v = logits). Attribution patching
(Syed et al. 2023) estimates the effect of patching that edge with the corrupted run's value by

    edge(u -> v) = sum over positions of  (z_u(corrupt) - z_u(clean)) · d m / d z_u |direct to v

averaged over prompts; for u = input, z_u is the embedding and its direct path to v is the identity, so
the edge is (embedding(corrupt) - embedding(clean)) · g_v with g_v as below. The direct gradient is
obtained in two vector-Jacobian products per edge end after one ordinary backward pass, so no per-head
copy of the residual stream is needed:

    g_v = d m / d resid_pre(L_v), restricted to the path through head v
        = VJP of z(L_v) w.r.t. resid_pre(L_v), applied to d m / d z_v (the other heads' gradients zeroed)
    d m / d z_u |direct to v = VJP of resid_mid(L_u) w.r.t. z(L_u), applied to g_v

The second step goes through W_O and whatever sits between the attention output and the residual
(Gemma's post-attention norm), so it is exact for that part of the architecture. For logits, g is
d m / d (input of the final norm). EAP-IG (Hanna et al. 2024) averages the same products over inputs
interpolated between corrupted and clean embeddings.

In a model whose MLPs are zero (the toy models), every gradient path from z_u to the metric is one of
these edges, so the edge scores out of a head sum to its node attribution score, and those out of the
input to the attribution of the whole embedding change; tests check both. MLP nodes are not scored.

Edge matrices are [layers·heads + 1, layers·heads + 1]: rows are upstream nodes (heads numbered
layer·n_heads + head, then the input: `input_row`), columns downstream nodes (heads, then the logits).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .activations import ForwardCounter, collect_z, model_shape, z_hook_name
from .lrp import quiet_norm_edits, relp_hooks
from .patching import MethodScores
from .tasks import Task, task_metric


def _resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _resid_mid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_mid"


FINAL_RESID = "ln_final.hook_in"


def edge_index(n_layers: int, n_heads: int) -> Tensor:
    """[layers·heads + 1, layers·heads + 1] bool: which (upstream head or input, downstream head or logits)
    pairs are edges. Heads are numbered layer·n_heads + head; the last row is the input, the last column
    the logits."""
    n = n_layers * n_heads
    layer_of = torch.arange(n_layers).repeat_interleave(n_heads)
    valid = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    valid[:n, :n] = layer_of[:, None] < layer_of[None, :]
    valid[:, n] = True  # everything reaches the logits
    valid[n, :] = True  # the input reaches every head
    return valid


def input_row(n_layers: int, n_heads: int) -> int:
    """The row of the input (embeddings) in edge matrices."""
    return n_layers * n_heads


@torch.no_grad()
def embeddings(model, tokens: Tensor) -> Tensor:
    """tokens [prompts, pos] -> the residual stream entering layer 0 [prompts, pos, d_model] (the embedding
    stage only: not counted as a pass of the model)."""
    return model.forward(tokens.to(model.cfg.device), stop_at_layer=0).detach()


def _edge_products(
    model, task: Task, delta_z: Tensor, delta_input: Tensor, resid_pre_override=None, rules: bool = False
) -> tuple[Tensor, int]:
    """One forward and backward on the clean prompts, then the direct-path products.

    delta_z: [prompts, pos, layers, heads, d_head] = z(corrupt) - z(clean); delta_input: [prompts, pos,
    d_model] = embeddings(corrupt) - embeddings(clean).
    Returns edge estimates [layers·heads + 1, layers·heads + 1] (sum over prompts and positions) and the
    number of vector-Jacobian products taken.
    """
    n_layers, n_heads = model_shape(model)
    kept: dict[str, Tensor] = {}

    def keeper(name: str):  # keyed by the name we ask for: hook.name may be the canonical name of an alias
        def keep(tensor: Tensor, hook) -> Tensor:
            if tensor.requires_grad:
                tensor.retain_grad()
            kept[name] = tensor
            return tensor

        return keep

    def input_leaf(resid: Tensor, hook) -> Tensor:
        # the embedding (or EAP-IG's interpolation of it) as a leaf, so layer-0 heads have a residual
        # stream to take gradients at, whether or not the embedding weights require them
        x = resid if resid_pre_override is None else resid_pre_override(resid, hook)
        return x.detach().requires_grad_(True)

    names = [z_hook_name(L) for L in range(n_layers)] + [_resid_pre(L) for L in range(n_layers)]
    names += [_resid_mid(L) for L in range(n_layers)] + [FINAL_RESID]
    hooks = [(_resid_pre(0), input_leaf)] + [(name, keeper(name)) for name in names]
    if rules:  # the forward's graph follows RelP's rules, so every product below does too
        hooks += relp_hooks(model)
    edges = torch.zeros(n_layers * n_heads + 1, n_layers * n_heads + 1)
    vjps = 0
    with torch.enable_grad(), quiet_norm_edits():
        logits = model.run_with_hooks(task.clean_tokens.to(model.cfg.device), fwd_hooks=hooks)
        task_metric(task, logits[:, -1]).sum().backward(retain_graph=True)
        missing = [n for n in names if n not in kept or kept[n].grad is None]
        if missing:
            raise RuntimeError(
                f"edge attribution needs gradients at {missing[:3]}: these hooks did not run "
                "or are not on the model's autograd path"
            )
        # residual-stream gradients g, one per downstream end: each head of each layer, and the logits
        downstream: list[tuple[int, Tensor]] = [(n_layers * n_heads, kept[FINAL_RESID].grad)]
        for L in range(n_layers):
            z, z_grad = kept[z_hook_name(L)], kept[z_hook_name(L)].grad
            for h in range(n_heads):
                only_h = torch.zeros_like(z_grad)
                only_h[:, :, h] = z_grad[:, :, h]
                (g,) = torch.autograd.grad(z, kept[_resid_pre(L)], grad_outputs=only_h, retain_graph=True)
                downstream.append((L * n_heads + h, g))
                vjps += 1
        # input -> v: the embedding reaches every later residual stream unchanged (the identity path)
        for column, g in downstream:
            edges[input_row(n_layers, n_heads), column] = (
                (delta_input.to(g.device).float() * g.float()).sum().cpu()
            )
        for L_up in range(n_layers):
            z_up, mid = kept[z_hook_name(L_up)], kept[_resid_mid(L_up)]
            delta = delta_z[:, :, L_up].to(z_up.device, z_up.dtype)  # [prompts, pos, heads, d_head]
            for column, g in downstream:
                if column < n_layers * n_heads and column // n_heads <= L_up:
                    continue  # not downstream of this layer
                (direct,) = torch.autograd.grad(mid, z_up, grad_outputs=g, retain_graph=True)
                vjps += 1
                edges[L_up * n_heads : (L_up + 1) * n_heads, column] = (
                    (delta * direct).sum(dim=(0, 1, 3)).float().cpu()
                )
    return edges, vjps


def _edge_method(model, task: Task, name: str, steps: int | None, rules: bool = False) -> MethodScores:
    """steps=None: attribution patching on the clean run (RelP with `rules`); an int: EAP-IG with that many
    interpolations."""
    started, counter = time.perf_counter(), ForwardCounter()
    n_layers, n_heads = model_shape(model)
    z_clean = collect_z(model, task.clean_tokens, counter=counter)
    z_corrupt = collect_z(model, task.corrupted_tokens, counter=counter)
    delta_z = z_corrupt - z_clean
    resid = {
        "clean": embeddings(model, task.clean_tokens),
        "corrupt": embeddings(model, task.corrupted_tokens),
    }
    delta_input = resid["corrupt"] - resid["clean"]
    vjps = 0
    if steps is None:
        total, vjps = _edge_products(model, task, delta_z, delta_input, rules=rules)
        counter.forward_prompts += len(task)
        counter.backward_prompts += len(task)
    else:
        total = torch.zeros(n_layers * n_heads + 1, n_layers * n_heads + 1)
        for step in range(1, steps + 1):
            alpha = step / steps

            def interpolate(x: Tensor, hook, alpha=alpha) -> Tensor:
                return resid["corrupt"] + alpha * (resid["clean"] - resid["corrupt"])

            products, n = _edge_products(model, task, delta_z, delta_input, interpolate)
            total += products / steps
            vjps += n
            counter.forward_prompts += len(task)
            counter.backward_prompts += len(task)
    estimate = total / len(task)  # mean over prompts of the estimated metric change when the edge is patched
    valid = edge_index(n_layers, n_heads)
    return MethodScores(
        name,
        node_scores_from_edges(estimate, valid, n_layers, n_heads),
        time.perf_counter() - started,
        counter.forward_prompts,
        counter.backward_prompts,
        {"edge_estimates": estimate, "edge_valid": valid, "vector_jacobian_products": vjps},
    )


def node_scores_from_edges(estimate: Tensor, valid: Tensor, n_layers: int, n_heads: int) -> Tensor:
    """A head's score: the sum of |estimate| over every edge it is an end of (outgoing to later heads
    and logits, incoming from earlier heads and the input) -> [layers, heads]. Fixed in advance, not tuned."""
    n = n_layers * n_heads
    magnitude = estimate.abs() * valid
    outgoing = magnitude[:n].sum(1)
    incoming = magnitude[:, :n].sum(0)
    return (outgoing + incoming).view(n_layers, n_heads)


def attribution_patching_edges(model, task: Task) -> MethodScores:
    """Edge attribution patching: 2 forwards (z clean, z corrupt) + 1 forward and 1 backward per prompt,
    then one vector-Jacobian product per edge end (counted in details, not as passes of the model)."""
    return _edge_method(model, task, "attribution_patching_edges", None)


def relp_edges(model, task: Task) -> MethodScores:
    """Edge RelP: edge attribution patching with every vector-Jacobian product under RelP's rules."""
    return _edge_method(model, task, "relp_edges", None, rules=True)


def eap_ig_edges(model, task: Task, steps: int = 5) -> MethodScores:
    """EAP-IG at edge level: `steps` interpolations, each 1 forward + 1 backward per prompt."""
    return _edge_method(model, task, f"eap_ig_edges_{steps}", steps)


@torch.no_grad()
def edge_patching_effects(model, task: Task, edges: list[tuple[int, int]], scale: float = 1.0) -> Tensor:
    """Actual edge patching, for checking the estimates: for each (upstream head or input, downstream head
    or logits) pair (indices as in `edge_index`), the mean metric change when only that edge carries the
    corrupted value.

    The downstream head's input gets the corrupted-minus-clean change of u's direct contribution,
    (z_u(corrupt) - z_u(clean))·W_O[u], or for the input embeddings(corrupt) - embeddings(clean); every
    other head and the rest of the stream stay clean. For a
    head v this takes two forward passes (the modified input to read v's new z, then the clean run
    with only v's z replaced). Exact for models without a norm after the attention output (the toys).
    `scale` < 1 patches only that fraction of the way to the corrupted value: effect / scale then tends to
    the attribution estimate as scale -> 0 (a check of the gradients, not of the linear approximation).
    -> [len(edges)] effects (patched - clean), in the same sign convention as the estimates.
    """
    n_layers, n_heads = model_shape(model)
    tokens = task.clean_tokens.to(model.cfg.device)
    z_clean = collect_z(model, task.clean_tokens)
    z_corrupt = collect_z(model, task.corrupted_tokens)
    W_O = model.W_O.detach().float().cpu()  # [layers, heads, d_head, d_model]
    delta_input = embeddings(model, task.corrupted_tokens) - embeddings(model, task.clean_tokens)
    clean_metric = task_metric(task, model(tokens)[:, -1]).mean()
    valid = edge_index(n_layers, n_heads)
    effects = []
    for up, down in edges:
        if not (0 <= up < len(valid) and 0 <= down < len(valid) and valid[up, down]):
            raise ValueError(
                f"({up}, {down}) is not an edge: a downstream head must be in a later layer than "
                f"its upstream head (edge_index({n_layers}, {n_heads}) lists the edges)"
            )
        if up == input_row(n_layers, n_heads):
            delta = scale * delta_input
        else:
            L_up, h_up = divmod(up, n_heads)
            delta = scale * (z_corrupt[:, :, L_up, h_up] - z_clean[:, :, L_up, h_up]) @ W_O[L_up, h_up]
        delta = delta.to(model.cfg.device)

        def add_delta(resid: Tensor, hook, delta=delta) -> Tensor:
            return resid + delta.to(resid.dtype)

        if down == n_layers * n_heads:
            logits = model.run_with_hooks(tokens, fwd_hooks=[(FINAL_RESID, add_delta)])
        else:
            L_down, h_down = divmod(down, n_heads)
            captured: dict[str, Tensor] = {}

            def capture(z: Tensor, hook, captured=captured, h_down=h_down) -> None:
                captured["z"] = z[:, :, h_down].clone()

            model.run_with_hooks(
                tokens, fwd_hooks=[(_resid_pre(L_down), add_delta), (z_hook_name(L_down), capture)]
            )

            def replace(z: Tensor, hook, captured=captured, h_down=h_down) -> Tensor:
                z = z.clone()
                z[:, :, h_down] = captured["z"]
                return z

            logits = model.run_with_hooks(tokens, fwd_hooks=[(z_hook_name(L_down), replace)])
        effects.append(float(task_metric(task, logits[:, -1]).mean() - clean_metric))
    return torch.tensor(effects)
