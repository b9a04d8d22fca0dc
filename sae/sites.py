"""Where an SAE sits in a language model: reading its input from a hook's activations, writing a new
value back, and loading the model an SAE names.

A hook yields [batch, seq, d] (residual stream, MLP out) or, for per-head hooks such as `hook_z`,
[batch, seq, heads, d_head]. An SAE with `hook_layout="heads"` reads all heads concatenated
(d_in = heads * d_head) or, with `hook_head_index`, one head. A transcoder reads its input there and
writes its output to another, flat site (`output_hookpoint`).
"""

from __future__ import annotations

from torch import Tensor

from sae.lm import load_model
from sae.model import SparseAutoencoder


def check_width(d_hook: int, sae: SparseAutoencoder, hookpoint: str | None = None) -> None:
    """Raise if the SAE cannot read a hook of width `d_hook` (per-head hooks: n_heads * d_head)."""
    if sae.cfg.d_in != d_hook:
        where = hookpoint or sae.cfg.hookpoint or "the hookpoint"
        raise ValueError(
            f"SAE reads d_in={sae.cfg.d_in} ({sae.cfg.source_format} SAE for "
            f"{sae.cfg.model_name or 'unknown model'}, {sae.cfg.hookpoint or 'unknown hook'}) but "
            f"{where} has width {d_hook}"
        )


def read_site(sae: SparseAutoencoder, acts: Tensor) -> Tensor:
    """The SAE's input from a hook activation: [b, t, d] or [b, t, heads, d_head] -> [b, t, d_in]."""
    if sae.cfg.hook_layout != "heads":
        site = acts
    elif sae.cfg.hook_head_index is not None:
        site = acts[:, :, sae.cfg.hook_head_index]
    else:
        site = acts.flatten(2)
    check_width(site.shape[-1], sae)  # e.g. a released SAE for another model of the same family
    return site


def write_site(sae: SparseAutoencoder, acts: Tensor, new: Tensor, first: int) -> Tensor:
    """`acts` with the SAE's site replaced by `new` [b, t, d_in] from position `first` on."""
    out = acts.clone()
    if sae.cfg.hook_layout == "heads" and sae.cfg.hook_head_index is not None:
        out[:, first:, sae.cfg.hook_head_index] = new[:, first:].to(acts.dtype)
    else:
        out[:, first:] = new[:, first:].reshape(out[:, first:].shape).to(acts.dtype)
    return out


def output_hookpoint(sae: SparseAutoencoder) -> str:
    """Where the SAE's output belongs: its own hookpoint, or a transcoder's output hookpoint."""
    if not sae.cfg.transcoder:
        return sae.cfg.hookpoint
    if sae.cfg.output_hookpoint is None:
        raise ValueError(
            f"a transcoder reading {sae.cfg.hookpoint} names no output_hookpoint: nowhere to write its output"
        )
    return sae.cfg.output_hookpoint


def write_output(sae: SparseAutoencoder, acts: Tensor, new: Tensor, first: int) -> Tensor:
    """`acts` at `output_hookpoint(sae)` with the SAE's output site replaced by `new` [b, t, d_out] from
    position `first` on (a transcoder's output site is flat)."""
    if not sae.cfg.transcoder:
        return write_site(sae, acts, new, first)
    out = acts.clone()
    out[:, first:] = new[:, first:].to(acts.dtype)
    return out


def load_sae_and_model(
    sae_path: str, model_name: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[SparseAutoencoder, object]:
    """The SAE at `sae_path` (any format `sae.load` reads) in eval mode, and the model it reads from:
    its cfg.model_name unless `model_name` is given."""
    from sae.formats import load

    loaded = load(sae_path, device=device).eval()
    name = model_name or loaded.cfg.model_name
    if name is None:
        raise ValueError(f"{sae_path}: the SAE's config names no model; name one (--model)")
    if loaded.cfg.hookpoint is None:
        raise ValueError(f"{sae_path}: the SAE's config names no hookpoint; it cannot be hooked into a model")
    return loaded, load_model(name, dtype, device)
