"""The activation-caching stage: writer (`build_cache`), manifest checks, and the training reader."""

from cache.manifest import CacheError, read_manifest, verify_cache
from cache.reader import ActivationReader, MultiHookpointReader, load_activations
from cache.writer import build_cache

__all__ = [
    "ActivationReader",
    "MultiHookpointReader",
    "CacheError",
    "build_cache",
    "load_activations",
    "read_manifest",
    "verify_cache",
]
