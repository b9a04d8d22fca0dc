"""Train two small SAEs; with --kill-at-replace N, SIGKILL this process at its Nth os.replace (the last step
of every atomic write: checkpoint files, their folder's renames, the final SAE files and metrics.json).
Used by tests/test_kill_training.py; prints the number of os.replace calls when it finishes.

python tests/scripts/kill_train.py OUT_DIR [--kill-at-replace N]
"""

import argparse
import os
import signal

import sae
from sae.synthetic import sparse_feature_data

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("--kill-at-replace", type=int, default=None)
args = parser.parse_args()

replaces = 0
os_replace, path_rename = os.replace, os.rename


def counted(rename):
    def call(*a, **kw):
        global replaces
        replaces += 1
        if replaces == args.kill_at_replace:
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(*a, **kw)

    return call


os.replace, os.rename = counted(os_replace), counted(path_rename)  # Path.rename calls os.rename

x, _ = sparse_feature_data(24 * 256, d=32, n_features=128, active=4, seed=5)
cfgs = [
    sae.SAEConfig(architecture="topk", d_in=32, d_sae=128, k=4),
    sae.SAEConfig(architecture="jumprelu", d_in=32, d_sae=128, k=4),
]
train_cfg = sae.TrainConfig(
    batch_size=256, out_dir=args.out_dir, log_every=2, checkpoint_every=4, dead_after_tokens=2048, seed=0
)
sae.Trainer(cfgs, train_cfg).fit(x)
print(f"replaces {replaces}")
