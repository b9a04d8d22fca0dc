"""Transcoders against SAEs on the same MLP at equal L0 (Paulo et al. 2025's comparison), on Gemma 3 270M.

Three runs of `train.py` share one cache of block 6's MLP input and output (one forward per batch):
a TopK SAE on the MLP output, a TopK transcoder from the MLP input to its output, and a skip transcoder;
each k = 32 and 8,192 latents, each evaluated by splicing its output in place of the MLP's output
(CE recovered against the MLP zero-ablated; FVU of the MLP output).

    python studies/transcoders/compare.py                 # ~15 min on a 2-core CPU
    python studies/transcoders/compare.py --tokens 200000 --eval-tokens 2048   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAYER = 6
MLP_IN, MLP_OUT = f"blocks.{LAYER}.mlp.hook_in", f"blocks.{LAYER}.mlp.hook_out"

RUNS = {
    "sae on the MLP output": [f"sae.hookpoint={MLP_OUT}"],
    "transcoder": [f"sae.hookpoint={MLP_IN}", f"sae.output_hookpoint={MLP_OUT}"],
    "skip transcoder": [
        f"sae.hookpoint={MLP_IN}",
        f"sae.output_hookpoint={MLP_OUT}",
        "sae.skip_connection=true",
    ],
}


def run(name: str, sets: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / name.replace(" ", "_")
    common = [
        f"cache.dir={Path(args.out) / 'cache'}",
        f'cache.hookpoints=["{MLP_IN}", "{MLP_OUT}"]',
        f"cache.tokens={args.tokens}",
        f"eval.tokens={args.eval_tokens}",
        f"train.out_dir={out}",
    ]
    command = [sys.executable, "train.py"] + [a for s in common + sets for a in ("--set", s)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    report = json.loads((out / "report.json").read_text())
    metrics = json.loads((Path(report["sae"]["dir"]) / "metrics.json").read_text())
    keys = ["ce_loss_recovered", "delta_lm_loss", "kl_clean_spliced", "fvu", "l0", "dead_fraction", "tokens"]
    return {k: report["eval"][k] for k in keys} | {
        "ce_loss_clean": report["eval"]["ce_loss_clean"],
        "ce_loss_zero_ablation": report["eval"]["ce_loss_zero_ablation"],
        "train_tokens_per_second": metrics["tokens_per_second_this_run"],
    }


def table(results: dict[str, dict]) -> str:
    head = ["dictionary (k 32, 8,192 latents)", "CE recovered", "Δ LM loss", "KL", "FVU (MLP out)", "L0"]
    head += ["dead", "train tok/s"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        cells = [
            name,
            f"{r['ce_loss_recovered']:.2%}",
            f"{r['delta_lm_loss']:+.4f}",
            f"{r['kl_clean_spliced']:.4f}",
            f"{r['fvu']:.4f}",
            f"{r['l0']:.1f}",
            f"{r['dead_fraction']:.1%}",
            f"{r['train_tokens_per_second']:,.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1_000_000, help="cached training tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(REPO / "out" / "transcoders"))
    parser.add_argument("--results", default=str(HERE / "results" / "compare.json"))
    args = parser.parse_args()
    results = {name: run(name, sets, args) for name, sets in RUNS.items()}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
