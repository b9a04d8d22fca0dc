"""`pip install` of the built wheel (not editable) into a fresh virtual environment works: the console
scripts answer, a saved SAE loads, and the package data (ground truths, dashboard assets) is inside.

The fresh environment reuses this one's dependencies through a .pth line (installing torch and the rest
again would take minutes and gigabytes); the wheel itself is installed with --no-deps, and every check
runs from a directory outside the repository, asserting that `sae` is imported from the fresh install.
"""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

import sae

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv holding the wheel built from this checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a clean copy of the tracked files, so the build writes nothing into the repo
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = work.glob("sae_toolkit-*.whl")
    env = work / "venv"
    venv.create(env, with_pip=True)
    (site_packages,) = env.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([env / "bin" / "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True)
    return env / "bin"


def run(bin_dir: Path, *command: str, cwd: Path) -> str:
    result = subprocess.run(
        [str(bin_dir / command[0]), *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_console_scripts_answer(installed, tmp_path):
    for script in ("sae-train", "sae-cache", "sae-analyze"):
        assert "usage:" in run(installed, script, "--help", cwd=tmp_path)
    assert 'name = "gemma-3-270m"' in run(installed, "sae-train", "--print-config", cwd=tmp_path)
    for subcommand in ("eval", "steer", "dashboard", "circuits", "autointerp"):
        assert "usage:" in run(installed, "sae-analyze", subcommand, "--help", cwd=tmp_path)


def test_the_installed_package_loads_an_sae_and_carries_its_data(installed, tmp_path):
    model = sae.SparseAutoencoder.from_config(
        sae.SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2), seed=0
    )
    model.save(tmp_path / "sae")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    torch.save({"x": x, "x_hat": model(x).detach()}, tmp_path / "io.pt")
    script = """
import sys, torch, sae
from pathlib import Path
from sae.analysis.circuits import ground_truth
from sae.analysis.dashboard import ASSETS
assert "site-packages" in sae.__file__, sae.__file__
io = torch.load("io.pt")
assert torch.allclose(sae.load("sae")(io["x"]), io["x_hat"])
assert ground_truth.head_mask("gpt2-small/ioi/acdc", 12, 12).sum() > 0
assert (ASSETS / "index.html").is_file()
print("ok")
"""
    assert run(installed, "python", "-c", script, cwd=tmp_path).strip() == "ok"
