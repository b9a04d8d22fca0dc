"""What crosses the wire per training step under torchrun, timed: the data-parallel gradient all-reduce
against module distribution's activation gather, for one SAE of width d_sae on a d_in-wide hookpoint.

    torchrun --standalone --nproc_per_node 2 benchmarks/dist_comm.py
        [--d-in 640] [--d-sae 8192] [--batch 4096]

Data parallel all-reduces the fp32 gradients of W_enc and W_dec (8 * d_in * d_sae bytes) every step;
module distribution gathers each rank's bf16 activations on the SAE's owner (2 * batch * d_in bytes
from every rank). Rank 0 prints the median of --repeats timings of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist

from sae.distributed import Distributed


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats`, each started together on every rank."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096, help="rows per rank per step")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    world = Distributed.from_env("cpu")
    if not world.active:
        raise SystemExit("run under torchrun with --nproc_per_node 2 or more")
    device = world.device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    gradients = [torch.randn(args.d_sae, args.d_in, device=device) for _ in range(2)]  # W_enc, W_dec grads
    acts = torch.randn(args.batch, args.d_in, device=device).to(torch.bfloat16)
    parts = [torch.empty_like(acts) for _ in range(world.world_size)] if world.is_main else None

    allreduce = timed(lambda: world.average_(gradients), args.repeats)
    gather = timed(lambda: dist.gather(acts, parts, dst=0), args.repeats)
    if world.is_main:
        grad_bytes = 8 * args.d_in * args.d_sae
        act_bytes = 2 * args.batch * args.d_in
        print(
            f"world {world.world_size}, backend {dist.get_backend()}, "
            f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}"
        )
        print(
            f"data parallel: all-reduce {grad_bytes / 1e6:.1f} MB of gradients: {allreduce * 1e3:.1f} ms "
            f"({grad_bytes / allreduce / 1e9:.2f} GB/s)"
        )
        print(
            f"module distribution: gather {act_bytes / 1e6:.2f} MB of activations per rank: "
            f"{gather * 1e3:.1f} ms "
            f"({act_bytes * (world.world_size - 1) / gather / 1e9:.2f} GB/s into the owner)"
        )


if __name__ == "__main__":
    main()
