"""Train a small TopK SAE on synthetic data, under torchrun or alone; used by tests/test_distributed.py.

torchrun --nproc_per_node 2 tests/scripts/dist_train.py OUT_DIR BATCH_SIZE [--nan-on-rank R] [--stop-at STEP]
"""

import argparse
import os
import signal

import sae
from sae.synthetic import sparse_feature_data

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("batch_size", type=int)
parser.add_argument("--nan-on-rank", type=int, default=None)
parser.add_argument("--stop-at", type=int, default=None, help="rank 0 sends itself SIGTERM at this batch")
parser.add_argument(
    "--fail-save-at-step", type=int, default=None, help="rank 0 fails writing the checkpoint of this step"
)
args = parser.parse_args()

rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
x, _ = sparse_feature_data(48 * 512, d=32, n_features=128, active=4, seed=5)
source = sae.TensorBatches(x, args.batch_size, seed=0, rank=rank, world_size=world_size)


class Batches:
    def batches(self, start=0):
        for i, batch in enumerate(source.batches(start), start):
            if args.nan_on_rank == rank and i == 10:
                batch = batch.clone()
                batch[0, 0] = float("nan")
            if args.stop_at == i and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


cfg = sae.SAEConfig(architecture="topk", d_in=32, d_sae=128, k=4)
train_cfg = sae.TrainConfig(
    batch_size=args.batch_size,
    total_tokens=len(x),
    out_dir=args.out_dir,
    compute_dtype="float32",
    log_every=8,
    checkpoint_every=8,
    dead_after_tokens=4096,
    lr=2e-3,
)
trainer = sae.Trainer([cfg], train_cfg)
if args.fail_save_at_step is not None and rank == 0:
    write = trainer._write_checkpoint

    def failing_write(final):
        if trainer.step == args.fail_save_at_step:
            raise OSError(f"rank 0: injected failure writing the checkpoint of step {trainer.step}")
        write(final)

    trainer._write_checkpoint = failing_write
trainer.fit(Batches())
