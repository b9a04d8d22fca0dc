"""The depth-bias measurement on untrained toys (reinit_depth.py): its small statistics, checked by hand."""

from __future__ import annotations

import pytest
import torch

from reinit_depth import layer0_first, relative_change, relative_spread, spearman


def test_relative_change_is_change_over_size_per_head():
    clean = torch.zeros(2, 1, 2, 3)  # [prompts, layers, heads, d_model]
    clean[:, 0, 0, 0] = 2.0  # head 0: norm 2, corrupted moves it by 1 -> 0.5
    clean[:, 0, 1, 0] = 1.0  # head 1: norm 1, corrupted unchanged -> 0
    corrupted = clean.clone()
    corrupted[:, 0, 0, 1] = 1.0
    assert relative_change(clean, corrupted).tolist() == [[0.5, 0.0]]
    per_position = torch.stack([clean, clean], 1)  # [prompts, pos, layers, heads, d_model]: same answer
    assert relative_change(per_position, torch.stack([corrupted, corrupted], 1)).tolist() == [[0.5, 0.0]]
    with pytest.raises(ValueError, match="shapes differ"):
        relative_change(clean, corrupted[:1])


def test_relative_spread_is_zero_for_a_constant_head():
    vectors = torch.ones(4, 1, 2, 3)
    vectors[:, 0, 1, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # head 1 flips one coordinate
    spread = relative_spread(vectors)
    assert spread[0, 0] == 0.0
    assert spread[0, 1] == pytest.approx(1 / 3**0.5)  # RMS distance 1 from the mean, norm sqrt(3)


def test_spearman_and_layer_ordering():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, torch.tensor([1.0, 1.0, 2.0, 2.0])) == pytest.approx(0.894, abs=1e-3)  # ties averaged
    assert layer0_first(torch.tensor([[3.0, 4.0], [1.0, 2.0]])) == 1.0
    assert layer0_first(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) == 0.0
    assert layer0_first(torch.tensor([[1.0, 3.0], [2.0, 3.0]])) == pytest.approx(0.375)  # one win, one tie
    with pytest.raises(ValueError, match="2 layers"):
        layer0_first(torch.zeros(3, 2))
