"""Training: a loop over batches of activations that knows nothing of the language model.

    trainer = Trainer([SAEConfig(...), SAEConfig(...)], TrainConfig(...))
    models = trainer.fit(batches)   # Tensor [N, d_in], a BatchSource, or any iterable of [B, d_in]
    # transcoders: pairs (inputs [N, d_in], targets [N, d_out]), or batches of such pairs

Every SAE in the list sees every batch, so a sweep over k, width or architecture costs one read of
the data. Inputs are scaled so that E||x|| = sqrt(d_in) (a transcoder's targets so that E||y|| =
sqrt(d_out)); the factors are folded into the saved weights, which therefore work on raw activations.
Checkpoints (every N steps, and on SIGINT/SIGTERM) hold everything the loop needs to continue exactly
where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import shutil
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from .batches import Batch, BatchSource, TensorBatches, as_batch_source
from .config import TRAINABLE_ARCHITECTURES, SAEConfig, TrainConfig
from .device import resolve_device
from .distributed import Distributed
from .io import atomic_save_file, atomic_write_json
from .model import SparseAutoencoder
from .objectives import Objective, fold_scales, init_from_data
from .typed_config import to_dict

CHECKPOINT_DIR = "checkpoint"
METRICS_LOG = "metrics.jsonl"
UNIT_NORM_DECODER = ("topk", "batchtopk", "matryoshka", "topafa", "jumprelu")
"""Architectures whose decoder rows stay unit norm (ReLU's are free under its norm-weighted penalty;
codebook vectors carry magnitudes)."""
LEARNT_BY_RULE = {"batchtopk": ("threshold",), "matryoshka": ("threshold",), "topafa": ("b_enc",)}
"""Parameters an architecture sets without gradients: a moving average, or a bias it leaves at zero."""


# --- one SAE under training ------------------------------------------------------------------------


@dataclass
class Member:
    """An SAE being trained, with its optimiser and firing statistics."""

    name: str
    model: SparseAutoencoder
    optimizer: torch.optim.Adam
    lr: float
    tokens_since_fired: Tensor  # [d_sae] int64
    state: dict[str, Tensor] = field(default_factory=dict)  # the objective's own (checkpointed)
    window: dict[str, float] = field(default_factory=dict)  # sums of logged terms since the last log
    window_fires: Tensor | None = None  # [d_sae] firing counts since the last log
    window_steps: int = 0
    window_tokens: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def cfg(self) -> SAEConfig:
        return self.model.cfg


def default_lr(d_sae: int) -> float:
    """lr proportional to 1 / sqrt(d_sae / 2^14) as Gao et al. 2024, but 1.6e-3 at 16k latents, 8x theirs.

    Their 2e-4 assumes tens of thousands of steps; in runs of a few hundred steps it leaves Adam
    step-starved (measured, gap.py / gemma_gap.py: planted data, 300k tokens at batch 1024, MMCS 0.665 ->
    0.996; Gemma 3 270M resid, d_sae 8192, 1M tokens, held-out FVU 0.125 -> 0.037), while a 5M-token
    run ends the same (FVU 0.163 -> 0.164). 16x still trains; 32x is worse than 8x."""
    return 1.6e-3 / math.sqrt(d_sae / 2**14)


def lr_factor(tokens: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `lr_decay_fraction`."""
    warmup, decay = total * cfg.lr_warmup_fraction, total * cfg.lr_decay_fraction
    if warmup and tokens < warmup:
        return (tokens + 1) / warmup
    if decay and tokens > total - decay:
        return max(0.0, (total - tokens) / decay)
    return 1.0


