"""The run config `sae-train` (`python train.py`) and `sae-cache` read: [model] [data] [cache] [sae] [train]
[eval], each section a dataclass read strictly, so an unknown or mistyped key fails with its dotted name.

The defaults below are the default job (Gemma 3 270M, the offline corpus, a TopK SAE on
`blocks.6.hook_resid_post`); `sae-train --print-config` writes them out as a TOML file to start from.
A config file or `--set section.key=value` changes only the keys it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cache import CachingConfig
from sae.config import SAEConfig, Similarity, TrainableArchitecture, TrainConfig, check_d_sae_and_k
from sae.typed_config import ConfigError, from_dict, load_toml, to_dict, to_toml


@dataclass
class SAESection:
    """The [sae] section: the `SAEConfig` of the SAE to train, less what the model and the cache tell
    (d_in, model_name, hook_layout), plus `hookpoints` to train one such SAE per hookpoint."""

    architecture: TrainableArchitecture = "topk"
    d_sae: int = 8192
    k: int | None = 32
    """Per architecture, as `SAEConfig.k`: active latents (topk), their batch mean (batchtopk, matryoshka),
    the target L0 (jumprelu), a cap (topafa)."""
    similarity: Similarity | None = None
    """Codebook SAEs: how tokens choose codes (None: SAEConfig's default)."""
    prefixes: list[int] | None = None
    """Matryoshka SAEs: nested prefix sizes ending at d_sae (None: SAEConfig's default)."""
    hookpoint: str | None = None
    """The cached hookpoint to train on; None: the first of cache.hookpoints."""
    hookpoints: list[str] | Literal["all"] | None = None
    """Several hookpoints ("all": every cached one): one SAE each, trained at once (under torchrun the
    SAEs are spread over the ranks). Excludes `hookpoint` and `hook_head_index`."""
    hook_head_index: int | None = None
    """Per-head hooks (hook_z): the one head to read; None: all heads concatenated."""
    output_hookpoint: str | None = None
    """Train a transcoder instead: from `hookpoint` (the input site) to this cached hookpoint, e.g.
    `blocks.6.mlp.hook_in` -> `blocks.6.mlp.hook_out` (cache both: cache.hookpoints)."""
    skip_connection: bool = False
    """Transcoders: add a linear skip path x @ W_skip^T (a skip transcoder, Paulo et al. 2025)."""

    def __post_init__(self) -> None:
        check_d_sae_and_k(self.architecture, self.d_sae, self.k, "sae")
        if self.skip_connection and self.output_hookpoint is None:
            raise ConfigError("sae.skip_connection is for transcoders: set sae.output_hookpoint too")
        if self.output_hookpoint is not None and (self.hookpoints, self.hook_head_index) != (None, None):
            raise ConfigError(
                "sae.output_hookpoint trains one transcoder on all of its input site: leave out "
                "sae.hookpoints and sae.hook_head_index"
            )
        if self.hookpoints is not None:
            if self.hookpoint is not None or self.hook_head_index is not None:
                raise ConfigError(
                    "sae.hookpoints trains one SAE per hookpoint: leave out sae.hookpoint and "
                    "sae.hook_head_index"
                )
            if isinstance(self.hookpoints, list) and (
                not self.hookpoints or len(set(self.hookpoints)) < len(self.hookpoints)
            ):
                raise ConfigError(f"sae.hookpoints: expected distinct hookpoint names, got {self.hookpoints}")


@dataclass
class EvalConfig:
    """The [eval] section: the model-in-the-loop evaluation after training."""

    enabled: bool = True
    tokens: int = 16_384
    """Held-out tokens: the contexts right after the cached ones, in the same stream."""
    batch_contexts: int = 4
    """Contexts per forward; Gemma's 262k-token vocabulary makes logits large, so keep it small."""


@dataclass
class RunConfig(CachingConfig):
    """A whole run: the caching sections ([model] [data] [cache]) and [sae] [train] [eval]."""

    sae: SAESection = field(default_factory=SAESection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="out/default"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        cached = self.cache.hookpoints
        output = [self.sae.output_hookpoint] if self.sae.output_hookpoint else []
        unknown = [h for h in self.sae_hookpoints + output if h not in cached]
        if unknown:
            raise ConfigError(f"sae.hookpoint(s) {unknown} are not cached; cache.hookpoints = {cached}")

    @property
    def one_sae_per_hookpoint(self) -> bool:
        return self.sae.hookpoints is not None

    @property
    def sae_hookpoints(self) -> list[str]:
        """The hookpoints that get an SAE: sae.hookpoints ("all": every cached one), else [sae_hookpoint]."""
        if self.sae.hookpoints == "all":
            return list(self.cache.hookpoints)
        return list(self.sae.hookpoints) if self.sae.hookpoints else [self.sae_hookpoint]

    @property
    def sae_hookpoint(self) -> str:
        """Where the (single) SAE reads: sae.hookpoint, by default the first cached hookpoint."""
        return self.sae.hookpoint or self.cache.hookpoints[0]

    def sae_config(
        self, d_in: int, hook_layout: str = "flat", hookpoint: str | None = None, d_out: int | None = None
    ) -> SAEConfig:
        """The [sae] section completed by the model and the cache (for `hookpoint` when there are several;
        a transcoder's output width `d_out`)."""
        given = {
            "similarity": self.sae.similarity,
            "hook_head_index": self.sae.hook_head_index,
            "prefixes": self.sae.prefixes,
        }
        return SAEConfig(
            architecture=self.sae.architecture,
            d_in=d_in,
            d_sae=self.sae.d_sae,
            k=self.sae.k,
            model_name=self.model.name,
            hookpoint=hookpoint or self.sae_hookpoints[0],
            hook_layout=hook_layout,
            transcoder=self.sae.output_hookpoint is not None,
            d_out=d_out,
            output_hookpoint=self.sae.output_hookpoint,
            skip_connection=self.sae.skip_connection,
            **{key: value for key, value in given.items() if value is not None},
        )


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The default run, changed by a TOML file's keys and then by `--set section.key=value` overrides."""
    return from_dict(RunConfig, load_toml(path, overrides), "config")


def run_config_toml(config: RunConfig) -> str:
    """`config` as the TOML file that reads back as it (None values are left out: they are defaults)."""
    return to_toml(to_dict(config))
