"""Sources of activation batches for the trainer, and the protocol they follow."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .config import TrainConfig
from .distributed import Distributed

Batch = Tensor | tuple[Tensor, Tensor]
"""What the trainer steps on: inputs [batch, d_in] (an SAE reconstructs them), or for transcoders the pair
(inputs [batch, d_in], targets [batch, d_out]) of the same tokens at two sites."""


@runtime_checkable
class BatchSource(Protocol):
    """Batches that can be replayed from any position: what exact resumption needs."""

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Batch `start`, `start + 1`, ...: each a `Batch`, the same sequence for the same source."""
        ...


class TensorBatches:
    """An in-memory [N, d_in] tensor (or a pair of [N, d_in] inputs and [N, d_out] targets, shuffled alike)
    as shuffled batches, reshuffled every epoch from a fixed seed.

    With `world_size` ranks, global step i covers rows [i * B * W, (i + 1) * B * W) of the epoch's
    permutation and rank r takes the r-th B of them: together the ranks see what one process with
    batch size B * W would see.
    """

    def __init__(self, data: Batch, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        parts = data if isinstance(data, tuple) else (data,)
        if any(part.ndim != 2 for part in parts) or len({len(part) for part in parts}) > 1:
            shapes = [tuple(part.shape) for part in parts]
            raise ValueError(f"activations must be [tokens, d] (inputs and targets alike), got {shapes}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rows = len(parts[0])
        self.rank, self.world_size = rank, world_size
        self.per_epoch = max(1, self.rows // (batch_size * world_size))

    def __len__(self) -> int:
        return self.per_epoch

    def batches(self, start: int = 0) -> Iterator[Batch]:
        first_epoch, first_pos = divmod(start, self.per_epoch)
        for epoch in itertools.count(first_epoch):
            order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
            for pos in range(first_pos if epoch == first_epoch else 0, self.per_epoch):
                first = (pos * self.world_size + self.rank) * self.batch_size
                rows = order[first : first + self.batch_size]
                yield (
                    tuple(part[rows] for part in self.data)
                    if isinstance(self.data, tuple)
                    else self.data[rows]
                )


class IterableBatches:
    """Any iterable of batches; resuming skips the batches already trained on."""

    def __init__(self, iterable: Iterable[Batch]):
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]  (TypeError when it has none)

    def batches(self, start: int = 0) -> Iterator[Batch]:
        return itertools.islice(iter(self.iterable), start, None)


def as_batch_source(
    data: Batch | BatchSource | Iterable[Batch], cfg: TrainConfig, dist: Distributed
) -> BatchSource:
    """A tensor (or pair of them) is sharded by rank here; any other source must already be this rank's
    share."""
    if isinstance(data, Tensor) or (isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data)):
        return TensorBatches(data, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    if isinstance(data, BatchSource):
        return data
    return IterableBatches(data)
