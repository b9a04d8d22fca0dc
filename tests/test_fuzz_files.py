"""Random truncations and byte flips of every file the toolkit reads: a saved SAE folder, a cache shard, a
cache manifest and each released format's files. Each must end in a named error of the toolkit's own
types, or load to exactly what was saved; never a bare Python exception or a silently changed result.

Foreign formats carry no checksum, so a flipped byte inside one of their weights cannot be told from a
real weight: for them a changed load is allowed, a bare exception is not.

    python tests/test_fuzz_files.py --cases 200   # counts per target and outcome, without hypothesis
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import sae
from cache import ActivationReader, CacheError
from sae.formats import FormatError
from sae.typed_config import ConfigError, to_dict

NAMED_ERRORS = (ConfigError, FormatError, CacheError)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# --- mutations and outcomes ---------------------------------------------------------------------------


def mutate(folder: Path, file_index: int, kind: str, where: float, mask: int) -> str:
    """Truncate or flip one byte of one file of `folder` (files in name order); -> what was done."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    path = files[file_index % len(files)]
    data = bytearray(path.read_bytes())
    at = min(int(where * len(data)), max(len(data) - 1, 0))
    if kind == "truncate" or not data:
        path.write_bytes(bytes(data[:at]))
        return f"{path.name} truncated to {at} of {len(data)} bytes"
    data[at] ^= mask
    path.write_bytes(bytes(data))
    return f"{path.name} byte {at} of {len(data)} ^= {mask:#04x}"


def outcome(load: Callable[[Path], object], folder: Path, original: object) -> str:
    """'named error', 'equal', 'changed' or 'bare <ExceptionType>'."""
    try:
        loaded = load(folder)
    except NAMED_ERRORS:
        return "named error"
    except Exception as e:  # what the fuzzing is looking for
        return f"bare {type(e).__name__}"
    return "equal" if same(loaded, original) else "changed"


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.equal(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    return a == b


# --- targets: (build a pristine folder, load it, what may a mutation do) -------------------------------


def sae_state(model: sae.SparseAutoencoder) -> dict:
    return {"cfg": to_dict(model.cfg), **{n: p.detach() for n, p in model.named_parameters()}}


def ours(folder: Path) -> None:
    cfg = sae.SAEConfig(architecture="jumprelu", d_in=16, d_sae=48, k=4, hookpoint="blocks.0.hook_resid_post")
    sae.SparseAutoencoder.from_config(cfg, seed=0).save(folder)


def copy_fixture(name: str) -> Callable[[Path], None]:
    return lambda folder: shutil.copytree(FIXTURES / name, folder, dirs_exist_ok=True)


def sparsify(folder: Path) -> None:
    cfg = sae.SAEConfig(architecture="topk", d_in=16, d_sae=48, k=4, hookpoint="blocks.0.hook_resid_post")
    sae.formats.export(sae.SparseAutoencoder.from_config(cfg, seed=1), folder, "sparsify")


def saelens(folder: Path) -> None:
    cfg = sae.SAEConfig(architecture="jumprelu", d_in=16, d_sae=48, hookpoint="blocks.0.hook_resid_post")
    model = sae.SparseAutoencoder.from_config(cfg, seed=2)
    with torch.no_grad():
        model.threshold.uniform_(0, 0.5)
    sae.formats.export(model, folder, "saelens")


def gemma_scope(folder: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {"W_enc": (16, 48), "W_dec": (48, 16), "b_enc": (48,), "b_dec": (16,), "threshold": (48,)}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / "params.npz", **{k: rng.standard_normal(s).astype(np.float32) for k, s in arrays.items()}
    )


OPENAI_FILE = "resid_post_mlp_v5_32k/6.pt"  # the release's path names the hookpoint


def openai(folder: Path) -> None:
    g = torch.Generator().manual_seed(4)
    state = {
        "pre_bias": torch.randn(16, generator=g),
        "encoder.weight": torch.randn(48, 16, generator=g),
        "latent_bias": torch.randn(48, generator=g),
        "decoder.weight": torch.randn(16, 48, generator=g),
        "activation": "TopK",
        "activation_state_dict": {"k": 4, "postact_fn": "ReLU"},
    }
    (folder / "resid_post_mlp_v5_32k").mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / OPENAI_FILE)


def load_sae(folder: Path) -> dict:
    return sae_state(sae.formats.load(folder))


def load_openai(folder: Path) -> dict:
    return sae_state(sae.formats.load(folder / OPENAI_FILE))


