"""Shuffled training batches from a cache, with bounded memory, parallel reads and rank sharding.

Each epoch visits the shards in a seeded random order; rank r of world_size takes every world_size-th
of them. Shards are read in windows of `window_shards` (parallel threads, the next window prefetched
while the current one is served); the rows of a window are permuted and served in batches, leftover
rows carrying over into the next window. So memory holds at most two windows, and the batch sequence
is a pure function of (seed, rank, world_size): `batches(start=n)` resumes exactly at batch n.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from cache.manifest import CacheError, acts_key, check_shard_file, read_manifest


class ActivationReader:
    """A BatchSource over a cache directory: `batches(start)` yields [batch_size, d_in] tensors.

    For per-head hookpoints ([heads, d_head] per token) the heads are concatenated (d_in = heads * d_head),
    or, with `head_index`, one head is read (d_in = d_head).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        hookpoint: str | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        epochs: int = 1,
        window_shards: int = 8,
        num_workers: int = 4,
        rank: int = 0,
        world_size: int = 1,
        head_index: int | None = None,
        checksum: bool = True,
    ):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        hookpoints = self.manifest["hookpoints"]
        if hookpoint is None:
            hookpoint = next(iter(hookpoints))
        if hookpoint not in hookpoints:
            raise CacheError(
                f"{self.cache_dir}: no hookpoint {hookpoint!r}; the cache has {', '.join(hookpoints)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.hookpoint, self.layout = hookpoint, hookpoints[hookpoint]["layout"]
        self.shape = hookpoints[hookpoint]["shape"]  # per token: [d] or [heads, d_head]
        if head_index is not None and not (self.layout == "heads" and 0 <= head_index < self.shape[0]):
            raise ValueError(
                f"head_index {head_index} needs a per-head hookpoint with more heads; "
                f"{hookpoint} has shape {self.shape}"
            )
        self.head_index = head_index
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.window_shards, self.num_workers, self.checksum = window_shards, num_workers, checksum
        self.rank, self.world_size = rank, world_size
        self.shards = self.manifest["shards"]
        for shard in self.shards:  # fail now, naming the shard, rather than hours into training
            check_shard_file(self.cache_dir, shard, checksum=False)
        self.batches_per_epoch = min(
            sum(self.shards[i]["tokens"] for i in self._epoch_order(0)[r::world_size]) // batch_size
            for r in range(world_size)
        )
        if self.batches_per_epoch == 0:
            raise CacheError(
                f"{self.cache_dir}: {self.manifest['tokens']} tokens over {world_size} rank(s) "
                f"make no full batch of {batch_size}"
            )

    @property
    def d_in(self) -> int:
        if self.layout == "heads" and self.head_index is None:
            return self.shape[0] * self.shape[1]
        return self.shape[-1]

    def __len__(self) -> int:
        return self.batches_per_epoch * self.epochs

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches start, start+1, ... of this rank's deterministic sequence."""
        for epoch in range(start // self.batches_per_epoch, self.epochs):
            skip = start - epoch * self.batches_per_epoch if epoch * self.batches_per_epoch < start else 0
            yield from self._epoch_batches(epoch, skip)

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch, "shards"))
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def _epoch_batches(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        mine = self._epoch_order(epoch)[self.rank :: self.world_size]
        windows = [mine[i : i + self.window_shards] for i in range(0, len(mine), self.window_shards)]
        # Skip whole windows without reading them: only their row counts matter.
        skip_rows, first = skip_batches * self.batch_size, 0
        while (
            first < len(windows)
            and (rows := sum(self.shards[i]["tokens"] for i in windows[first])) <= skip_rows
        ):
            skip_rows -= rows
            first += 1
        served = skip_batches
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="cache-reader") as pool:
            upcoming = self._submit(pool, windows, first)
            carry = None  # rows left over from the previous window: [rows, d_in]
            for w in range(first, len(windows)):
                rows = torch.cat([future.result() for future in upcoming])
                upcoming = self._submit(pool, windows, w + 1)  # prefetch while this window is served
                generator = torch.Generator().manual_seed(_mix(self.seed, epoch, self.rank, w))
                rows = rows[torch.randperm(len(rows), generator=generator)]
                if w == first:
                    rows = rows[skip_rows:]
                if carry is not None:
                    rows = torch.cat([carry, rows])
                n_full = len(rows) // self.batch_size
                for b in range(n_full):
                    if served == self.batches_per_epoch:
                        return
                    yield rows[b * self.batch_size : (b + 1) * self.batch_size]
                    served += 1
                carry = rows[n_full * self.batch_size :]

    def _submit(self, pool: ThreadPoolExecutor, windows: list[list[int]], w: int) -> list[Future]:
        return [pool.submit(self.read_shard, i) for i in windows[w]] if w < len(windows) else []

    def read_shard(self, index: int) -> torch.Tensor:
        """The hookpoint's activations in shard `index`: [tokens, d_in], checked against the manifest."""
        acts = self._shard_acts(index, self._load_shard(index), self.hookpoint)
        if self.head_index is not None:
            return acts[:, self.head_index]
        return acts.flatten(1)

    def _load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Every tensor of shard `index`, after checking its size (and checksum) against the manifest."""
        shard = self.shards[index]
        path = self.cache_dir / shard["file"]
        data = path.read_bytes()
        if len(data) != shard["bytes"]:
            raise CacheError(
                f"shard {path} has {len(data)} bytes, manifest.json says {shard['bytes']}: "
                "truncated or replaced"
            )
        if self.checksum and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise CacheError(f"shard {path}: sha256 does not match manifest.json; the file is corrupt")
        try:
            return load_safetensors(data)
        except Exception as e:
            raise CacheError(f"shard {path}: cannot read it as safetensors: {e}") from e

    def _shard_acts(self, index: int, tensors: dict[str, torch.Tensor], hookpoint: str) -> torch.Tensor:
        """`hookpoint`'s activations among a shard's tensors: [tokens, *shape], shape checked
        against the manifest."""
        shard, key = self.shards[index], acts_key(hookpoint)
        path = self.cache_dir / shard["file"]
        if key not in tensors:
            raise CacheError(f"shard {path}: cannot read tensor {key!r}: the file has {sorted(tensors)}")
        acts, shape = tensors[key], self.manifest["hookpoints"][hookpoint]["shape"]
        if list(acts.shape) != [shard["tokens"], *shape]:
            raise CacheError(
                f"shard {path}: {key} has shape {list(acts.shape)}, "
                f"manifest.json says {[shard['tokens'], *shape]}"
            )
        return acts


class MultiHookpointReader(ActivationReader):
    """Batches of the same tokens at several hookpoints: `batches(start)` yields {hookpoint: [batch_size, d]}.

    Each shard file is read once for all hookpoints; rows are shuffled, sharded by rank and resumed
    exactly as `ActivationReader` does, so the rows for hookpoint h equal those an `ActivationReader`
    of h with the same seed, rank and world_size serves. Per-head hookpoints come with heads concatenated.
    """

    def __init__(self, cache_dir: str | Path, hookpoints: list[str], **kwargs: Any):
        if not hookpoints:
            raise ValueError("MultiHookpointReader needs at least one hookpoint")
        super().__init__(cache_dir, hookpoints[0], **kwargs)
        missing = [h for h in hookpoints if h not in self.manifest["hookpoints"]]
        if missing:
            raise CacheError(
                f"{self.cache_dir}: no hookpoint(s) {missing}; "
                f"the cache has {', '.join(self.manifest['hookpoints'])}"
            )
        self.hookpoints = list(hookpoints)
        self.widths = {
            h: math.prod(self.manifest["hookpoints"][h]["shape"]) for h in hookpoints
        }  # d per token

    @property
    def d_in(self) -> int:
        return sum(self.widths.values())

    def read_shard(self, index: int) -> torch.Tensor:
        """Shard `index` at every hookpoint, side by side: [tokens, sum of widths]."""
        tensors = self._load_shard(index)
        return torch.cat([self._shard_acts(index, tensors, h).flatten(1) for h in self.hookpoints], dim=1)

    def batches(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        for rows in super().batches(start):
            yield {
                h: part.contiguous()
                for h, part in zip(self.hookpoints, rows.split(list(self.widths.values()), dim=1))
            }


class PairedReader(MultiHookpointReader):
    """A transcoder's batches: `batches(start)` yields (inputs [batch_size, d_in], targets
    [batch_size, d_out]), the same tokens at `input_hookpoint` and `output_hookpoint` (e.g.
    `blocks.6.mlp.hook_in` and `blocks.6.mlp.hook_out`), shuffled, sharded and resumed as
    `ActivationReader` does."""

    def __init__(self, cache_dir: str | Path, input_hookpoint: str, output_hookpoint: str, **kwargs: Any):
        if input_hookpoint == output_hookpoint:
            raise ValueError(
                f"a transcoder's input and output hookpoints must differ, got {input_hookpoint!r}"
            )
        super().__init__(cache_dir, [input_hookpoint, output_hookpoint], **kwargs)
        self.input_hookpoint, self.output_hookpoint = input_hookpoint, output_hookpoint

    @property
    def d_in(self) -> int:
        return self.widths[self.input_hookpoint]

    @property
    def d_out(self) -> int:
        return self.widths[self.output_hookpoint]

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        for batch in super().batches(start):
            yield batch[self.input_hookpoint], batch[self.output_hookpoint]


def _mix(*parts: Any) -> int:
    """A 63-bit seed from several parts (stable across runs, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def load_activations(
    cache_dir: str | Path, hookpoint: str | None = None, max_tokens: int | None = None
) -> torch.Tensor:
    """All (or the first max_tokens) activations of a hookpoint in cache order: [tokens, d_in].
    For small caches."""
    reader = ActivationReader(cache_dir, hookpoint, batch_size=1)
    parts, total = [], 0
    for index in range(len(reader.shards)):
        parts.append(reader.read_shard(index))
        total += len(parts[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    return torch.cat(parts)[:max_tokens]
