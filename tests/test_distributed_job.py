"""`torchrun --nproc_per_node 2 train.py CONFIG` and `torchrun ... -m cache CONFIG` on a tiny model, gloo,
2 processes.

Distributed caching must write the cache one process writes (same shard bytes), resume per rank after
a kill, and fail the job (not hang) when a rank fails.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sae
from cache import ActivationReader, read_manifest, verify_cache

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]


def torchrun(
    *args: str, timeout: int = 300, nproc: int = 2, **popen
) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **popen)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, model_dir: Path, tokens: int = 4000) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"""
[model]
name = "{model_dir}"
[data]
context_size = 32
[cache]
dir = "{tmp_path / "cache"}"
hookpoints = {json.dumps(HOOKS)}
tokens = {tokens}
batch_contexts = 8
shard_contexts = 16
[sae]
architecture = "topk"
d_sae = 64
k = 4
[train]
batch_size = 128
out_dir = "{tmp_path / "out"}"
checkpoint_every = 5
[eval]
tokens = 500
""")
    return path


def single_process_cache(config: Path, tmp_path: Path) -> dict:
    """The same cache from one `python -m cache` process, with the workers' thread count (bitwise
    comparable)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "cache", str(config), "--set", f"cache.dir={tmp_path / 'single'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_manifest(tmp_path / "single")


def test_train_py_under_torchrun_caches_trains_and_evaluates_once(tmp_path, tiny_lm_dir):
    config = write_config(tmp_path, tiny_lm_dir)
    result = torchrun("train.py", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("CE loss recovered") == 1  # rank 0 alone evaluates and reports
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval"]["l0"] == pytest.approx(4, abs=0.01)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "blocks.1.hook_resid_post_topk_k4_64",
        "checkpoint",
        "metrics.jsonl",
        "report.json",
    ]
    # Each rank cached its own shards; merged, they are the cache one process writes, byte for byte.
    merged = verify_cache(tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("manifest.part*"))
    single = single_process_cache(config, tmp_path)
    assert merged["shards"] == single["shards"] and merged["norm_stats"] == single["norm_stats"]
    # Data parallel from the sharded reader: both ranks' rows count, 2 x 128 per step.
    state = json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())
    steps = len(ActivationReader(tmp_path / "cache", HOOKS[0], batch_size=128, rank=0, world_size=2))
    assert state["step"] == steps and state["tokens"] == steps * 256
    metrics = json.loads(
        (tmp_path / "out" / "blocks.1.hook_resid_post_topk_k4_64" / "metrics.json").read_text()
    )
    assert metrics["tokens"] == state["tokens"]
    assert sae.load(tmp_path / "out" / "blocks.1.hook_resid_post_topk_k4_64").cfg.d_in == 32


def _parts_listing(cache_dir: Path) -> dict[str, list]:
    listing = {}
    for path in cache_dir.glob("manifest.part*of2.json"):
        try:
            listing[path.name] = json.loads(path.read_text())["shards"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return listing


def test_distributed_cache_resumes_per_rank_after_a_kill(tmp_path, tiny_lm_dir):
    config = write_config(tmp_path, tiny_lm_dir, tokens=30_000)
    job = torchrun("-m", "cache", str(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while job.poll() is None and time.monotonic() < deadline:
        listing = _parts_listing(tmp_path / "cache")
        if len(listing) == 2 and all(len(shards) >= 2 for shards in listing.values()):
            break
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    job.wait()
    before = _parts_listing(tmp_path / "cache")
    assert len(before) == 2 and not (tmp_path / "cache" / "manifest.json").exists(), (
        "the job ended before the kill"
    )

    resumed = torchrun("-m", "cache", str(config))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    merged = verify_cache(tmp_path / "cache", progress=False)
    by_file = {s["file"]: s for s in merged["shards"]}
    for shards in before.values():  # each rank kept what it had listed
        assert all(by_file[s["file"]] == s for s in shards)
    single = single_process_cache(config, tmp_path)
    assert merged["shards"] == single["shards"] and merged["complete"]
    assert not list((tmp_path / "cache").glob(".*.tmp")) and not list(
        (tmp_path / "cache").glob("manifest.part*")
    )


def test_a_rank_failing_while_caching_fails_the_job_with_its_error(tmp_path, tiny_lm_dir):
    config = write_config(tmp_path, tiny_lm_dir)
    (tmp_path / "cache" / "shard_000001.safetensors").mkdir(
        parents=True
    )  # rank 1's first shard cannot be written
    started = time.monotonic()
    result = torchrun("train.py", str(config), timeout=180)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    assert "writing a shard to" in result.stderr and "shard_000001.safetensors" in result.stderr
    assert seconds < 120, (
        f"the job took {seconds:.0f} s to fail"
    )  # rank 0 waits at the merge barrier, then is stopped
    assert not (tmp_path / "cache" / "manifest.json").exists()  # nothing merged from a failed job


def test_train_py_one_sae_per_hookpoint_spreads_them_over_the_ranks(tmp_path, tiny_lm_dir):
    config = write_config(tmp_path, tiny_lm_dir)
    result = torchrun("train.py", str(config), "--set", 'sae.hookpoints="all"')
    assert result.returncode == 0, result.stderr[-3000:]
    assert "owners: blocks.1.hook_resid_post -> rank 0, blocks.0.hook_resid_post -> rank 1" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["saes"]) == HOOKS and result.stdout.count("CE loss recovered") == 2
    for hookpoint, entry in report["saes"].items():
        assert (
            Path(entry["dir"]).parent == tmp_path / "out" / hookpoint
        )  # its SAE, checkpoint and metrics.jsonl
        assert (tmp_path / "out" / hookpoint / "checkpoint" / "state.json").is_file()
        assert entry["cfg"]["hookpoint"] == hookpoint and entry["eval"]["l0"] == pytest.approx(4, abs=0.01)
