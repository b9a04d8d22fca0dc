"""Data-parallel training under a real torchrun with the gloo backend (NCCL is the GPU path)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sae

SCRIPT = Path(__file__).parent / "scripts" / "dist_train.py"
pytestmark = pytest.mark.slow


def run(out: Path, batch_size: int, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(SCRIPT), str(out), str(batch_size), *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def weights(out: Path) -> dict[str, torch.Tensor]:
    model = sae.load(str(out / "topk_k4_128"))
    return {name: p.detach() for name, p in model.named_parameters()}


def test_two_ranks_match_one_process_on_the_same_tokens(tmp_path):
    two = run(tmp_path / "two", 256)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(tmp_path / "one", 512, nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    # Rank r of 2 takes the r-th half of each 512-row global batch, so both runs see the same tokens
    # per step. They differ only in FVU's normaliser (each rank's batch variance vs the global one).
    for name, w in weights(tmp_path / "one").items():
        err = ((weights(tmp_path / "two")[name] - w).norm() / w.norm()).item()
        print(f"{name}: relative difference {err:.2e}")
        assert err < 0.01, (name, err)  # measured: 0.2-0.3 %
    assert not (tmp_path / "two" / "checkpoint.tmp").exists()
    # Firing counts are summed over ranks, and so are the tokens they are divided by.
    for out in ("one", "two"):
        assert json.loads((tmp_path / out / "topk_k4_128" / "metrics.json").read_text())[
            "l0"
        ] == pytest.approx(4)


def test_a_failing_rank_fails_the_job_with_its_error(tmp_path):
    result = run(tmp_path, 256, "--nan-on-rank", "1")
    assert result.returncode != 0
    assert "batch 10 (tokens 5,120 onward): 1 NaN/inf values in rows [0]" in result.stderr
    assert "rank [1] met bad data" in result.stderr  # rank 0 stops too, instead of waiting on rank 1


def test_rank_0_failing_to_save_fails_the_job_promptly(tmp_path):
    # The other rank waits at the barrier after the checkpoint; torchrun stops it when rank 0 exits.
    started = time.monotonic()
    result = run(tmp_path, 256, "--fail-save-at-step", "16")
    seconds = time.monotonic() - started
    assert result.returncode != 0
    assert "rank 0: injected failure writing the checkpoint of step 16" in result.stderr
    assert seconds < 90, f"{seconds:.0f} s"  # the process group's own timeout would take 10 minutes


def test_resume_after_sigterm_under_torchrun_is_exact(tmp_path):
    uninterrupted = run(tmp_path / "a", 256)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    stopped = run(tmp_path / "b", 256, "--stop-at", "13")
    assert stopped.returncode != 0 and "checkpoint saved" in stopped.stderr
    resumed = run(tmp_path / "b", 256)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name
