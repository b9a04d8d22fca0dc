"""Distributed caching under torchrun: each rank caches a disjoint set of shards, rank 0 merges.

The contexts still to cache, [first_context, target_contexts), are cut into shards of `shard_contexts`
exactly as one process would cut them, and shard j of that plan goes to rank j % world_size. So the
merged cache is the one a single process would have written, shard for shard (same files, same bytes),
and the forward pass is paid once per context across the job.

Each rank lists the shards it finished in its own part manifest (`manifest.part{r}of{W}.json`, written
atomically after each shard file), so a killed job resumed with the same command and the same number of
processes redoes only the shards no part lists. Once every rank is done, rank 0 appends the parts to
`manifest.json` after a barrier and deletes them. Every rank tokenizes the whole stream to find its
contexts; only the forward and the write are divided.
"""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cache.config import CachingConfig
from cache.manifest import CacheError, check_shard_file, shard_file_name, summarize_norms, write_manifest
from cache.shards import ShardWriter, cache_lock, capture_batch, remove_stale_temporary_files, write_shard
from sae.data import token_contexts
from sae.distributed import Distributed
from sae.io import atomic_write_json

PART_GLOB = "manifest.part*of*.json"


def part_manifest_path(cache_dir: Path, rank: int, world_size: int) -> Path:
    return cache_dir / f"manifest.part{rank}of{world_size}.json"


def shard_plan(
    manifest: dict[str, Any], target_contexts: int, shard_contexts: int, world_size: int
) -> dict[str, int]:
    """What is left to cache and how it is cut: shard j covers contexts first_context + j * shard_contexts
    onward (up to target_contexts) and is written by rank j % world_size as file first_shard + j."""
    return {
        "first_shard": len(manifest["shards"]),
        "first_context": manifest["contexts"],
        "target_contexts": target_contexts,
        "shard_contexts": shard_contexts,
        "world_size": world_size,
    }


def planned_shards(plan: dict[str, int]) -> int:
    return max(0, math.ceil((plan["target_contexts"] - plan["first_context"]) / plan["shard_contexts"]))


class PartShardWriter(ShardWriter):
    """Writes this rank's shards under their plan-wide file names and lists them in its part manifest."""

    def __init__(self, cache_dir: Path, part: dict[str, Any], part_path: Path):
        self.part, self.part_path = part, part_path
        super().__init__(cache_dir, part)

    def _write(self, first_context: int, contexts: int, tensors: dict[str, torch.Tensor]) -> None:
        plan = self.part["plan"]
        index = plan["first_shard"] + (first_context - plan["first_context"]) // plan["shard_contexts"]
        self.part["shards"].append(
            write_shard(self.cache_dir, index, first_context, contexts, tensors, self.part["hookpoints"])
        )
        atomic_write_json(self.part_path, self.part)


def cache_shards_of_this_rank(
    run: CachingConfig,
    model,
    dist: Distributed,
    manifest: dict[str, Any],
    target_contexts: int,
    stop_at_layer: int | None,
    progress: bool,
) -> Path:
    """Every rank: cache its shards of the plan; then rank 0 merges the parts into manifest.json."""
    cache_dir = Path(run.cache.dir)
    if manifest["contexts"] >= target_contexts:
        return cache_dir  # every rank read the same complete manifest
    if dist.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with cache_lock(cache_dir):
            _remove_merged_parts(cache_dir, manifest)
            remove_stale_temporary_files(cache_dir)
    dist.barrier()  # no rank writes before the clean-up is done
    plan = shard_plan(manifest, target_contexts, run.cache.shard_contexts, dist.world_size)
    part_path = part_manifest_path(cache_dir, dist.rank, dist.world_size)
    _check_no_foreign_parts(cache_dir, dist.world_size)
    part = _open_part(part_path, plan, manifest)
    done = {shard["first_context"] for shard in part["shards"]}
    mine = [
        j
        for j in range(dist.rank, planned_shards(plan), dist.world_size)
        if plan["first_context"] + j * plan["shard_contexts"] not in done
    ]
    if mine:
        with cache_lock(cache_dir, f".lock.part{dist.rank}of{dist.world_size}"):
            writer = PartShardWriter(cache_dir, part, part_path)
            try:
                _forward_shards(run, model, writer, plan, mine, stop_at_layer, progress and dist.is_main)
            finally:
                writer.close()
    dist.barrier()  # every part is complete: merge
    if dist.is_main:
        with cache_lock(cache_dir):
            _merge_parts(cache_dir, manifest, plan)
    dist.barrier()  # the merged manifest is on disk for every rank to read
    return cache_dir


