"""Reading foreign files with errors that name the file, key or tensor (shared by every converter).

Nothing here unpickles arbitrary objects: safetensors, `numpy.load(allow_pickle=False)` and
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ..config import SAEConfig
from ..io import FormatError
from ..typed_config import ConfigError


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except Exception as e:  # safetensors raises its own types for truncated or corrupt headers
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e


def safetensors_keys(path: Path) -> set[str]:
    """Tensor names in a safetensors file, reading only its header."""
    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except Exception as e:
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e


def read_npz(path: Path) -> dict[str, Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: torch.from_numpy(np.array(archive[name])) for name in archive.files}
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object arrays), truncated members
        raise FormatError(f"{path}: not a readable .npz archive ({e})") from e


def read_torch_state_dict(path: Path) -> dict[str, Any]:
    """A torch checkpoint of tensors and plain values, loaded without executing pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except Exception as e:  # UnpicklingError for anything but tensors and plain containers; corrupt zips
        raise FormatError(f"{path}: not a torch state dict loadable with weights_only=True ({e})") from e
    if not isinstance(state, dict):
        raise FormatError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def zip_member_names(path: Path) -> list[str] | None:
    """Members of a zip archive (both .npz and torch's checkpoint format are zips), or None if not a zip."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return None
    except (UnicodeDecodeError, ValueError, OSError) as e:  # a zip whose directory is corrupt
        raise FormatError(f"{path}: a zip archive with a corrupt member directory ({e})") from e


def require_tensors(tensors: dict[str, Any], names: list[str], source: Path | str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        found = ", ".join(sorted(map(str, tensors))) or "nothing"
        raise FormatError(
            f"{source}: missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}; found {found}"
        )
    for name in names:
        if not isinstance(tensors[name], Tensor):
            raise FormatError(f"{source}: {name} is a {type(tensors[name]).__name__}, expected a tensor")


def require_shape(tensor: Tensor, shape: tuple[int, ...], name: str, source: Path | str) -> None:
    if tuple(tensor.shape) != shape:
        raise FormatError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")


def require_key(cfg: dict[str, Any], key: str, source: Path | str) -> Any:
    if key not in cfg:
        raise FormatError(f"{source}: missing key {key!r}; found {', '.join(sorted(cfg)) or 'nothing'}")
    return cfg[key]


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(tensor: Tensor, name: str, source: Path | str) -> str:
    """Our dtype name for a stored tensor: the dtype comes from the file, never a default (sparsify #116)."""
    if tensor.dtype not in DTYPE_NAMES:
        raise FormatError(
            f"{source}: tensor {name} has dtype {tensor.dtype}; expected float32, bfloat16 or float16"
        )
    return DTYPE_NAMES[tensor.dtype]


def sae_config(source: Path | str, **fields: Any) -> SAEConfig:
    """SAEConfig(**fields), with any inconsistency reported against the file it came from."""
    try:
        return SAEConfig(**fields)
    except ConfigError as e:
        raise FormatError(f"{source}: {e}") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form string metadata of a safetensors header ({} when there is none)."""
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e
