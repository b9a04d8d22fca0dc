"""The SAE as an inference module: one class for every architecture we train or load.

Weights use one layout whatever their origin (converters in `sae.formats` map foreign files onto it):

    W_enc [d_sae, d_in]   b_enc [d_sae]   W_dec [d_sae, d_out]   b_dec [d_out]   (d_out = d_in
                                                                                but for transcoders)
    threshold [d_sae]     jumprelu, batchtopk, matryoshka (the last two learn one threshold for all
                          latents in training and encode with it at inference)
    b_mag, r_mag [d_sae]  gated (b_enc is the gate bias)
    W_skip [d_out, d_in]  with `skip_connection`

dtype policy: the weights live in `cfg.dtype`; inputs are cast to it and outputs cast back to the
input's dtype. Training keeps float32 weights and chooses its matmul dtype itself (`sae.trainer`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from .activations import top_afa
from .config import FIXED_K_ARCHITECTURES, THRESHOLD_ARCHITECTURES, SAEConfig
from .device import DTYPES
from .io import (
    FormatError,
    atomic_save_file,
    atomic_write_json,
    json_sha256,
    safetensors_metadata,
    tensor_sha256,
)
from .kernels import SparseCode, sparse_decode
from .typed_config import ConfigError, from_dict, to_dict

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FORMAT_NAME = "sae-toolkit"


class InputStats(NamedTuple):
    """Per-token statistics of a LayerNorm-ed input, needed to undo the normalisation after decoding."""

    mean: Tensor  # [..., 1]
    std: Tensor  # [..., 1]


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an SAE of this config holds, with its shape."""
    d_in, d_out, d_sae = cfg.d_in, cfg.d_out, cfg.d_sae
    shapes = {"W_enc": (d_sae, d_in), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if cfg.architecture in THRESHOLD_ARCHITECTURES:
        shapes["threshold"] = (d_sae,)
    if cfg.architecture == "gated":
        shapes |= {"b_mag": (d_sae,), "r_mag": (d_sae,)}
    if cfg.skip_connection:
        shapes["W_skip"] = (d_out, d_in)
    return shapes


class SparseAutoencoder(nn.Module):
    """encode: [..., d_in] -> [..., d_sae]; decode: [..., d_sae] -> [..., d_out]; forward = both.

    An SAE reconstructs its input (d_out = d_in); a transcoder predicts another site from it, optionally
    with a linear skip path: forward(x) = decode(encode(x)) + x @ W_skip^T."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        for name, shape in param_shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)))

    @classmethod
    def from_config(cls, cfg: SAEConfig, seed: int | None = None) -> SparseAutoencoder:
        """A freshly initialised SAE: random decoder directions, encoder tied to the decoder.

        TopK and codebook decoder rows have unit norm (Gao et al.); ReLU rows have norm 0.1 and are
        left free during training (Anthropic, April 2024). A transcoder's input and output sites differ:
        its decoder starts at zero and its rows stay free (as sparsify's), so each latent's output is
        learnt from where its random encoder row fires (on Gemma 3's block-6 MLP, 100k tokens: FVU 0.23
        and 19 % never firing, against 0.44 and 76 % from random unit rows); its skip path starts at
        zero too. The trainer then sets b_dec from the data.
        """
        model = cls(cfg)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        scale = 0.1 if cfg.architecture == "relu" else 1.0

        def unit_rows(d: int) -> Tensor:
            W = torch.randn(cfg.d_sae, d, generator=generator)
            return W / W.norm(dim=1, keepdim=True) * scale

        with torch.no_grad():
            model.W_enc.copy_(unit_rows(cfg.d_in))
            if not cfg.transcoder:  # (a transcoder's W_dec stays zero)
                model.W_dec.copy_(model.W_enc)
        return model

    # --- encoding -------------------------------------------------------------------------------

    def input_stats(self, x: Tensor) -> InputStats | None:
        """Statistics of the per-token LayerNorm that OpenAI's TopK SAEs apply to their input."""
        if self.cfg.input_norm == "none":
            return None
        mean = x.mean(dim=-1, keepdim=True)
        return InputStats(mean, (x - mean).std(dim=-1, keepdim=True))

    def _prepare(self, x: Tensor) -> Tensor:
        """Raw activations -> what the encoder matmul sees (normalised, b_dec removed)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE expects inputs [..., {self.cfg.d_in}], got {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        stats = self.input_stats(x)
        if stats is not None:
            x = (x - stats.mean) / (stats.std + 1e-5)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activations(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae]: encoder pre-activations (similarities for a codebook SAE)."""
        x = self._prepare(x)
        if self.cfg.similarity == "cosine" and self.cfg.architecture == "codebook":
            return F.normalize(x, dim=-1) @ F.normalize(self.W_enc, dim=-1).T + self.b_enc
        return x @ self.W_enc.T + self.b_enc

    @property
    def k_sparse(self) -> bool:
        """Whether `encode_sparse` applies: at most k latents per token, known before encoding."""
        return self.cfg.architecture in FIXED_K_ARCHITECTURES or (
            self.cfg.architecture == "topafa" and self.cfg.k is not None
        )

    def encode_sparse(self, x: Tensor) -> SparseCode:
        """[..., d_in] -> values, indices [..., k] for architectures with at most k active latents per token
        (topk, codebook, groupmax; topafa with a cap k, values 0 beyond a token's own count)."""
        arch, k = self.cfg.architecture, self.cfg.k
        pre = self.pre_activations(x)
        if arch == "topafa" and k is not None:
            return self._top_afa(x, SparseCode(*pre.relu().topk(k, dim=-1)))
        if arch == "topk":
            values, indices = pre.topk(k, dim=-1)
            return SparseCode(values.relu().to(x.dtype), indices)
        if arch == "codebook":
            _, indices = pre.topk(k, dim=-1)
            return SparseCode(torch.ones(indices.shape, dtype=x.dtype, device=x.device), indices)
        if arch == "groupmax":
            # k contiguous groups of d_sae / k latents; the largest of each group is its active latent
            values, within = pre.relu().unflatten(-1, (k, -1)).max(dim=-1)
            offsets = torch.arange(k, device=pre.device) * (self.cfg.d_sae // k)
            return SparseCode(values.to(x.dtype), within + offsets)
        raise ValueError(f"{arch} SAEs have no fixed number of active latents; use encode()")

    def _top_afa(self, x: Tensor, candidates: SparseCode) -> SparseCode:
        """Lee et al.'s selection among candidate activations [..., c]: the fewest whose norm is
        closest to ‖x - b_dec‖ (in the encoder's units)."""
        lead = candidates.values.shape[:-1]
        flat = SparseCode(*(t.reshape(-1, t.shape[-1]) for t in candidates))
        target = self._prepare(x).reshape(-1, self.cfg.d_in).norm(dim=-1)
        values, indices = top_afa(flat, self.W_dec.norm(dim=-1), target)
        return SparseCode(values.view(*lead, -1).to(x.dtype), indices.view(*lead, -1))

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae] dense activations, zero where a latent is inactive."""
        arch = self.cfg.architecture
        if self.k_sparse:
            values, indices = self.encode_sparse(x)
            dense = torch.zeros(*values.shape[:-1], self.cfg.d_sae, dtype=values.dtype, device=values.device)
            return dense.scatter(-1, indices, values)
        pre = self.pre_activations(x)
        if arch == "relu":
            f = pre.relu()
        elif arch in THRESHOLD_ARCHITECTURES:
            f = pre.relu() * (pre > self.threshold)
        elif arch == "topafa":  # no cap: every latent is a candidate
            every = torch.arange(self.cfg.d_sae, device=pre.device).expand_as(pre)
            values, indices = self._top_afa(x, SparseCode(pre.relu(), every))
            f = torch.zeros_like(values).scatter(-1, indices, values)
        elif arch == "gated":
            x_c = self._prepare(x)
            magnitude = x_c @ (self.W_enc * self.r_mag.exp()[:, None]).T + self.b_mag
            f = (pre > 0) * magnitude.relu()
        else:
            raise AssertionError(f"unhandled architecture {arch}")
        return f.to(x.dtype)

    def codes(self, x: Tensor, k: int | None = None) -> Tensor:
        """[..., d_in] -> LongTensor [..., k]: active latents/codes by decreasing activation, -1 where
        fewer fire.

        `k` defaults to the config's; for architectures without a fixed k (relu, jumprelu, gated) pass it.
        """
        k = k or self.cfg.k
        if k is None:
            raise ValueError(f"{self.cfg.architecture} SAE has no k in its config: pass codes(x, k=...)")
        if self.k_sparse and k == self.cfg.k:
            values, indices = self.encode_sparse(x)
        else:
            values, indices = self.encode(x).topk(k, dim=-1)
        order = values.argsort(dim=-1, descending=True, stable=True)
        values, indices = values.gather(-1, order), indices.gather(-1, order)
        return indices.masked_fill(values <= 0, -1)

    # --- decoding -------------------------------------------------------------------------------

    def decode(self, f: Tensor, stats: InputStats | None = None) -> Tensor:
        """[..., d_sae] -> [..., d_out]. For LayerNorm-input SAEs pass `stats=input_stats(x)` to get
        raw units back; the skip connection, which needs x itself, is added by `forward`."""
        x_hat = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return self._restore(x_hat, stats).to(f.dtype)

    def decode_sparse(self, code: SparseCode, stats: InputStats | None = None) -> Tensor:
        """values, indices [..., k] -> [..., d_out], touching only the k active decoder rows."""
        values, indices = code
        lead = values.shape[:-1]
        x_hat = (
            sparse_decode(
                values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype),
                indices.reshape(-1, indices.shape[-1]),
                self.W_dec,
            ).view(*lead, self.cfg.d_out)
            + self.b_dec
        )
        return self._restore(x_hat, stats).to(values.dtype)

    def _restore(self, x_hat: Tensor, stats: InputStats | None) -> Tensor:
        # OpenAI and SAELens undo their LayerNorm with std alone (x_hat * std + mean): eps only guards the
        # division
        return x_hat if stats is None else x_hat * stats.std + stats.mean

    def forward(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_out]: the reconstruction of x (a transcoder's prediction of its output
        site), in raw units."""
        stats = self.input_stats(x.to(self.W_enc.dtype))
        if self.k_sparse:
            x_hat = self.decode_sparse(self.encode_sparse(x), stats)
        else:
            x_hat = self.decode(self.encode(x), stats)
        if self.cfg.skip_connection:
            x_hat = x_hat + (x.to(self.W_skip.dtype) @ self.W_skip.T).to(x_hat.dtype)
        return x_hat

    # --- persistence ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` and `sae.safetensors` into directory `path`, each atomically (other libraries'
        layouts: `sae.export`). The weights file's metadata holds the sha256 of every tensor and of the
        cfg, which `load` checks."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in [*path.glob(f".{CFG_FILE}.*.tmp"), *path.glob(f".{WEIGHTS_FILE}.*.tmp")]:
            stale.unlink()  # half-written by a killed save
        cfg = to_dict(self.cfg)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        metadata = {"format": FORMAT_NAME, "sha256.cfg": json_sha256(cfg)}
        metadata |= {f"sha256.{name}": tensor_sha256(t) for name, t in tensors.items()}
        atomic_write_json(path / CFG_FILE, {"format": FORMAT_NAME, **cfg})
        atomic_save_file(tensors, path / WEIGHTS_FILE, metadata=metadata)
        return path

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", verify: bool = True
    ) -> SparseAutoencoder:
        """Read a directory written by `save`; check every tensor's presence, shape, dtype and finiteness,
        and (with `verify`) the checksums of the tensors and of cfg.json that `save` recorded. Pass
        verify=False to load a cfg.json edited by hand."""
        path = Path(path)
        cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
        cfg = read_cfg(cfg_path)
        try:
            data = weights_path.read_bytes()
            tensors = load_safetensors(data)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{weights_path}: missing; an SAE directory holds {CFG_FILE} and {WEIGHTS_FILE}"
            ) from None
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise FormatError(f"{weights_path}: not a readable safetensors file ({e})") from e
        checksums = safetensors_metadata(data)
        if verify:
            check_checksums(cfg, tensors, checksums, cfg_path, weights_path)
        for name, tensor in tensors.items():
            if tensor.dtype != DTYPES[cfg.dtype]:
                raise FormatError(
                    f"{weights_path}: tensor {name} is {tensor.dtype}, {cfg_path} says dtype {cfg.dtype}"
                )
        return cls.from_tensors(cfg, tensors, source=str(weights_path)).to(device)

    @classmethod
    def from_tensors(
        cls, cfg: SAEConfig, tensors: dict[str, Tensor], source: str = "tensors"
    ) -> SparseAutoencoder:
        """Build an SAE from tensors in our layout, naming any missing, extra, misshapen or non-finite one."""
        expected = param_shapes(cfg)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise FormatError(
                f"{source}: tensors do not match a {cfg.architecture} SAE"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unexpected {', '.join(extra)}" if extra else "")
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise FormatError(
                    f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
                )
            if not torch.isfinite(tensors[name]).all():
                raise FormatError(f"{source}: tensor {name} contains NaN or inf")
        model = cls(cfg)
        dtype = DTYPES[cfg.dtype]
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(tensors[name].to(dtype))
        return model

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        where = f"{c.hookpoint} -> {c.output_hookpoint}" if c.transcoder else c.hookpoint
        kind = "transcoder, " if c.transcoder else ""
        return f"{kind}{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hookpoint={where}"


def read_cfg(cfg_path: Path) -> SAEConfig:
    """An SAEConfig from our cfg.json, every field checked; errors name the file."""
    try:
        cfg_data = json.loads(cfg_path.read_bytes().decode())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{cfg_path}: missing; an SAE directory holds {CFG_FILE} and {WEIGHTS_FILE}"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg_data, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object of SAE settings, got {cfg_data!r:.60}")
    if cfg_data.pop("format", FORMAT_NAME) != FORMAT_NAME:
        raise ConfigError(f"{cfg_path}: format is not {FORMAT_NAME!r}")
    return from_dict(SAEConfig, cfg_data, where=str(cfg_path))


def check_checksums(
    cfg: SAEConfig, tensors: dict[str, Tensor], checksums: dict[str, str], cfg_path: Path, weights_path: Path
) -> None:
    """The digests `save` wrote into the weights' metadata against what was read; files saved before
    checksums existed load with a warning."""
    if "sha256.cfg" not in checksums:
        warnings.warn(
            f"{weights_path}: saved without checksums (by an earlier version); not verified", stacklevel=3
        )
        return
    if json_sha256(to_dict(cfg)) != checksums["sha256.cfg"]:
        raise FormatError(
            f"{cfg_path} is not the cfg saved with {weights_path} (its sha256 differs): corrupt, or edited "
            "by hand (then load with verify=False)"
        )
    for (
        name,
        tensor,
    ) in tensors.items():  # a tensor with no digest is an unexpected one: from_tensors names it
        if f"sha256.{name}" in checksums and checksums[f"sha256.{name}"] != tensor_sha256(tensor):
            raise FormatError(
                f"{weights_path}: tensor {name} does not match its saved sha256; the file is corrupt"
            )
