"""dictionary_learning (saprmarks/dictionary_learning): `ae.pt` + `config.json`
{"trainer": {dict_class, ...}}.

The state dict's layout depends on `trainer.dict_class`; each maps onto our layout as that class's
`encode`/`decode` compute (dictionary_learning 0.1.0):

    AutoEncoder          bias [D], encoder.weight [F, D], encoder.bias [F], decoder.weight [D, F]
                         f = ReLU(W (x - bias) + b). `from_pretrained` rescales decoder columns to unit
                         norm (and the encoder to match) by default, so we do too.
    AutoEncoderNew       encoder.weight/bias, decoder.weight/bias: f = ReLU(W x + b), no input centring
    AutoEncoderTopK      encoder.weight/bias, decoder.weight [D, F], b_dec, buffers k, threshold:
                         f = TopK(ReLU(W (x - b_dec) + b)) (encode's default ignores the threshold)
    BatchTopKSAE         as TopK, but encode's default thresholds: f = ReLU(pre) * (ReLU(pre) > threshold),
                         a JumpReLU with the scalar threshold on every latent (dropped by SAELens, #608)
    MatryoshkaBatchTopKSAE  W_enc [D, F], b_enc, W_dec [F, D], b_dec, threshold, k, group_sizes:
                         BatchTopK's encode with all groups active (a Matryoshka SAE's nested groups
                         only matter in training)
    JumpReluAutoEncoder  W_enc [D, F], b_enc, W_dec [F, D], b_dec, threshold [F]:
                         f = ReLU(pre * (pre > threshold)), no input centring (their class's
                         apply_b_dec_to_input defaults to False)
    GatedAutoEncoder     encoder.weight, decoder.weight, decoder_bias, gate_bias, mag_bias, r_mag
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model import SparseAutoencoder
from .files import (
    FormatError,
    dtype_name,
    read_json,
    read_torch_state_dict,
    require_key,
    require_tensors,
    sae_config,
)

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
SUBMODULE_HOOK = re.compile(r"^resid_post_layer_(\d+)$")  # the names their demo and sweeps use


def convert_autoencoder(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    W_enc, b_enc = state["encoder.weight"], state["encoder.bias"]  # [F, D], [F]
    W_dec = state["decoder.weight"].T  # [F, D]
    # from_pretrained(normalize_decoder=True): unit decoder rows; encoder rows and bias scaled to keep x_hat
    norms = W_dec.norm(dim=1)  # [F]
    if not torch.allclose(norms, torch.ones_like(norms)):
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    return {"architecture": "relu"}, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": state["bias"]}


def convert_autoencoder_new(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return {"architecture": "relu", "apply_b_dec_to_input": False}, {
        "W_enc": state["encoder.weight"],
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["decoder.bias"],
    }


def convert_topk(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return {"architecture": "topk", "k": int(state["k"].item())}, {
        "W_enc": state["encoder.weight"],
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["b_dec"],
    }


def batch_topk_threshold(state: dict[str, Tensor], d_sae: int) -> Tensor:
    """The scalar inference threshold, broadcast to [d_sae]. A threshold < 0 was never learnt: encoding is
    then plain ReLU, which our JumpReLU reproduces since ReLU(pre) > t <=> pre > t for t >= 0 only."""
    threshold = state["threshold"].reshape(())
    if threshold < 0:
        warnings.warn(
            f"BatchTopK threshold is {threshold.item()} (never learnt): the SAE encodes as plain ReLU, "
            "as dictionary_learning's encode does",
            stacklevel=2,
        )
    return threshold.expand(d_sae).clone()


def convert_batch_topk(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    W_enc = state["encoder.weight"]
    return {"architecture": "jumprelu", "k": int(state["k"].item())}, {
        "W_enc": W_enc,
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["b_dec"],
        "threshold": batch_topk_threshold(state, W_enc.shape[0]),
    }


def convert_matryoshka(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    # Inference uses every group: `active_groups` is not saved and from_pretrained sets it to all of them.
    W_enc = state["W_enc"].T  # [D, F] -> [F, D]
    return {"architecture": "jumprelu", "k": int(state["k"].item())}, {
        "W_enc": W_enc,
        "b_enc": state["b_enc"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
        "threshold": batch_topk_threshold(state, W_enc.shape[0]),
    }


def convert_jumprelu(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    # ReLU(pre * (pre > t)) == ReLU(pre) * (pre > t): our jumprelu
    return {"architecture": "jumprelu", "apply_b_dec_to_input": False}, {
        "W_enc": state["W_enc"].T,
        "b_enc": state["b_enc"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
        "threshold": state["threshold"],
    }


def convert_gated(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    # gate: W (x - b_dec) + gate_bias > 0; magnitude: exp(r_mag) * W (x - b_dec) + mag_bias
    # (ours scales W's rows)
    return {"architecture": "gated"}, {
        "W_enc": state["encoder.weight"],
        "b_enc": state["gate_bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["decoder_bias"],
        "b_mag": state["mag_bias"],
        "r_mag": state["r_mag"],
    }


CONVERTERS = {  # dict_class -> (state dict entries it must hold, converter)
    "AutoEncoder": (["bias", "encoder.weight", "encoder.bias", "decoder.weight"], convert_autoencoder),
    "AutoEncoderNew": (
        ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"],
        convert_autoencoder_new,
    ),
    "AutoEncoderTopK": (["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"], convert_topk),
    "BatchTopKSAE": (
        ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"],
        convert_batch_topk,
    ),
    "MatryoshkaBatchTopKSAE": (
        ["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"],
        convert_matryoshka,
    ),
    "JumpReluAutoEncoder": (["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], convert_jumprelu),
    "GatedAutoEncoder": (
        ["encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "mag_bias", "r_mag"],
        convert_gated,
    ),
}


def load_dictionary_learning(path: str | Path) -> SparseAutoencoder:
    """A dictionary_learning trainer folder (`ae.pt` + `config.json`) -> SparseAutoencoder."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    trainer = require_key(read_json(config_path), "trainer", config_path)
    dict_class = require_key(trainer, "dict_class", config_path)
    if dict_class not in CONVERTERS:
        raise FormatError(
            f"{config_path}: dict_class {dict_class!r} is not supported; supported: {', '.join(CONVERTERS)}"
        )
    required, convert = CONVERTERS[dict_class]
    state = read_torch_state_dict(weights_path)
    require_tensors(state, required, weights_path)
    arch, ours = convert(state)
    d_sae, d_in = ours["W_enc"].shape
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        if key in trainer and trainer[key] != value:
            raise FormatError(
                f"{config_path}: trainer.{key} is {trainer[key]} but {weights_path} holds {value}"
            )
    if "k" in arch and "k" in trainer and trainer["k"] != arch["k"]:
        raise FormatError(
            f"{config_path}: trainer.k is {trainer['k']} but {weights_path} buffer k is {arch['k']}"
        )

    submodule = SUBMODULE_HOOK.match(str(trainer.get("submodule_name", "")))
    if submodule is None:
        warnings.warn(
            f"{config_path}: submodule_name {trainer.get('submodule_name')!r} has no transformer-lens "
            "equivalent we know; hookpoint left unset",
            stacklevel=2,
        )
    cfg = sae_config(
        config_path,
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_name(ours["W_enc"], "W_enc", weights_path),
        model_name=trainer.get("lm_name"),
        hookpoint=f"blocks.{submodule.group(1)}.hook_resid_post" if submodule else None,
        source_format="dictionary_learning",
        **arch,
    )
    return SparseAutoencoder.from_tensors(cfg, ours, source=str(weights_path))
