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

import math
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cache.config import CachingConfig
from cache.distributed import cache_shards_of_this_rank
from cache.manifest import (
    FORMAT,
    FORMAT_VERSION,
    CacheError,
    check_shard_file,
    read_manifest,
    summarize_norms,
)
from cache.shards import ShardWriter, cache_lock, capture_batch, remove_stale_temporary_files
from sae.data import OFFLINE_CORPUS, context_batches, token_contexts
from sae.device import DTYPES
from sae.distributed import Distributed
from sae.lm import capture, hookpoints_ready, load_model, stop_layer, weights_hash
from sae.version import __version__


def cache_settings(run: CachingConfig, model_weights: str) -> dict[str, Any]:
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
        "toolkit_version": __version__,
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
    return drop_damaged_shards(cache_dir, manifest)


def drop_damaged_shards(cache_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its first damaged shard (size or sha256 not as listed) and those after it, so
    the run recomputes them; shards are read back in full, once per resume."""
    for i, shard in enumerate(manifest["shards"]):
        try:
            check_shard_file(cache_dir, shard, checksum=True)
        except CacheError as e:
            kept = manifest["shards"][:i]
            print(f"{e}; caching again from context {shard['first_context']} ({len(kept)} shards kept)")
            hookpoints = list(manifest["hookpoints"])
            return manifest | {
                "shards": kept,
                "contexts": shard["first_context"],
                "tokens": sum(s["tokens"] for s in kept),
                "complete": False,
                "norm_stats": {h: summarize_norms(kept, h) for h in hookpoints} if kept else {},
            }
    return manifest


def build_cache(
    run: CachingConfig, model=None, progress: bool = True, dist: Distributed | None = None
) -> Path:
    """Cache `run.cache.hookpoints` for `run.cache.tokens` tokens into `run.cache.dir`; resume if started.
    `run` is a `CachingConfig` (a whole run config is one too).

    Returns the cache directory. `model` may be passed to reuse a loaded bridge. Under torchrun (`dist`
    with several ranks) each rank caches a disjoint set of shards (`cache.distributed`); every rank
    must call this, and all return once the merged manifest is written.
    """
    model = model if model is not None else load_model(run.model.name, run.model.dtype, run.model.device)
    weights_dtype = next(model.parameters()).dtype
    if weights_dtype != DTYPES[run.model.dtype]:  # the manifest would name a dtype the cache was not made in
        raise CacheError(
            f"the model passed to build_cache is {weights_dtype}, but model.dtype is {run.model.dtype!r}: "
            "load it in that dtype, or set model.dtype to match"
        )
    with hookpoints_ready(model, run.cache.hookpoints):
        return _cache_into(run, model, dist, progress)


def _cache_into(run: CachingConfig, model, dist: Distributed | None, progress: bool) -> Path:
    """`build_cache` once the model is loaded and its hookpoints are ready."""
    cache_dir = Path(run.cache.dir)
    hookpoints = run.cache.hookpoints
    stop_at_layer = stop_layer(hookpoints, model.cfg.n_layers)

    probe = torch.full((1, 2), model.tokenizer.bos_token_id, dtype=torch.long, device=run.model.device)
    hook_shapes = {h: list(a.shape[2:]) for h, a in capture(model, probe, hookpoints, stop_at_layer).items()}
    manifest = open_or_resume(cache_dir, cache_settings(run, weights_hash(run.model.name)), hook_shapes)
    manifest["target_tokens"] = max(run.cache.tokens, manifest["target_tokens"])
    target_contexts = math.ceil(manifest["target_tokens"] / run.tokens_per_context)
    if dist is not None and dist.active:
        return cache_shards_of_this_rank(run, model, dist, manifest, target_contexts, stop_at_layer, progress)
    if manifest["contexts"] >= target_contexts:
        return cache_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache_dir):
        remove_stale_temporary_files(cache_dir)
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


def _forward_and_queue(
    run: CachingConfig,
    model,
    writer: ShardWriter,
    start: int,
    target_contexts: int,
    stop_at_layer: int | None,
    progress: bool,
) -> None:
    """Run contexts [start, target_contexts) through the model and queue them to `writer` shard by shard."""
    tokens_per_context = run.tokens_per_context
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
    if pending:  # the dataset ended inside a shard: keep what was computed (build_cache reports it)
        flush()
    bar.close()
