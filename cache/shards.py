"""Shards: a forward's activations as a shard's tensors, shard files written atomically by a writer
thread, and the lock that keeps two runs from writing one cache."""

from __future__ import annotations

import contextlib
import fcntl
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cache.config import CachingConfig
from cache.manifest import (
    POSITIONS_KEY,
    TOKENS_KEY,
    CacheError,
    acts_key,
    norm_sums,
    shard_file_name,
    summarize_norms,
    write_manifest,
)
from sae.device import DTYPES
from sae.io import atomic_save_file
from sae.lm import capture

QUEUED_SHARDS = 2


def capture_batch(
    run: CachingConfig, model, tokens: torch.Tensor, stop_at_layer: int | None
) -> dict[str, torch.Tensor]:
    """A shard's tensors for the contexts `tokens` [batch, context_size]: activations (BOS dropped when
    exclude_bos) in the cache dtype on the CPU, token ids and positions, one row per token."""
    first_position = 1 if run.cache.exclude_bos else 0
    acts = capture(model, tokens.to(run.model.device), run.cache.hookpoints, stop_at_layer)
    batch = {
        acts_key(h): a[:, first_position:].flatten(0, 1).to("cpu", DTYPES[run.cache.dtype])
        for h, a in acts.items()
    }
    batch[TOKENS_KEY] = tokens[:, first_position:].flatten().to(torch.int32)
    batch[POSITIONS_KEY] = torch.arange(first_position, run.data.context_size, dtype=torch.int32).repeat(
        len(tokens)
    )
    return batch


class ShardWriter:
    """A thread that writes queued shards and then lists them in the manifest, in order."""

    def __init__(self, cache_dir: Path, manifest: dict[str, Any]):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUED_SHARDS)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-shard-writer", daemon=True)
        self.thread.start()

    def put(self, first_context: int, contexts: int, tensors: dict[str, torch.Tensor]) -> None:
        self._raise_if_failed()
        self.queue.put((first_context, contexts, tensors))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise CacheError(f"writing a shard to {self.cache_dir} failed: {self.error}") from self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # reported to the main thread by put()/close()
                    self.error = e

    def _write(self, first_context: int, contexts: int, tensors: dict[str, torch.Tensor]) -> None:
        manifest = self.manifest
        hookpoints = list(manifest["hookpoints"])
        manifest["shards"].append(
            write_shard(self.cache_dir, len(manifest["shards"]), first_context, contexts, tensors, hookpoints)
        )
        manifest["contexts"] = first_context + contexts
        manifest["tokens"] += len(tensors[TOKENS_KEY])
        manifest["complete"] = manifest["tokens"] >= manifest["target_tokens"]
        manifest["norm_stats"] = {h: summarize_norms(manifest["shards"], h) for h in hookpoints}
        write_manifest(self.cache_dir, manifest)


def write_shard(
    cache_dir: Path,
    index: int,
    first_context: int,
    contexts: int,
    tensors: dict[str, torch.Tensor],
    hookpoints: list[str],
) -> dict[str, Any]:
    """Write shard `index` atomically; return its manifest entry."""
    path = cache_dir / shard_file_name(index)
    sha256 = atomic_save_file(tensors, path)
    return {
        "file": path.name,
        "first_context": first_context,
        "contexts": contexts,
        "tokens": len(tensors[TOKENS_KEY]),
        "bytes": path.stat().st_size,
        "sha256": sha256,
        "norm_sums": {h: norm_sums(tensors[acts_key(h)].flatten(1).float().norm(dim=-1)) for h in hookpoints},
    }


@contextlib.contextmanager
def cache_lock(cache_dir: Path, name: str = ".lock") -> Iterator[None]:
    """An exclusive lock on the cache directory, so two runs never interleave shards.

    The kernel releases it when the process dies, even by SIGKILL.
    """
    with open(cache_dir / name, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"{cache_dir} is being written by another process (it holds {cache_dir / name})"
            ) from None
        yield


def remove_stale_temporary_files(cache_dir: Path) -> None:
    """Half-written files of a killed run: never listed in a manifest, so never read."""
    for stale in cache_dir.glob(".*.tmp"):
        stale.unlink()
