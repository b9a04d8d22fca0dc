"""manifest.json: what a cache holds and how it was made; the source of truth for its shards.

A shard is listed only after its file is fully on disk, and the manifest itself is replaced atomically,
so the manifest never names a shard that is not complete. Checks here turn a missing, truncated or
corrupt shard, or a manifest that disagrees with the files, into a `CacheError` naming the shard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sae.io import atomic_write_json, json_sha256, sha256_file

MANIFEST = "manifest.json"
FORMAT = "sae-toolkit activation cache"
FORMAT_VERSION = 1
TOKENS_KEY = "tokens"
POSITIONS_KEY = "positions"


class CacheError(RuntimeError):
    """A cache directory that is missing, incomplete, corrupt, or not the one the config describes."""


def acts_key(hookpoint: str) -> str:
    """Name of a hookpoint's tensor inside a shard file."""
    return f"acts.{hookpoint}"


def shard_file_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of `cache_dir`, checked against its schema and its own checksum."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{path}: no manifest; {cache_dir} is not an activation cache "
            "(build one with python -m cache CONFIG)"
        )
    try:
        manifest = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from e
    check_manifest(manifest, path)
    return manifest


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically, with a checksum of its contents (`read_manifest` checks it)."""
    manifest.pop(CHECKSUM_KEY, None)
    atomic_write_json(Path(cache_dir) / MANIFEST, {**manifest, CHECKSUM_KEY: json_sha256(manifest)})


# The manifest's schema: key -> type (a dict: a nested table with these keys). `hookpoints` and each
# shard's `norm_sums` are tables keyed by hookpoint, checked by `check_manifest`.
Number = (int, float)
MODEL_SCHEMA = {"name": str, "weights": str, "dtype": str}
HOOKPOINT_SCHEMA = {"shape": list, "layout": str}
NORM_SUMS_SCHEMA = {"count": int, "sum": Number, "sum_sq": Number, "max": Number}
SHARD_SCHEMA = {
    "file": str,
    "first_context": int,
    "contexts": int,
    "tokens": int,
    "bytes": int,
    "sha256": str,
    "norm_sums": dict,
}
MANIFEST_SCHEMA = {
    "format": str,
    "format_version": int,
    "toolkit_version": str,
    "model": MODEL_SCHEMA,
    "data": dict,
    "dtype": str,
    "exclude_bos": bool,
    "batch_contexts": int,
    "shard_contexts": int,
    "hookpoints": dict,
    "target_tokens": int,
    "contexts": int,
    "tokens": int,
    "complete": bool,
    "norm_stats": dict,
    "shards": list,
}
CHECKSUM_KEY = "manifest_sha256"  # optional: manifests written before it existed have none


def _table(
    value: Any, schema: dict[str, Any], path: Path, where: str, optional: tuple[str, ...] = ()
) -> None:
    """`value` is a JSON object with exactly `schema`'s keys (those in `optional` may be absent), each of
    its type; errors name the file and the key."""
    if not isinstance(value, dict):
        raise CacheError(f"{path}: {where or 'the manifest'} must be a JSON object, got {value!r:.60}")
    prefix = f"{where}." if where else ""
    missing = [key for key in schema if key not in value and key not in optional]
    unknown = [key for key in value if key not in schema and key not in optional]
    if missing or unknown:
        raise CacheError(
            f"{path}: "
            + "; ".join(
                [f"missing key {prefix}{key}" for key in missing]
                + [f"unknown key {prefix}{key}" for key in unknown]
            )
        )
    for key, kind in schema.items():
        if key not in value:
            continue
        if isinstance(kind, dict):
            _table(value[key], kind, path, prefix + key)
        elif not isinstance(value[key], kind) or (isinstance(value[key], bool) and kind is not bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CacheError(f"{path}: {prefix}{key} must be {names}, got {value[key]!r:.60}")


def check_manifest(manifest: Any, path: Path) -> None:
    """The one check of a manifest: its schema, its checksum, its format version, and totals that agree
    with the shard list. Every error is a `CacheError` naming the file and the key."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not an activation-cache manifest (expected format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: format_version {manifest.get('format_version')!r}, this toolkit reads {FORMAT_VERSION}"
        )
    if CHECKSUM_KEY in manifest:
        contents = {key: value for key, value in manifest.items() if key != CHECKSUM_KEY}
        if json_sha256(contents) != manifest[CHECKSUM_KEY]:
            raise CacheError(f"{path}: contents do not match its {CHECKSUM_KEY}; the manifest is corrupt")
    _table(manifest, MANIFEST_SCHEMA | {CHECKSUM_KEY: str}, path, "", optional=(CHECKSUM_KEY,))
    hookpoints = manifest["hookpoints"]
    for name, hookpoint in hookpoints.items():
        _table(hookpoint, HOOKPOINT_SCHEMA, path, f"hookpoints.{name}")
        shape, layout = hookpoint["shape"], hookpoint["layout"]
        if not (shape and all(isinstance(d, int) and d > 0 for d in shape) and len(shape) <= 2):
            raise CacheError(f"{path}: hookpoints.{name}.shape must be 1 or 2 positive sizes, got {shape}")
        if layout != ("heads" if len(shape) == 2 else "flat"):
            raise CacheError(f"{path}: hookpoints.{name}.layout {layout!r} does not fit shape {shape}")
    next_context = 0
    for i, shard in enumerate(manifest["shards"]):
        _table(shard, SHARD_SCHEMA, path, f"shards[{i}]")
        if set(shard["norm_sums"]) != set(hookpoints):
            raise CacheError(f"{path}: shards[{i}].norm_sums must have one entry per hookpoint")
        for name, sums in shard["norm_sums"].items():
            _table(sums, NORM_SUMS_SCHEMA, path, f"shards[{i}].norm_sums.{name}")
        if shard["file"] != shard_file_name(i) or shard["first_context"] != next_context:
            raise CacheError(
                f"{path}: shards[{i}] is {shard['file']} from context {shard['first_context']}; "
                f"expected {shard_file_name(i)} from context {next_context}"
            )
        next_context += shard["contexts"]
    tokens = sum(shard["tokens"] for shard in manifest["shards"])
    if tokens != manifest["tokens"] or next_context != manifest["contexts"]:
        raise CacheError(
            f"{path}: says {manifest['tokens']} tokens in {manifest['contexts']} contexts, "
            f"but its shards hold {tokens} tokens in {next_context} contexts"
        )


