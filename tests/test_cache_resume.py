"""Kill a real `python -m cache` process with SIGKILL mid-run, resume it, compare with an uninterrupted
run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file
from tiny_lm import tiny_run_config

from cache import build_cache, read_manifest, verify_cache

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"tokens": 20_000, "batch_contexts": 16, "shard_contexts": 32}


def _write_config(path: Path, model_dir: Path, cache_dir: Path) -> None:
    cache = "\n".join(f"{k} = {v}" for k, v in SETTINGS.items())
    path.write_text(
        f'[model]\nname = "{model_dir}"\ndtype = "float32"\n[data]\ncontext_size = 32\n'
        f'[cache]\ndir = "{cache_dir}"\n'
        f'hookpoints = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]\n{cache}\n'
    )


def _listed_shards(cache_dir: Path) -> int:
    try:
        return len(json.loads((cache_dir / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_lm, tiny_lm_dir, tmp_path):
    config_path = tmp_path / "cache.toml"
    _write_config(config_path, tiny_lm_dir, tmp_path / "killed")
    command = [sys.executable, "-m", "cache", str(config_path)]

    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _listed_shards(tmp_path / "killed") < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = read_manifest(tmp_path / "killed")
    assert process.returncode == -signal.SIGKILL and not interrupted["complete"], (
        "the run ended before the kill"
    )

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    killed = verify_cache(tmp_path / "killed", progress=False)
    assert killed["shards"][: len(interrupted["shards"])] == interrupted["shards"]  # kept, not redone

    config = tiny_run_config(
        tiny_lm_dir,
        tmp_path,
        cache={
            **SETTINGS,
            "dir": str(tmp_path / "straight"),
            "hookpoints": ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"],
        },
    )
    straight = read_manifest(build_cache(config, tiny_lm, progress=False))

    assert killed["tokens"] == straight["tokens"] and killed["contexts"] == straight["contexts"]
    assert [s["sha256"] for s in killed["shards"]] == [
        s["sha256"] for s in straight["shards"]
    ]  # identical bytes
    for shard in straight["shards"]:
        a, b = (
            load_file(tmp_path / "killed" / shard["file"]),
            load_file(tmp_path / "straight" / shard["file"]),
        )
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert killed["norm_stats"] == straight["norm_stats"]
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # no temp file left behind once resumed
