"""Patching baselines and ground truth: exhaustive node (head) patching, attribution patching, EAP-IG,
and the faithfulness of a circuit. Every function returns scores [layers, heads] plus its cost.

Sign convention: an *effect* is mean metric(clean) - mean metric(clean with the head ablated), so a head
the task needs has a positive effect; importance scores are |effect| (negative heads are part of the
circuit too: ACDC's IOI list includes negative name movers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .activations import (
    ForwardCounter,
    ablation_values,
    collect_z,
    last_logits_with_ablation,
    model_shape,
    z_hook_name,
)
from .lrp import quiet_norm_edits, relp_hooks
from .tasks import Task, task_metric


@dataclass
class MethodScores:
    """What every scoring method returns: head scores and what they cost."""

    method: str
    scores: Tensor  # [layers, heads], higher = more likely in the circuit
    seconds: float
    forward_prompts: int
    backward_prompts: int
    details: dict = field(default_factory=dict)


def metric_of(
    model, task: Task, tokens: Tensor, ablated: Tensor, replacement: Tensor | None, counter: ForwardCounter
) -> Tensor:
    """Mean task metric on `tokens` with heads `ablated` [layers, heads] replaced."""
    logits = last_logits_with_ablation(model, tokens, ablated, replacement, counter=counter)
    return task_metric(task, logits).mean()


def exhaustive_head_patching(model, task: Task, ablation: str = "resample") -> MethodScores:
    """Ablate each head alone on the clean prompts: 1 + layers·heads forward passes of the task."""
    started, counter = time.perf_counter(), ForwardCounter()
    n_layers, n_heads = model_shape(model)
    replacement = ablation_values(
        collect_z(model, task.corrupted_tokens, counter=counter), ablation, len(task)
    )
    none = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    clean = metric_of(model, task, task.clean_tokens, none, None, counter)
    effects = torch.zeros(n_layers, n_heads)
    for L in range(n_layers):
        for h in range(n_heads):
            one = none.clone()
            one[L, h] = True
            effects[L, h] = clean - metric_of(model, task, task.clean_tokens, one, replacement, counter)
    return MethodScores(
        f"patching_{ablation}",
        effects.abs(),
        time.perf_counter() - started,
        counter.forward_prompts,
        0,
        {"effects": effects, "clean_metric": float(clean)},
    )


def ground_truth_from_effects(
    effects: Tensor, clean_metric: float, corrupted_metric: float, fraction: float = 0.1
) -> Tensor:
    """Heads whose |effect| is at least `fraction` of the clean-corrupted metric gap: [layers, heads] bool.

    The fraction is fixed before looking at any method's scores (default 10%).
    """
    gap = abs(clean_metric - corrupted_metric)
    if gap == 0:
        raise ValueError("clean and corrupted prompts give the same metric: no circuit to find")
    return effects.abs() >= fraction * gap


@dataclass
class AblationReference:
    """What every faithfulness measurement of one task shares, computed once: the ablation values, the
    metric of the full model and of the empty circuit, and the full model's last-position log-probs."""

    ablation: str
    replacement: Tensor | None  # [prompts, pos, layers, heads, d_head], None for zero ablation
    metric_model: float
    metric_empty: float
    logprobs_model: Tensor  # [prompts, vocab]
    kl_empty: float  # KL(full model || every head ablated), mean over prompts
    forward_prompts: int


def _kl(logprobs_p: Tensor, logprobs_q: Tensor) -> float:
    """Mean over prompts of KL(p || q) at the last position, from log-probs [prompts, vocab]."""
    return float((logprobs_p.exp() * (logprobs_p - logprobs_q)).sum(-1).mean())


def ablation_reference(model, task: Task, ablation: str = "resample") -> AblationReference:
    counter = ForwardCounter()
    replacement = ablation_values(
        collect_z(model, task.corrupted_tokens, counter=counter), ablation, len(task)
    )
    n_layers, n_heads = model_shape(model)
    nothing = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    full = last_logits_with_ablation(model, task.clean_tokens, nothing, None, counter=counter)
    empty = last_logits_with_ablation(model, task.clean_tokens, ~nothing, replacement, counter=counter)
    full_logprobs = full.log_softmax(-1)
    return AblationReference(
        ablation,
        replacement,
        float(task_metric(task, full).mean()),
        float(task_metric(task, empty).mean()),
        full_logprobs,
        _kl(full_logprobs, empty.log_softmax(-1)),
        counter.forward_prompts,
    )


