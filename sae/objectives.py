"""What each architecture minimises, and how it starts from the data.

An `Objective` maps (SAE, batch of scaled inputs and targets, training state) to a loss, its logged terms
and per-latent firing counts; the targets are the inputs themselves for an SAE, the output site for a
transcoder; the trainer owns everything else (optimiser, schedule, bookkeeping).
`state` holds what an objective carries from step to step besides the SAE's weights (JumpReLU's
penalty coefficient); the trainer checkpoints it with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import JumpReLU, Step, batch_topk_mask, top_afa
from .config import TrainConfig
from .device import DTYPES
from .kernels import (
    RaggedCode,
    SparseCode,
    dense_decode,
    dense_encode_above,
    dense_ragged_decode,
    dense_topk_encode,
    encode_above,
    ragged_decode,
    sparse_decode,
    topk_encode,
)
from .model import SparseAutoencoder

StepTerms = dict[str, Tensor]  # scalar loss terms of one step, for logging
CANDIDATES_PER_K = 4  # batch top-k chooses among each token's 4k largest activations (see `batchtopk`)


class Objective:
    """Forward pass and loss of one architecture on inputs x: [batch, d_in] and targets y: [batch, d_out]
    (both scaled; y is x for an SAE)."""

    def __init__(self, train_cfg: TrainConfig):
        self.cfg = train_cfg
        self.compute_dtype = DTYPES[train_cfg.compute_dtype]
        sparse = train_cfg.sparse_kernels
        self.encode = topk_encode if sparse else dense_topk_encode
        self.decode = sparse_decode if sparse else dense_decode
        self.encode_above = encode_above if sparse else dense_encode_above
        self.decode_ragged = ragged_decode if sparse else dense_ragged_decode

    def __call__(
        self,
        sae: SparseAutoencoder,
        x: Tensor,
        y: Tensor,
        progress: float,
        dead: Tensor,
        state: dict[str, Tensor],
    ) -> tuple[Tensor, StepTerms, Tensor]:
        """-> (loss, terms, fires: [d_sae] how often each latent fired in this batch).

        `progress` is the fraction of training done; `dead` [n_dead] the latents AuxK may revive."""
        return getattr(self, sae.cfg.architecture)(sae, x, y, progress, dead, state)

    @staticmethod
    def _encoder_input(sae: SparseAutoencoder, x: Tensor) -> Tensor:
        """[batch, d_in]: x less b_dec for an SAE, x itself for a transcoder (its b_dec is at the output)."""
        return x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x

    @staticmethod
    def _output_base(sae: SparseAutoencoder, x: Tensor) -> Tensor:
        """What the output holds besides the latents' sum: b_dec [d_out], plus a skip transcoder's linear
        path x @ W_skip^T [batch, d_out]."""
        return sae.b_dec + x @ sae.W_skip.T if sae.cfg.skip_connection else sae.b_dec

    # --- k-sparse codes: topk, batchtopk, matryoshka, topafa ---------------------------------------

    def _candidates(
        self, sae: SparseAutoencoder, x: Tensor, k: int, dead: Tensor
    ) -> tuple[SparseCode, SparseCode | None]:
        """The k largest ReLU-ed pre-activations per token [batch, k], and AuxK's over the dead latents."""
        return self.encode(
            x,
            sae.W_enc,
            sae.b_enc,
            min(k, sae.cfg.d_sae),
            pre_bias=sae.b_dec if sae.cfg.apply_b_dec_to_input else None,
            relu=True,
            compute_dtype=self.compute_dtype,
            aux_latents=dead,
            k_aux=self.cfg.k_aux or sae.cfg.d_in // 2,
        )

    def _reconstruction(
        self, sae: SparseAutoencoder, y: Tensor, y_hat: Tensor, aux: SparseCode | None
    ) -> tuple[Tensor, StepTerms, Tensor]:
        """FVU of the target y [batch, d_out] by the output y_hat, plus AuxK's term -> (loss, terms,
        variance: the FVU's denominator Σ ‖y - mean(y)‖², for the terms an architecture adds)."""
        variance = (y - y.mean(0)).pow(2).sum()
        residual = y - y_hat
        fvu = residual.pow(2).sum() / variance
        terms, loss = {"fvu": fvu}, fvu
        if aux is not None:
            # AuxK (Gao et al.): dead latents learn to explain what the live ones miss. The residual
            # already contains b_dec (and the skip path), so the auxiliary reconstruction must not add it.
            target = residual.detach()
            aux_hat = self.decode(aux.values, aux.indices, sae.W_dec)
            terms["auxk"] = (aux_hat - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
            loss = loss + self.cfg.auxk_coefficient * terms["auxk"]
        return loss, terms, variance

    def topk(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        k, base = sae.cfg.k, self._output_base(sae, x)
        wide, aux = self._candidates(sae, x, 4 * k if self.cfg.multi_topk else k, dead)
        code = wide
        if self.cfg.multi_topk:  # the k largest of the 4k, gradients flowing back through the 4k code
            values, pos = wide.values.topk(k, dim=-1, sorted=False)
            code = SparseCode(values, wide.indices.gather(-1, pos))
        y_hat = self.decode(code.values, code.indices, sae.W_dec) + base
        loss, terms, variance = self._reconstruction(sae, y, y_hat, aux)
        if self.cfg.multi_topk:
            # Multi-TopK (Gao et al.): L(k) + L(4k)/8, so that the SAE also works at larger k.
            wide_hat = self.decode(wide.values, wide.indices, sae.W_dec) + base
            terms["multi_topk_fvu"] = (y - wide_hat).pow(2).sum() / variance
            loss = loss + terms["multi_topk_fvu"] / 8
        return loss, terms, self._fires(code, sae.cfg.d_sae)

    def _batch_topk(self, sae: SparseAutoencoder, x: Tensor, dead: Tensor):
        """The k * batch largest activations of the batch, among each token's 4k largest, as a ragged
        code: exact unless a token would keep all 4k (logged as `capped_fraction`). Moves the inference
        threshold towards the smallest activation kept."""
        k = sae.cfg.k
        candidates, aux = self._candidates(sae, x, CANDIDATES_PER_K * k, dead)
        kept = batch_topk_mask(candidates.values, k)
        code = RaggedCode.from_mask(candidates, kept)
        with torch.no_grad():
            smallest = code.values.min()
            decay = self.cfg.threshold_decay
            unset = sae.threshold < 0  # never learnt yet: start from this batch's value
            sae.threshold.copy_(torch.where(unset, smallest, decay * sae.threshold + (1 - decay) * smallest))
        capped = kept.all(dim=-1).float().mean() if kept.shape[-1] < sae.cfg.d_sae else torch.zeros(())
        return code, aux, {"capped_fraction": capped, "threshold": sae.threshold[0].clone()}

    def batchtopk(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        code, aux, extra = self._batch_topk(sae, x, dead)
        y_hat = self.decode_ragged(code, sae.W_dec) + self._output_base(sae, x)
        loss, terms, _ = self._reconstruction(sae, y, y_hat, aux)
        return loss, terms | extra, self._ragged_fires(code, sae.cfg.d_sae)

    def matryoshka(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        """Mean over the nested prefixes m_j of the FVU of f[:m_j] W_dec[:m_j] + b_dec (Bussmann et al.
        2025); the last prefix is the whole dictionary, whose FVU is logged as `fvu`. Each band of latents
        [m_{j-1}, m_j) is decoded once and the prefixes' outputs are running sums of the bands, so the
        decoder costs what one decode of the code costs, not one per prefix."""
        code, aux, extra = self._batch_topk(sae, x, dead)
        token_ids = code.token_ids()
        band_of_entry = torch.bucketize(
            code.indices, torch.tensor(sae.cfg.prefixes, device=x.device), right=True
        )
        prefix_hats, y_hat = [], self._output_base(sae, x)
        for band in range(len(sae.cfg.prefixes)):
            in_band = band_of_entry == band
            offsets = torch.zeros_like(code.offsets)
            offsets[1:] = torch.bincount(token_ids[in_band], minlength=code.tokens).cumsum(0)
            band_code = RaggedCode(code.values[in_band], code.indices[in_band], offsets)
            y_hat = y_hat + self.decode_ragged(band_code, sae.W_dec)
            prefix_hats.append(y_hat)
        loss, terms, variance = self._reconstruction(sae, y, y_hat, aux)
        prefix_fvus = [(y - hat).pow(2).sum() / variance for hat in prefix_hats[:-1]]
        prefix_loss = torch.stack([*prefix_fvus, terms["fvu"]]).mean()
        terms["prefix_fvu"] = prefix_loss
        loss = loss - terms["fvu"] + prefix_loss
        return loss, terms | extra, self._ragged_fires(code, sae.cfg.d_sae)

    def topafa(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        """Lee et al. 2025: f = ReLU((x - b_dec) W_enc), no encoder bias; each token keeps the fewest
        latents whose norm comes closest to ‖x - b_dec‖ (`activations.top_afa`), among its k largest
        when the SAE has a cap k. Loss: FVU + AuxK + c · d_in · mean((‖f‖ - ‖x - b_dec‖)²) / Var(x),
        their mean squared error plus c · mean((‖f‖ - ‖x - b_dec‖)²) rescaled as our FVU is. No
        transcoders (y is x). Their code matches ‖f‖ to ‖x‖ on inputs normalised per token; on a residual
        stream with a large mean (Gemma 3's) that target drove L0 to 1 and FVU to 6, so ‖f‖ is matched to
        the same centred norm the selection uses."""
        cfg = sae.cfg  # b_enc stays zero: the trainer never trains it (trainer.LEARNT_BY_RULE)
        candidates, aux = self._candidates(sae, x, cfg.k or cfg.d_sae, dead)
        target = (x - sae.b_dec).norm(dim=-1).detach()  # [tokens]
        code = top_afa(candidates, sae.W_dec.norm(dim=-1), target)
        y_hat = self.decode(code.values, code.indices, sae.W_dec) + self._output_base(sae, x)
        loss, terms, variance = self._reconstruction(sae, y, y_hat, aux)
        norm_gap = (code.values.norm(dim=-1) - target).pow(2).mean()
        terms["afa"] = norm_gap * cfg.d_in * len(x) / variance
        loss = loss + self.cfg.afa_coefficient * terms["afa"]
        if cfg.k is not None:
            terms["capped_fraction"] = (code.values[:, -1] > 0).float().mean()
        return loss, terms, self._fires(code, cfg.d_sae)

    # --- dense codes: relu, jumprelu, and codebook's binary ones -----------------------------------

    def jumprelu(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        """‖y - ŷ‖² + λ S, S = Σ_i H(pre_i - θ_i) (L0) or Σ_i tanh(c f_i ‖d_i‖) per token, θ learnt through
        straight-through gradients (Rajamanoharan et al. 2024); with the SAE's k set instead
        ‖y - ŷ‖² + μ (S - k)² / k, which raises L0 when below k as well as lowering it above
        (dictionary_learning's λ (S/k - 1)², scaled by k so that at S = 1.5 k it pulls as hard as λ S
        with λ = μ). L0 settles where that pull meets the reconstruction's, a little off k
        (studies/jumprelu_l0).

        Only the entries with pre > θ - ε/2 carry any gradient (the active ones to the weights, those
        within ε/2 of θ to θ), so the code keeps only them (`encode_above`): the decoder and every
        gradient after the encoder matmul cost O(nnz), not O(tokens * d_sae)."""
        cfg, bandwidth = self.cfg, self.cfg.jumprelu_bandwidth
        code = self.encode_above(
            x,
            sae.W_enc,
            sae.b_enc,
            sae.threshold - bandwidth / 2,
            pre_bias=sae.b_dec if sae.cfg.apply_b_dec_to_input else None,
            compute_dtype=self.compute_dtype,
        )
        threshold = sae.threshold[code.indices]  # [nnz]
        active = RaggedCode(JumpReLU.apply(code.values, threshold, bandwidth), code.indices, code.offsets)
        residual = y - (self.decode_ragged(active, sae.W_dec) + self._output_base(sae, x))
        mse = residual.pow(2).sum(-1).mean()
        l0 = Step.apply(code.values, threshold, bandwidth).sum() / len(x)
        if cfg.jumprelu_penalty == "l0":
            sparsity = l0
        else:
            scaled = cfg.tanh_scale * active.values * sae.W_dec.norm(dim=1)[code.indices]
            sparsity = torch.tanh(scaled).sum() / len(x)
        if sae.cfg.k is None:
            loss = mse + cfg.l0_coefficient * sparsity
        else:  # two-sided: below k its gradient raises L0, which λ S alone cannot
            loss = mse + cfg.l0_target_coefficient * (sparsity - sae.cfg.k).pow(2) / sae.cfg.k
        fvu = residual.pow(2).sum().detach() / (y - y.mean(0)).pow(2).sum()
        terms = {"fvu": fvu, "mse": mse, "sparsity": sparsity}
        return loss, terms, self._ragged_fires(active, sae.cfg.d_sae)

    def codebook(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        cfg = sae.cfg  # no transcoders (the trainer refuses them): its codes start from input clusters
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

    def relu(self, sae: SparseAutoencoder, x: Tensor, y: Tensor, progress: float, dead: Tensor, state):
        cd = self.compute_dtype
        f = (
            F.linear(self._encoder_input(sae, x).to(cd), sae.W_enc.to(cd), sae.b_enc.to(cd)).float().relu()
        )  # [batch, d_sae]
        # The decoder stays in float32 (bf16 here cut feature recovery on synthetic data from 0.96 to 0.62).
        residual = y - (f @ sae.W_dec + self._output_base(sae, x))
        mse = residual.pow(2).sum(-1).mean()
        # Anthropic's April 2024 penalty: activations weighted by decoder norms, so that shrinking
        # the decoder cannot buy sparsity; its coefficient warms up linearly.
        l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        l1_coefficient = self.cfg.l1_coefficient * min(
            1.0, progress / max(self.cfg.l1_warmup_fraction, 1e-12)
        )
        fvu = residual.pow(2).sum().detach() / (y - y.mean(0)).pow(2).sum()
        return mse + l1_coefficient * l1, {"fvu": fvu, "mse": mse, "l1": l1}, (f > 0).sum(0)

    @staticmethod
    def _fires(code: SparseCode, d_sae: int) -> Tensor:
        return torch.bincount(
            code.indices.flatten(), weights=(code.values > 0).flatten().float(), minlength=d_sae
        )

    @staticmethod
    def _ragged_fires(code: RaggedCode, d_sae: int) -> Tensor:
        return torch.bincount(code.indices, weights=(code.values > 0).float(), minlength=d_sae)


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
    sae: SparseAutoencoder, x: Tensor, y: Tensor, train_cfg: TrainConfig, generator: torch.Generator
) -> None:
    """b_dec = mean of the (scaled) targets y (the inputs x for an SAE); a transcoder, which does not
    subtract b_dec from its input, centres its pre-activations instead (b_enc = -W_enc mean(x)); a codebook
    SAE also gets its codes from the data, a JumpReLU SAE its thresholds, and BatchTopK / Matryoshka mark
    theirs as not yet learnt."""
    cfg = sae.cfg
    sae.b_dec.copy_(y.mean(0))
    if cfg.transcoder and not cfg.apply_b_dec_to_input:
        sae.b_enc.copy_(-sae.W_enc @ x.mean(0))
    if cfg.architecture in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(-1.0)
    if cfg.architecture == "jumprelu":
        sae.threshold.copy_(jumprelu_thresholds(sae, x))
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


def jumprelu_thresholds(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """[d_sae] starting thresholds: with a target L0 k, each latent's (1 - k/d_sae) quantile on x, so the
    run starts near its target instead of waiting for the penalty to lower L0 from ~d_sae/2 (the slow
    fall SAELens users report); without k, Rajamanoharan et al.'s 0.001."""
    start = 1e-3
    if sae.cfg.k is None:
        return torch.full((sae.cfg.d_sae,), start, device=x.device)
    pre = F.linear(Objective._encoder_input(sae, x), sae.W_enc, sae.b_enc).relu()  # [rows, d_sae]
    rank = min(len(x), max(1, math.ceil(len(x) * (1 - sae.cfg.k / sae.cfg.d_sae))))
    return pre.kthvalue(rank, dim=0).values.clamp(min=start)


@torch.no_grad()
def fold_scales(model: SparseAutoencoder, input_scale: float, target_scale: float) -> SparseAutoencoder:
    """A copy of `model`, trained on a x -> c y (a = input_scale, c = target_scale; a = c for an SAE), that
    maps raw x to raw y, with activations f' / c and decoder directions unchanged.

    For pre' = W_enc (a x - [b_dec]) + b_enc, activations f = f' / c need W_enc * a / c, b_enc / c and the
    thresholds / c; then y = y' / c needs b_dec / c and W_skip * a / c. (An SAE subtracting b_dec has a = c,
    so its encoder weights are untouched.) A codebook SAE's activations are binary, so its decoder vectors
    take the factor instead; with cosine similarity its similarities do not scale at all, nor may its b_enc.
    """
    cfg, a, c = model.cfg, input_scale, target_scale
    folded = SparseAutoencoder.from_tensors(cfg, {n: p.detach().clone() for n, p in model.named_parameters()})
    folded.W_enc.mul_(a / c)
    folded.b_dec.div_(c)
    if not (cfg.architecture == "codebook" and cfg.similarity == "cosine"):
        folded.b_enc.div_(c)
    if cfg.architecture == "codebook":
        folded.W_dec.div_(c)
    if "threshold" in dict(folded.named_parameters()):
        folded.threshold.div_(c)
    if cfg.skip_connection:
        folded.W_skip.mul_(a / c)
    return folded.to(model.W_enc.device)
