"""The study's own code-method variants (variants.py): the head-normalised ones, and the table of every
method the study compares."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae.analysis.circuits.methods import CODE_METHODS

from variants import COMPARED_CODE_METHODS, REMOVED_VARIANTS, head_mean_norms, method


def test_the_study_compares_the_library_registry_and_its_removed_variants():
    assert len(COMPARED_CODE_METHODS) == 13
    assert set(COMPARED_CODE_METHODS) == set(CODE_METHODS) | set(REMOVED_VARIANTS)
    assert not set(CODE_METHODS) & set(REMOVED_VARIANTS)
    for name in CODE_METHODS:  # the library's own definitions, not copies that could drift
        assert COMPARED_CODE_METHODS[name] is CODE_METHODS[name]
    assert method("oneill_overlap") is REMOVED_VARIANTS["oneill_overlap"]
    assert method("eap_ig") == "eap_ig"  # a baseline goes by name
    with pytest.raises(ValueError, match="unknown method"):
        method("nonexistent")


def _scaled_head_vectors(
    idx: torch.Tensor, directions: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """[prompts, 1 layer, 3 heads, d]: head 1 = head 0 × 10 (same directions), head 2 writes nothing."""
    base = directions[idx] + 0.3 * torch.randn(len(idx), directions.shape[1], generator=generator)
    return torch.stack([base, base * 10, torch.zeros_like(base)], 1)[:, None]


def test_normalised_codebook_scores_ignore_a_heads_output_scale():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(12, 16, generator=generator)
    positives = _scaled_head_vectors(torch.randint(0, 6, (20,), generator=generator), directions, generator)
    negatives = _scaled_head_vectors(torch.randint(3, 12, (20,), generator=generator), directions, generator)
    scores = {}
    for name in ("codebook_overlap", "codebook_overlap_normalised"):
        variant = dataclasses.replace(COMPARED_CODE_METHODS[name], d_sae=16, epochs=30)
        scores[name], details = variant.scores(positives, negatives, seed=0)
        assert details["silent_vectors"] == 40  # the all-zero head stays zero: no code, no NaN
        assert scores[name][0, 2] == 0 and torch.isfinite(scores[name]).all()
    # in one shared SAE the 10× larger head gets other codes; divided by its own mean norm it gets the same
    assert abs(scores["codebook_overlap"][0, 0] - scores["codebook_overlap"][0, 1]) > 0.05, scores
    assert scores["codebook_overlap_normalised"][0, 0] == scores["codebook_overlap_normalised"][0, 1], scores


def test_head_mean_norms_per_head_over_prompts_and_positions():
    vectors = torch.zeros(3, 5, 2, 2, 4)  # [prompts, pos, layers, heads, d]
    vectors[..., 0, 0, 0] = 2.0
    vectors[1, :, 1, 1, 1] = -6.0  # only one prompt of head (1, 1) is non-zero: mean over 3 prompts is 2
    norms = head_mean_norms(vectors)
    assert norms.shape == (2, 2)
    assert torch.allclose(norms, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))  # zero heads divide by 1
    assert torch.allclose(head_mean_norms(vectors[:, 0]), norms)  # position-mean shape [prompts, L, H, d]
    with pytest.raises(ValueError, match="expected"):
        head_mean_norms(vectors[0, 0])
