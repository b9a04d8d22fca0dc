"""Released dictionaries: detect the format from the files present and their keys, convert, export.

    model = sae.formats.load("path/or/hf://org/repo/subpath")
    sae.formats.export(model, "out/for_saelens", "saelens")   # or "sparsify"

Every converter maps a foreign file onto `SparseAutoencoder`'s one layout so that encode/decode give the
source library's own forward pass (see each module's docstring for the semantics it reproduces).
"""

from __future__ import annotations

from pathlib import Path

from ..model import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder
from .dictionary_learning import load_dictionary_learning
from .files import FormatError, safetensors_keys, zip_member_names
from .gemma_scope import load_gemma_scope
from .openai import load_openai
from .saelens import export_saelens, load_saelens
from .sparsify import export_sparsify, load_sparsify

HUB_PREFIX = "hf://"

# What each format looks like on disk: shown when nothing matches.
RECOGNISED = {
    "sae": f"a folder with {CFG_FILE} + {WEIGHTS_FILE} holding W_enc, W_dec, ... (this toolkit)",
    "saelens": "a folder with cfg.json + sae_weights.safetensors",
    "sparsify": "a folder with cfg.json + sae.safetensors holding encoder.weight (one hookpoint of a run)",
    "gemma_scope": "params.npz (or its folder) holding W_enc, W_dec, b_enc, b_dec, threshold",
    "openai": "a torch state dict file holding pre_bias, encoder.weight, latent_bias, decoder.weight",
    "dictionary_learning": "a folder with ae.pt + config.json {trainer: {dict_class, ...}}",
}
EXPORTERS = {"saelens": export_saelens, "sparsify": export_sparsify}


def unknown_format(path: Path, why: str = "") -> FormatError:
    found = (
        sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()) if path.is_dir() else [path.name]
    )
    formats = "\n".join(f"  {name}: {shape}" for name, shape in RECOGNISED.items())
    return FormatError(
        f"{path}: not a recognised SAE format{': ' + why if why else ''}; "
        f"found {', '.join(found[:20]) or 'an empty folder'}{' ...' if len(found) > 20 else ''}.\n"
        f"Recognised formats:\n{formats}"
    )


def detect_file_format(path: Path) -> str:
    """A single file: npz and torch checkpoints are both zip archives; their members tell them apart."""
    members = zip_member_names(path)
    if members is None:
        raise unknown_format(path, "a single file that is neither an .npz archive nor a torch checkpoint")
    if any(m.endswith("data.pkl") for m in members):  # torch.save's zip layout: <archive>/data.pkl
        return "openai"
    if members and all(m.endswith(".npy") for m in members):
        return "gemma_scope"
    raise unknown_format(path, f"a zip archive with members {', '.join(members[:10])}")


def detect_format(path: str | Path) -> str:
    """The format of a local file or folder, from the files present and the tensor names they hold."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return detect_file_format(path)
    if (path / "sae_weights.safetensors").is_file() and (path / "cfg.json").is_file():
        return "saelens"
    if (path / "ae.pt").is_file() and (path / "config.json").is_file():
        return "dictionary_learning"
    if (path / "params.npz").is_file():
        return "gemma_scope"
    if (path / WEIGHTS_FILE).is_file() and (path / CFG_FILE).is_file():
        keys = safetensors_keys(path / WEIGHTS_FILE)
        if "encoder.weight" in keys:
            return "sparsify"
        if "W_enc" in keys:
            return "sae"
        raise unknown_format(path, f"{WEIGHTS_FILE} holds {', '.join(sorted(keys))}")
    hookpoints = sorted(
        p.name for p in path.iterdir() if (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file()
    )
    if hookpoints:  # a sparsify run: one folder per hookpoint
        raise FormatError(
            f"{path}: a sparsify run with {len(hookpoints)} hookpoints; load one of them, "
            f"e.g. {path / hookpoints[0]} (hookpoints: {', '.join(hookpoints)})"
        )
    raise unknown_format(path)


LOADERS = {
    "sae": SparseAutoencoder.load,
    "saelens": load_saelens,
    "sparsify": load_sparsify,
    "gemma_scope": load_gemma_scope,
    "openai": load_openai,
    "dictionary_learning": load_dictionary_learning,
}


def resolve(ref: str | Path) -> Path:
    """A local path, or `hf://org/repo[/subpath]` downloaded (only the subpath) with huggingface_hub."""
    ref = str(ref)
    if not ref.startswith(HUB_PREFIX):
        return Path(ref)
    parts = ref[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"{ref}: expected hf://org/repo[/subpath]")
    from huggingface_hub import snapshot_download  # only needed for hub references

    repo_id, subpath = "/".join(parts[:2]), "/".join(parts[2:])
    # The subpath is a file or a folder; a sparsify run also keeps the model's name in the root config.json.
    patterns = [subpath, f"{subpath}/*", "config.json"] if subpath else None
    local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    return local / subpath if subpath else local


def load(
    ref: str | Path, device: str = "cpu", format: str | None = None, verify: bool = True
) -> SparseAutoencoder:
    """Load an SAE in any recognised format from a local path or `hf://org/repo[/subpath]`.

    `format` skips detection (one of RECOGNISED's names); otherwise it is detected from the files.
    `verify` checks the checksums of our own format (foreign formats have none): False loads a cfg.json
    edited by hand.
    """
    path = resolve(ref)
    format = format or detect_format(path)
    if format not in LOADERS:
        raise FormatError(f"unknown format {format!r}; recognised: {', '.join(LOADERS)}")
    if format == "sae":
        return SparseAutoencoder.load(path, device, verify=verify)
    return LOADERS[format](path).to(device)


def export(model: SparseAutoencoder, path: str | Path, format: str) -> Path:
    """Write `model` in a foreign format (`saelens` or `sparsify`), refusing what the format cannot
    express."""
    if format not in EXPORTERS:
        raise ValueError(f"cannot export to {format!r}; export formats: {', '.join(EXPORTERS)}")
    return EXPORTERS[format](model, path)


__all__ = [
    "EXPORTERS",
    "LOADERS",
    "RECOGNISED",
    "FormatError",
    "detect_format",
    "export",
    "export_saelens",
    "export_sparsify",
    "load",
    "load_dictionary_learning",
    "load_gemma_scope",
    "load_openai",
    "load_saelens",
    "load_sparsify",
]
