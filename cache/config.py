"""What determines a cache: the [model], [data] and [cache] sections of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sae.data import DataConfig
from sae.lm import ModelConfig
from sae.typed_config import ConfigError


@dataclass
class CacheConfig:
    """The [cache] section: where, which hookpoints, how many tokens, how the shards are cut."""

    dir: str = "out/cache/gemma-3-270m_python-stdlib_ctx128"
    hookpoints: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    tokens: int = 1_000_000
    """Contexts are cached until this many tokens are written (BOS positions excluded when exclude_bos)."""
    batch_contexts: int = 16
    """Contexts per forward pass."""
    shard_contexts: int = 256
    """Contexts per shard file (256 x 127 tokens: ~42 MB in bf16 at d 640); a multiple of batch_contexts,
    so that a resumed run batches identically."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    exclude_bos: bool = True
    """Leave the BOS position out: its residual norm in Gemma is ~5e4, far from every other token."""

    def __post_init__(self) -> None:
        if not self.hookpoints:
            raise ConfigError("cache.hookpoints: at least one hookpoint is needed")
        if self.shard_contexts % self.batch_contexts:
            raise ConfigError(
                f"cache.shard_contexts ({self.shard_contexts}) must be a multiple of "
                f"cache.batch_contexts ({self.batch_contexts})"
            )


@dataclass
class CachingConfig:
    """Everything that determines a cache's contents: what `build_cache` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    @property
    def tokens_per_context(self) -> int:
        """Tokens stored per context: the context without its BOS when exclude_bos."""
        return self.data.context_size - (1 if self.cache.exclude_bos else 0)
