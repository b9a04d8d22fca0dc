"""The caching stage: one forward per batch of contexts, every hookpoint at once, shards streamed to disk.

The model runs in the main thread and a writer thread serialises, checksums and writes each shard
(torch releases the GIL, so disk work overlaps the next forward). Memory holds at most the shard
being filled plus `QUEUED_SHARDS` waiting to be written, whatever the cache size.

Resuming: shards are written atomically and the manifest lists a shard only once its file is complete,
so after a crash the same command continues from the context after the last listed shard. Shards
start at multiples of `batch_contexts`, so the resumed run batches (and computes) exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import queue
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cache.manifest import (
    FORMAT,
    FORMAT_VERSION,
    POSITIONS_KEY,
    TOKENS_KEY,
    CacheError,
    acts_key,
    norm_sums,
    read_manifest,
    shard_file_name,
    summarize_norms,
    write_manifest,
)
import sae
from sae.distributed import Distributed
from sae.data import OFFLINE_CORPUS, context_batches, token_contexts
from sae.io import atomic_save_file
from sae.lm import DTYPES, load_model, weights_hash
from sae.run_config import RunConfig

QUEUED_SHARDS = 2
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def stop_layer(hookpoints: list[str], n_layers: int) -> int | None:
    """The first block the forward can skip: one past the deepest hooked block (None: run everything)."""
    layers = [_BLOCK_HOOK.match(h) for h in hookpoints]
    if not all(layers):
        return None  # a hook outside the blocks (e.g. ln_final): the whole model must run
    deepest = max(int(m.group(1)) for m in layers)
    return deepest + 1 if deepest + 1 < n_layers else None


def capture(
    model, tokens: torch.Tensor, hookpoints: list[str], stop_at_layer: int | None
) -> dict[str, torch.Tensor]:
    """Activations of `hookpoints` for `tokens` [batch, seq]: [batch, seq, d] or [batch, seq, heads, d_head]."""
    with torch.inference_mode():
        _, acts = model.run_with_cache(
            tokens, names_filter=hookpoints, stop_at_layer=stop_at_layer, return_cache_object=False
        )
    return {h: acts[h] for h in hookpoints}


def prepare_model(model, hookpoints: list[str]) -> None:
    """Check the hookpoints exist and switch on the optional per-head `hook_result`."""
    unknown = [h for h in hookpoints if h not in model.hook_dict]
    if unknown:
        layer0 = sorted(h for h in model.hook_dict if h.startswith("blocks.0."))
        raise CacheError(f"unknown hookpoint(s) {unknown}; block 0 has: {', '.join(layer0)}")
    if any(h.endswith("hook_result") for h in hookpoints):
        model.set_use_attn_result(True)


def cache_settings(run: RunConfig, model_weights: str) -> dict[str, Any]:
    """What determines the cache's contents; a resumed run must agree on all of it."""
    data = {
        "dataset": run.data.dataset,
        "split": run.data.split,
        "text_column": run.data.text_column,
        "seed": run.data.seed,
        "context_size": run.data.context_size,
    }
    if run.data.dataset == OFFLINE_CORPUS:  # the corpus is this interpreter's stdlib
        data["python_version"] = ".".join(map(str, sys.version_info[:3]))
    return {
        "model": {"name": run.model.name, "weights": model_weights, "dtype": run.model.dtype},
        "data": data,
        "dtype": run.cache.dtype,
        "exclude_bos": run.cache.exclude_bos,
        "batch_contexts": run.cache.batch_contexts,
        "shard_contexts": run.cache.shard_contexts,
    }


