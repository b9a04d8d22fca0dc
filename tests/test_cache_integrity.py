"""A corrupt, truncated or missing shard, or a manifest that disagrees with the shards, is named."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_lm import tiny_run_config

from cache import ActivationReader, CacheError, read_manifest, verify_cache
from cache.manifest import write_manifest
from cache.writer import build_cache

REPO = Path(__file__).resolve().parent.parent
SHARD = "shard_000001.safetensors"


@pytest.fixture(scope="module")
def pristine(tiny_lm, tiny_lm_dir, tmp_path_factory):
    config = tiny_run_config(tiny_lm_dir, tmp_path_factory.mktemp("pristine"), cache={"tokens": 1500})
    return build_cache(config, tiny_lm, progress=False)


@pytest.fixture
def cache_dir(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "cache"))


def _verify_cli(cache_dir):
    return subprocess.run(
        [sys.executable, "-m", "cache", "--verify", str(cache_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_intact_cache_verifies(cache_dir):
    assert verify_cache(cache_dir, progress=False)["complete"]
    result = _verify_cli(cache_dir)
    assert result.returncode == 0 and "OK" in result.stdout


def test_corrupt_shard(cache_dir):
    path = cache_dir / SHARD
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the activations: same size, wrong checksum
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{SHARD}.*corrupt"):
        verify_cache(cache_dir, progress=False)
    reader = ActivationReader(cache_dir, batch_size=64)  # sizes are fine, so the reader opens ...
    with pytest.raises(CacheError, match=f"{SHARD}.*corrupt"):
        list(reader.batches())  # ... and refuses the shard when it reads it
    result = _verify_cli(cache_dir)
    assert result.returncode == 1 and SHARD in result.stderr


def test_truncated_shard(cache_dir):
    path = cache_dir / SHARD
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CacheError, match=f"{SHARD}.*truncated"):
        ActivationReader(cache_dir, batch_size=64)
    with pytest.raises(CacheError, match=f"{SHARD}.*truncated"):
        verify_cache(cache_dir, progress=False)


def test_missing_shard(cache_dir):
    (cache_dir / SHARD).unlink()
    with pytest.raises(CacheError, match=f"{SHARD} is missing"):
        ActivationReader(cache_dir, batch_size=64)


def _edit_manifest(cache_dir, edit, checksum=True):
    """Edit the manifest; with `checksum`, write it as the toolkit would (its checksum recomputed), so that
    the check under test is the one that fires."""
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if checksum:
        write_manifest(cache_dir, manifest)
    else:
        path.write_text(json.dumps(manifest))


def test_manifest_totals_disagreeing_with_shards(cache_dir):
    _edit_manifest(cache_dir, lambda m: m.update(tokens=m["tokens"] + 1))
    with pytest.raises(CacheError, match=r"manifest\.json: says .* tokens .* but its shards hold"):
        read_manifest(cache_dir)


def test_manifest_shard_entry_disagreeing_with_file(cache_dir):
    def claim_more_tokens(manifest):
        manifest["shards"][1]["tokens"] += 1
        manifest["tokens"] += 1

    _edit_manifest(cache_dir, claim_more_tokens)
    reader = ActivationReader(cache_dir, batch_size=64)
    with pytest.raises(CacheError, match=f"{SHARD}: .* has shape .* manifest.json says"):
        reader.read_shard(1)


def test_manifest_listing_shards_out_of_order(cache_dir):
    _edit_manifest(cache_dir, lambda m: m["shards"].reverse())
    with pytest.raises(CacheError, match=r"shards\[0\] is shard_\d+"):
        read_manifest(cache_dir)


def test_manifest_not_json_or_absent(cache_dir, tmp_path):
    (cache_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(CacheError, match=r"manifest\.json: not valid JSON"):
        read_manifest(cache_dir)
    with pytest.raises(CacheError, match="no manifest"):
        read_manifest(tmp_path / "empty")


def test_manifest_edited_without_its_checksum(cache_dir):
    _edit_manifest(cache_dir, lambda m: m["norm_stats"].clear(), checksum=False)
    with pytest.raises(CacheError, match=r"manifest\.json: contents do not match its manifest_sha256"):
        read_manifest(cache_dir)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda m: m.pop("target_tokens"), "missing key target_tokens"),
        (lambda m: m.pop("norm_stats"), "missing key norm_stats"),
        (
            lambda m: m["hookpoints"][next(iter(m["hookpoints"]))].pop("shape"),
            r"missing key hookpoints\..*\.shape",
        ),
        (
            lambda m: m["hookpoints"][next(iter(m["hookpoints"]))].pop("layout"),
            r"missing key hookpoints\..*\.layout",
        ),
        (lambda m: m["shards"][0].pop("norm_sums"), r"missing key shards\[0\]\.norm_sums"),
        (lambda m: m.update(tokens=str(m["tokens"])), "tokens must be int"),
        (lambda m: m.update(complete=1), "complete must be bool"),
        (lambda m: m.update(extra=1), "unknown key extra"),
    ],
)
def test_every_manifest_key_is_checked_by_name(cache_dir, edit, named):
    _edit_manifest(cache_dir, edit)
    with pytest.raises(CacheError, match=rf"manifest\.json: {named}"):
        read_manifest(cache_dir)
    with pytest.raises(CacheError, match=named):
        ActivationReader(cache_dir, batch_size=64)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("tokens", [1500, 2500])  # resuming a complete cache, and extending it
def test_resuming_rewrites_a_damaged_shard(pristine, tiny_lm, tiny_lm_dir, tmp_path, damage, tokens, capsys):
    cache_dir = Path(shutil.copytree(pristine, tmp_path / "cache"))
    path = cache_dir / SHARD
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    build_cache(tiny_run_config(tiny_lm_dir, tmp_path, cache={"tokens": tokens}), tiny_lm, progress=False)
    assert f"{SHARD}" in capsys.readouterr().out  # says which shard it recomputes
    manifest = verify_cache(cache_dir, progress=False)
    assert (cache_dir / SHARD).read_bytes() == (pristine / SHARD).read_bytes()
    assert manifest["tokens"] >= tokens and manifest["complete"]
    listed = {shard["file"] for shard in manifest["shards"]}
    assert {p.name for p in cache_dir.glob("shard_*")} == listed  # nothing unlisted left behind
