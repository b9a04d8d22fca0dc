"""Typed configuration: dataclasses read strictly from dicts, TOML files and `--set a.b=c` overrides.

Every config is a frozen-in-spirit dataclass; `from_dict` rejects unknown keys and wrong types with a
message naming the key and listing the valid ones, so a typo in a TOML file never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key or value that is not what the toolkit expects."""


# Trainable architectures, then the ones we only load from other libraries (inference and analysis).
TRAINABLE_ARCHITECTURES = ("topk", "relu", "codebook")
LOAD_ONLY_ARCHITECTURES = ("jumprelu", "groupmax", "gated")
Architecture = Literal["topk", "relu", "codebook", "jumprelu", "groupmax", "gated"]


@dataclass
class SAEConfig:
    """What an SAE is: enough to rebuild it and to know where it reads activations from."""

    architecture: Architecture
    d_in: int
    d_sae: int
    k: int | None = None
    """Active latents per token (topk, groupmax) or codes per token (codebook); informative for others."""
    similarity: Literal["inner", "cosine"] = "cosine"
    """How the codebook SAE chooses codes: cosine similarity with its keys (rebuilt synthetic data with
    FVU 0.42 where the inner product reached 0.60), or the inner product."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (false for Gemma Scope's JumpReLU SAEs)."""
    input_norm: Literal["none", "layernorm"] = "none"
    """Per-token LayerNorm of the input, undone after decoding (OpenAI's TopK SAEs)."""
    skip_connection: bool = False
    """A linear skip path x @ W_skip^T added to the output (sparsify's transcoders and skip SAEs)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the weights."""
    # Where the activations come from; optional so that SAEs on synthetic data need none of it.
    model_name: str | None = None
    hookpoint: str | None = None
    """transformer-lens hook name, e.g. `blocks.6.hook_resid_post`."""
    hook_layout: Literal["flat", "heads"] = "flat"
    """`heads`: the hook yields [..., n_heads, d_head] (hook_z), flattened to d_in = n_heads * d_head."""
    hook_head_index: int | None = None
    """For per-head hooks, the one head this SAE reads (SAELens's hook_head_index)."""
    source_format: str = "sae"
    """The format the weights were loaded from ("sae" for ours)."""

    def __post_init__(self) -> None:
        if self.architecture not in TRAINABLE_ARCHITECTURES + LOAD_ONLY_ARCHITECTURES:
            raise ConfigError(
                f"unknown SAE architecture {self.architecture!r}; "
                f"known: {', '.join(TRAINABLE_ARCHITECTURES + LOAD_ONLY_ARCHITECTURES)}"
            )
        for name in ("d_in", "d_sae"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"SAEConfig.{name} must be positive, got {getattr(self, name)}")
        needs_k = self.architecture in ("topk", "codebook", "groupmax")
        if needs_k and (self.k is None or not 0 < self.k <= self.d_sae):
            raise ConfigError(
                f"architecture {self.architecture!r} needs 0 < k <= d_sae ({self.d_sae}), got k={self.k}"
            )
        if self.architecture == "groupmax" and self.d_sae % self.k:
            raise ConfigError(f"groupmax needs d_sae ({self.d_sae}) divisible by k ({self.k})")

    @property
    def trainable(self) -> bool:
        return self.architecture in TRAINABLE_ARCHITECTURES


@dataclass
class TrainConfig:
    """How to train: optimisation, bookkeeping and where the run writes."""

    total_tokens: int | None = None
    """Tokens to train on; None: all the data (a tensor's rows, or an iterable with a length)."""
    batch_size: int = 4096
    """Rows per step when the trainer batches a tensor or a cache itself."""
    lr: float | None = None
    """None: 2e-4 / sqrt(d_sae / 2**14) per SAE (Gao et al. 2024)."""
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.2
    """Linear decay to zero over this final fraction of the steps."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    auxk_coefficient: float = 1 / 32
    k_aux: int | None = None
    """Dead latents used by the AuxK loss; None: d_in // 2."""
    multi_topk: bool = False
    """TopK SAEs: add the FVU at 4k, weighted 1/8 (Gao et al.), so the SAE also reconstructs at larger k."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead (and feeds AuxK)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens in a logging window counts as dense."""
    l1_coefficient: float = 5.0
    """ReLU SAEs: weight of sum_i f_i * ||W_dec,i|| (on inputs scaled to E||x|| = sqrt(d_in))."""
    l1_warmup_fraction: float = 0.05
    codebook_init: Literal["samples", "kmeans"] = "kmeans"
    normalize_inputs: bool = True
    """Scale inputs so that E||x|| = sqrt(d_in); the factor is folded into the saved weights."""
    seed: int = 0
    device: str = "cpu"
    """"cpu", "cuda", "cuda:1", or "auto" (cuda when available)."""
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """dtype of the encoder matmul (the O(d_in * d_sae) step); everything else stays in float32."""
    sparse_kernels: bool = True
    """Use the sparse decoder and encoder-gradient kernels (False: the dense reference path)."""
    log_every: int = 50
    checkpoint_every: int = 1000
    out_dir: str = "out/run"
    wandb: bool = False
    wandb_project: str = "sae"
    run_name: str | None = None


# --- reading configs ------------------------------------------------------------------------------


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation` where that is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not of type {_type_name(annotation)}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def from_dict(cls: type[C], data: Any, where: str | None = None) -> C:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {name: _check_type(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{where}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        )
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (TOML/JSON-ready; None values dropped)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), the value read as TOML (bare words: strings)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    path = [p.strip() for p in dotted.split(".")]
    if not all(path):
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as a path or a model name
    return path, value


def load_toml(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a TOML file and apply `--set` overrides; type checking is left to `from_dict`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    for assignment in overrides:
        keys, value = parse_override(assignment)
        table = data
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {assignment}: {key!r} is not a section")
        table[keys[-1]] = value
    return data
