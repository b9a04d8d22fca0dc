"""Module distribution under torchrun: SAEs on many hookpoints spread over ranks, activations routed to
owners.

Each hookpoint's SAEs belong to one rank (`assign_owners`). Every step, each rank reads the same
number of rows of its own share of the cache at every hookpoint (`cache.MultiHookpointReader`), and
for each hookpoint the ranks' rows are gathered on its owner, which so trains on world_size x
batch_size rows of all ranks' tokens: the batch one process would read from the concatenated shares.
No gradient crosses the wire (each SAE lives on one rank); what does is one gather of activations per
hookpoint per step, (world_size - 1) / world_size of the batch's bytes into each owner.

The model forward is paid once per token at caching time (`cache.distributed`), where each rank caches
a disjoint slice of the stream. Each hookpoint trains under `out_dir/<hookpoint>/` (its SAEs, its
checkpoint, its metrics.jsonl), so a resumed job finds every SAE's state whichever rank owns it; a job
killed between two ranks' checkpoints resumes every hookpoint from the last step all of them saved.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from itertools import chain, islice
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .config import SAEConfig, TrainConfig
from .device import resolve_device
from .distributed import Distributed
from .model import SparseAutoencoder
from .trainer import CHECKPOINT_DIR, Trainer, TrainingError, _stop_requests, agree_on_stop

PREVIOUS_CHECKPOINT = CHECKPOINT_DIR + ".previous"


class HookpointBatches(Protocol):
    """What `ModuleTrainer.fit` reads: this rank's rows at every hookpoint, resumable
    (cache.MultiHookpointReader)."""

    hookpoints: list[str]
    batch_size: int

    def __len__(self) -> int: ...

    def batches(self, start: int = 0) -> Iterator[dict[str, Tensor]]: ...


def assign_owners(hookpoints: list[str], costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Owner rank of each hookpoint: largest cost first onto the least loaded rank (ties: lowest rank),
    so one rank does not get all the wide SAEs. Deterministic, so every rank computes the same map."""
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    for h in sorted(hookpoints, key=lambda h: (-costs[h], hookpoints.index(h))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[h] = rank
        load[rank] += costs[h]
    return {h: owners[h] for h in hookpoints}


def hookpoint_dir(out_dir: str | Path, hookpoint: str) -> Path:
    return Path(out_dir) / hookpoint


def route_to_owners(
    batch: dict[str, Tensor], owners: dict[str, int], dist: Distributed, device: torch.device
) -> dict[str, Tensor]:
    """Gather each hookpoint's rows [B, d] from every rank on its owner:
    {owned hookpoint: [world_size * B, d]}.

    Every rank must call this with the same hookpoints in the same order (the gathers are collective)."""
    routed = {}
    for h, owner in owners.items():
        x = batch[h].to(device)
        if not dist.active:
            routed[h] = x
            continue
        parts = [torch.empty_like(x) for _ in range(dist.world_size)] if dist.rank == owner else None
        torch_dist.gather(x, parts, dst=owner)
        if parts is not None:
            routed[h] = torch.cat(parts)
    return routed


class ModuleTrainer:
    """Trains {hookpoint: [SAEConfig, ...]} with each hookpoint's SAEs on one rank (one `Trainer` per
    owned hookpoint, with no data-parallel collectives of its own); the ranks step in lockstep."""

    def __init__(
        self, sae_cfgs: Mapping[str, list[SAEConfig]], cfg: TrainConfig, dist: Distributed | None = None
    ):
        if cfg.wandb:
            raise ValueError(
                "wandb logging is not wired for module distribution; each hookpoint writes metrics.jsonl"
            )
        if not sae_cfgs:
            raise ValueError("ModuleTrainer needs at least one hookpoint")
        for h, cfgs in sae_cfgs.items():
            if not cfgs or any(c.hookpoint != h for c in cfgs):
                raise ValueError(
                    f"the SAEs listed under {h!r} must read that hookpoint: {[c.hookpoint for c in cfgs]}"
                )
        device = resolve_device(cfg.device)
        self.dist = dist or Distributed.from_env(device.type)
        self.device = self.dist.device(device)
        self.cfg = cfg
        self.sae_cfgs = dict(sae_cfgs)
        costs = {h: sum(c.d_in * c.d_sae for c in cfgs) for h, cfgs in sae_cfgs.items()}
        self.owners = assign_owners(list(sae_cfgs), costs, self.dist.world_size)
        self.trainers = {h: self._new_trainer(h) for h in sae_cfgs if self.owners[h] == self.dist.rank}
        self.step = 0
        self._stop_signal: int | None = None  # set by _stop_requests on SIGINT/SIGTERM

    def _new_trainer(self, hookpoint: str) -> Trainer:
        """The trainer of one owned hookpoint; Distributed(): its SAEs are not replicated, so it has no
        collectives."""
        cfg = replace(
            self.cfg, out_dir=str(hookpoint_dir(self.cfg.out_dir, hookpoint)), device=str(self.device)
        )
        return Trainer(self.sae_cfgs[hookpoint], cfg, Distributed())

    def fit(self, reader: HookpointBatches) -> dict[str, list[SparseAutoencoder]]:
        """Train this rank's SAEs on every rank's rows; returns them (raw units, also saved) by hookpoint."""
        missing = [h for h in self.sae_cfgs if h not in reader.hookpoints]
        if missing:
            raise ValueError(f"the reader has no hookpoint(s) {missing}")
        total = self.cfg.total_tokens or len(reader) * reader.batch_size * self.dist.world_size
        rows_per_step = reader.batch_size * self.dist.world_size
        resumed = self._load_consistent_checkpoints()
        batches = (route_to_owners(b, self.owners, self.dist, self.device) for b in reader.batches(self.step))
        batches = self._init_unresumed(batches, resumed, rows_per_step)
        logs = {h: t._open_log() for h, t in self.trainers.items()}
        started, step_at_start = time.perf_counter(), self.step
        with _stop_requests(self):
            for batch in batches:
                if self.step * rows_per_step >= total:
                    break
                checked, error = self._check(batch)
                if self._ranks_agree_to_stop(error):
                    self._save_checkpoints()
                    raise SystemExit(
                        f"stopped at step {self.step}; "
                        f"checkpoints saved under {self.cfg.out_dir}/<hookpoint>/"
                    )
                for h, t in self.trainers.items():
                    x = checked[h] * t.input_scale
                    for m in t.members:
                        t._train_step(m, x, x, total)
                    t.step += 1
                    t.tokens += len(x)
                    if t.step % self.cfg.log_every == 0:
                        t._log(logs[h], None, None, total)
                self.step += 1
                if self.step % self.cfg.checkpoint_every == 0:
                    self._save_checkpoints()
        seconds = time.perf_counter() - started
        if self.step * rows_per_step < total:
            print(f"data ran out after {self.step * rows_per_step:,} of {total:,} tokens")
        tokens_this_run = (self.step - step_at_start) * rows_per_step
        for h, t in self.trainers.items():
            t._log(logs[h], None, None, total)
            logs[h].close()
            if tokens_this_run or not t.summaries:  # else a finished run, resumed: its summaries stand
                t.summaries = {m.name: t._summary(m, seconds, tokens_this_run) for m in t.members}
        self._save_checkpoints()  # first, so that a kill during the final save resumes to the same files
        trained = {h: t._save_final() for h, t in self.trainers.items()}
        self.dist.barrier()  # every SAE is on disk when fit returns, on every rank
        return trained

    # -- checkpoints: every hookpoint at the same step, whatever moment a kill comes --

    def _save_checkpoints(self) -> None:
        """Each hookpoint's checkpoint at this step, its last one kept as checkpoint.previous until every
        rank has saved: a job killed in between resumes all hookpoints from that last common step."""
        for t in self.trainers.values():
            current, previous = t.out_dir / CHECKPOINT_DIR, t.out_dir / PREVIOUS_CHECKPOINT
            if current.exists():
                shutil.rmtree(previous, ignore_errors=True)
                current.rename(previous)
            t.save_checkpoint()
        self.dist.barrier()
        for t in self.trainers.values():  # every hookpoint is at this step now
            shutil.rmtree(t.out_dir / PREVIOUS_CHECKPOINT, ignore_errors=True)

    def _load_consistent_checkpoints(self) -> dict[str, bool]:
        """Load every owned hookpoint's checkpoint and set self.step to the step all ranks resume from.
        Hookpoints a kill left one save ahead go back to their previous checkpoint (or to a fresh start
        when that save was their first). Returns which hookpoints resumed."""
        for t in self.trainers.values():
            current, previous = t.out_dir / CHECKPOINT_DIR, t.out_dir / PREVIOUS_CHECKPOINT
            if previous.exists() and not current.exists():  # killed between the rename and the new save
                previous.rename(current)
        resumed = {h: t.load_checkpoint() for h, t in self.trainers.items()}
        highest, lowest = self._step_bounds()
        if highest != lowest:
            for h, t in list(self.trainers.items()):
                if t.step == highest:
                    shutil.rmtree(t.out_dir / CHECKPOINT_DIR)
                    if (t.out_dir / PREVIOUS_CHECKPOINT).exists():
                        (t.out_dir / PREVIOUS_CHECKPOINT).rename(t.out_dir / CHECKPOINT_DIR)
                    self.trainers[h] = t = self._new_trainer(h)
                    resumed[h] = t.load_checkpoint()
                    print(f"{h}: back to the checkpoint of step {t.step}, the last one every hookpoint has")
            highest, lowest = self._step_bounds()
            if highest != lowest:
                raise TrainingError(
                    f"the hookpoints' checkpoints under {self.cfg.out_dir} are at steps {lowest} to "
                    f"{highest} and cannot be brought to one step; delete them to start afresh"
                )
        self.step = highest
        return resumed

    def _step_bounds(self) -> tuple[int, int]:
        """Highest and lowest step over every rank's hookpoints (a rank without any counts as neither)."""
        steps = [t.step for t in self.trainers.values()]
        bounds = torch.tensor(
            [max(steps, default=-1), -min(steps, default=2**62)], dtype=torch.int64, device=self.device
        )
        self.dist.max_(bounds)
        return int(bounds[0]), -int(bounds[1])

    def _init_unresumed(
        self, batches: Iterator[dict[str, Tensor]], resumed: dict[str, bool], rows_per_step: int
    ) -> Iterator[dict[str, Tensor]]:
        """Scale, b_dec and codebooks of fresh SAEs from the first batches (which are then trained on).
        Every rank reads the same number of batches, since each read is a collective gather."""
        if self.step > 0:
            return batches
        rows_needed = max(
            [self.cfg.batch_size]
            + [4 * c.d_sae for cfgs in self.sae_cfgs.values() for c in cfgs if c.architecture == "codebook"]
        )
        first = list(islice(batches, math.ceil(rows_needed / rows_per_step)))
        for h, t in self.trainers.items():
            if not resumed[h]:
                t._init_from_first_batches(iter([b[h] for b in first]))
        return chain(first, batches)

    def _check(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], TrainingError | None]:
        checked = {}
        for h, t in self.trainers.items():
            try:
                checked[h], _ = t._check_batch(batch[h], self.step, t.tokens)
            except TrainingError as e:
                return {}, TrainingError(f"{h}: {e}")
        return checked, None

    def _ranks_agree_to_stop(self, error: TrainingError | None) -> bool:
        self._stop_signal = agree_on_stop(self.dist, self.device, self.step, error, self._stop_signal)
        return self._stop_signal is not None