# name: (build, load, checksummed: a changed load is a failure)
SAE_TARGETS: dict[str, tuple[Callable[[Path], None], Callable[[Path], object], bool]] = {
    "ours": (ours, load_sae, True),
    "sparsify": (sparsify, load_sae, False),
    "saelens": (saelens, load_sae, False),
    "gemma_scope": (gemma_scope, load_sae, False),
    "openai": (openai, load_openai, False),
    **{
        f"dictionary_learning/{kind}": (copy_fixture(f"dictionary_learning/{kind}"), load_sae, False)
        for kind in ("standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
    },
}


def read_cache(folder: Path) -> dict:
    reader = ActivationReader(folder, batch_size=64, num_workers=1)
    return {"manifest": reader.manifest, "acts": [reader.read_shard(i) for i in range(len(reader.shards))]}


class Pristine:
    """One pristine copy of each target, built once; `case` runs one mutation in a scratch copy."""

    def __init__(self, root: Path, cache_dir: Path | None = None):
        self.root, self.originals, self.loads = root, {}, {}
        for name, (build, load, _) in SAE_TARGETS.items():
            folder = root / name
            build(folder)
            self.originals[name], self.loads[name] = load(folder), load
        if cache_dir is not None:
            shards = sorted(p.name for p in cache_dir.glob("shard_*.safetensors"))
            for name, keep in (("cache_shard", shards[:1]), ("cache_manifest", ["manifest.json"])):
                self.originals[name], self.loads[name] = read_cache(cache_dir), read_cache
                self.mutable = getattr(self, "mutable", {}) | {name: keep}
            self.cache_dir = cache_dir

    def case(self, target: str, file_index: int, kind: str, where: float, mask: int) -> tuple[str, str]:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "target"
            if target.startswith("cache_"):
                shutil.copytree(self.cache_dir, folder)
                mutable = [folder / name for name in self.mutable[target]]
                hidden = Path(scratch) / "mutable"
                hidden.mkdir()
                for path in mutable:  # mutate only the target's files: move them aside and back
                    shutil.move(path, hidden / path.name)
                done = mutate(hidden, file_index, kind, where, mask)
                for path in mutable:
                    shutil.move(hidden / path.name, path)
            else:
                shutil.copytree(self.root / target, folder)
                done = mutate(folder, file_index, kind, where, mask)
            return done, outcome(self.loads[target], folder, self.originals[target])


def checksummed(target: str) -> bool:
    return target.startswith("cache_") or SAE_TARGETS[target][2]


# --- the tests ------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CASES_PER_TARGET = 300


@pytest.fixture(scope="module")
def pristine(tiny_lm, tiny_lm_dir, tmp_path_factory):
    from cache.writer import build_cache
    from tests.tiny_lm import tiny_run_config

    config = tiny_run_config(tiny_lm_dir, tmp_path_factory.mktemp("fuzz_cache"), cache={"tokens": 600})
    cache_dir = build_cache(config, tiny_lm, progress=False)
    return Pristine(tmp_path_factory.mktemp("fuzz_targets"), cache_dir)


@pytest.mark.parametrize("target", [*SAE_TARGETS, "cache_shard", "cache_manifest"])
def test_mutated_files_give_a_named_error_or_the_same_load(pristine, target):
    @settings(
        max_examples=CASES_PER_TARGET,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        file_index=st.integers(0, 7),
        kind=st.sampled_from(["truncate", "flip"]),
        where=st.floats(0, 1, exclude_max=True),
        mask=st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF]),
    )
    def check(file_index, kind, where, mask):
        done, result = pristine.case(target, file_index, kind, where, mask)
        allowed = {"named error", "equal"} | (set() if checksummed(target) else {"changed"})
        assert result in allowed, f"{target}: {done} -> {result}"

    check()


# --- counts, for the record ----------------------------------------------------------------------------


def main(cases: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cache.writer import build_cache
    from sae.lm import load_model
    from tests.tiny_lm import make_tiny_lm, tiny_run_config

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_lm(Path(tmp) / "model")
        cache_dir = build_cache(
            tiny_run_config(model_dir, Path(tmp) / "cache", cache={"tokens": 600}),
            load_model(str(model_dir)),
            progress=False,
        )
        pristine = Pristine(Path(tmp) / "targets", cache_dir)
        rng = random.Random(0)
        for target in [*SAE_TARGETS, "cache_shard", "cache_manifest"]:
            counts: Counter[str] = Counter()
            for _ in range(cases):
                args = (
                    rng.randrange(8),
                    rng.choice(["truncate", "flip"]),
                    rng.random(),
                    1 << rng.randrange(8),
                )
                counts[pristine.case(target, *args)[1]] += 1
            print(f"{target}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()), flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=200)
    main(parser.parse_args().cases)
