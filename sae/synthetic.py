"""Synthetic sparse-coding data with a known dictionary: the ground truth for training tests."""

from __future__ import annotations

from collections.abc import Iterator

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
    features = _unit_rows(torch.randn(n_features, d, generator=g))
    return torch.cat(
        [codes @ features for codes in _sparse_codes(n_tokens, n_features, active, g, chunk_tokens)]
    ), features


def sparse_transcoder_data(
    n_tokens: int,
    d_in: int = 64,
    d_out: int = 64,
    n_features: int = 256,
    active: float = 5.0,
    seed: int = 0,
    chunk_tokens: int = 8192,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (x: [n_tokens, d_in], y: [n_tokens, d_out], read: [n_features, d_in], write: [n_features, d_out]).

    A planted transcoder: each token's sparse codes (as in `sparse_feature_data`) appear in x along the
    unit rows of `read` and in y along the unit rows of `write`, so y is a sparse function of x that an
    SAE on x alone would not find."""
    g = torch.Generator().manual_seed(seed)
    read = _unit_rows(torch.randn(n_features, d_in, generator=g))
    write = _unit_rows(torch.randn(n_features, d_out, generator=g))
    xs, ys = [], []
    for codes in _sparse_codes(n_tokens, n_features, active, g, chunk_tokens):
        xs.append(codes @ read)
        ys.append(codes @ write)
    return torch.cat(xs), torch.cat(ys), read, write


def _sparse_codes(
    n_tokens: int, n_features: int, active: float, g: torch.Generator, chunk_tokens: int
) -> Iterator[Tensor]:
    """Chunks [rows, n_features]: Bernoulli(active / n_features) on-states times magnitudes U[0.5, 1.5]."""
    for start in range(0, n_tokens, chunk_tokens):
        rows = min(chunk_tokens, n_tokens - start)
        on = torch.rand(rows, n_features, generator=g) < active / n_features
        yield on * (0.5 + torch.rand(rows, n_features, generator=g))


def _unit_rows(w: Tensor) -> Tensor:
    return w / w.norm(dim=1, keepdim=True)


def feature_recovery(decoder: Tensor, features: Tensor) -> float:
    """Mean over true features of the best cosine similarity with a decoder row: 1.0 = all found."""
    dec = decoder / decoder.norm(dim=1, keepdim=True)
    true = features / features.norm(dim=1, keepdim=True)
    return (true @ dec.T).max(dim=1).values.mean().item()