def circuit_faithfulness(
    model, task: Task, circuit: Tensor, ablation: str = "resample", reference: AblationReference | None = None
) -> dict[str, float]:
    """How well the heads in `circuit` [layers, heads] alone do the task, every other head ablated:

    faithfulness      (m(C) - m(∅)) / (m(M) - m(∅)) of the task metric m (1: as good as the full model M)
    completeness_gap  the same for the complement M∖C (near 0 when the circuit holds everything)
    kl_circuit        KL(M || C) of the next-token distributions at the last position (0: identical);
                      kl_empty is KL(M || ∅) for scale, and kl_faithfulness = 1 - kl_circuit / kl_empty
    `reference` (from `ablation_reference`) shares the full-model and empty-circuit runs between circuits.
    """
    if reference is None:
        reference = ablation_reference(model, task, ablation)
    elif reference.ablation != ablation:
        raise ValueError(f"reference was made with {reference.ablation!r} ablation, asked for {ablation!r}")
    counter = ForwardCounter()
    circuit = circuit.bool()
    logits_circuit = last_logits_with_ablation(
        model, task.clean_tokens, ~circuit, reference.replacement, counter=counter
    )
    logits_complement = last_logits_with_ablation(
        model, task.clean_tokens, circuit, reference.replacement, counter=counter
    )
    full, empty = reference.metric_model, reference.metric_empty
    in_circuit = float(task_metric(task, logits_circuit).mean())
    complement = float(task_metric(task, logits_complement).mean())
    kl_circuit = _kl(reference.logprobs_model, logits_circuit.log_softmax(-1))
    return {
        "metric_model": full,
        "metric_empty": empty,
        "metric_circuit": in_circuit,
        "faithfulness": (in_circuit - empty) / (full - empty),
        "completeness_gap": (complement - empty) / (full - empty),
        "kl_circuit": kl_circuit,
        "kl_empty": reference.kl_empty,
        "kl_faithfulness": 1 - kl_circuit / reference.kl_empty if reference.kl_empty > 0 else None,
        "forward_prompts": counter.forward_prompts + reference.forward_prompts,
    }


# --- gradient-based baselines -----------------------------------------------------------------------


def _metric_and_z_grads(
    model, task: Task, resid_pre_override=None, rules: bool = False
) -> tuple[Tensor, list[Tensor]]:
    """Sum of the task metric on the clean prompts and d(metric)/dz per layer: [prompts, pos, heads,
    d_head]; with `rules`, the gradient under RelP's propagation rules (`lrp.py`)."""
    n_layers, _ = model_shape(model)
    zs: dict[int, Tensor] = {}

    def keep(z: Tensor, hook) -> Tensor:
        z.retain_grad()
        zs[hook.layer()] = z
        return z

    hooks = [(z_hook_name(L), keep) for L in range(n_layers)]
    if resid_pre_override is not None:
        hooks.append(("blocks.0.hook_resid_pre", resid_pre_override))
    if rules:
        hooks += relp_hooks(model)
    with torch.enable_grad(), quiet_norm_edits():
        logits = model.run_with_hooks(task.clean_tokens.to(model.cfg.device), fwd_hooks=hooks)
        metric = task_metric(task, logits[:, -1]).sum()
        metric.backward()
    return metric.detach(), [zs[L].grad.detach().float().cpu() for L in range(n_layers)]


def attribution_patching(model, task: Task, rules: bool = False) -> MethodScores:
    """Node attribution patching (Syed et al.): |sum over positions of (z_corrupt - z_clean)·dm/dz|,
    averaged over prompts. 2 forwards + 1 backward per prompt. With `rules`: RelP (Rezaei Jafari et al.
    2025), the gradient taken under LRP's rules, at the same cost."""
    started, counter = time.perf_counter(), ForwardCounter()
    z_clean = collect_z(model, task.clean_tokens, counter=counter)  # [prompts, pos, layers, heads, d_head]
    z_corrupt = collect_z(model, task.corrupted_tokens, counter=counter)
    _, grads = _metric_and_z_grads(model, task, rules=rules)
    counter.backward_prompts += len(task)
    grad = torch.stack(grads, dim=2)  # [prompts, pos, layers, heads, d_head]
    estimate = ((z_corrupt - z_clean) * grad).sum(dim=(1, 4)).mean(0)  # [layers, heads]: metric change
    return MethodScores(
        "relp" if rules else "attribution_patching",
        estimate.abs(),
        time.perf_counter() - started,
        counter.forward_prompts + len(task),
        counter.backward_prompts,
        {"estimated_effects": -estimate},
    )


def eap_ig_nodes(model, task: Task, steps: int = 5) -> MethodScores:
    """EAP-IG at head level (Hanna et al. 2024): the gradient averaged over `steps` interpolations of the
    block-0 input between corrupted and clean, times (z_corrupt - z_clean)."""
    started, counter = time.perf_counter(), ForwardCounter()
    z_clean = collect_z(model, task.clean_tokens, counter=counter)
    z_corrupt = collect_z(model, task.corrupted_tokens, counter=counter)
    resid: dict[str, Tensor] = {}
    for name, tokens in (("clean", task.clean_tokens), ("corrupt", task.corrupted_tokens)):
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter="blocks.0.hook_resid_pre")
        resid[name] = cache["blocks.0.hook_resid_pre"].detach()
    total = None
    for step in range(1, steps + 1):
        alpha = step / steps

        def interpolate(x: Tensor, hook, alpha=alpha) -> Tensor:
            return resid["corrupt"] + alpha * (resid["clean"] - resid["corrupt"])

        _, grads = _metric_and_z_grads(model, task, interpolate)
        grad = torch.stack(grads, dim=2)
        total = grad if total is None else total + grad
        counter.forward_prompts += len(task)
        counter.backward_prompts += len(task)
    estimate = ((z_corrupt - z_clean) * total / steps).sum(dim=(1, 4)).mean(0)
    return MethodScores(
        f"eap_ig_{steps}",
        estimate.abs(),
        time.perf_counter() - started,
        counter.forward_prompts + 2 * len(task),
        counter.backward_prompts,
        {"estimated_effects": -estimate},
    )
