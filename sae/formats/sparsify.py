"""EleutherAI sparsify: per-hookpoint `cfg.json` + `sae.safetensors`, run-level `config.json` one folder up.

    encoder.weight [d_sae, d_in]   encoder.bias [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]
    W_skip [d_in, d_in] (skip_connection: output += x @ W_skip^T)

sparsify encodes with top_k(ReLU(W (x - b_dec) + b)) or GroupMax (the max of ReLU(pre) within each of k
contiguous groups), and decodes with latents @ W_dec + b_dec. Transcoders (`transcode`) skip the b_dec
subtraction; they read a module's input and predict its output, of the same width (sparsify has no
d_out): for `layers.N.mlp`, transformer-lens's `blocks.N.mlp.hook_in` -> `blocks.N.mlp.hook_out`.
Our layout is the same up to names: no transposes (SAELens's sparsify loader transposed W_dec and
dropped the b_dec subtraction). The dtype is the file's (sparsify #116).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from ..io import atomic_save_file, atomic_write_json
from ..model import SparseAutoencoder
from .files import (
    FormatError,
    dtype_name,
    read_json,
    read_safetensors,
    require_key,
    require_shape,
    require_tensors,
    sae_config,
    safetensors_metadata,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"  # one level up: the training run, with the model's name

# HF module names (relative to the model, optionally under its base-model prefix) -> transformer-lens hooks.
# A module's *output* is what sparsify hooks for SAEs; a transcoder reads the module's *input* and predicts
# its output. (TransformerBridge's hook_mlp_out comes after Gemma's post-MLP norm: not the module's output.)
_LAYER = r"(?:[\w.]+\.)?(?:layers|h)\.(\d+)"
SAE_HOOKS = [
    (re.compile(rf"^{_LAYER}$"), "blocks.{}.hook_resid_post"),
    (re.compile(rf"^{_LAYER}\.mlp$"), "blocks.{}.hook_mlp_out"),
    (re.compile(rf"^{_LAYER}\.(?:self_attn|attn|attention)$"), "blocks.{}.hook_attn_out"),
]
TRANSCODER_HOOKS = [  # (input, output)
    (re.compile(rf"^{_LAYER}$"), ("blocks.{}.hook_resid_pre", "blocks.{}.hook_resid_post")),
    (re.compile(rf"^{_LAYER}\.mlp$"), ("blocks.{}.mlp.hook_in", "blocks.{}.mlp.hook_out")),
]


def map_hookpoint(module_name: str) -> str | None:
    """An SAE's hook: `layers.10` -> `blocks.10.hook_resid_post`; None (with a warning) for modules we
    cannot name."""
    for pattern, hook in SAE_HOOKS:
        if match := pattern.match(module_name):
            return hook.format(match.group(1))
    _unnamed(module_name)
    return None


def map_transcoder_hookpoints(module_name: str) -> tuple[str | None, str | None]:
    """A transcoder's (input, output) hooks: `layers.10.mlp` -> `blocks.10.mlp.hook_in`, `...hook_out`."""
    for pattern, hooks in TRANSCODER_HOOKS:
        if match := pattern.match(module_name):
            return hooks[0].format(match.group(1)), hooks[1].format(match.group(1))
    _unnamed(module_name)
    return None, None


def _unnamed(module_name: str) -> None:
    warnings.warn(
        f"sparsify hookpoint {module_name!r} has no transformer-lens equivalent we know; "
        "hookpoint left unset",
        stacklevel=3,
    )


