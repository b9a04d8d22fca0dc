"""Data parallelism under torchrun: one process per device, gradients averaged by all-reduce.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `Distributed.from_env` joins the process group with
NCCL on CUDA and gloo on CPU, which is the only difference between the two. Without torchrun there
is one process and every collective below is a no-op, so the trainer has a single code path.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_type: str, timeout: timedelta = timedelta(minutes=10)) -> Distributed:
        """Join torchrun's process group if there is one. The timeout bounds how long a rank waits
        in a collective for a peer that died, so a failure cannot become a silent hang."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if backend == "nccl":  # NCCL collectives run on the current device: each rank's own GPU
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=timeout)
            # Leaving the group before the interpreter tears down: a gloo group still alive at exit
            # aborts the process ("terminate called without an active exception") after a clean run.
            atexit.register(_leave_process_group)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU under torchrun; the CPU is shared."""
        if device.type == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return device

    def average_(self, tensors: list[Tensor]) -> None:
        """In place: each tensor becomes its mean over ranks (gradients)."""
        if self.active:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.world_size)

    def sum_(self, tensor: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: Tensor) -> Tensor:
        """In place: the elementwise maximum over ranks (module distribution's resume check)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast_(self, tensors: list[Tensor], src: int = 0) -> None:
        if self.active:
            for t in tensors:
                dist.broadcast(t, src)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
