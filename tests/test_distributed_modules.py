"""Module distribution under a real torchrun (gloo, 2 processes): one SAE per hookpoint, each on its own
rank, activations of every rank's share of the cache routed to the owner."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_run_config

import sae
from cache import ActivationReader, MultiHookpointReader, build_cache
from sae.routing import assign_owners

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "dist_modules.py"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
BATCH = 64
SAE_NAME = "{}_topk_k4_64"


def run_script(cache_dir: Path, out: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(cache_dir),
        str(out),
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def weights(out: Path, hookpoint: str) -> dict[str, torch.Tensor]:
    model = sae.load(out / hookpoint / SAE_NAME.format(hookpoint))
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def cache_dir(tiny_lm, tiny_lm_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("modules")
    config = tiny_run_config(
        tiny_lm_dir, tmp, cache={"hookpoints": HOOKS, "tokens": 6000}
    )  # bf16, as by default
    return build_cache(config, tiny_lm, progress=False)


@pytest.fixture(scope="module")
def distributed_run(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modules_out") / "two"
    result = run_script(cache_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 trained ['blocks.0.hook_resid_post']" in result.stdout  # each rank owns one SAE
    assert "rank 1 trained ['blocks.1.hook_resid_post']" in result.stdout
    return out


class BothRanksRows:
    """What the owner of `hookpoint` sees per step, read in one process: rank 0's rows, then rank 1's."""

    def __init__(self, cache_dir: Path, hookpoint: str):
        self.readers = [
            ActivationReader(cache_dir, hookpoint, batch_size=BATCH, seed=0, rank=r, world_size=2)
            for r in range(2)
        ]

    def __len__(self) -> int:
        return len(self.readers[0])

    def batches(self, start=0):
        for parts in zip(*(r.batches(start) for r in self.readers)):
            yield torch.cat(parts)


@pytest.fixture
def one_thread():
    """The torchrun workers' thread count, so that the in-process reference is bitwise comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_each_sae_equals_training_it_alone_on_the_same_tokens(
    cache_dir, distributed_run, tmp_path, one_thread
):
    for hookpoint in HOOKS:
        source = BothRanksRows(cache_dir, hookpoint)
        cfg = sae.SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint=hookpoint)
        train_cfg = sae.TrainConfig(
            batch_size=BATCH,
            total_tokens=len(source) * 2 * BATCH,
            out_dir=str(tmp_path / hookpoint),
            compute_dtype="float32",
            log_every=4,
            checkpoint_every=4,
            dead_after_tokens=2048,
            lr=2e-3,
        )
        sae.Trainer([cfg], train_cfg, dist=sae.distributed.Distributed()).fit(source)
        alone = weights(tmp_path, hookpoint)
        routed = weights(distributed_run, hookpoint)
        for name, w in alone.items():
            err = ((routed[name] - w).norm() / w.norm()).item()
            print(f"{hookpoint} {name}: relative difference {err:.2e}")
            assert err < 1e-5, (
                hookpoint,
                name,
                err,
            )  # the same rows in the same order: only summation order may differ


def test_multi_hookpoint_reader_serves_the_rows_of_single_readers(cache_dir):
    multi = MultiHookpointReader(
        cache_dir, HOOKS, batch_size=BATCH, seed=3, rank=1, world_size=2, window_shards=2
    )
    singles = [
        ActivationReader(cache_dir, h, batch_size=BATCH, seed=3, rank=1, world_size=2, window_shards=2)
        for h in HOOKS
    ]
    assert len(multi) == len(singles[0]) and multi.widths == {h: 32 for h in HOOKS}
    for batch, *rows in zip(multi.batches(3), *(s.batches(3) for s in singles)):
        for h, r in zip(HOOKS, rows):
            assert torch.equal(batch[h], r)


def test_owners_balance_cost():
    assert assign_owners(["a", "b"], {"a": 1, "b": 1}, 2) == {"a": 0, "b": 1}
    assert assign_owners(["a", "b", "c"], {"a": 1, "b": 4, "c": 2}, 2) == {"a": 1, "b": 0, "c": 1}
    assert assign_owners(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, 4) == {"a": 0, "b": 1, "c": 2}


