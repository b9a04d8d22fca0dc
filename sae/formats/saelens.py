"""SAELens: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`, log10 densities, unused here).

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]
    jumprelu: threshold [d_sae] (older files: log_threshold)   gated: b_gate, b_mag, r_mag [d_sae]
    pre-6.0 files may hold scaling_factor [d_sae] (the "finetuning" scale applied before decoding)

SAELens's forward (v6 `SAE.process_sae_in` / `encode` / `decode`):
    x -> flatten heads (hook_z) -> normalise (layer_norm: per-token LN; constant_norm_rescale) -> x - b_dec
      -> pre = x W_enc + b_enc -> standard: ReLU | topk: ReLU(TopK(pre * |W_dec| if rescaled)) |
         jumprelu: ReLU(pre) * (pre > threshold) |
         gated: (x W_enc + b_gate > 0) * ReLU(x (W_enc e^r_mag) + b_mag)
    f -> (f / |W_dec| if rescaled) W_dec + b_dec -> un-normalise -> unflatten heads
The weights are cast to the cfg's dtype, as SAELens does on load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_save_file, atomic_write_json
from ..model import SparseAutoencoder
from .files import (
    FormatError,
    read_json,
    read_safetensors,
    require_key,
    require_shape,
    require_tensors,
    sae_config,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")  # BatchTopK and Matryoshka are saved as jumprelu
SAELENS_DTYPE_NAMES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
}
SAELENS_VERSION_WRITTEN = "6.0.0"


def upgrade_pre_6_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 cfg.json in v6 terms, as SAELens's `handle_pre_6_0_config` reads it.

    Pre-6.0: flat hook_point / hook_point_head_index / model_name, `activation_fn_str` ("relu", or
    "topk" with activation_fn_kwargs.k: these are TopK SAEs, not ReLU ones, SAELens #553), and a
    boolean normalize_activations (true meant the April-update expected-average scaling).
    """
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    architecture = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if activation == "topk":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise FormatError("activation_fn_str is 'topk' but activation_fn_kwargs has no k")
        architecture = "topk"
    elif activation != "relu":
        raise FormatError(f"activation_fn_str {activation!r}; SAELens pre-6.0 SAEs use relu or topk")
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        normalize = "expected_average_only_in" if normalize else "none"
    metadata = cfg.get("metadata") or {}  # a v6-shaped file without a version is read as pre-6.0 too
    hook_name = cfg.get("hook_point", cfg.get("hook_name", metadata.get("hook_name")))
    head_index = cfg.get("hook_point_head_index", cfg.get("hook_head_index", metadata.get("hook_head_index")))
    return {
        "architecture": architecture,
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "k": k,
        "rescale_acts_by_decoder_norm": cfg.get("rescale_acts_by_decoder_norm", False),
        "dtype": cfg.get("dtype", "float32"),
        "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
        "normalize_activations": normalize,
        "reshape_activations": cfg.get(
            "reshape_activations", "hook_z" if hook_name and hook_name.endswith("hook_z") else "none"
        ),
        "metadata": {
            "model_name": cfg.get("model_name", metadata.get("model_name")),
            "hook_name": hook_name,
            "hook_head_index": head_index,
        },
    }


