"""Shipped ground-truth head lists (data/ground_truth.json) as [layers, heads] masks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

DATA_FILE = Path(__file__).parent / "data" / "ground_truth.json"


def available() -> list[str]:
    """Keys such as "gpt2-small/ioi/acdc" ("model/task/source"); sources differ where O'Neill & Bui's
    lists do."""
    return [k for k in json.loads(DATA_FILE.read_text()) if not k.startswith("_")]


def head_mask(key: str, n_layers: int, n_heads: int) -> Tensor:
    """[layers, heads] bool of the heads listed under `key`."""
    lists = json.loads(DATA_FILE.read_text())
    if key not in lists or key.startswith("_"):
        raise KeyError(f"no ground truth {key!r} in {DATA_FILE}; available: {', '.join(available())}")
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for head in lists[key]:
        layer, index = map(int, head.split("."))
        if not (layer < n_layers and index < n_heads):
            raise ValueError(
                f"ground truth {key}: head {head} does not exist in a {n_layers}x{n_heads} model"
            )
        mask[layer, index] = True
    return mask
