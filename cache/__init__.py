"""The activation-caching stage: `build_cache` (writer), manifest checks, and the training reader."""

from cache.config import CacheConfig, CachingConfig
from cache.manifest import CacheError, read_manifest, verify_cache
from cache.reader import ActivationReader, MultiHookpointReader, PairedReader, load_activations
from cache.writer import build_cache

__all__ = [
    "ActivationReader",
    "CacheConfig",
    "CacheError",
    "CachingConfig",
    "MultiHookpointReader",
    "PairedReader",
    "build_cache",
    "load_activations",
    "read_manifest",
    "verify_cache",
]