def param_groups(model: SparseAutoencoder, cfg: TrainConfig) -> list[dict]:
    """The trained parameters, JumpReLU's thresholds in a group of their own whose lr is scaled by
    `threshold_lr_scale` (Adam moves a parameter by about lr per step, whatever its scale)."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    thresholds = [p for n, p in trained if n == "threshold"]
    groups = [{"params": [p for n, p in trained if n != "threshold"], "lr_scale": 1.0}]
    return groups + ([{"params": thresholds, "lr_scale": cfg.threshold_lr_scale}] if thresholds else [])


def sae_name(cfg: SAEConfig) -> str:
    """e.g. `blocks.6.hook_resid_post_topk_k32_8192`, `blocks.6.mlp.hook_in_skip_transcoder_topk_k32_8192`."""
    kind = ("skip_transcoder" if cfg.skip_connection else "transcoder") if cfg.transcoder else None
    parts = [cfg.hookpoint, kind, cfg.architecture, f"k{cfg.k}" if cfg.k else None, str(cfg.d_sae)]
    return "_".join(p for p in parts if p)


# --- the trainer ----------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """Bad data met during training; the last checkpoint is left as it was."""


class Trainer:
    """Trains SAEs on batches of activations; under torchrun, data-parallel across ranks.

    Data parallelism touches four places, each marked `dist`: ranks agree on stopping before a step,
    average gradients after backward, sum firing counts, and only rank 0 writes files.
    """

    def __init__(
        self, sae_cfgs: list[SAEConfig] | SAEConfig, cfg: TrainConfig, dist: Distributed | None = None
    ):
        sae_cfgs = [sae_cfgs] if isinstance(sae_cfgs, SAEConfig) else list(sae_cfgs)
        if not sae_cfgs:
            raise ValueError("Trainer needs at least one SAEConfig")
        for c in sae_cfgs:
            if not c.trainable:
                raise ValueError(
                    f"architecture {c.architecture!r} can be loaded but not trained; "
                    f"trainable: {', '.join(TRAINABLE_ARCHITECTURES)}"
                )
            # what released SAEs carry but the objectives do not train (they would be ignored in training)
            unsupported = {
                "input_norm": c.input_norm != "none",
                "skip_connection (an SAE's; skip transcoders train)": c.skip_connection and not c.transcoder,
                "apply_b_dec_to_input (the default for SAEs, not for transcoders)": c.apply_b_dec_to_input
                == c.transcoder,
                "a codebook transcoder": c.transcoder and c.architecture == "codebook",
            }
            if any(unsupported.values()):
                names = ", ".join(name for name, set_ in unsupported.items() if set_)
                raise ValueError(f"the trainer cannot train {names}")
        widths = {(c.d_in, c.d_out, c.transcoder) for c in sae_cfgs}
        if len(widths) > 1:
            raise ValueError(
                "the SAEs trained from one read must share d_in, and d_out if they are transcoders "
                f"(they read the same batches); got (d_in, d_out, transcoder) = {sorted(widths)}"
            )
        self.cfg = cfg
        self.d_in, self.d_out, self.transcoders = widths.pop()
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
            for param in LEARNT_BY_RULE.get(sae_cfg.architecture, ()):
                getattr(model, param).requires_grad_(False)
            lr = cfg.lr or default_lr(sae_cfg.d_sae)
            optimizer = torch.optim.Adam(
                param_groups(model, cfg), lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True
            )  # one kernel for all tensors: ~6x faster than foreach on CPU
            self.members.append(
                Member(
                    name,
                    model,
                    optimizer,
                    lr,
                    torch.zeros(sae_cfg.d_sae, dtype=torch.int64, device=self.device),
                )
            )
        self.step = 0
        self.tokens = 0
        self.input_scale: float | None = None
        self.target_scale: float | None = None  # the input scale for SAEs
        self.wandb_id: str | None = None
        self._stop_signal: int | None = None
        self.summaries: dict[str, dict] = {}  # metrics.json of each SAE, once the run has finished

    # -- the loop --

    def fit(self, data: Batch | BatchSource | Iterable[Batch]) -> list[SparseAutoencoder]:
        """Train every SAE on `data`: a tensor [N, d_in], a `BatchSource` (such as `cache.ActivationReader`)
        or any iterable of [batch, d_in] tensors; for transcoders the same of (inputs, targets) pairs
        (`cache.PairedReader`). Returns the SAEs folded to raw units (also saved under out_dir)."""
        source = as_batch_source(data, self.cfg, self.dist)
        total = self._total_tokens(source)
        resumed = self.load_checkpoint()
        batches = source.batches(self.step)
        if not resumed:
            self._truncate_metrics_log(0)  # steps logged by a run killed before its first checkpoint
            batches = self._init_from_first_batches(batches)
        main = self.dist.is_main
        log = self._open_log() if main else None
        wandb_run = self._start_wandb() if self.cfg.wandb and main else None
        started, tokens_at_start = time.perf_counter(), self.tokens
        bar = tqdm(
            total=total,
            initial=self.tokens,
            unit="tok",
            unit_scale=True,
            desc="train",
            dynamic_ncols=True,
            disable=not main,
        )
        with _stop_requests(self):
            for batch in batches:
                if self.tokens >= total:
                    break
                try:
                    (x, y), error = self._check_batch(batch, self.step, self.tokens), None
                except TrainingError as e:
                    x, y, error = None, None, e
                if self._ranks_agree_to_stop(error):
                    self.save_checkpoint()
                    bar.close()
                    self._raise_stop()
                x, y = x * self.input_scale, (y * self.target_scale if self.transcoders else None)
                for m in self.members:
                    self._train_step(m, x, x if y is None else y, total)
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
        seconds, tokens_this_run = time.perf_counter() - started, self.tokens - tokens_at_start
        if main:
            self._log(log, wandb_run, None, total)
            log.close()
        if tokens_this_run or not self.summaries:  # else a finished run, resumed: its summaries stand
            self.summaries = {m.name: self._summary(m, seconds, tokens_this_run) for m in self.members}
        self.save_checkpoint()  # first, so that a kill during the final save resumes to the same files
        models = self._save_final()
        if wandb_run is not None:
            wandb_run.finish()
        return models

    def _ranks_agree_to_stop(self, error: TrainingError | None) -> bool:
        self._stop_signal = agree_on_stop(
            self.dist,
            self.device,
            self.step,
            error,
            self._stop_signal,
            f"; {self._checkpoint_note()}",
        )
        return self._stop_signal is not None

    def _train_step(self, m: Member, x: Tensor, y: Tensor, total: int) -> None:
        """One optimiser step of `m` on scaled inputs x [batch, d_in] and targets y [batch, d_out]."""
        progress = self.tokens / total
        for group in m.optimizer.param_groups:
            group["lr"] = m.lr * group["lr_scale"] * lr_factor(self.tokens, total, self.cfg)
        dead = (m.tokens_since_fired >= self.cfg.dead_after_tokens).nonzero().flatten()
        loss, terms, fires = self.objective(m.model, x, y, progress, dead, m.state)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"step {self.step}: loss of {m.name} is {loss.item()}; no weights were "
                f"updated and {self._checkpoint_note()}"
            )
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_([p.grad for p in m.model.parameters() if p.grad is not None])  # dist
        unit_norm = m.cfg.architecture in UNIT_NORM_DECODER and not m.cfg.transcoder  # (from_config)
        if unit_norm:
            _project_out_radial_grad(m.model.W_dec)
        m.optimizer.step()
        with torch.no_grad():
            if unit_norm:
                m.model.W_dec.div_(m.model.W_dec.norm(dim=1, keepdim=True))
            if m.cfg.architecture == "jumprelu":
                m.model.threshold.clamp_(min=0)  # f = ReLU(pre) H(pre - θ) needs θ >= 0
        with torch.no_grad():
            fires = self.dist.sum_(fires.float())  # dist: every rank tracks the same dead latents
            m.tokens_since_fired += len(x) * self.dist.world_size
            m.tokens_since_fired[fires > 0] = 0
            m.window_fires = fires if m.window_fires is None else m.window_fires + fires
            for key, value in terms.items():
                m.window[key] = m.window.get(key, 0.0) + value.detach()
            m.window["loss"] = m.window.get("loss", 0.0) + loss.detach()
            m.window_steps += 1
            m.window_tokens += len(x) * self.dist.world_size  # fires above are summed over ranks too

    def _check_batch(self, batch: Batch, index: int, tokens_before: int) -> tuple[Tensor, Tensor | None]:
        """-> (inputs, targets or None for SAEs) as float32 on the device, or an error naming the batch if
        its shapes or values are bad."""
        where = f"batch {index} (tokens {tokens_before:,} onward)"
        if not self.transcoders:
            return self._check_part(batch, self.d_in, where, "activations"), None
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            got = f"a {type(batch).__name__}" + (
                f" {tuple(batch.shape)}" if isinstance(batch, Tensor) else ""
            )
            raise TrainingError(f"{where}: transcoders train on (inputs, targets) pairs, got {got}")
        x = self._check_part(batch[0], self.d_in, where, "inputs")
        y = self._check_part(batch[1], self.d_out, where, "targets")
        if len(x) != len(y):
            raise TrainingError(f"{where}: {len(x)} inputs but {len(y)} targets")
        return x, y

    def _check_part(self, batch: Tensor, width: int, where: str, what: str) -> Tensor:
        if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.shape[1] != width:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise TrainingError(f"{where}: expected {what} [batch, {width}], got {shape}")
        x = batch.to(self.device, torch.float32, non_blocking=True)
        if torch.isfinite(x.sum()):  # one pass; only a batch that fails it gets the full check
            return x
        bad = ~torch.isfinite(x)
        if bad.any():
            rows = bad.any(dim=1).nonzero().flatten()
            raise TrainingError(
                f"{where}: {int(bad.sum())} NaN/inf values in rows {rows[:5].tolist()}"
                f"{'...' if len(rows) > 5 else ''} of the {what}; no weights were updated and "
                f"{self._checkpoint_note()}"
            )
        return x

    def _total_tokens(self, source: BatchSource) -> int:
        if self.cfg.total_tokens is not None:
            return self.cfg.total_tokens
        if isinstance(source, TensorBatches):
            return source.rows
        try:
            return len(source) * self.cfg.batch_size * self.dist.world_size  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                "TrainConfig.total_tokens is needed for data of unknown length "
                "(it sets the learning-rate schedule)"
            ) from None

    def _init_from_first_batches(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Scales, b_dec and codebooks from the first batches, which are then trained on as usual."""
        rows_needed = max(
            [self.cfg.batch_size]
            + [4 * m.cfg.d_sae for m in self.members if m.cfg.architecture == "codebook"]
        )
        first, checked, rows = [], [], 0
        for index, batch in enumerate(batches):
            first.append(batch)
            checked.append(self._check_batch(batch, index, rows))
            rows += len(checked[-1][0])
            if rows >= rows_needed:
                break
        if not first:
            raise ValueError("no activations: the data yielded no batch")
        x = torch.cat([inputs for inputs, _ in checked])
        y = torch.cat([targets for _, targets in checked]) if self.transcoders else x
        mean_norms = torch.stack([x.norm(dim=1).mean(), y.norm(dim=1).mean()])
        self.dist.average_([mean_norms])  # dist: statistics over every rank's first batches
        if self.cfg.normalize_inputs:
            self.input_scale = math.sqrt(self.d_in) / mean_norms[0].item()
            self.target_scale = math.sqrt(self.d_out) / mean_norms[1].item()
        else:
            self.input_scale = self.target_scale = 1.0
        generator = torch.Generator().manual_seed(self.cfg.seed)
        for m in self.members:
            init_from_data(m.model, x * self.input_scale, y * self.target_scale, self.cfg, generator)
            # b_enc too where it centres a transcoder's pre-activations (codebooks: rank 0's codes)
            self.dist.average_([m.model.b_dec.data] + ([m.model.b_enc.data] if m.cfg.transcoder else []))
            self.dist.broadcast_([p.data for p in m.model.parameters()])  # and rank 0's codebooks
        return itertools.chain(first, batches)

    # -- logging --

    def _open_log(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return open(self.out_dir / METRICS_LOG, "a")

    def _start_wandb(self):
        import wandb

        if self.wandb_id is None:
            self.wandb_id = secrets.token_hex(
                4
            )  # kept in checkpoints, so a resumed run continues the same wandb run
        return wandb.init(
            project=self.cfg.wandb_project,
            name=self.cfg.run_name,
            id=self.wandb_id,
            resume="allow",
            dir=str(self.out_dir),
            config={"train": to_dict(self.cfg), "saes": {m.name: to_dict(m.cfg) for m in self.members}},
        )

    def metrics(self, m: Member) -> dict[str, float]:
        """Means over the steps since the last log, plus the state of the latents."""
        steps = max(m.window_steps, 1)
        out = {key: float(value) / steps for key, value in m.window.items()}
        if m.window_fires is not None and m.window_tokens:
            out["l0"] = float(m.window_fires.sum()) / m.window_tokens
            out["dense_fraction"] = float(
                (m.window_fires / m.window_tokens > self.cfg.dense_threshold).float().mean()
            )
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
                wandb_run.log(
                    {f"{m.name}/{k}": v for k, v in record.items() if k not in ("step", "sae")},
                    step=self.step,
                )
            m.last_metrics = record
            m.window, m.window_fires, m.window_steps, m.window_tokens = {}, None, 0, 0
        log.flush()
        if bar is not None:
            first = self.members[0].last_metrics
            bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first.get('l0', 0):.1f}")

    def _summary(self, m: Member, seconds: float, tokens_this_run: int) -> dict:
        """metrics.json of one SAE: its last logged metrics, the run's length, scales and speed."""
        return {
            **m.last_metrics,
            "tokens": self.tokens,
            "steps": self.step,
            "input_scale": self.input_scale,
            **({"target_scale": self.target_scale} if self.transcoders else {}),
            "train_seconds_this_run": seconds,
            "tokens_per_second_this_run": tokens_this_run / seconds if seconds else None,
        }

    def _save_final(self) -> list[SparseAutoencoder]:
        """Each SAE folded to raw units, saved to out_dir/<name> with its metrics.json (main rank)."""
        models = []
        for m in self.members:
            model = fold_scales(m.model, self.input_scale, self.target_scale)
            models.append(model)
            if self.dist.is_main:
                for stale in (self.out_dir / m.name).glob(".metrics.json.*.tmp"):
                    stale.unlink()  # of a killed final save (model.save clears its own)
                model.save(self.out_dir / m.name)
                atomic_write_json(self.out_dir / m.name / "metrics.json", self.summaries[m.name])
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
            tensors |= {f"state.{key}": value.reshape(-1) for key, value in m.state.items()}
            for n, p in m.model.named_parameters():
                for key, value in m.optimizer.state.get(p, {}).items():
                    tensors[f"adam.{n}.{key}"] = value.reshape(-1) if key == "step" else value
            atomic_save_file({k: v.cpu() for k, v in tensors.items()}, tmp / f"{m.name}.safetensors")
        log = self.out_dir / METRICS_LOG  # flushed at each log: it holds exactly the steps done
        atomic_write_json(
            tmp / "state.json",
            {
                "step": self.step,
                "tokens": self.tokens,
                "input_scale": self.input_scale,
                "target_scale": self.target_scale,
                "wandb_id": self.wandb_id,
                "metrics_log_bytes": log.stat().st_size if log.exists() else 0,
                "last_metrics": {m.name: m.last_metrics for m in self.members},
                "summaries": self.summaries,
                "saes": {m.name: to_dict(m.cfg) for m in self.members},
                "train": to_dict(self.cfg),
            },
        )
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
            raise ValueError(
                f"{path}: checkpoint holds SAEs {sorted(saved)}, this run trains {sorted(expected)}; "
                f"use another out_dir or delete the checkpoint"
            )
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
            m.state = {
                k.split(".", 1)[1]: v.reshape(()) for k, v in tensors.items() if k.startswith("state.")
            }
        self.step, self.tokens = state["step"], state["tokens"]
        self.input_scale, self.wandb_id = state["input_scale"], state["wandb_id"]
        self.target_scale = state.get("target_scale", self.input_scale)  # checkpoints before transcoders
        for m in self.members:
            m.last_metrics = state.get("last_metrics", {}).get(m.name, {})
        self.summaries = state.get("summaries", {})
        self._truncate_metrics_log(state.get("metrics_log_bytes"))
        print(f"resuming from {path} at step {self.step:,} ({self.tokens:,} tokens)")
        return True

    def _truncate_metrics_log(self, checkpoint_bytes: int | None) -> None:
        """Drop what metrics.jsonl gained after the checkpoint, so that the steps the resumed run redoes
        are logged once."""
        log = self.out_dir / METRICS_LOG
        if checkpoint_bytes is not None and self.dist.is_main and log.exists():
            if log.stat().st_size > checkpoint_bytes:
                with open(log, "r+b") as f:
                    f.truncate(checkpoint_bytes)

    def _checkpoint_note(self) -> str:
        if (self.out_dir / CHECKPOINT_DIR / "state.json").exists():
            return f"the last checkpoint in {self.out_dir / CHECKPOINT_DIR} is intact"
        return f"no checkpoint has been written to {self.out_dir} yet"

    def _raise_stop(self) -> None:
        where = self.out_dir / CHECKPOINT_DIR
        if self._stop_signal == signal.SIGINT:
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved to {where}")
        raise SystemExit(f"terminated at step {self.step}; checkpoint saved to {where}")


