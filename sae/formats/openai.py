"""OpenAI sparse_autoencoder (Gao et al. 2024): a torch state dict (`.pt`), read with weights_only=True.

    pre_bias [d]   encoder.weight [n, d]   latent_bias [n]   decoder.weight [d, n]
    activation: "ReLU" | "TopK"   activation_state_dict: {k, postact_fn} for TopK
    (plus training statistics: stats_last_nonzero, latents_activation_frequency, latents_mean_square)

Their `Autoencoder.from_state_dict` normalises the input exactly when the activation is TopK:
x -> (x - mean) / (std + 1e-5) per token (unbiased std), then latents = act(W (x - pre_bias) + latent_bias),
recons = (latents W_dec^T + pre_bias) * std + mean.
Release paths: `<location>[_v5_32k]/autoencoders/[N/]<layer>.pt`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from torch import Tensor

from ..model import SparseAutoencoder
from .files import FormatError, dtype_name, read_torch_state_dict, require_shape, require_tensors, sae_config

TENSORS = ["pre_bias", "encoder.weight", "latent_bias", "decoder.weight"]
TRAINING_STATS = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
LOCATION_HOOKS = {  # OpenAI's names for where they read GPT-2 small -> transformer-lens hooks
    "resid_post_mlp": "blocks.{}.hook_resid_post",
    "resid_post_attn": "blocks.{}.hook_resid_mid",
    "resid_delta_attn": "blocks.{}.hook_attn_out",
    "resid_delta_mlp": "blocks.{}.hook_mlp_out",
    "mlp_post_act": "blocks.{}.mlp.hook_post",
}
RELEASE_PATH = re.compile(
    rf"(?P<location>{'|'.join(LOCATION_HOOKS)})(?:_v\d+_\w+)?/autoencoders/(?:\d+/)?(?P<layer>\d+)\.pt$"
)
OPENAI_MODEL = "gpt2-small"  # every released OpenAI SAE reads GPT-2 small


def load_openai(path: str | Path) -> SparseAutoencoder:
    path = Path(path)
    state = read_torch_state_dict(path)
    require_tensors(state, TENSORS, path)
    if unexpected := sorted(
        set(state) - set(TENSORS) - TRAINING_STATS - {"activation", "activation_state_dict"}
    ):
        raise FormatError(f"{path}: unexpected entries {', '.join(unexpected)} in an OpenAI autoencoder")
    n_latents, d_in = state["encoder.weight"].shape
    require_shape(state["pre_bias"], (d_in,), "pre_bias", path)
    require_shape(state["latent_bias"], (n_latents,), "latent_bias", path)
    require_shape(state["decoder.weight"], (d_in, n_latents), "decoder.weight", path)
    if state.get("encoder.bias") is not None:
        raise FormatError(f"{path}: OpenAI encoders have no bias (latent_bias plays its part)")

    activation = state.get("activation", "ReLU")  # their from_state_dict's default
    k = None
    if activation == "TopK":
        activation_state = state.get("activation_state_dict") or {}
        k = activation_state.get("k")
        k = int(k.item()) if isinstance(k, Tensor) else k
        if not isinstance(k, int):
            raise FormatError(
                f"{path}: TopK activation without an integer activation_state_dict['k'] (got {k!r})"
            )
        if activation_state.get("postact_fn", "ReLU") != "ReLU":
            raise FormatError(
                f"{path}: TopK postact_fn {activation_state['postact_fn']!r}; only ReLU is supported"
            )
    elif activation != "ReLU":
        raise FormatError(f"{path}: activation {activation!r}; OpenAI autoencoders use ReLU or TopK")

    release = RELEASE_PATH.search(path.as_posix())
    if release is None:
        warnings.warn(
            f"{path}: not a release path <location>/autoencoders/<layer>.pt; hookpoint unknown", stacklevel=2
        )
    cfg = sae_config(
        path,
        architecture="topk" if activation == "TopK" else "relu",
        d_in=d_in,
        d_sae=n_latents,
        k=k,
        input_norm="layernorm"
        if activation == "TopK"
        else "none",  # their `normalize = activation == "TopK"`
        dtype=dtype_name(state["encoder.weight"], "encoder.weight", path),
        model_name=OPENAI_MODEL if release else None,
        hookpoint=LOCATION_HOOKS[release["location"]].format(release["layer"]) if release else None,
        source_format="openai",
    )
    ours = {
        "W_enc": state["encoder.weight"],  # [n, d]
        "b_enc": state["latent_bias"],
        "W_dec": state["decoder.weight"].T,  # [d, n] -> [n, d]: decoder columns are the latents' directions
        "b_dec": state["pre_bias"],
    }
    return SparseAutoencoder.from_tensors(cfg, ours, source=str(path))
