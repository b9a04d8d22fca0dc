"""Synthetic sparse-coding data with a known dictionary: the ground truth for training tests."""

from __future__ import annotations

import torch
from torch import Tensor


def sparse_feature_data(
    n_tokens: int,
    d: int = 64,
    n_features: int = 256,
    active: float = 5.0,
    seed: int = 0,
    chunk_tokens: int = 8192,
) -> tuple[Tensor, Tensor]:
    """-> (x: [n_tokens, d], features: [n_features, d] unit-norm).

    Each token is a sum of about `active` features (independent Bernoulli draws) with magnitudes
    uniform in [0.5, 1.5]. Generated in chunks, so wide dictionaries fit in memory.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    chunks = []
    for start in range(0, n_tokens, chunk_tokens):
        rows = min(chunk_tokens, n_tokens - start)
        on = torch.rand(rows, n_features, generator=g) < active / n_features
        magnitudes = 0.5 + torch.rand(rows, n_features, generator=g)
        chunks.append((on * magnitudes) @ features)
    return torch.cat(chunks), features


def feature_recovery(decoder: Tensor, features: Tensor) -> float:
    """Mean over true features of the best cosine similarity with a decoder row: 1.0 = all found."""
    dec = decoder / decoder.norm(dim=1, keepdim=True)
    true = features / features.norm(dim=1, keepdim=True)
    return (true @ dec.T).max(dim=1).values.mean().item()