def is_pre_6_config(cfg: dict[str, Any]) -> bool:
    """SAELens's own test: no sae_lens_version (top level or in metadata) at 6.0 or above."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    major = str(version).split(".")[0]
    return not major.isdigit() or int(major) < 6


def load_saelens(path: str | Path, norm_scaling_factor: float | None = None) -> SparseAutoencoder:
    """A SAELens folder -> SparseAutoencoder with SAELens's forward folded into our layout.

    `norm_scaling_factor`: for `normalize_activations="expected_average_only_in"` SAEs whose factor lives
    in SAELens's pretrained directory rather than the folder; folded in as SAELens's
    `fold_activation_norm_scaling_factor` does. Without it such an SAE reads raw activations, exactly as
    `SAE.load_from_disk` does, and a warning says so.
    """
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    raw_cfg = read_json(cfg_path)
    try:
        cfg = upgrade_pre_6_config(raw_cfg) if is_pre_6_config(raw_cfg) else raw_cfg
    except FormatError as e:
        raise FormatError(f"{cfg_path}: {e}") from None
    architecture = require_key(cfg, "architecture", cfg_path)
    if architecture not in ARCHITECTURES:
        raise FormatError(
            f"{cfg_path}: SAELens architecture {architecture!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    d_in, d_sae = require_key(cfg, "d_in", cfg_path), require_key(cfg, "d_sae", cfg_path)
    dtype_str = str(cfg.get("dtype", "float32"))
    if dtype_str not in SAELENS_DTYPE_NAMES:
        raise FormatError(
            f"{cfg_path}: dtype {dtype_str!r}; expected one of {', '.join(SAELENS_DTYPE_NAMES)}"
        )
    dtype = getattr(torch, SAELENS_DTYPE_NAMES[dtype_str])

    # SAELens casts every stored tensor to the cfg's dtype; we compute the folds in float64 first.
    tensors = {name: t.to(torch.float64) for name, t in read_safetensors(weights_path).items()}
    if architecture == "jumprelu" and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()  # pre-6.0 parameterisation
    gate_bias = "b_gate" if architecture == "gated" else "b_enc"
    required = ["W_enc", gate_bias, "W_dec", "b_dec"]
    required += {"jumprelu": ["threshold"], "gated": ["b_mag", "r_mag"]}.get(architecture, [])
    require_tensors(tensors, required, weights_path)
    known = set(required) | {"scaling_factor"}
    if unexpected := sorted(set(tensors) - known):
        raise FormatError(
            f"{weights_path}: unexpected tensors {', '.join(unexpected)} for a SAELens "
            f"{architecture} SAE (expected {', '.join(required)})"
        )
    require_shape(tensors["W_enc"], (d_in, d_sae), "W_enc", weights_path)
    require_shape(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path)
    require_shape(tensors["b_dec"], (d_in,), "b_dec", weights_path)
    for name in [*required[4:], gate_bias]:
        require_shape(tensors[name], (d_sae,), name, weights_path)

    W_enc = tensors["W_enc"].T  # [d_sae, d_in]
    b_enc = tensors[gate_bias]  # [d_sae]
    W_dec, b_dec = tensors["W_dec"], tensors["b_dec"]  # [d_sae, d_in], [d_in]
    if "scaling_factor" in tensors:  # pre-6.0: decode(f) = (f * s) W_dec + b_dec, so s folds into W_dec rows
        require_shape(tensors["scaling_factor"], (d_sae,), "scaling_factor", weights_path)
        W_dec = W_dec * tensors["scaling_factor"][:, None]

    normalize = cfg.get("normalize_activations", "none")
    input_norm = "none"
    if normalize == "layer_norm":
        input_norm = "layernorm"  # SAELens's run_time_activation_ln_in/out: the same LN as OpenAI's
    elif normalize == "expected_average_only_in":
        if norm_scaling_factor is None:
            warnings.warn(
                f"{cfg_path}: normalize_activations is 'expected_average_only_in' and no "
                "norm_scaling_factor was given; the SAE reads raw activations, as SAELens's "
                "load_from_disk does",
                stacklevel=2,
            )
        else:  # SAELens's fold_activation_norm_scaling_factor
            W_enc, W_dec, b_dec = (
                W_enc * norm_scaling_factor,
                W_dec / norm_scaling_factor,
                b_dec / norm_scaling_factor,
            )
    elif normalize != "none":
        raise FormatError(
            f"{cfg_path}: normalize_activations {normalize!r} is a per-token rescaling our SAEs "
            "cannot express; supported: none, layer_norm, expected_average_only_in"
        )

    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens: f = TopK(pre * |W_dec,i|), decode (f / |W_dec,i|) W_dec. Scaling latent i's encoder row
        # and bias by |W_dec,i| > 0 and its decoder row by 1/|W_dec,i| gives the same f and reconstruction.
        norms = W_dec.norm(dim=1)  # [d_sae]
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]

    ours = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if architecture == "jumprelu":
        ours["threshold"] = tensors["threshold"]
    if architecture == "gated":
        ours |= {"b_mag": tensors["b_mag"], "r_mag": tensors["r_mag"]}

    metadata = cfg.get("metadata") or {}
    sae_cfg = sae_config(
        cfg_path,
        architecture={"standard": "relu"}.get(architecture, architecture),
        d_in=d_in,
        d_sae=d_sae,
        k=cfg.get("k") if architecture == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        input_norm=input_norm,
        dtype=SAELENS_DTYPE_NAMES[dtype_str],
        model_name=metadata.get("model_name"),
        hookpoint=metadata.get("hook_name"),
        hook_layout="heads" if cfg.get("reshape_activations", "none") == "hook_z" else "flat",
        hook_head_index=metadata.get("hook_head_index"),
        source_format="saelens",
    )
    ours = {name: t.to(dtype) for name, t in ours.items()}
    return SparseAutoencoder.from_tensors(sae_cfg, ours, source=str(weights_path))


def export_saelens(model: SparseAutoencoder, path: str | Path) -> Path:
    """Write a SAELens v6 folder (`SAE.load_from_disk(path)`; Neuronpedia's upload format)."""
    cfg = model.cfg
    # BatchTopK and Matryoshka SAEs encode with their learnt threshold at inference: SAELens's jumprelu
    architecture = {
        "relu": "standard",
        "topk": "topk",
        "jumprelu": "jumprelu",
        "batchtopk": "jumprelu",
        "matryoshka": "jumprelu",
        "gated": "gated",
    }.get(cfg.architecture)
    problems = []
    if architecture is None:
        problems.append(f"architecture {cfg.architecture!r} (SAELens has standard, topk, jumprelu, gated)")
    if cfg.skip_connection:
        problems.append("a skip connection (SAELens SAEs have none)")
    if problems:
        raise ValueError(f"cannot export to SAELens exactly: {'; '.join(problems)}")

    weights: dict[str, Tensor] = {
        "W_enc": model.W_enc.detach().T,  # [d_in, d_sae]
        ("b_gate" if architecture == "gated" else "b_enc"): model.b_enc.detach(),
        "W_dec": model.W_dec.detach(),
        "b_dec": model.b_dec.detach(),
    }
    if architecture == "jumprelu":
        weights["threshold"] = model.threshold.detach()
    if architecture == "gated":
        weights |= {"b_mag": model.b_mag.detach(), "r_mag": model.r_mag.detach()}
    sae_cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": {"none": "none", "layernorm": "layer_norm"}[cfg.input_norm],
        "reshape_activations": "hook_z" if cfg.hook_layout == "heads" else "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION_WRITTEN,
            "sae_lens_training_version": SAELENS_VERSION_WRITTEN,
            "model_name": cfg.model_name,
            "hook_name": cfg.hookpoint,
            "hook_head_index": cfg.hook_head_index,
        },
    }
    if architecture == "topk":
        sae_cfg |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_file({n: t.contiguous().cpu() for n, t in weights.items()}, path / WEIGHTS_FILE)
    atomic_write_json(path / CFG_FILE, sae_cfg)
    return path