def check_shard_file(cache_dir: str | Path, shard: dict[str, Any], checksum: bool) -> None:
    """The shard's file exists with the listed size (and, with checksum, the listed sha256)."""
    path = Path(cache_dir) / shard["file"]
    if not path.is_file():
        raise CacheError(f"shard {path} is missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheError(
            f"shard {path} has {size} bytes, {MANIFEST} says {shard['bytes']}: truncated or replaced"
        )
    if checksum and sha256_file(path) != shard["sha256"]:
        raise CacheError(f"shard {path}: sha256 does not match {MANIFEST}; the file is corrupt")


def verify_cache(cache_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Check the manifest and every shard's size and checksum; return the manifest."""
    from tqdm import tqdm

    manifest = read_manifest(cache_dir)
    for shard in tqdm(manifest["shards"], desc="verify shards", unit="shard", disable=not progress):
        check_shard_file(cache_dir, shard, checksum=True)
    return manifest


# --- activation norm statistics (why: spotting BOS-like outliers and choosing input scaling) -----------


def norm_sums(norms) -> dict[str, float]:
    """Per-shard sufficient statistics of per-token activation norms (summable across shards)."""
    norms = norms.double()
    return {
        "count": norms.numel(),
        "sum": norms.sum().item(),
        "sum_sq": (norms**2).sum().item(),
        "max": norms.max().item(),
    }


def summarize_norms(shards: list[dict[str, Any]], hookpoint: str) -> dict[str, float]:
    """mean, std and max of the per-token norm of `hookpoint` over all the shards."""
    sums = [shard["norm_sums"][hookpoint] for shard in shards]
    count = sum(s["count"] for s in sums)
    if count == 0:
        return {"count": 0}
    mean = sum(s["sum"] for s in sums) / count
    variance = max(sum(s["sum_sq"] for s in sums) / count - mean**2, 0.0)
    return {"count": count, "mean": mean, "std": math.sqrt(variance), "max": max(s["max"] for s in sums)}