def agree_on_stop(
    dist: Distributed,
    device: torch.device,
    step: int,
    error: TrainingError | None,
    stop_signal: int | None,
    failure_note: str = "",
) -> int | None:
    """Before a step's collectives, every rank learns whether any rank met bad data or was asked to
    stop, so all ranks stop together instead of waiting forever on a missing peer (dist).

    Raises this rank's error, or a TrainingError naming the ranks that failed; -> the signal to stop
    on (a peer's request becomes SIGTERM here), or None to go on."""
    flags = torch.zeros(2, dist.world_size, device=device)  # on the GPU for NCCL
    flags[0, dist.rank] = error is not None
    flags[1, dist.rank] = stop_signal is not None
    dist.sum_(flags)
    if error is not None:
        raise error
    failed = flags[0].nonzero().flatten().tolist()
    if failed:
        raise TrainingError(
            f"step {step}: rank {failed} met bad data (see its error); all ranks stop{failure_note}"
        )
    if flags[1].any() and stop_signal is None:
        return signal.SIGTERM
    return stop_signal


def _project_out_radial_grad(W_dec: torch.nn.Parameter) -> None:
    """Remove the part of each decoder row's gradient along the row: rows stay unit norm to first order."""
    if W_dec.grad is not None:
        with torch.no_grad():
            W_dec.grad.addcmul_(torch.linalg.vecdot(W_dec.grad, W_dec)[:, None], W_dec, value=-1)


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