@pytest.mark.slow
def test_resume_after_sigterm_is_exact(cache_dir, distributed_run, tmp_path):
    stopped = run_script(cache_dir, tmp_path, "--stop-at", "7")
    assert stopped.returncode != 0 and "checkpoints saved" in stopped.stderr, stopped.stderr[-3000:]
    resumed = run_script(cache_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 2  # each owner from its hookpoint's checkpoint
    for hookpoint in HOOKS:
        a, b = weights(distributed_run, hookpoint), weights(tmp_path, hookpoint)
        assert all(torch.equal(a[n], b[n]) for n in a), hookpoint


@pytest.mark.slow
def test_a_kill_between_two_ranks_checkpoints_resumes_from_the_last_common_step(
    cache_dir, distributed_run, tmp_path
):
    failed = run_script(cache_dir, tmp_path, "--fail-on-rank", "1", "--fail-checkpoint-at", "8")
    assert failed.returncode != 0 and "injected failure writing the checkpoint of step 8" in failed.stderr
    ahead = tmp_path / HOOKS[0]  # rank 0 saved step 8; rank 1 died with its step-4 checkpoint set aside
    assert json.loads((ahead / "checkpoint" / "state.json").read_text())["step"] == 8
    assert (
        not (tmp_path / HOOKS[1] / "checkpoint").exists()
        and (tmp_path / HOOKS[1] / "checkpoint.previous").exists()
    )
    resumed = run_script(cache_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{HOOKS[0]}: back to the checkpoint of step 4" in resumed.stdout
    for hookpoint in HOOKS:
        a, b = weights(distributed_run, hookpoint), weights(tmp_path, hookpoint)
        assert all(torch.equal(a[n], b[n]) for n in a), hookpoint
    assert not list(tmp_path.glob("*/checkpoint.previous"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, message",
    [
        ((), "rank 1: injected read failure at batch 5"),  # while routing: rank 0 waits in a gather
        (("--fail-at-save",), "rank 1: injected failure while saving"),  # rank 0 waits at the final barrier
    ],
)
def test_a_failing_rank_fails_the_job_promptly_with_its_error(cache_dir, tmp_path, where, message):
    started = time.monotonic()
    result = run_script(cache_dir, tmp_path, "--fail-on-rank", "1", *where, timeout=180)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    assert message in result.stderr
    assert seconds < 90, (
        f"{seconds:.0f} s"
    )  # the process group's timeout is 10 minutes: this is torchrun stopping it


def test_run_config_one_sae_per_hookpoint(tiny_lm_dir, tmp_path):
    from sae.typed_config import ConfigError

    config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"hookpoints": HOOKS}, sae={"hookpoints": "all"})
    assert config.one_sae_per_hookpoint and config.sae_hookpoints == HOOKS
    assert config.sae_config(d_in=32, hookpoint=HOOKS[1]).hookpoint == HOOKS[1]
    with pytest.raises(ConfigError, match="not cached"):
        tiny_run_config(
            tiny_lm_dir,
            tmp_path,
            cache={"hookpoints": HOOKS},
            sae={"hookpoints": ["blocks.5.hook_resid_post"]},
        )
    with pytest.raises(ConfigError, match=r"leave out sae\.hookpoint"):
        tiny_run_config(
            tiny_lm_dir,
            tmp_path,
            cache={"hookpoints": HOOKS},
            sae={"hookpoints": "all", "hookpoint": HOOKS[0]},
        )
    with pytest.raises(ConfigError, match="distinct"):
        tiny_run_config(
            tiny_lm_dir, tmp_path, cache={"hookpoints": HOOKS}, sae={"hookpoints": [HOOKS[0], HOOKS[0]]}
        )


def test_module_trainer_in_one_process_is_a_trainer_per_hookpoint(cache_dir, tmp_path, one_thread):
    from sae.distributed import Distributed
    from sae.routing import ModuleTrainer

    train_cfg = sae.TrainConfig(
        batch_size=BATCH,
        out_dir=str(tmp_path / "modules"),
        compute_dtype="float32",
        log_every=4,
        dead_after_tokens=2048,
        lr=2e-3,
    )
    cfgs = {h: [sae.SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint=h)] for h in HOOKS}
    trained = ModuleTrainer(cfgs, train_cfg, Distributed()).fit(
        MultiHookpointReader(cache_dir, HOOKS, batch_size=BATCH)
    )
    assert list(trained) == HOOKS  # one process owns every hookpoint; routing is the identity
    for h in HOOKS:
        reference = sae.Trainer(
            cfgs[h], replace(train_cfg, out_dir=str(tmp_path / "alone" / h)), Distributed()
        )
        (alone,) = reference.fit(ActivationReader(cache_dir, h, batch_size=BATCH))
        for (name, a), b in zip(alone.named_parameters(), trained[h][0].parameters()):
            assert torch.equal(a, b), (h, name)