def new_manifest(settings: dict[str, Any], hook_shapes: dict[str, list[int]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": sae.__version__,
        **settings,
        "hookpoints": {
            h: {"shape": shape, "layout": "heads" if len(shape) == 2 else "flat"}
            for h, shape in hook_shapes.items()
        },
        "target_tokens": 0,
        "contexts": 0,
        "tokens": 0,
        "complete": False,
        "norm_stats": {},
        "shards": [],
    }


def open_or_resume(
    cache_dir: Path, settings: dict[str, Any], hook_shapes: dict[str, list[int]]
) -> dict[str, Any]:
    """The manifest to continue from: the existing one if its settings match, else a fresh one."""
    if not (cache_dir / "manifest.json").exists():
        return new_manifest(settings, hook_shapes)
    manifest = read_manifest(cache_dir)
    expected = {**settings, "hookpoints": new_manifest(settings, hook_shapes)["hookpoints"]}
    differences = [
        f"{key}: cache has {manifest.get(key)!r}, config gives {value!r}"
        for key, value in expected.items()
        if manifest.get(key) != value
    ]
    if differences:
        raise CacheError(
            f"{cache_dir} holds a cache built with other settings (use another cache.dir):\n  "
            + "\n  ".join(differences)
        )
    return manifest


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
def _lock(cache_dir: Path, name: str = ".lock") -> Iterator[None]:
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


def build_cache(run: RunConfig, model=None, progress: bool = True, dist: Distributed | None = None) -> Path:
    """Cache `run.cache.hookpoints` for `run.cache.tokens` tokens into `run.cache.dir`; resume if started.

    Returns the cache directory. `model` may be passed to reuse a loaded bridge. Under torchrun (`dist`
    with several ranks) each rank caches a disjoint set of shards (`cache.distributed`); every rank
    must call this, and all return once the merged manifest is written.
    """
    cache_dir = Path(run.cache.dir)
    hookpoints = run.cache.hookpoints
    model = model if model is not None else load_model(run.model.name, run.model.dtype, run.model.device)
    prepare_model(model, hookpoints)
    stop_at_layer = stop_layer(hookpoints, model.cfg.n_layers)

    probe = torch.full((1, 2), model.tokenizer.bos_token_id, dtype=torch.long, device=run.model.device)
    hook_shapes = {h: list(a.shape[2:]) for h, a in capture(model, probe, hookpoints, stop_at_layer).items()}
    manifest = open_or_resume(cache_dir, cache_settings(run, weights_hash(run.model.name)), hook_shapes)
    manifest["target_tokens"] = max(run.cache.tokens, manifest["target_tokens"])
    tokens_per_context = run.data.context_size - (1 if run.cache.exclude_bos else 0)
    target_contexts = math.ceil(manifest["target_tokens"] / tokens_per_context)
    if dist is not None and dist.active:
        from cache.distributed import cache_shards_of_this_rank

        return cache_shards_of_this_rank(run, model, dist, manifest, target_contexts, stop_at_layer, progress)
    if manifest["contexts"] >= target_contexts:
        return cache_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _lock(cache_dir):
        for stale in cache_dir.glob(".*.tmp"):  # half-written files of a killed run (never listed)
            stale.unlink()
        writer = ShardWriter(cache_dir, manifest)
        try:
            _forward_and_queue(
                run, model, writer, manifest["contexts"], target_contexts, stop_at_layer, progress
            )
        finally:
            writer.close()  # waits for the queued shards: they are complete and worth keeping
    if manifest["contexts"] < target_contexts:
        raise CacheError(
            f"dataset {run.data.dataset!r} ran out after {manifest['contexts']} contexts "
            f"({manifest['tokens']} tokens); cache.tokens asks for {manifest['target_tokens']}"
        )
    return cache_dir


def capture_batch(
    run: RunConfig, model, tokens: torch.Tensor, stop_at_layer: int | None
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


def _forward_and_queue(
    run: RunConfig,
    model,
    writer: ShardWriter,
    start: int,
    target_contexts: int,
    stop_at_layer: int | None,
    progress: bool,
) -> None:
    """Run contexts [start, target_contexts) through the model and queue them to `writer` shard by shard."""
    tokens_per_context = run.data.context_size - (1 if run.cache.exclude_bos else 0)
    pending: list[dict[str, torch.Tensor]] = []  # batches of the shard being filled
    pending_contexts, shard_start = 0, start

    def flush() -> None:
        nonlocal pending, pending_contexts, shard_start
        writer.put(
            shard_start, pending_contexts, {key: torch.cat([b[key] for b in pending]) for key in pending[0]}
        )
        shard_start, pending, pending_contexts = shard_start + pending_contexts, [], 0

    bar = tqdm(
        total=target_contexts * tokens_per_context,
        initial=start * tokens_per_context,
        desc=f"cache {', '.join(run.cache.hookpoints)}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    batches = context_batches(
        token_contexts(run.data, model.tokenizer), run.cache.batch_contexts, skip_contexts=start
    )
    for tokens in batches:  # tokens: [batch, context_size]
        tokens = tokens[: target_contexts - shard_start - pending_contexts]
        pending.append(capture_batch(run, model, tokens, stop_at_layer))
        pending_contexts += len(tokens)
        bar.update(len(tokens) * tokens_per_context)
        done = shard_start + pending_contexts >= target_contexts
        if pending_contexts == run.cache.shard_contexts or done:
            flush()
        if done:
            break
    if (
        pending
    ):  # the dataset ended inside a shard: keep what was computed (build_cache reports the shortfall)
        flush()
    bar.close()
