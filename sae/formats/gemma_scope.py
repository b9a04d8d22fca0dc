"""Gemma Scope (Google DeepMind): `params.npz` at
`.../gemma-scope-<size>-<pt|it>-<site>/layer_L/width_W/average_l0_N/`.

    W_enc [d_model, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_model]   b_dec [d_model]   threshold [d_sae]

JumpReLU with the raw threshold (not its log): pre = x W_enc + b_enc, with no b_dec subtraction;
f = ReLU(pre) * (pre > threshold) (the release's reference code writes mask * ReLU(pre));
x_hat = f W_dec + b_dec.
The npz holds weights only: layer, width, site and average L0 come from the path.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from ..model import SparseAutoencoder
from .files import FormatError, dtype_name, read_npz, require_shape, require_tensors, sae_config

PARAMS_FILE = "params.npz"
TENSORS = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]
SAE_DIR = re.compile(r"layer_(?P<layer>\d+)/width_(?P<width>\d+)(?P<unit>[km]?)/average_l0_(?P<l0>\d+)$")
RELEASE_DIR = re.compile(r"gemma-scope-(?P<size>\d+b)-(?P<variant>pt|it)-(?P<site>res|mlp|att)\b")
SITE_HOOKS = {
    "res": ("blocks.{}.hook_resid_post", "flat"),
    "mlp": ("blocks.{}.hook_mlp_out", "flat"),
    "att": ("blocks.{}.attn.hook_z", "heads"),  # concatenated per-head z, d_in = n_heads * d_head
}


def width_from_path(width: str, unit: str) -> int:
    """`16k` -> 16384, `1m` -> 1048576: the release rounds powers of two to thousands."""
    if not unit:
        return int(width)
    return 2 ** round(math.log2(int(width) * {"k": 1e3, "m": 1e6}[unit]))


def load_gemma_scope(path: str | Path) -> SparseAutoencoder:
    """`params.npz` (or its folder) -> a jumprelu SparseAutoencoder without b_dec subtraction."""
    path = Path(path)
    params_path = path / PARAMS_FILE if path.is_dir() else path
    tensors = read_npz(params_path)
    require_tensors(tensors, TENSORS, params_path)
    d_in, d_sae = tensors["W_enc"].shape  # [d_model, d_sae]
    require_shape(tensors["W_dec"], (d_sae, d_in), "W_dec", params_path)
    require_shape(tensors["b_dec"], (d_in,), "b_dec", params_path)
    for name in ("b_enc", "threshold"):
        require_shape(tensors[name], (d_sae,), name, params_path)

    sae_dir = params_path.parent.as_posix()
    sae_match = SAE_DIR.search(sae_dir)
    release_match = RELEASE_DIR.search(sae_dir)
    hookpoint, layout, model_name, l0 = None, "flat", None, None
    if sae_match:
        width = width_from_path(sae_match["width"], sae_match["unit"])
        if width != d_sae:
            raise FormatError(f"{params_path}: the path says width {width} but W_enc has {d_sae} latents")
        l0 = int(sae_match["l0"])
    if sae_match and release_match:
        hook, layout = SITE_HOOKS[release_match["site"]]
        hookpoint = hook.format(sae_match["layer"])
        model_name = f"gemma-2-{release_match['size']}" + ("-it" if release_match["variant"] == "it" else "")
    else:
        unknown = "model and hookpoint are" if sae_match else "model, hookpoint, width and L0 are"
        warnings.warn(
            f"{params_path}: path is not .../gemma-scope-<size>-<pt|it>-<site>/layer_L/width_W/"
            f"average_l0_N/params.npz, so the {unknown} unknown",
            stacklevel=2,
        )

    cfg = sae_config(
        params_path,
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        k=l0,  # informative for jumprelu: the release's average L0
        apply_b_dec_to_input=False,
        dtype=dtype_name(tensors["W_enc"], "W_enc", params_path),
        model_name=model_name,
        hookpoint=hookpoint,
        hook_layout=layout,
        source_format="gemma_scope",
    )
    ours = {
        "W_enc": tensors["W_enc"].T,  # [d_sae, d_model]
        "b_enc": tensors["b_enc"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
        "threshold": tensors["threshold"],
    }
    return SparseAutoencoder.from_tensors(cfg, ours, source=str(params_path))
