"""Training: a loop over batches of activations that knows nothing of the language model.

    trainer = Trainer([SAEConfig(...), SAEConfig(...)], TrainConfig(...))
    models = trainer.fit(batches)   # Tensor [N, d_in], a BatchSource, or any iterable of [B, d_in]

Every SAE in the list sees every batch, so a sweep over k, width or architecture costs one read of
the data. Inputs are scaled so that E||x|| = sqrt(d_in); the factor is folded into the saved weights,
which therefore work on raw activations. Checkpoints (every N steps, and on SIGINT/SIGTERM) hold
everything the loop needs to continue exactly where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import secrets
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from .config import SAEConfig, TrainConfig, to_dict
from .distributed import Distributed
from .io import atomic_save_file, atomic_write_json
from .kernels import SparseCode, dense_decode, dense_topk_encode, sparse_decode, topk_encode
from .model import SparseAutoencoder

CHECKPOINT_DIR = "checkpoint"
METRICS_LOG = "metrics.jsonl"


# --- device and dtype policy: the one place that decides them ------------------------------------


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TrainConfig.device is {name!r} but CUDA is not available on this machine")
    return device


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- data -----------------------------------------------------------------------------------------


@runtime_checkable
class BatchSource(Protocol):
    """Batches that can be replayed from any position: what exact resumption needs."""

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        """Batch `start`, `start + 1`, ...: [batch, d_in] each, the same sequence for the same source."""
        ...


class TensorBatches:
    """An in-memory [N, d_in] tensor as shuffled batches, reshuffled every epoch from a fixed seed.

    With `world_size` ranks, global step i covers rows [i * B * W, (i + 1) * B * W) of the epoch's
    permutation and rank r takes the r-th B of them: together the ranks see what one process with
    batch size B * W would see.
    """

    def __init__(self, data: Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if data.ndim != 2:
            raise ValueError(f"activations must be [tokens, d_in], got shape {tuple(data.shape)}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = max(1, len(data) // (batch_size * world_size))

    def __len__(self) -> int:
        return self.per_epoch

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        epoch, pos = divmod(start, self.per_epoch)
        for epoch in itertools.count(epoch):
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch))
            for pos in range(pos, self.per_epoch):
                first = (pos * self.world_size + self.rank) * self.batch_size
                yield self.data[order[first : first + self.batch_size]]
            pos = 0


class _IterableBatches:
    """Any iterable of batches; resuming skips the batches already trained on."""

    def __init__(self, iterable: Iterable[Tensor]):
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]  (TypeError when it has none)

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        return itertools.islice(iter(self.iterable), start, None)


def as_batch_source(
    data: Tensor | BatchSource | Iterable[Tensor], cfg: TrainConfig, dist: Distributed
) -> BatchSource:
    """A tensor is sharded by rank here; any other source must already be this rank's share."""
    if isinstance(data, Tensor):
        return TensorBatches(data, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    if isinstance(data, BatchSource):
        return data
    return _IterableBatches(data)


# --- one SAE under training ------------------------------------------------------------------------


@dataclass
class Member:
    """An SAE being trained, with its optimiser and firing statistics."""

    name: str
    model: SparseAutoencoder
    optimizer: torch.optim.Adam
    lr: float
    tokens_since_fired: Tensor  # [d_sae] int64
    window: dict[str, float] = field(default_factory=dict)  # sums of logged terms since the last log
    window_fires: Tensor | None = None  # [d_sae] firing counts since the last log
    window_steps: int = 0
    window_tokens: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def cfg(self) -> SAEConfig:
        return self.model.cfg


StepTerms = dict[str, Tensor]  # scalar loss terms of one step, for logging


def default_lr(d_sae: int) -> float:
    """Gao et al. 2024: lr proportional to 1 / sqrt(d_sae / 2^14), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(tokens: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `lr_decay_fraction`."""
    warmup, decay = total * cfg.lr_warmup_fraction, total * cfg.lr_decay_fraction
    if warmup and tokens < warmup:
        return (tokens + 1) / warmup
    if decay and tokens > total - decay:
        return max(0.0, (total - tokens) / decay)
    return 1.0


def sae_name(cfg: SAEConfig) -> str:
    parts = [cfg.hookpoint, cfg.architecture, f"k{cfg.k}" if cfg.k else None, str(cfg.d_sae)]
    return "_".join(p for p in parts if p)


# --- objectives -----------------------------------------------------------------------------------


class Objective:
    """Forward pass and loss of one architecture on a batch x: [batch, d_in] (scaled inputs)."""

    def __init__(self, train_cfg: TrainConfig):
        self.cfg = train_cfg
        self.compute_dtype = COMPUTE_DTYPES[train_cfg.compute_dtype]
        sparse = train_cfg.sparse_kernels
        self.encode = topk_encode if sparse else dense_topk_encode
        self.decode = sparse_decode if sparse else dense_decode

    def __call__(self, m: Member, x: Tensor, progress: float) -> tuple[Tensor, StepTerms, Tensor]:
        """-> (loss, terms, fires: [d_sae] how often each latent fired in this batch)."""
        return getattr(self, m.cfg.architecture)(m, x, progress)

    def topk(self, m: Member, x: Tensor, progress: float):
        sae, cfg = m.model, m.cfg
        dead = (m.tokens_since_fired >= self.cfg.dead_after_tokens).nonzero().flatten()
        k_aux = self.cfg.k_aux or cfg.d_in // 2
        code, aux = self.encode(x, sae.W_enc, sae.b_enc, cfg.k, pre_bias=sae.b_dec, relu=True,
                                compute_dtype=self.compute_dtype, aux_latents=dead, k_aux=k_aux)
        x_hat = self.decode(code.values, code.indices, sae.W_dec) + sae.b_dec
        residual = x - x_hat
        fvu = residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        terms, loss = {"fvu": fvu}, fvu
        if aux is not None:
            # AuxK (Gao et al.): dead latents learn to explain what the live ones miss. The residual
            # already contains b_dec, so the auxiliary reconstruction must not add it again.
            target = residual.detach()
            aux_hat = self.decode(aux.values, aux.indices, sae.W_dec)
            terms["auxk"] = (aux_hat - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
            loss = loss + self.cfg.auxk_coefficient * terms["auxk"]
        return loss, terms, self._fires(code, cfg.d_sae)

    def codebook(self, m: Member, x: Tensor, progress: float):
        sae, cfg = m.model, m.cfg
        x_c, keys = x - sae.b_dec, sae.W_enc
        if cfg.similarity == "cosine":
            x_c, keys = F.normalize(x_c, dim=-1), F.normalize(keys, dim=-1)
        code, _ = self.encode(x_c, keys, sae.b_enc, cfg.k, relu=False, compute_dtype=self.compute_dtype)
        # Binary activations forward; straight-through backward, so the keys learn which code to pick.
        ones = 1 + code.values - code.values.detach()
        x_hat = self.decode(ones, code.indices, sae.W_dec) + sae.b_dec
        fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        fires = torch.bincount(code.indices.flatten(), minlength=cfg.d_sae)
        return fvu, {"fvu": fvu}, fires

    def relu(self, m: Member, x: Tensor, progress: float):
        sae, cd = m.model, self.compute_dtype
        f = F.linear((x - sae.b_dec).to(cd), sae.W_enc.to(cd), sae.b_enc.to(cd)).float().relu()  # [batch, d_sae]
        # The decoder stays in float32 (bf16 here cut feature recovery on synthetic data from 0.96 to 0.62).
        x_hat = f @ sae.W_dec + sae.b_dec
        residual = x - x_hat
        mse = residual.pow(2).sum(-1).mean()
        # Anthropic's April 2024 penalty: activations weighted by decoder norms, so that shrinking
        # the decoder cannot buy sparsity; its coefficient warms up linearly.
        l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        l1_coefficient = self.cfg.l1_coefficient * min(1.0, progress / max(self.cfg.l1_warmup_fraction, 1e-12))
        fvu = residual.pow(2).sum().detach() / (x - x.mean(0)).pow(2).sum()
        return mse + l1_coefficient * l1, {"fvu": fvu, "mse": mse, "l1": l1}, (f > 0).sum(0)

    @staticmethod
    def _fires(code: SparseCode, d_sae: int) -> Tensor:
        return torch.bincount(code.indices.flatten(), weights=(code.values > 0).flatten().float(),
                              minlength=d_sae)


# --- initialisation from data ---------------------------------------------------------------------


def kmeans(x: Tensor, n: int, iters: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means on x: [rows, d] -> centroids [n, d], started from random rows.

    An empty cluster keeps its previous centroid. Distances run in x's dtype on x's device.
    """
    centroids = x[torch.randint(len(x), (n,), generator=generator).to(x.device)].clone()
    for _ in range(iters):
        # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2)
        nearest = (x @ centroids.T - centroids.pow(2).sum(-1) / 2).argmax(dim=-1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        counts = torch.bincount(nearest, minlength=n)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


@torch.no_grad()
def init_from_data(m: Member, x: Tensor, train_cfg: TrainConfig, generator: torch.Generator) -> None:
    """b_dec = mean of the (scaled) data; a codebook SAE also gets its codes from the data."""
    sae = m.model
    sae.b_dec.copy_(x.mean(0))
    if m.cfg.architecture != "codebook":
        return
    centered = x - sae.b_dec
    if train_cfg.codebook_init == "kmeans":
        centroids = kmeans(centered, m.cfg.d_sae, iters=10, generator=generator)
    else:
        centroids = centered[torch.randint(len(x), (m.cfg.d_sae,), generator=generator).to(x.device)]
    # Each input is rebuilt from k codes, so each code starts as 1/k of a typical input.
    sae.W_dec.copy_(centroids / m.cfg.k)
    sae.W_enc.copy_(centroids)
    if m.cfg.similarity == "inner":
        sae.b_enc.copy_(-centroids.pow(2).sum(-1) / 2)  # inner-product ranking = nearest centroid
    else:
        sae.b_enc.zero_()


@torch.no_grad()
def fold_input_scale(model: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of `model`, trained on x * scale, that works on raw x with activations in raw units.

    pre(scale * x) = scale * pre'(x) with b_enc' = b_enc / scale and b_dec' = b_dec / scale, so the
    activations of raw x are f / scale and decoder directions are unchanged. A codebook SAE's
    activations are binary, so its decoder vectors take the factor instead.
    """
    folded = SparseAutoencoder.from_tensors(model.cfg, {n: p.detach().clone() for n, p in model.named_parameters()})
    folded.b_enc.div_(scale)
    folded.b_dec.div_(scale)
    if model.cfg.architecture == "codebook":
        folded.W_dec.div_(scale)
    return folded.to(model.W_enc.device)


# --- the trainer ----------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """Bad data met during training; the last checkpoint is left as it was."""


class Trainer:
    """Trains SAEs on batches of activations; under torchrun, data-parallel across ranks.

    Data parallelism touches four places, each marked `dist`: ranks agree on stopping before a step,
    average gradients after backward, sum firing counts, and only rank 0 writes files.
    """

    def __init__(self, sae_cfgs: list[SAEConfig] | SAEConfig, cfg: TrainConfig, dist: Distributed | None = None):
        sae_cfgs = [sae_cfgs] if isinstance(sae_cfgs, SAEConfig) else list(sae_cfgs)
        if not sae_cfgs:
            raise ValueError("Trainer needs at least one SAEConfig")
        for c in sae_cfgs:
            if not c.trainable:
                raise ValueError(f"architecture {c.architecture!r} can be loaded but not trained; "
                                 "trainable: topk, relu, codebook")
        widths = {c.d_in for c in sae_cfgs}
        if len(widths) > 1:
            raise ValueError(f"SAEs trained from one read must share d_in; got {sorted(widths)}")
        self.cfg = cfg
        self.d_in = widths.pop()
        device = resolve_device(cfg.device)
        self.dist = dist or Distributed.from_env(device.type)
        self.device = self.dist.device(device)
        self.out_dir = Path(cfg.out_dir)
        self.objective = Objective(cfg)
        self.members: list[Member] = []
        names = [sae_name(c) for c in sae_cfgs]
        for i, (name, sae_cfg) in enumerate(zip(names, sae_cfgs)):
            name = f"{name}_{i}" if names.count(name) > 1 else name
            model = SparseAutoencoder.from_config(sae_cfg, seed=cfg.seed + i).to(self.device)
            lr = cfg.lr or default_lr(sae_cfg.d_sae)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                         fused=True)  # one kernel for all tensors: ~6x faster than foreach on CPU
            self.members.append(Member(name, model, optimizer, lr,
                                       torch.zeros(sae_cfg.d_sae, dtype=torch.int64, device=self.device)))
        self.step = 0
        self.tokens = 0
        self.input_scale: float | None = None
        self.wandb_id: str | None = None
        self._stop_signal: int | None = None

    # -- the loop --

    def fit(self, data: Tensor | BatchSource | Iterable[Tensor]) -> list[SparseAutoencoder]:
        """Train every SAE on `data`; returns them folded to raw units (also saved under out_dir)."""
        source = as_batch_source(data, self.cfg, self.dist)
        total = self._total_tokens(source)
        resumed = self.load_checkpoint()
        batches = source.batches(self.step)
        if not resumed:
            batches = self._init_from_first_batches(batches)
        main = self.dist.is_main
        log = self._open_log() if main else None
        wandb_run = self._start_wandb() if self.cfg.wandb and main else None
        started, tokens_at_start = time.perf_counter(), self.tokens
        bar = tqdm(total=total, initial=self.tokens, unit="tok", unit_scale=True, desc="train",
                   dynamic_ncols=True, disable=not main)
        with _stop_requests(self):
            for batch in batches:
                if self.tokens >= total:
                    break
                try:
                    x, error = self._check_batch(batch, self.step, self.tokens), None
                except TrainingError as e:
                    x, error = None, e
                if self._ranks_agree_to_stop(error):
                    self.save_checkpoint()
                    bar.close()
                    self._raise_stop()
                x = x * self.input_scale
                for m in self.members:
                    self._train_step(m, x, total)
                self.step += 1
                self.tokens += len(x) * self.dist.world_size
                bar.update(len(x) * self.dist.world_size)
                if self.step % self.cfg.log_every == 0 and main:
                    self._log(log, wandb_run, bar, total)
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        bar.close()
        if self.tokens < total:
            print(f"data ran out after {self.tokens:,} of {total:,} tokens")
        seconds = time.perf_counter() - started
        if main:
            self._log(log, wandb_run, None, total)
            log.close()
        models = self._save_final(seconds, self.tokens - tokens_at_start)
        self.save_checkpoint()
        if wandb_run is not None:
            wandb_run.finish()
        return models

    def _ranks_agree_to_stop(self, error: TrainingError | None) -> bool:
        """Before a step's collectives, every rank learns whether any rank met bad data or was asked
        to stop, so all ranks stop together instead of waiting forever on a missing peer (dist)."""
        flags = torch.zeros(2, self.dist.world_size, device=self.device)
        flags[0, self.dist.rank] = error is not None
        flags[1, self.dist.rank] = self._stop_signal is not None
        self.dist.sum_(flags)
        if error is not None:
            raise error
        failed = flags[0].nonzero().flatten().tolist()
        if failed:
            raise TrainingError(f"step {self.step}: rank {failed} met bad data (see its error); all ranks stop; "
                                f"the last checkpoint in {self.out_dir / CHECKPOINT_DIR} is intact")
        if flags[1].any() and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # a peer was asked to stop: stop with it
        return self._stop_signal is not None

    def _train_step(self, m: Member, x: Tensor, total: int) -> None:
        progress = self.tokens / total
        for group in m.optimizer.param_groups:
            group["lr"] = m.lr * lr_factor(self.tokens, total, self.cfg)
        loss, terms, fires = self.objective(m, x, progress)
        if not torch.isfinite(loss):
            raise TrainingError(f"step {self.step}: loss of {m.name} is {loss.item()}; no weights were "
                                f"updated and the last checkpoint in {self.out_dir / CHECKPOINT_DIR} is intact")
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_([p.grad for p in m.model.parameters()])  # dist: data-parallel gradient
        if m.cfg.architecture == "topk":
            _project_out_radial_grad(m.model.W_dec)
        m.optimizer.step()
        if m.cfg.architecture == "topk":
            with torch.no_grad():
                m.model.W_dec.div_(m.model.W_dec.norm(dim=1, keepdim=True))
        with torch.no_grad():
            fires = self.dist.sum_(fires.float())  # dist: every rank tracks the same dead latents
            m.tokens_since_fired += len(x) * self.dist.world_size
            m.tokens_since_fired[fires > 0] = 0
            m.window_fires = fires if m.window_fires is None else m.window_fires + fires
            for key, value in terms.items():
                m.window[key] = m.window.get(key, 0.0) + value.detach()
            m.window["loss"] = m.window.get("loss", 0.0) + loss.detach()
            m.window_steps += 1
            m.window_tokens += len(x)

    def _check_batch(self, batch: Tensor, index: int, tokens_before: int) -> Tensor:
        """The batch as float32 on the device, or an error naming it if its shape or values are bad."""
        where = f"batch {index} (tokens {tokens_before:,} onward)"
        if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.shape[1] != self.d_in:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise TrainingError(f"{where}: expected activations [batch, {self.d_in}], got {shape}")
        x = batch.to(self.device, torch.float32, non_blocking=True)
        bad = ~torch.isfinite(x)
        if bad.any():
            rows = bad.any(dim=1).nonzero().flatten()
            raise TrainingError(f"{where}: {int(bad.sum())} NaN/inf values in rows {rows[:5].tolist()}"
                                f"{'...' if len(rows) > 5 else ''}; no weights were updated and the last "
                                f"checkpoint in {self.out_dir / CHECKPOINT_DIR} is intact")
        return x

    def _total_tokens(self, source: BatchSource) -> int:
        if self.cfg.total_tokens is not None:
            return self.cfg.total_tokens
        if isinstance(source, TensorBatches):
            return len(source.data)
        try:
            return len(source) * self.cfg.batch_size * self.dist.world_size  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("TrainConfig.total_tokens is needed for data of unknown length "
                             "(it sets the learning-rate schedule)") from None

    def _init_from_first_batches(self, batches: Iterator[Tensor]) -> Iterator[Tensor]:
        """Scale, b_dec and codebooks from the first batches, which are then trained on as usual."""
        rows_needed = max([self.cfg.batch_size] + [4 * m.cfg.d_sae for m in self.members
                                                   if m.cfg.architecture == "codebook"])
        first, rows = [], 0
        for index, batch in enumerate(batches):
            first.append(batch)
            self._check_batch(batch, index, rows)
            rows += len(batch)
            if rows >= rows_needed:
                break
        if not first:
            raise ValueError("no activations: the data yielded no batch")
        x = torch.cat([b.to(self.device, torch.float32) for b in first])
        mean_norm = x.norm(dim=1).mean()
        self.dist.average_([mean_norm])  # dist: statistics over every rank's first batches
        self.input_scale = math.sqrt(self.d_in) / mean_norm.item() if self.cfg.normalize_inputs else 1.0
        generator = torch.Generator().manual_seed(self.cfg.seed)
        for m in self.members:
            init_from_data(m, x * self.input_scale, self.cfg, generator)
            self.dist.average_([m.model.b_dec.data])
            self.dist.broadcast_([p.data for p in m.model.parameters()])  # and rank 0's codebooks
        return itertools.chain(first, batches)

    # -- logging --

    def _open_log(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return open(self.out_dir / METRICS_LOG, "a")

    def _start_wandb(self):
        import wandb

        if self.wandb_id is None:
            self.wandb_id = secrets.token_hex(4)  # kept in checkpoints, so a resumed run continues the same wandb run
        return wandb.init(
            project=self.cfg.wandb_project, name=self.cfg.run_name, id=self.wandb_id, resume="allow",
            dir=str(self.out_dir), config={"train": to_dict(self.cfg), "saes": {m.name: to_dict(m.cfg) for m in self.members}},
        )

    def metrics(self, m: Member) -> dict[str, float]:
        """Means over the steps since the last log, plus the state of the latents."""
        steps = max(m.window_steps, 1)
        out = {key: float(value) / steps for key, value in m.window.items()}
        if m.window_fires is not None and m.window_tokens:
            out["l0"] = float(m.window_fires.sum()) / m.window_tokens
            out["dense_fraction"] = float((m.window_fires / m.window_tokens > self.cfg.dense_threshold).float().mean())
        out["dead_fraction"] = float((m.tokens_since_fired >= self.cfg.dead_after_tokens).float().mean())
        out["lr"] = m.optimizer.param_groups[0]["lr"]
        return out

    def _log(self, log, wandb_run, bar, total: int) -> None:
        if not any(m.window_steps for m in self.members):
            return
        for m in self.members:
            record = {"step": self.step, "tokens": self.tokens, "sae": m.name, **self.metrics(m)}
            log.write(json.dumps(record) + "\n")
            if wandb_run is not None:
                wandb_run.log({f"{m.name}/{k}": v for k, v in record.items() if k not in ("step", "sae")},
                              step=self.step)
            m.last_metrics = record
            m.window, m.window_fires, m.window_steps, m.window_tokens = {}, None, 0, 0
        log.flush()
        if bar is not None:
            first = self.members[0].last_metrics
            bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first.get('l0', 0):.1f}")

    def _save_final(self, seconds: float, tokens_this_run: int) -> list[SparseAutoencoder]:
        models = []
        for m in self.members:
            model = fold_input_scale(m.model, self.input_scale)
            models.append(model)
            if not self.dist.is_main:
                continue
            model.save(self.out_dir / m.name)
            summary = {
                **m.last_metrics,
                "tokens": self.tokens, "steps": self.step, "input_scale": self.input_scale,
                "train_seconds_this_run": seconds,
                "tokens_per_second_this_run": tokens_this_run / seconds if seconds else None,
            }
            atomic_write_json(self.out_dir / m.name / "metrics.json", summary)
        return models

    # -- checkpoints --

    def save_checkpoint(self) -> Path:
        """Write the whole training state to out_dir/checkpoint, replacing the previous one atomically.

        Ranks hold identical state, so rank 0 writes and the others wait for it (dist)."""
        final = self.out_dir / CHECKPOINT_DIR
        if self.dist.is_main:
            self._write_checkpoint(final)
        self.dist.barrier()
        return final

    def _write_checkpoint(self, final: Path) -> None:
        tmp, old = final.with_name(CHECKPOINT_DIR + ".tmp"), final.with_name(CHECKPOINT_DIR + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for m in self.members:
            tensors = {f"param.{n}": p.detach() for n, p in m.model.named_parameters()}
            tensors["tokens_since_fired"] = m.tokens_since_fired
            for n, p in m.model.named_parameters():
                for key, value in m.optimizer.state.get(p, {}).items():
                    tensors[f"adam.{n}.{key}"] = value.reshape(-1) if key == "step" else value
            atomic_save_file({k: v.cpu() for k, v in tensors.items()}, tmp / f"{m.name}.safetensors")
        atomic_write_json(tmp / "state.json", {
            "step": self.step, "tokens": self.tokens, "input_scale": self.input_scale,
            "wandb_id": self.wandb_id, "saes": {m.name: to_dict(m.cfg) for m in self.members},
            "train": to_dict(self.cfg),
        })
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Restore from out_dir/checkpoint if there is one; False when starting fresh."""
        path = self.out_dir / CHECKPOINT_DIR
        if not path.exists() and (self.out_dir / (CHECKPOINT_DIR + ".old")).exists():
            path = self.out_dir / (CHECKPOINT_DIR + ".old")  # killed between the two renames
        if not (path / "state.json").exists():
            return False
        state = json.loads((path / "state.json").read_text())
        saved = set(state["saes"])
        expected = {m.name for m in self.members}
        if saved != expected:
            raise ValueError(f"{path}: checkpoint holds SAEs {sorted(saved)}, this run trains {sorted(expected)}; "
                             f"use another out_dir or delete the checkpoint")
        for m in self.members:
            tensors = load_file(path / f"{m.name}.safetensors", device=str(self.device))
            with torch.no_grad():
                for n, p in m.model.named_parameters():
                    p.copy_(tensors[f"param.{n}"])
                    keys = [k for k in tensors if k.startswith(f"adam.{n}.")]
                    if keys:
                        m.optimizer.state[p] = {k.rsplit(".", 1)[1]: tensors[k] for k in keys}
                        m.optimizer.state[p]["step"] = m.optimizer.state[p]["step"].reshape(())
            m.tokens_since_fired = tensors["tokens_since_fired"]
        self.step, self.tokens = state["step"], state["tokens"]
        self.input_scale, self.wandb_id = state["input_scale"], state["wandb_id"]
        print(f"resuming from {path} at step {self.step:,} ({self.tokens:,} tokens)")
        return True

    def _raise_stop(self) -> None:
        where = self.out_dir / CHECKPOINT_DIR
        if self._stop_signal == signal.SIGINT:
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved to {where}")
        raise SystemExit(f"terminated at step {self.step}; checkpoint saved to {where}")


def _project_out_radial_grad(W_dec: torch.nn.Parameter) -> None:
    """Remove the part of each decoder row's gradient along the row: rows stay unit norm to first order."""
    if W_dec.grad is not None:
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec


class _stop_requests:
    """Within the block, SIGINT/SIGTERM ask the trainer to checkpoint after the current step and stop."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict[int, object] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.trainer._stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.trainer._stop_signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(
    data: Tensor | BatchSource | Iterable[Tensor], train_cfg: TrainConfig, sae_cfg: SAEConfig
) -> SparseAutoencoder:
    """Train one SAE; see `Trainer` for several at once."""
    return Trainer([sae_cfg], train_cfg).fit(data)[0]
