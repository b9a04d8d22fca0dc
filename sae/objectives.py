"""What each architecture minimises, and how it starts from the data.

An `Objective` maps (SAE, batch of scaled inputs) to a loss, its logged terms and per-latent firing
counts; the trainer owns everything else (optimiser, schedule, bookkeeping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig
from .device import DTYPES
from .kernels import SparseCode, dense_decode, dense_topk_encode, sparse_decode, topk_encode
from .model import SparseAutoencoder

StepTerms = dict[str, Tensor]  # scalar loss terms of one step, for logging


class Objective:
    """Forward pass and loss of one architecture on a batch x: [batch, d_in] (scaled inputs)."""

    def __init__(self, train_cfg: TrainConfig):
        self.cfg = train_cfg
        self.compute_dtype = DTYPES[train_cfg.compute_dtype]
        sparse = train_cfg.sparse_kernels
        self.encode = topk_encode if sparse else dense_topk_encode
        self.decode = sparse_decode if sparse else dense_decode

    def __call__(
        self, sae: SparseAutoencoder, x: Tensor, progress: float, dead: Tensor
    ) -> tuple[Tensor, StepTerms, Tensor]:
        """-> (loss, terms, fires: [d_sae] how often each latent fired in this batch).

        `progress` is the fraction of training done; `dead` [n_dead] the latents AuxK may revive."""
        return getattr(self, sae.cfg.architecture)(sae, x, progress, dead)

    def topk(self, sae: SparseAutoencoder, x: Tensor, progress: float, dead: Tensor):
        cfg = sae.cfg
        k_aux = self.cfg.k_aux or cfg.d_in // 2
        k_encode = 4 * cfg.k if self.cfg.multi_topk else cfg.k
        code, aux = self.encode(
            x,
            sae.W_enc,
            sae.b_enc,
            k_encode,
            pre_bias=sae.b_dec,
            relu=True,
            compute_dtype=self.compute_dtype,
            aux_latents=dead,
            k_aux=k_aux,
        )
        wide = code
        if self.cfg.multi_topk:  # the k largest of the 4k, gradients flowing back through the 4k code
            values, pos = wide.values.topk(cfg.k, dim=-1, sorted=False)
            code = SparseCode(values, wide.indices.gather(-1, pos))
        variance = (x - x.mean(0)).pow(2).sum()
        x_hat = self.decode(code.values, code.indices, sae.W_dec) + sae.b_dec
        residual = x - x_hat
        fvu = residual.pow(2).sum() / variance
        terms, loss = {"fvu": fvu}, fvu
        if self.cfg.multi_topk:
            # Multi-TopK (Gao et al.): L(k) + L(4k)/8, so that the SAE also works at larger k.
            wide_hat = self.decode(wide.values, wide.indices, sae.W_dec) + sae.b_dec
            terms["multi_topk_fvu"] = (x - wide_hat).pow(2).sum() / variance
            loss = loss + terms["multi_topk_fvu"] / 8
        if aux is not None:
            # AuxK (Gao et al.): dead latents learn to explain what the live ones miss. The residual
            # already contains b_dec, so the auxiliary reconstruction must not add it again.
            target = residual.detach()
            aux_hat = self.decode(aux.values, aux.indices, sae.W_dec)
            terms["auxk"] = (aux_hat - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
            loss = loss + self.cfg.auxk_coefficient * terms["auxk"]
        return loss, terms, self._fires(code, cfg.d_sae)

    def codebook(self, sae: SparseAutoencoder, x: Tensor, progress: float, dead: Tensor):
        cfg = sae.cfg
        x_c, keys = x - sae.b_dec, sae.W_enc
        if cfg.similarity == "cosine":
            x_c, keys = F.normalize(x_c, dim=-1), F.normalize(keys, dim=-1)
        code, _ = self.encode(x_c, keys, sae.b_enc, cfg.k, relu=False, compute_dtype=self.compute_dtype)
        # Binary activations forward; straight-through backward, so the keys learn which code to pick.
        ones = 1 + code.values - code.values.detach()
        x_hat = self.decode(ones, code.indices, sae.W_dec) + sae.b_dec
        fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        fires = torch.bincount(code.indices.flatten(), minlength=cfg.d_sae)
        return fvu, {"fvu": fvu}, fires

    def relu(self, sae: SparseAutoencoder, x: Tensor, progress: float, dead: Tensor):
        cd = self.compute_dtype
        f = (
            F.linear((x - sae.b_dec).to(cd), sae.W_enc.to(cd), sae.b_enc.to(cd)).float().relu()
        )  # [batch, d_sae]
        # The decoder stays in float32 (bf16 here cut feature recovery on synthetic data from 0.96 to 0.62).
        x_hat = f @ sae.W_dec + sae.b_dec
        residual = x - x_hat
        mse = residual.pow(2).sum(-1).mean()
        # Anthropic's April 2024 penalty: activations weighted by decoder norms, so that shrinking
        # the decoder cannot buy sparsity; its coefficient warms up linearly.
        l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        l1_coefficient = self.cfg.l1_coefficient * min(
            1.0, progress / max(self.cfg.l1_warmup_fraction, 1e-12)
        )
        fvu = residual.pow(2).sum().detach() / (x - x.mean(0)).pow(2).sum()
        return mse + l1_coefficient * l1, {"fvu": fvu, "mse": mse, "l1": l1}, (f > 0).sum(0)

    @staticmethod
    def _fires(code: SparseCode, d_sae: int) -> Tensor:
        return torch.bincount(
            code.indices.flatten(), weights=(code.values > 0).flatten().float(), minlength=d_sae
        )


# --- initialisation from data ---------------------------------------------------------------------


def kmeans(x: Tensor, n: int, iters: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means on x: [rows, d] -> centroids [n, d], started from random rows.

    An empty cluster keeps its previous centroid. Distances run in x's dtype on x's device.
    """
    centroids = x[torch.randint(len(x), (n,), generator=generator).to(x.device)].clone()
    for _ in range(iters):
        # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2)
        nearest = (x @ centroids.T - centroids.pow(2).sum(-1) / 2).argmax(dim=-1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        counts = torch.bincount(nearest, minlength=n)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


@torch.no_grad()
def init_from_data(
    sae: SparseAutoencoder, x: Tensor, train_cfg: TrainConfig, generator: torch.Generator
) -> None:
    """b_dec = mean of the (scaled) data; a codebook SAE also gets its codes from the data."""
    cfg = sae.cfg
    sae.b_dec.copy_(x.mean(0))
    if cfg.architecture != "codebook":
        return
    centered = x - sae.b_dec
    if train_cfg.codebook_init == "kmeans":
        centroids = kmeans(centered, cfg.d_sae, iters=10, generator=generator)
    else:
        centroids = centered[torch.randint(len(x), (cfg.d_sae,), generator=generator).to(x.device)]
    # Each input is rebuilt from k codes, so each code starts as 1/k of a typical input.
    sae.W_dec.copy_(centroids / cfg.k)
    sae.W_enc.copy_(centroids)
    if cfg.similarity == "inner":
        sae.b_enc.copy_(-centroids.pow(2).sum(-1) / 2)  # inner-product ranking = nearest centroid
    else:
        sae.b_enc.zero_()


@torch.no_grad()
def fold_input_scale(model: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of `model`, trained on x * scale, that works on raw x with activations in raw units.

    pre(scale * x) = scale * pre'(x) with b_enc' = b_enc / scale and b_dec' = b_dec / scale, so the
    activations of raw x are f / scale and decoder directions are unchanged. A codebook SAE's
    activations are binary, so its decoder vectors take the factor instead; with cosine similarity
    the similarities do not scale at all, so its b_enc must not either.
    """
    cfg = model.cfg
    folded = SparseAutoencoder.from_tensors(cfg, {n: p.detach().clone() for n, p in model.named_parameters()})
    folded.b_dec.div_(scale)
    if not (cfg.architecture == "codebook" and cfg.similarity == "cosine"):
        folded.b_enc.div_(scale)
    if cfg.architecture == "codebook":
        folded.W_dec.div_(scale)
    return folded.to(model.W_enc.device)