def _forward_shards(
    run: CachingConfig,
    model,
    writer: ShardWriter,
    plan: dict[str, int],
    mine: list[int],
    stop_at_layer: int | None,
    progress: bool,
) -> None:
    """Forward the contexts of shards `mine` (plan positions, ascending) in the batches one
    process would use."""
    size, batch_contexts = plan["shard_contexts"], run.cache.batch_contexts
    contexts = islice(token_contexts(run.data, model.tokenizer), plan["first_context"], None)
    tokens_per_context = run.tokens_per_context
    bar = tqdm(
        total=len(mine) * size * tokens_per_context,
        desc=f"cache (rank shards) {', '.join(run.cache.hookpoints)}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    position = 0  # plan position of the shard `contexts` is at
    for j in mine:
        for _ in islice(contexts, (j - position) * size):  # other ranks' shards: tokenized, not forwarded
            pass
        first = plan["first_context"] + j * size
        shard = list(islice(contexts, min(size, plan["target_contexts"] - first)))
        position = j + 1
        if not shard:
            break  # the dataset ended before this shard: the merge reports the shortfall
        tokens = torch.tensor(shard, dtype=torch.long)  # [contexts, context_size]
        batches = [
            capture_batch(run, model, tokens[i : i + batch_contexts], stop_at_layer)
            for i in range(0, len(tokens), batch_contexts)
        ]
        writer.put(first, len(shard), {key: torch.cat([b[key] for b in batches]) for key in batches[0]})
        bar.update(len(shard) * tokens_per_context)
        if len(shard) < size and first + len(shard) < plan["target_contexts"]:
            break  # the dataset ended inside this shard
    bar.close()


def _open_part(part_path: Path, plan: dict[str, int], manifest: dict[str, Any]) -> dict[str, Any]:
    """This rank's part manifest: the one an interrupted run left (same plan, shard files intact),
    or a new one."""
    if not part_path.exists():
        return {"plan": plan, "hookpoints": list(manifest["hookpoints"]), "shards": []}
    part = json.loads(part_path.read_text())
    if part.get("plan") != plan:
        raise CacheError(
            f"{part_path} belongs to an interrupted run with plan {part.get('plan')}, this run plans {plan}: "
            "resume with the same cache.tokens, cache.shard_contexts and number of processes, "
            "or delete the manifest.part*.json files"
        )
    for shard in part["shards"]:
        check_shard_file(part_path.parent, shard, checksum=False)
    return part


def _check_no_foreign_parts(cache_dir: Path, world_size: int) -> None:
    """Parts of an interrupted run with another number of processes: their shards follow another plan."""
    foreign = sorted(p.name for p in cache_dir.glob(PART_GLOB) if not p.name.endswith(f"of{world_size}.json"))
    if foreign:
        raise CacheError(
            f"{cache_dir} holds part manifests of an interrupted run with another number of processes "
            f"({', '.join(foreign)}): resume it with that --nproc_per_node, "
            "or delete them to redo those shards"
        )


def _remove_merged_parts(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Parts left by a run killed after its merge (all their shards already in manifest.json)."""
    listed = {shard["file"]: shard["sha256"] for shard in manifest["shards"]}
    for path in cache_dir.glob(PART_GLOB):
        shards = json.loads(path.read_text())["shards"]
        if all(listed.get(shard["file"]) == shard["sha256"] for shard in shards):
            path.unlink()


def _merge_parts(cache_dir: Path, manifest: dict[str, Any], plan: dict[str, int]) -> None:
    """Append every part's shards to manifest.json in plan order, then delete the parts."""
    paths = [part_manifest_path(cache_dir, r, plan["world_size"]) for r in range(plan["world_size"])]
    shards = sorted(
        (s for p in paths if p.exists() for s in json.loads(p.read_text())["shards"]),
        key=lambda s: s["first_context"],
    )
    expected_context = plan["first_context"]
    for index, shard in enumerate(shards, plan["first_shard"]):
        if shard["file"] != shard_file_name(index) or shard["first_context"] != expected_context:
            raise CacheError(
                f"{cache_dir}: the ranks' shards leave a gap before {shard['file']} "
                f"(context {shard['first_context']}, expected {expected_context})"
            )
        expected_context += shard["contexts"]
    manifest["shards"].extend(shards)
    manifest["contexts"] = expected_context
    manifest["tokens"] += sum(s["tokens"] for s in shards)
    manifest["complete"] = manifest["tokens"] >= manifest["target_tokens"]
    manifest["norm_stats"] = {h: summarize_norms(manifest["shards"], h) for h in manifest["hookpoints"]}
    write_manifest(cache_dir, manifest)
    for path in paths:
        path.unlink(missing_ok=True)
    if manifest["contexts"] < plan["target_contexts"]:
        raise CacheError(
            f"dataset ran out after {manifest['contexts']} contexts ({manifest['tokens']} tokens); "
            f"cache.tokens asks for {manifest['target_tokens']}"
        )
