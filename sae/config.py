"""The SAE and its training, as typed configs: `SAEConfig` (what an SAE is) and `TrainConfig` (how to
train it). Both are read strictly (`sae.typed_config.from_dict`): unknown keys and wrong types are errors."""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass
from typing import Literal

from .typed_config import ConfigError

# Trainable architectures, then the ones we only load from other libraries (inference and analysis).
TrainableArchitecture = Literal["topk", "relu", "codebook", "batchtopk", "jumprelu", "matryoshka", "topafa"]
LoadOnlyArchitecture = Literal["groupmax", "gated"]
Architecture = Literal[TrainableArchitecture, LoadOnlyArchitecture]  # nested Literals flatten
TRAINABLE_ARCHITECTURES: tuple[str, ...] = typing.get_args(TrainableArchitecture)
LOAD_ONLY_ARCHITECTURES: tuple[str, ...] = typing.get_args(LoadOnlyArchitecture)
Similarity = Literal["inner", "cosine"]
FIXED_K_ARCHITECTURES = ("topk", "codebook", "groupmax")  # exactly k active latents per token
THRESHOLD_ARCHITECTURES = ("jumprelu", "batchtopk", "matryoshka")  # encode with a per-latent threshold
K_REQUIRED = (*FIXED_K_ARCHITECTURES, "batchtopk", "matryoshka")


def check_d_sae_and_k(architecture: str, d_sae: int, k: int | None, where: str) -> None:
    """d_sae positive; k set where the architecture needs it, and never above d_sae."""
    if d_sae <= 0:
        raise ConfigError(f"{where}.d_sae must be positive, got {d_sae}")
    if architecture in K_REQUIRED and k is None:
        raise ConfigError(f"architecture {architecture!r} needs k (0 < k <= d_sae = {d_sae})")
    if k is not None and not 0 < k <= d_sae:
        raise ConfigError(f"{where}.k must satisfy 0 < k <= d_sae ({d_sae}), got k={k}")
    if architecture == "groupmax" and d_sae % k:
        raise ConfigError(f"groupmax needs d_sae ({d_sae}) divisible by k ({k})")


