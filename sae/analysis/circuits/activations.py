"""Per-head activations of a TransformerBridge, and forward passes with heads ablated.

We hook `blocks.L.attn.hook_z` ([batch, pos, heads, d_head]) and multiply by W_O ourselves rather than
use `hook_result`: the latter needs `set_use_attn_result(True)`, which transformer-lens 4.3 only offers
for some attention classes, while hook_z exists for every attention bridge. z·W_O[L, h] is exactly
hook_result (checked in tests/test_circuits.py); the attention output is its sum over heads plus b_O.

Ablating a head means replacing its z (so its whole output z·W_O) with zeros, a mean, or another
prompt's z ("resample"). `ForwardCounter` counts prompt-forwards so every method can report its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ForwardCounter:
    forward_prompts: int = 0  # prompts run forward (a batch of 8 counts 8)
    backward_prompts: int = 0  # prompts run backward


def z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def model_shape(model) -> tuple[int, int]:
    return model.cfg.n_layers, model.cfg.n_heads


@torch.no_grad()
def collect_z(model, tokens: Tensor, batch_size: int = 64, counter: ForwardCounter | None = None) -> Tensor:
    """tokens [prompts, pos] -> z: [prompts, pos, layers, heads, d_head] (float32, on the CPU)."""
    n_layers, _ = model_shape(model)
    chunks = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(model.cfg.device)
        stored: dict[int, Tensor] = {}

        def store(z: Tensor, hook, stored=stored) -> None:
            stored[hook.layer()] = z.detach().float().cpu()

        model.run_with_hooks(batch, fwd_hooks=[(z_hook_name(L), store) for L in range(n_layers)])
        chunks.append(torch.stack([stored[L] for L in range(n_layers)], dim=2))
        if counter is not None:
            counter.forward_prompts += len(batch)
    return torch.cat(chunks)


def head_results_from_z(model, z: Tensor) -> Tensor:
    """z [..., layers, heads, d_head] -> head results z·W_O: [..., layers, heads, d_model]."""
    W_O = model.W_O.detach().float().cpu()  # [layers, heads, d_head, d_model]
    return torch.einsum("...lhd,lhdm->...lhm", z, W_O)


def collect_head_results(
    model,
    tokens: Tensor,
    positions: str = "mean",
    batch_size: int = 64,
    counter: ForwardCounter | None = None,
) -> Tensor:
    """Per-head output vectors.

    positions="mean": [prompts, layers, heads, d_model], averaged over every position (O'Neill & Bui);
    positions="all":  [prompts, pos, layers, heads, d_model].
    """
    if positions not in ("mean", "all"):
        raise ValueError(f"positions must be 'mean' or 'all', got {positions!r}")
    z = collect_z(model, tokens, batch_size, counter)
    if positions == "mean":
        z = z.mean(dim=1)  # the mean commutes with the linear W_O, so average the smaller z first
    return head_results_from_z(model, z)


# --- ablation ---------------------------------------------------------------------------------------

ABLATIONS = ("zero", "mean", "resample")


def ablation_values(z_reference: Tensor, ablation: str, n_prompts: int) -> Tensor | None:
    """What an ablated head's z becomes, for each prompt: [prompts, pos, layers, heads, d_head] (None: zero).

    z_reference: z of the corrupted prompts [prompts, pos, layers, heads, d_head]. "mean" uses its mean
    over prompts at each position; "resample" uses corrupted prompt i for clean prompt i (ACDC's choice).
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; known: {', '.join(ABLATIONS)}")
    if ablation == "zero":
        return None
    if ablation == "mean":
        return z_reference.mean(0, keepdim=True).expand(n_prompts, *z_reference.shape[1:])
    if len(z_reference) != n_prompts:
        raise ValueError(
            f"resample ablation needs one corrupted prompt per clean prompt: "
            f"{len(z_reference)} vs {n_prompts}"
        )
    return z_reference


@torch.no_grad()
def last_logits_with_ablation(
    model,
    tokens: Tensor,
    ablated: Tensor,
    replacement: Tensor | None,
    batch_size: int = 64,
    counter: ForwardCounter | None = None,
) -> Tensor:
    """Logits at the last position [prompts, vocab] with the heads in `ablated` ([layers, heads] bool)
    replaced by `replacement` ([prompts, pos, layers, heads, d_head], or None for zeros)."""
    layers = ablated.any(dim=1).nonzero().flatten().tolist()
    outputs = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(model.cfg.device)

        def patch(z: Tensor, hook, start=start) -> Tensor:
            L = hook.layer()
            heads = ablated[L].to(z.device)
            if replacement is None:
                new = torch.zeros_like(z)
            else:
                new = replacement[start : start + len(z), :, L].to(z.device, z.dtype)
            return torch.where(heads[None, None, :, None], new, z)

        logits = model.run_with_hooks(batch, fwd_hooks=[(z_hook_name(L), patch) for L in layers])
        outputs.append(logits[:, -1].float().cpu())
        if counter is not None:
            counter.forward_prompts += len(batch)
    return torch.cat(outputs)
