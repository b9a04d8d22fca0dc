"""Sparse autoencoders on language-model activations: cache, train, load, analyse.

    import sae
    cfg = sae.SAEConfig(architecture="topk", d_in=640, d_sae=8192, k=32)
    model = sae.train(activations, sae.TrainConfig(total_tokens=10_000_000), cfg)
    model.save("out/my_sae"); model = sae.load("out/my_sae")

The names here are imported on first use, so that what the lower layers import (`sae.lm`, `sae.data`:
the caching stage reads them) does not load the trainer, and a command's `--help` answers at once.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sae.version import __version__

if TYPE_CHECKING:
    from torch import Tensor

    from sae.batches import BatchSource, TensorBatches
    from sae.config import SAEConfig, TrainConfig
    from sae.formats import export, load
    from sae.io import FormatError
    from sae.kernels import SparseCode
    from sae.model import SparseAutoencoder
    from sae.trainer import Trainer, TrainingError
    from sae.typed_config import ConfigError

_PUBLIC = {
    "BatchSource": "sae.batches",
    "TensorBatches": "sae.batches",
    "SAEConfig": "sae.config",
    "TrainConfig": "sae.config",
    "export": "sae.formats",
    "load": "sae.formats",
    "FormatError": "sae.io",
    "SparseCode": "sae.kernels",
    "SparseAutoencoder": "sae.model",
    "Trainer": "sae.trainer",
    "TrainingError": "sae.trainer",
    "ConfigError": "sae.typed_config",
}


def train(
    data: Tensor | BatchSource | Iterable[Tensor] | str | os.PathLike,
    train_cfg: TrainConfig,
    sae_cfg: SAEConfig,
) -> SparseAutoencoder:
    """Train one SAE on `data`: a tensor [tokens, d_in], a `BatchSource`, any iterable of [batch, d_in]
    tensors, or the directory of an activation cache (read at `sae_cfg.hookpoint`, by default the cache's
    first, and shared between ranks under torchrun). `sae.Trainer` trains several SAEs from one read."""
    from sae.device import resolve_device
    from sae.distributed import Distributed
    from sae.trainer import Trainer

    dist = Distributed.from_env(resolve_device(train_cfg.device).type)
    if isinstance(data, (str, os.PathLike)):
        from cache import ActivationReader

        data = ActivationReader(
            data,
            sae_cfg.hookpoint,
            batch_size=train_cfg.batch_size,
            seed=train_cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    return Trainer([sae_cfg], train_cfg, dist=dist).fit(data)[0]


def __getattr__(name: str) -> Any:
    """`sae.SAEConfig` and the other public names, and submodules such as `sae.formats`, on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        try:
            value = importlib.import_module(f"sae.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"sae.{name}":
                raise  # a submodule that exists but misses a dependency
            raise AttributeError(f"module 'sae' has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "BatchSource",
    "ConfigError",
    "FormatError",
    "SAEConfig",
    "SparseAutoencoder",
    "SparseCode",
    "TensorBatches",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "__version__",
    "export",
    "load",
    "train",
]
