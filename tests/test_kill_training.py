"""SIGKILL during training, checkpoints and the final save, then the same command again: the SAEs, their
cfg.json and metrics.json, and metrics.jsonl equal those of an uninterrupted run, and no temporary file
is left behind. The kills land at the Nth os.replace of the run (tests/scripts/kill_train.py), which is
where every atomic write becomes visible."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "kill_train.py"
SAES = ("topk_k4_128", "jumprelu_k4_128")
TIMINGS = ("train_seconds_this_run", "tokens_per_second_this_run")


def train(out: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), str(out)] + (
        [] if kill_at is None else ["--kill-at-replace", str(kill_at)]
    )
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def outputs(out: Path) -> dict:
    result = {"metrics.jsonl": (out / "metrics.jsonl").read_text().splitlines()}
    for name in SAES:
        metrics = json.loads((out / name / "metrics.json").read_text())
        result[name] = {
            "cfg": (out / name / "cfg.json").read_text(),
            "metrics": {k: v for k, v in metrics.items() if k not in TIMINGS},
            "weights": load_file(out / name / "sae.safetensors"),
        }
    return result


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".old")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = train(out)
    assert done.returncode == 0, done.stderr
    return outputs(out), int(done.stdout.split("replaces")[1])


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a.equal(b) if hasattr(a, "equal") else a == b


@pytest.mark.slow
@pytest.mark.parametrize("from_end", [*range(11), 20, 29, 37])  # 0-10: the final checkpoint and save
def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, from_end):
    expected, replaces = uninterrupted
    killed = train(tmp_path, kill_at=replaces - from_end)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert equal(outputs(tmp_path), expected)
    assert leftovers(tmp_path) == []
