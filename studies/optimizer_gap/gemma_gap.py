"""The same comparison on real activations: Gemma 3 270M blocks.6.hook_resid_post (an existing cache,
read only), TopK d_sae 8192, k 32, batch 4096, ~1M tokens; the last shard is held out.

    python studies/optimizer_gap/gemma_gap.py --only ours,ours:lr×4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import gap

CACHE = Path("/tmp/c1/out/cache/gemma-3-270m_python-stdlib_ctx128")
HOOK = "blocks.6.hook_resid_post"


def load():
    manifest = json.loads((CACHE / "manifest.json").read_text())
    shards = [load_file(CACHE / s["file"]) for s in manifest["shards"]]
    key = next(k for k in shards[0] if HOOK in k)
    parts = [s[key].reshape(-1, 640) for s in shards]
    return torch.cat(parts[:-1]), parts[-1].float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="ours,ours:lr×4,sparsify,sparsify:signum")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x, held = load()
    total = min(a.tokens, len(x))
    print(
        f"gemma {HOOK}: train {len(x):,} rows (using {total:,}), held out {len(held):,}; "
        f"d_sae={a.d_sae} k={a.k} batch={a.batch_size}"
    )
    fake_features = torch.eye(640)[:1]  # MMCS means nothing here
    for name in a.only.split(","):
        kind, v = gap.VARIANTS[name]
        fn = gap.our_run if kind == "ours" else gap.sparsify_run
        t0 = time.perf_counter()
        fvus, l0s = [], []
        for seed in range(a.seeds):
            r = fn(x, held, fake_features, seed, total, a.batch_size, a.d_sae, a.k, v)
            fvus.append(r[1])
            l0s += r[2:]
        l0 = f" L0 {gap.fmt(l0s)}" if l0s else ""
        print(
            f"{name:28s} held-out FVU {gap.fmt(fvus)}{l0}  {[round(f, 4) for f in fvus]}  "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
