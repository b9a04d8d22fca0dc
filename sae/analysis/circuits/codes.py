"""Discretising head outputs: one SAE shared by all heads, trained on a handful of prompts.

Two ways, each a pair (train, encode) working on plain tensors:

* `train_oneill_relu_sae` + `argmax_codes` — faithful to O'Neill & Bui 2024's code: a ReLU SAE with
  ~200 latents, loss = MSE + l1·sum|f|, Adam 1e-3, 500 full-batch epochs, code = argmax latent. Their
  recipe is a few hundred full-batch steps on ~100 rows with a constant coefficient and no input
  scaling, which `sae.Trainer` (streaming batches, lr schedule, decoder-norm-weighted L1 with warm-up,
  input normalisation) does not do, so it gets a dedicated 15-line loop. FLAW kept on purpose: an
  all-zero latent vector has argmax 0, so "no latent fired" and "latent 0 fired" share a code;
  `argmax_codes` reports how often that happened.
* `train_codebook_sae` + `topk_code_sets` — our improvement: the toolkit's codebook SAE
  (`sae.train`), each vector represented by the set of its k nearest codes. A head output that is
  exactly zero (a head that writes nothing) gets no code at all (-1s), not a made-up one.
* `head_codes` — no SAE trained for the task: per-head codes from a dictionary trained by `train.py` on
  every head's `hook_z` concatenated.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

import sae
from sae.model import SparseAutoencoder

NO_CODE = -1


def training_rows(head_vectors: Tensor, n_prompts: int, seed: int) -> tuple[Tensor, Tensor]:
    """Pick `n_prompts` prompts of head_vectors [prompts, ..., d_model]; every head (and position) of
    each becomes one row: -> rows [n_prompts·..., d_model] and the chosen prompt indices [n_prompts]."""
    if n_prompts > len(head_vectors):
        raise ValueError(f"asked for {n_prompts} training prompts but only {len(head_vectors)} are given")
    chosen = torch.randperm(len(head_vectors), generator=torch.Generator().manual_seed(seed))[:n_prompts]
    return head_vectors[chosen].reshape(-1, head_vectors.shape[-1]), chosen


def train_oneill_relu_sae(
    rows: Tensor,
    d_sae: int = 200,
    l1_coefficient: float = 0.02,
    lr: float = 1e-3,
    epochs: int = 500,
    seed: int = 0,
) -> SparseAutoencoder:
    """O'Neill & Bui's SAE on rows [n, d_model]: full batch, MSE + l1·mean(sum|f|), constant Adam lr."""
    torch.manual_seed(seed)
    cfg = sae.SAEConfig(architecture="relu", d_in=rows.shape[-1], d_sae=d_sae, apply_b_dec_to_input=False)
    model = _oneill_init(cfg, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x = rows.float()
    for _ in range(epochs):
        f = (x @ model.W_enc.T + model.b_enc).relu()  # [n, d_sae]
        x_hat = f @ model.W_dec + model.b_dec
        loss = (x_hat - x).pow(2).mean() + l1_coefficient * f.abs().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _oneill_init(cfg: sae.SAEConfig, seed: int) -> SparseAutoencoder:
    """nn.Linear's default initialisation (uniform ±1/sqrt(fan_in)), as their torch code gets it."""
    generator = torch.Generator().manual_seed(seed)
    model = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name, fan_in in (
            ("W_enc", cfg.d_in),
            ("b_enc", cfg.d_in),
            ("W_dec", cfg.d_sae),
            ("b_dec", cfg.d_sae),
        ):
            p = getattr(model, name)
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / fan_in**0.5)
    return model


@dataclass
class Codes:
    codes: Tensor  # [..., k] LongTensor, NO_CODE (-1) where there is no code
    silent_rows: int  # vectors on which no latent fired (faithful: they got code 0 anyway)


@torch.no_grad()
def argmax_codes(model: SparseAutoencoder, vectors: Tensor) -> Codes:
    """vectors [..., d_model] -> argmax latent [..., 1]. All-zero latents give code 0 (their flaw)."""
    f = model.encode(vectors.float())
    silent = int((f.max(-1).values <= 0).sum())
    return Codes(f.argmax(-1, keepdim=True), silent)


def train_codebook_sae(
    rows: Tensor, d_sae: int = 64, k: int = 4, epochs: int = 200, lr: float = 1e-2, seed: int = 0
) -> SparseAutoencoder:
    """The toolkit's codebook SAE on rows [n, d_model] through `sae.train`, full batch for `epochs`.

    Exactly-zero rows are left out: they carry no direction to learn a code for.
    """
    rows = rows[rows.norm(dim=-1) > 0].float()
    if len(rows) < 2:
        raise ValueError(f"codebook SAE needs at least 2 non-zero rows, got {len(rows)}")
    cfg = sae.SAEConfig(architecture="codebook", d_in=rows.shape[-1], d_sae=d_sae, k=k)
    with (
        tempfile.TemporaryDirectory() as out_dir
    ):  # the trainer writes logs and a checkpoint; we keep neither
        train_cfg = sae.TrainConfig(
            total_tokens=len(rows) * epochs,
            batch_size=len(rows),
            lr=lr,
            seed=seed,
            compute_dtype="float32",
            lr_warmup_fraction=0.0,
            out_dir=out_dir,
            log_every=10**9,
            checkpoint_every=10**9,
        )
        return sae.train(rows, train_cfg, cfg)


@torch.no_grad()
def topk_code_sets(model: SparseAutoencoder, vectors: Tensor, k: int | None = None) -> Codes:
    """vectors [..., d_model] -> the k nearest codes [..., k]; an exactly-zero vector gets NO_CODE."""
    codes = model.codes(vectors.float(), k)
    silent = vectors.norm(dim=-1) == 0
    return Codes(codes.masked_fill(silent[..., None], NO_CODE), int(silent.sum()))


@torch.no_grad()
def head_codes(model: SparseAutoencoder, z: Tensor, k: int = 1) -> Codes:
    """Per-head codes from a trained dictionary of every head's `hook_z` concatenated (O'Neill & Bui's
    scoring on the dictionaries users train, instead of a per-task SAE).

    z [..., heads, d_head] -> codes [..., heads, k]: for each head, the k latents that write most into that
    head's slice of the input, f_i · ‖W_dec[i, head]‖ (the per-head split of decoder rows of Kissane et
    al. 2024); NO_CODE where fewer than k latents write into the head.
    """
    n_heads = z.shape[-2]
    if model.cfg.d_in != z.shape[-2] * z.shape[-1]:
        raise ValueError(f"the dictionary reads d_in={model.cfg.d_in}, hook_z has {tuple(z.shape[-2:])}")
    f = model.encode(z.flatten(-2).to(model.W_dec.dtype))  # [..., d_sae]
    share = model.W_dec.unflatten(-1, (n_heads, -1)).norm(dim=-1).T  # [heads, d_sae]
    values, codes = (f[..., None, :] * share).topk(k, dim=-1)  # [..., heads, k]
    return Codes(codes.masked_fill(values <= 0, NO_CODE), int((values[..., 0] <= 0).sum()))
