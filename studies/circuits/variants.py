"""Every SAE-code method the study's tables compare, by name, in the order the tables list them.

The library's registry (`sae.analysis.circuits.CODE_METHODS`) keeps O'Neill & Bui's methods and the two
variants that earned their place in these tables (README.md, "Which variants the library keeps"); the
others are defined here, so that every table still regenerates. Each runs through the library's own
functions (`run_method`, the controls), which take a CodeMethod as well as a name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.analysis.circuits.methods import BASELINES, CODE_METHODS, CodeMethod


def head_mean_norms(vectors: Tensor) -> Tensor:
    """vectors [prompts, (pos,) layers, heads, d_model] -> each head's mean vector norm [layers, heads],
    with 1 in place of 0 (a head whose vectors are all zero stays zero when divided by it)."""
    if vectors.dim() not in (4, 5):
        raise ValueError(
            f"expected [prompts, (pos,) layers, heads, d_model], got shape {tuple(vectors.shape)}"
        )
    norms = vectors.norm(dim=-1)
    means = norms.reshape(-1, *norms.shape[-2:]).mean(0)
    return torch.where(means > 0, means, torch.ones_like(means))


@dataclass
class HeadNormalisedCodeMethod(CodeMethod):
    """A code method on each head's vectors divided by that head's mean norm over all pooled positive and
    negative vectors: in the one SAE all heads share, a head's output scale otherwise decides which codes
    it gets."""

    def scores(
        self,
        positive_vectors: Tensor,
        negative_vectors: Tensor,
        seed: int,
        pair_of_positive: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        scale = head_mean_norms(torch.cat([positive_vectors, negative_vectors]))[..., None]  # [L, H, 1]
        return super().scores(positive_vectors / scale, negative_vectors / scale, seed, pair_of_positive)


def _codebook(name: str, positions: str, kind: type[CodeMethod] = CodeMethod, **calibration) -> CodeMethod:
    """Our codebook variant: 64 codes, k = 4 codes per vector, total-variation overlap score."""
    return kind(name, "codebook", positions, "overlap", d_sae=64, k=4, epochs=200, **calibration)


POOLED_NULL = {"null_permutations": 100}
PAIR_NULL = {"null_permutations": 100, "null": "pairs"}

# The variants the library's registry dropped, each for the reason README.md gives.
REMOVED_VARIANTS = {
    m.name: m
    for m in [
        _codebook("codebook_overlap", "mean"),
        _codebook("codebook_overlap_positions", "all"),
        CodeMethod("oneill_overlap", "oneill_relu", "mean", "overlap"),
        _codebook("codebook_overlap_normalised", "mean", HeadNormalisedCodeMethod),
        _codebook("codebook_overlap_positions_normalised", "all", HeadNormalisedCodeMethod),
        _codebook("codebook_overlap_calibrated", "mean", **POOLED_NULL),
        CodeMethod("oneill_overlap_calibrated", "oneill_relu", "mean", "overlap", **POOLED_NULL),
        _codebook("codebook_overlap_positions_pair_calibrated", "all", **PAIR_NULL),
        CodeMethod("oneill_overlap_pair_calibrated", "oneill_relu", "mean", "overlap", **PAIR_NULL),
    ]
}

_TABLE_ORDER = [
    "oneill",
    "oneill_edge",
    "codebook_overlap",
    "codebook_overlap_positions",
    "oneill_overlap",
    "codebook_overlap_normalised",
    "codebook_overlap_positions_normalised",
    "codebook_overlap_calibrated",
    "codebook_overlap_positions_calibrated",
    "oneill_overlap_calibrated",
    "codebook_overlap_pair_calibrated",
    "codebook_overlap_positions_pair_calibrated",
    "oneill_overlap_pair_calibrated",
]
COMPARED_CODE_METHODS = {name: CODE_METHODS.get(name) or REMOVED_VARIANTS[name] for name in _TABLE_ORDER}
ALL_METHODS = [*COMPARED_CODE_METHODS, *BASELINES]
# `random` and `layer_index` score any model of one shape alike: no re-initialised control applies to them
WEIGHT_READING_METHODS = [m for m in ALL_METHODS if m not in ("random", "layer_index")]


def method(name: str) -> str | CodeMethod:
    """What the library's `run_method` takes for `name`: the CodeMethod of a code method, else the name."""
    if name not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(ALL_METHODS)}")
    return COMPARED_CODE_METHODS.get(name, name)
