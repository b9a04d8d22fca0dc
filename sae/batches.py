"""Sources of activation batches for the trainer, and the protocol they follow."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .config import TrainConfig
from .distributed import Distributed


@runtime_checkable
class BatchSource(Protocol):
    """Batches that can be replayed from any position: what exact resumption needs."""

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        """Batch `start`, `start + 1`, ...: [batch, d_in] each, the same sequence for the same source."""
        ...


class TensorBatches:
    """An in-memory [N, d_in] tensor as shuffled batches, reshuffled every epoch from a fixed seed.

    With `world_size` ranks, global step i covers rows [i * B * W, (i + 1) * B * W) of the epoch's
    permutation and rank r takes the r-th B of them: together the ranks see what one process with
    batch size B * W would see.
    """

    def __init__(self, data: Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if data.ndim != 2:
            raise ValueError(f"activations must be [tokens, d_in], got shape {tuple(data.shape)}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = max(1, len(data) // (batch_size * world_size))

    def __len__(self) -> int:
        return self.per_epoch

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        first_epoch, first_pos = divmod(start, self.per_epoch)
        for epoch in itertools.count(first_epoch):
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch))
            for pos in range(first_pos if epoch == first_epoch else 0, self.per_epoch):
                first = (pos * self.world_size + self.rank) * self.batch_size
                yield self.data[order[first : first + self.batch_size]]


class IterableBatches:
    """Any iterable of batches; resuming skips the batches already trained on."""

    def __init__(self, iterable: Iterable[Tensor]):
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]  (TypeError when it has none)

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        return itertools.islice(iter(self.iterable), start, None)


def as_batch_source(
    data: Tensor | BatchSource | Iterable[Tensor], cfg: TrainConfig, dist: Distributed
) -> BatchSource:
    """A tensor is sharded by rank here; any other source must already be this rank's share."""
    if isinstance(data, Tensor):
        return TensorBatches(data, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    if isinstance(data, BatchSource):
        return data
    return IterableBatches(data)
