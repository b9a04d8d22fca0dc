"""The activation rules with no fixed k per token, shared by inference (`sae.model`) and training
(`sae.objectives`):

    batch top-k   keep the k * B largest activations of a batch of B tokens (Bussmann et al. 2024)
    top-AFA       keep, per token, the fewest latents whose norm √Σ (f_i ‖d_i‖)² comes closest to
                  ‖x - b_dec‖ (Lee et al. 2025)
    JumpReLU      f = pre * H(pre - θ), with straight-through gradients for θ (Rajamanoharan et al. 2024)

Each selection works on a k-sparse candidate code (values, indices: [tokens, c]), so training can take
the candidates from the sparse encoder and never form [tokens, d_sae].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import SparseCode


def batch_topk_mask(values: Tensor, k: int) -> Tensor:
    """values [tokens, c] of candidate activations -> bool [tokens, c]: the k * tokens largest of them all
    (positive ones only), so that tokens share k active latents on average."""
    keep = min(k * values.shape[0], values.numel())
    flat = values.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep, sorted=False).indices] = True
    return mask.view_as(values) & (values.detach() > 0)


def afa_counts(scores: Tensor, target: Tensor) -> Tensor:
    """scores [tokens, c] sorted descending, target [tokens] -> k* [tokens] in 1..c: the prefix whose
    √(cumulative score) lies closest to the target (the first such prefix where two tie)."""
    return (scores.cumsum(-1).sqrt() - target[:, None]).abs().argmin(dim=-1) + 1


def top_afa(candidates: SparseCode, decoder_norms: Tensor, target: Tensor) -> SparseCode:
    """top-AFA on candidate activations [tokens, c] (ReLU-ed): sorted by score s = (f ‖d‖)², the first k*
    kept and the rest zeroed (k* from `afa_counts`); decoder_norms [d_sae], target [tokens] = ‖x - b_dec‖."""
    values, indices = candidates
    scores = (values * decoder_norms[indices]).pow(2)
    order = scores.detach().argsort(dim=-1, descending=True)
    values, indices, scores = values.gather(-1, order), indices.gather(-1, order), scores.gather(-1, order)
    kept = torch.arange(values.shape[-1], device=values.device) < afa_counts(scores.detach(), target)[:, None]
    return SparseCode(values * kept, indices)


class JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - θ) for pre-activations and thresholds of one shape ([nnz], an entry's latent's θ)
    or θ [d_sae] broadcast over pre [tokens, d_sae]. Backward: exact for pre; for θ the straight-through
    estimate -θ/ε K((pre - θ)/ε) with the rectangle kernel K = 1 on (-1/2, 1/2), so only entries within
    ε/2 of their threshold reach it (what lets training keep only those and the active ones)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = (-(threshold / ctx.bandwidth) * near * grad).sum_to_size(threshold.shape)
        return grad * (pre > threshold), grad_threshold, None


class Step(torch.autograd.Function):
    """H(pre - θ), shapes as `JumpReLU` (the L0 count). Backward reaches θ only: -1/ε K((pre - θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, (-near * grad / ctx.bandwidth).sum_to_size(threshold.shape), None