def default_prefixes(d_sae: int) -> list[int]:
    """Matryoshka's nested prefix sizes when none are given: d_sae/16, /8, /4, /2 and all of it."""
    return sorted({max(1, d_sae // 2**i) for i in (4, 3, 2, 1, 0)})


def check_prefixes(prefixes: list[int], d_sae: int, where: str) -> None:
    if not prefixes or any(b <= a for a, b in itertools.pairwise(prefixes)) or prefixes[0] <= 0:
        raise ConfigError(f"{where}.prefixes must be increasing positive sizes, got {prefixes}")
    if prefixes[-1] != d_sae:
        raise ConfigError(f"{where}.prefixes must end at d_sae ({d_sae}), got {prefixes}")


@dataclass
class SAEConfig:
    """What an SAE is: enough to rebuild it and to know where it reads activations from."""

    architecture: Architecture
    d_in: int
    d_sae: int
    k: int | None = None
    """What k means depends on the architecture:
    topk, groupmax: active latents per token; codebook: codes per token;
    batchtopk, matryoshka: active latents per token on average over a training batch (k * batch kept);
    jumprelu: a target L0, penalised two-sided (None: a fixed penalty; `TrainConfig.l0_coefficient`);
    topafa: a cap on the latents one token may use (None: no cap, exact but dense); relu, gated: unused."""
    prefixes: list[int] | None = None
    """Matryoshka: the nested prefix sizes m_1 < ... < d_sae whose reconstructions the loss sums
    (None: `default_prefixes(d_sae)`)."""
    transcoder: bool = False
    """Predict another site from this one (Dunefsky et al. 2024): read `hookpoint`, write `output_hookpoint`
    (e.g. an MLP's input and output), trained on pairs of activations; else reconstruct the input."""
    d_out: int | None = None
    """Width of what the decoder writes: the output site of a transcoder (None: d_in)."""
    similarity: Similarity = "cosine"
    """How the codebook SAE chooses codes: cosine similarity with its keys (rebuilt synthetic data with
    FVU 0.42 where the inner product reached 0.60), or the inner product."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding (None: true for SAEs, false for transcoders, whose
    b_dec lives at the output site; false for Gemma Scope's JumpReLU SAEs)."""
    input_norm: Literal["none", "layernorm"] = "none"
    """Per-token LayerNorm of the input, undone after decoding (OpenAI's TopK SAEs)."""
    skip_connection: bool = False
    """A linear skip path x @ W_skip^T added to the output (skip transcoders, Paulo et al. 2025)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the weights."""
    # Where the activations come from; optional so that SAEs on synthetic data need none of it.
    model_name: str | None = None
    hookpoint: str | None = None
    """transformer-lens hook name, e.g. `blocks.6.hook_resid_post`; a transcoder's input site."""
    output_hookpoint: str | None = None
    """A transcoder's output site, e.g. `blocks.6.mlp.hook_out` for `blocks.6.mlp.hook_in`."""
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
        if self.d_in <= 0:
            raise ConfigError(f"SAEConfig.d_in must be positive, got {self.d_in}")
        check_d_sae_and_k(self.architecture, self.d_sae, self.k, "SAEConfig")
        self._resolve_transcoder()
        if self.architecture == "matryoshka":
            if self.prefixes is None:
                self.prefixes = default_prefixes(self.d_sae)
            check_prefixes(self.prefixes, self.d_sae, "SAEConfig")
        elif self.prefixes is not None:
            raise ConfigError(f"SAEConfig.prefixes is for matryoshka SAEs, not {self.architecture!r}")

    def _resolve_transcoder(self) -> None:
        """Fill d_out and apply_b_dec_to_input; refuse what only a transcoder can have."""
        if self.d_out is None:
            self.d_out = self.d_in
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.transcoder
        if self.transcoder:
            if self.architecture == "topafa":
                raise ConfigError(
                    "a topafa transcoder is undefined: top-AFA matches ||f|| to its input's norm"
                )
            if self.input_norm != "none":
                raise ConfigError(
                    "input_norm undoes the input's normalisation at the output: not for transcoders"
                )
            if self.apply_b_dec_to_input and self.d_out != self.d_in:
                raise ConfigError("a transcoder with d_out != d_in cannot subtract b_dec from its input")
            return
        if self.d_out != self.d_in:
            raise ConfigError(
                f"SAEConfig.d_out ({self.d_out}) differs from d_in ({self.d_in}): set transcoder"
            )
        if self.output_hookpoint is not None:
            raise ConfigError("SAEConfig.output_hookpoint is for transcoders: set transcoder = true")

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
    """None: 1.6e-3 / sqrt(d_sae / 2**14) per SAE (Gao et al. 2024's scaling, 8x their 2e-4; `default_lr`)."""
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
    threshold_decay: float = 0.9
    """BatchTopK, Matryoshka: the inference threshold is an exponential moving average, with this decay per
    step, of the smallest activation each training batch keeps (dictionary_learning: 0.999 from step 1000,
    which a short run never reaches). That smallest activation falls during training, so a slow average
    lags above it: on Gemma 3's residual stream (232 steps, k 32) 0.99 gave an inference L0 of 22.8 and
    FVU 0.118 on held-out rows, 0.9 gives 31.7 and 0.105."""
    jumprelu_penalty: Literal["l0", "tanh"] = "l0"
    """JumpReLU's sparsity penalty: λ Σ_i H(pre_i - θ_i) (Rajamanoharan et al.) or λ Σ_i tanh(c f_i ‖d_i‖)
    (Anthropic, January 2025), with c = `tanh_scale`."""
    l0_coefficient: float = 1.0
    """JumpReLU without k: λ, the weight of the L0 (or tanh) penalty on the per-token squared error of
    inputs scaled to E‖x‖ = √d_in."""
    l0_target_coefficient: float = 10.0
    """JumpReLU with k: μ in μ (L0 - k)² / k, a penalty that pulls L0 towards k from either side; it
    settles where that pull meets the reconstruction's (studies/jumprelu_l0)."""
    threshold_lr_scale: float = 1.0
    """JumpReLU: the thresholds' learning rate as a multiple of `lr`."""
    jumprelu_bandwidth: float = 0.3
    """Width ε of the rectangle kernel in the threshold's straight-through gradient. Rajamanoharan et al.
    use 0.001 over runs of ~10^5 steps; in runs of hundreds of steps so narrow a window almost never holds a
    pre-activation, the thresholds do not move and L0 goes where the encoder takes it (planted data, k 5,
    300k tokens, under the one-sided L0 controller of an earlier version: L0 1.5 at 0.001, 2.8 at 0.1, 3.5 at
    0.3)."""
    tanh_scale: float = 4.0
    afa_coefficient: float = 1 / 16
    """top-AFA: weight of mean((‖f‖ - ‖x‖)^2), the value Lee et al. report stable across layers."""
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