def load_sparsify(path: str | Path) -> SparseAutoencoder:
    """A sparsify hookpoint folder (`<run>/<hookpoint>/`) -> SparseAutoencoder, metadata from the run's
    config."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    tensors = read_safetensors(weights_path)
    require_tensors(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights_path)

    d_sae, d_in = tensors["encoder.weight"].shape  # [d_sae, d_in]
    if require_key(cfg, "d_in", cfg_path) != d_in:
        raise FormatError(
            f"{cfg_path}: d_in is {cfg['d_in']} but {weights_path} encoder.weight is {(d_sae, d_in)}"
        )
    num_latents = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    if num_latents != d_sae:
        raise FormatError(f"{cfg_path}: {num_latents} latents configured but encoder.weight has {d_sae} rows")
    require_shape(tensors["encoder.bias"], (d_sae,), "encoder.bias", weights_path)
    require_shape(tensors["W_dec"], (d_sae, d_in), "W_dec", weights_path)
    require_shape(tensors["b_dec"], (d_in,), "b_dec", weights_path)

    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise FormatError(f"{cfg_path}: activation {activation!r}; sparsify has topk and groupmax")
    skip = bool(cfg.get("skip_connection", False))
    if skip != ("W_skip" in tensors):
        raise FormatError(
            f"{cfg_path}: skip_connection is {skip} but {weights_path} {'lacks' if skip else 'has'} W_skip"
        )
    transcode = bool(cfg.get("transcode", False))

    # Metadata: sparsify keeps the model in the run's config.json and the hookpoint as the folder name;
    # our own exports (a lone folder) carry both in the safetensors header instead.
    run_config_path = path.parent / RUN_CONFIG_FILE
    run = read_json(run_config_path) if run_config_path.is_file() else {}
    header = safetensors_metadata(weights_path)
    if header.get("hookpoint"):
        model_name, hookpoint = header.get("model_name") or None, header["hookpoint"]
        output_hookpoint = header.get("output_hookpoint") or None
    elif transcode:
        model_name, (hookpoint, output_hookpoint) = run.get("model"), map_transcoder_hookpoints(path.name)
    else:
        model_name, hookpoint, output_hookpoint = run.get("model"), map_hookpoint(path.name), None
    sae_cfg = sae_config(
        cfg_path,
        architecture=activation,
        d_in=d_in,
        d_sae=d_sae,
        k=require_key(cfg, "k", cfg_path),
        transcoder=transcode,
        output_hookpoint=output_hookpoint if transcode else None,
        apply_b_dec_to_input=not transcode,
        skip_connection=skip,
        dtype=dtype_name(tensors["encoder.weight"], "encoder.weight", weights_path),
        model_name=model_name,
        hookpoint=hookpoint,
        source_format="sparsify",
    )
    ours = {
        "W_enc": tensors["encoder.weight"],  # [d_sae, d_in], as ours
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],  # [d_sae, d_in], as ours: no transpose
        "b_dec": tensors["b_dec"],
    }
    if skip:
        ours["W_skip"] = tensors["W_skip"]  # [d_in, d_in], applied as x @ W_skip^T by both
    return SparseAutoencoder.from_tensors(sae_cfg, ours, source=str(weights_path))


def export_sparsify(model: SparseAutoencoder, path: str | Path) -> Path:
    """Write the folder `SparseCoder.load_from_disk(path)` reads: cfg.json + sae.safetensors.

    Only what sparsify computes can be exported: TopK or GroupMax on raw inputs, with b_dec subtracted (an
    SAE) or not (a transcoder, optionally with its skip path, of equal input and output widths).
    Our model name and hookpoints travel in the safetensors header metadata (sparsify ignores it; sparsify
    itself names the hookpoint by the folder and the model in the run's config.json).
    """
    cfg = model.cfg
    problems = []
    if cfg.architecture not in ("topk", "groupmax"):
        problems.append(f"architecture {cfg.architecture!r} (sparsify has topk and groupmax)")
    if cfg.apply_b_dec_to_input == cfg.transcoder:
        problems.append(
            f"apply_b_dec_to_input={cfg.apply_b_dec_to_input} (sparsify subtracts b_dec from the input of an "
            "SAE, never of a transcoder)"
        )
    if cfg.d_out != cfg.d_in:
        problems.append(f"d_out {cfg.d_out} != d_in {cfg.d_in} (sparsify's transcoders keep the width)")
    if cfg.input_norm != "none":
        problems.append(f"input_norm={cfg.input_norm!r} (sparsify does not normalise inputs)")
    if problems:
        raise ValueError(f"cannot export to sparsify exactly: {'; '.join(problems)}")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": model.W_enc.detach().cpu(),
        "encoder.bias": model.b_enc.detach().cpu(),
        "W_dec": model.W_dec.detach().cpu(),
        "b_dec": model.b_dec.detach().cpu(),
    }
    if cfg.skip_connection:
        tensors["W_skip"] = model.W_skip.detach().cpu()
    metadata = {"format": "pt"}
    if cfg.hookpoint:
        metadata |= {"hookpoint": cfg.hookpoint, "model_name": cfg.model_name or ""}
    if cfg.output_hookpoint:
        metadata["output_hookpoint"] = cfg.output_hookpoint
    atomic_save_file(tensors, path / WEIGHTS_FILE, metadata=metadata)
    atomic_write_json(
        path / CFG_FILE,
        {
            "activation": cfg.architecture,
            "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
            "normalize_decoder": True,
            "num_latents": cfg.d_sae,
            "k": cfg.k,
            "multi_topk": False,
            "skip_connection": cfg.skip_connection,
            "transcode": cfg.transcoder,
            "d_in": cfg.d_in,
        },
    )
    return path
