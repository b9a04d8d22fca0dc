"""Does JumpReLU's L0 reach its target on real activations? L0 per step of our JumpReLU trainer on the
default cache.

    python studies/jumprelu_l0/curve.py            # ~15 min on a 2-core CPU
    python studies/jumprelu_l0/curve.py --tokens 200000   # a quick look

SAELens's users report that JumpReLU's L0 will not fall (SAELens #382, #494, #719). Runs, all on the
default job's cache (`python train.py`: Gemma 3 270M, blocks.6.hook_resid_post), d_sae 8192:
- target: k = 16, 32, 64 (the target L0), thresholds starting at each latent's (1 - k/d_sae) quantile,
  penalty λ (L0 - k)² / k with λ = 1; one read of the data for the three;
- fixed λ: no k, λ = `l0_coefficient` (1.0), thresholds starting at Rajamanoharan et al.'s 0.001, so L0
  starts near d_sae / 2 and only the penalty can lower it: with our bandwidth ε = 0.3 and with the
  paper's ε = 0.001 (fewer tokens: it stays dense, and dense steps are slow).
Writes results/curves.json (L0, FVU and λ every 2 steps), results/l0.png and prints the table of
the README.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sae
from cache import ActivationReader
from sae.io import atomic_write_json

HERE = Path(__file__).resolve().parent
CACHE = Path("out/cache/gemma-3-270m_python-stdlib_ctx128")
D_IN, D_SAE, BATCH = 640, 8192, 4096


def train(name: str, cfgs: list[sae.SAEConfig], tokens: int, out: Path, **train_kw) -> dict[str, list[dict]]:
    """Train `cfgs` in one read of the cache; -> {sae name: its logged steps}."""
    reader = ActivationReader(CACHE, "blocks.6.hook_resid_post", batch_size=BATCH)
    run_dir = out / name
    cfg = sae.TrainConfig(
        total_tokens=tokens, batch_size=BATCH, out_dir=str(run_dir), log_every=2, **train_kw
    )
    start = time.perf_counter()
    sae.Trainer(cfgs, cfg).fit(reader)
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    logged: dict[str, list[dict]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        logged.setdefault(f"{name}/{row['sae']}", []).append(row)
    return logged


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l0, ax_fvu) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        tokens = [r["tokens"] / 1e6 for r in rows]
        ax_l0.plot(tokens, [r["l0"] for r in rows], label=name)
        ax_fvu.plot(tokens, [r["fvu"] for r in rows], label=name)
    for target in (16, 32, 64):
        ax_l0.axhline(target, color="grey", lw=0.5, ls="--")
    ax_l0.set(yscale="log", xlabel="training tokens (M)", ylabel="L0 (batch mean)", title="JumpReLU L0")
    ax_fvu.set(yscale="log", xlabel="training tokens (M)", ylabel="FVU (training batches)", title="FVU")
    ax_l0.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(curves: dict[str, list[dict]]) -> str:
    lines = [
        "| run | L0, first log | L0 at 25 % | L0 at 50 % | L0, mean of the last 25 % (min–max) | "
        "FVU at the end |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in curves.items():
        at = [rows[min(len(rows) - 1, int(f * len(rows)))] for f in (0.25, 0.5)]
        tail = [r["l0"] for r in rows[-max(len(rows) // 4, 1) :]]  # the last quarter
        lines.append(
            f"| {name} | {rows[0]['l0']:.1f} | {at[0]['l0']:.1f} | {at[1]['l0']:.1f} | "
            f"{sum(tail) / len(tail):.1f} ({min(tail):.1f}–{max(tail):.1f}) | "
            f"{rows[-1]['fvu']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=950_272, help="per run (232 batches of 4,096)")
    parser.add_argument("--narrow-tokens", type=int, default=204_800, help="the ε = 0.001 run (dense)")
    parser.add_argument("--out", type=Path, default=Path("out/jumprelu_l0"))
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    jumprelu = lambda k: sae.SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, k=k)  # noqa: E731
    curves = {}
    curves |= train("target", [jumprelu(k) for k in (16, 32, 64)], args.tokens, args.out)
    curves |= train("fixed_lambda_eps0.3", [jumprelu(None)], args.tokens, args.out)
    curves |= train(
        "fixed_lambda_eps0.001", [jumprelu(None)], args.narrow_tokens, args.out, jumprelu_bandwidth=0.001
    )
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "curves.json", curves)
    plot(curves, args.results / "l0.png")
    print(summary(curves))


if __name__ == "__main__":
    main()
