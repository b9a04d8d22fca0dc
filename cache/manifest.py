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

from sae.io import atomic_write_json, sha256_file

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
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{path}: no manifest; {cache_dir} is not an activation cache "
            "(build one with python -m cache CONFIG)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from e
    _check_manifest(manifest, path)
    return manifest


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(cache_dir) / MANIFEST, manifest)


def _check_manifest(manifest: Any, path: Path) -> None:
    """The manifest's own consistency: required keys, and totals that agree with the shard list."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not an activation-cache manifest (expected format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: format_version {manifest.get('format_version')!r}, this toolkit reads {FORMAT_VERSION}"
        )
    required = ("model", "hookpoints", "dtype", "data", "shards", "tokens", "contexts")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise CacheError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    shard_keys = ("file", "first_context", "contexts", "tokens", "bytes", "sha256")
    next_context = 0
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or any(key not in shard for key in shard_keys):
            raise CacheError(f"{path}: shards[{i}] must have keys {', '.join(shard_keys)}")
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
