"""Train one TopK SAE per hookpoint of a cache with module distribution; used by
tests/test_distributed_modules.py.

torchrun --nproc_per_node 2 tests/scripts/dist_modules.py CACHE_DIR OUT_DIR [--fail-on-rank R --fail-at STEP]
                                                                           [--stop-at STEP]
"""

import argparse
import os
import signal
import time

import sae
from cache import MultiHookpointReader
from sae.routing import ModuleTrainer

parser = argparse.ArgumentParser()
parser.add_argument("cache_dir")
parser.add_argument("out_dir")
parser.add_argument(
    "--hookpoints", nargs="+", default=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument(
    "--fail-on-rank", type=int, default=None, help="this rank raises while reading batch --fail-at"
)
parser.add_argument("--fail-at", type=int, default=5)
parser.add_argument(
    "--fail-at-save", action="store_true", help="the failing rank raises while saving its SAEs instead"
)
parser.add_argument("--stop-at", type=int, default=None, help="rank 0 sends itself SIGTERM at this batch")
parser.add_argument(
    "--fail-checkpoint-at",
    type=int,
    default=None,
    help="the failing rank dies writing the checkpoint of this step, after the other rank wrote its own",
)
args = parser.parse_args()
rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Reader(MultiHookpointReader):
    def batches(self, start=0):
        for i, batch in enumerate(super().batches(start), start):
            if (
                args.fail_on_rank == rank
                and i == args.fail_at
                and not args.fail_at_save
                and args.fail_checkpoint_at is None
            ):
                raise OSError(f"rank {rank}: injected read failure at batch {i}")
            if args.stop_at == i and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


reader = Reader(
    args.cache_dir, args.hookpoints, batch_size=args.batch_size, seed=0, rank=rank, world_size=world_size
)
train_cfg = sae.TrainConfig(
    batch_size=args.batch_size,
    out_dir=args.out_dir,
    compute_dtype="float32",
    log_every=4,
    checkpoint_every=4,
    dead_after_tokens=2048,
    lr=2e-3,
)
cfgs = {
    h: [sae.SAEConfig(architecture="topk", d_in=reader.widths[h], d_sae=64, k=4, hookpoint=h)]
    for h in args.hookpoints
}
trainer = ModuleTrainer(cfgs, train_cfg)
if args.fail_at_save and args.fail_on_rank == rank:
    for t in trainer.trainers.values():

        def broken_save(*a, **k):
            raise OSError(f"rank {rank}: injected failure while saving")

        t._save_final = broken_save
if args.fail_checkpoint_at is not None and args.fail_on_rank == rank:
    for t in trainer.trainers.values():

        def write_or_die(final, t=t, write=t._write_checkpoint):
            if t.step == args.fail_checkpoint_at:
                time.sleep(2)  # the other rank's checkpoint of this step lands first
                raise OSError(f"rank {rank}: injected failure writing the checkpoint of step {t.step}")
            write(final)

        t._write_checkpoint = write_or_die
trained = trainer.fit(reader)
print(f"rank {rank} trained {sorted(trained)}", flush=True)
