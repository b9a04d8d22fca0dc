"""Sparse autoencoders on language-model activations: cache, train, load, analyse.

import sae
cfg = sae.SAEConfig(architecture="topk", d_in=640, d_sae=8192, k=32)
model = sae.train(activations, sae.TrainConfig(total_tokens=10_000_000), cfg)
model.save("out/my_sae"); model = sae.load("out/my_sae")
"""

from .batches import BatchSource, TensorBatches
from .config import ConfigError, SAEConfig, TrainConfig
from .kernels import SparseCode
from .model import SparseAutoencoder
from .trainer import Trainer, TrainingError, train


def load(path: str, device: str = "cpu") -> SparseAutoencoder:
    """Load an SAE from a local path or `hf://org/repo[/subpath]`: ours, SAELens, sparsify, Gemma Scope,
    OpenAI or dictionary_learning, detected from the files (see `sae.formats`)."""
    from . import formats

    return formats.load(path, device=device)


__all__ = [
    "BatchSource",
    "ConfigError",
    "SAEConfig",
    "SparseAutoencoder",
    "SparseCode",
    "TensorBatches",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "load",
    "train",
]
__version__ = "0.1.0"
