"""The bench table of benchmarks/README.md: our architectures trained on the default cache at k = 32
(top-AFA: cap 64; JumpReLU: target L0 32), then `analyze.py bench` over all of them on held-out text.

    python train.py                                   # the default job: its cache
    python benchmarks/bench_dictionaries.py           # train (or --reuse) and bench -> out/bench_default
    python benchmarks/bench_dictionaries.py --reuse --autointerp-latents 50   # + the embedding score

Training is benchmarks/architectures.py's: the first 232 batches of 4,096 cached rows, in cache order,
every dictionary in one loop. The bench reads contexts after the cached ones (--skip-contexts).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from architectures import BATCH, TRAIN_BATCHES, cache_rows, train_ours, wait_for_default_job

from cache import read_manifest
from sae.cli.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ["topk", "batchtopk", "matryoshka", "jumprelu", "topafa", "codebook"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reuse", action="store_true", help="bench what is already trained under --train-out")
    p.add_argument("--train-out", type=Path, default=ROOT / "out" / "bench_dictionaries")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench_default")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens of the core metrics")
    p.add_argument("--autointerp-latents", type=int, default=0, help="0: no embedding score")
    args = p.parse_args()

    config = load_run_config(None, [])
    cache_dir = ROOT / config.cache.dir
    wait_for_default_job(ROOT / config.train.out_dir / "report.json")
    if not args.reuse or not args.train_out.exists():
        _, rows = cache_rows(cache_dir)
        batches = list(rows[: TRAIN_BATCHES * BATCH].split(BATCH))
        train_ours(batches, ARCHITECTURES, args.train_out, config.model.name, reuse=False, label="ours")
        del rows, batches
    saes = sorted(str(path.parent) for path in args.train_out.glob("*/sae.safetensors"))
    command = [sys.executable, str(ROOT / "analyze.py"), "bench", *saes, "--out", str(args.out)]
    command += ["--tokens", str(args.tokens), "--skip-contexts", str(read_manifest(cache_dir)["contexts"])]
    if args.autointerp_latents:
        command += ["--autointerp-cache", str(cache_dir)]
        command += ["--autointerp-latents", str(args.autointerp_latents)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
