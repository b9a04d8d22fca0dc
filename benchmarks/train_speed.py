"""TopK SAE training throughput, side by side on the same batches in one process:

  - this toolkit's Trainer (bf16 encoder matmul + sparse kernels; and float32),
  - EleutherAI sparsify's SparseCoder in a plain Adam loop (float32, as it runs on CPU; and under
    CPU bf16 autocast, which sparsify itself only enables on CUDA),
  - a naive dense PyTorch TopK SAE.

Every run trains on the same batches in the same order with the same learning rate, then reports
held-out FVU and L0, so speed is compared at matching quality after the same number of tokens.

    python benchmarks/train_speed.py                       # d_in 640, d_sae 8192, k 32, batch 4096
    python benchmarks/train_speed.py --steps 20 --skip-dense  # quicker

The data are synthetic sparse-coding activations (16,384 true features in d_in, ~32 active per token),
so FVU is meaningful; pass --activations FILE.safetensors (a tensor named `acts`) for real ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sae
from sae.batches import TensorBatches
from sae.synthetic import sparse_feature_data
from sae.trainer import default_lr


def fvu(x: Tensor, x_hat: Tensor) -> float:
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


# --- the runs: each trains on `batches` and returns a function x -> (x_hat, l0) ------------------

Run = Callable[[list[Tensor], argparse.Namespace], Callable[[Tensor], tuple[Tensor, float]]]


def run_ours(compute_dtype: str) -> Run:
    def run(batches: list[Tensor], args) -> Callable:
        out = Path(tempfile.mkdtemp(prefix="bench_ours_"))
        cfg = sae.SAEConfig(architecture="topk", d_in=args.d_in, d_sae=args.d_sae, k=args.k)
        train_cfg = sae.TrainConfig(
            batch_size=args.batch_size,
            total_tokens=sum(len(b) for b in batches),
            lr=args.lr,
            compute_dtype=compute_dtype,
            out_dir=str(out),
            log_every=10**9,
            checkpoint_every=10**9,
            lr_warmup_fraction=0.0,
            lr_decay_fraction=0.0,
            normalize_inputs=False,
        )
        model = sae.Trainer([cfg], train_cfg).fit(iter(batches))[0]
        shutil.rmtree(out)

        def apply(x: Tensor):
            with torch.no_grad():
                return model(x), (model.encode(x) > 0).float().sum(-1).mean().item()

        return apply

    return run


def run_sparsify(autocast_bf16: bool) -> Run:
    def run(batches: list[Tensor], args) -> Callable:
        from sparsify import SaeConfig, SparseCoder

        torch.manual_seed(0)
        coder = SparseCoder(args.d_in, SaeConfig(num_latents=args.d_sae, k=args.k), device="cpu")
        coder.b_dec.data = batches[0].mean(0)
        optimizer = torch.optim.Adam(coder.parameters(), lr=args.lr)
        for x in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                out = coder(x)
            optimizer.zero_grad()
            out.fvu.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            coder.set_decoder_norm_to_unit_norm()

        def apply(x: Tensor):
            with torch.no_grad():
                out = coder(x)
                return out.sae_out, float(args.k)

        return apply

    return run


class DenseTopK(nn.Module):
    """The textbook TopK SAE: scatter the top-k into a dense code and multiply by the full decoder."""

    def __init__(self, d_in: int, d_sae: int, k: int):
        super().__init__()
        W = torch.randn(d_sae, d_in)
        W /= W.norm(dim=1, keepdim=True)
        self.W_enc, self.W_dec = nn.Parameter(W.clone()), nn.Parameter(W.clone())
        self.b_enc, self.b_dec = nn.Parameter(torch.zeros(d_sae)), nn.Parameter(torch.zeros(d_in))
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        values, indices = pre.topk(self.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        return f @ self.W_dec + self.b_dec


def run_dense(batches: list[Tensor], args) -> Callable:
    torch.manual_seed(0)
    model = DenseTopK(args.d_in, args.d_sae, args.k)
    model.b_dec.data = batches[0].mean(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for x in batches:
        loss = (x - model(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            model.W_dec.grad -= (model.W_dec.grad * model.W_dec).sum(1, keepdim=True) * model.W_dec
        optimizer.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)

    def apply(x: Tensor):
        with torch.no_grad():
            return model(x), float(args.k)

    return apply


RUNS: dict[str, Run] = {
    "sae-toolkit, bf16 encoder matmul (default)": run_ours("bfloat16"),
    "sae-toolkit, float32": run_ours("float32"),
    "sparsify SparseCoder, plain loop, float32": run_sparsify(False),
    "sparsify SparseCoder, plain loop, CPU bf16 autocast": run_sparsify(True),
    "naive dense TopK, float32": run_dense,
}
PEER = "sparsify SparseCoder, plain loop, float32"


def load_data(args) -> tuple[Tensor, Tensor]:
    n = args.steps * args.batch_size + args.eval_tokens
    if args.activations:
        from safetensors.torch import load_file

        acts = load_file(args.activations)["acts"].float()
        if len(acts) < n:
            raise SystemExit(f"{args.activations}: {len(acts)} rows, the benchmark needs {n}")
        acts = acts[:n]
    else:
        acts, _ = sparse_feature_data(n, d=args.d_in, n_features=2 * args.d_sae, active=32, seed=0)
    return acts[: -args.eval_tokens], acts[-args.eval_tokens :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--activations", default=None)
    parser.add_argument("--skip-dense", action="store_true", help="leave out the slow naive dense run")
    parser.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = parser.parse_args()
    args.lr = args.lr or default_lr(args.d_sae)

    train, held_out = load_data(args)
    # The same batches, in the same order, for every run.
    source = TensorBatches(train, args.batch_size, seed=0).batches()
    batches = [next(source) for _ in range(args.steps)]
    tokens = args.steps * args.batch_size
    print(
        f"{tokens:,} training tokens, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, "
        f"batch {args.batch_size}, lr {args.lr:.2e}, {torch.get_num_threads()} threads"
    )

    results = []
    for name, run in RUNS.items():
        if args.skip_dense and run is run_dense:
            continue
        start = time.perf_counter()
        apply = run(batches, args)
        seconds = time.perf_counter() - start
        x_hat, l0 = apply(held_out)
        results.append(
            {
                "run": name,
                "tokens_per_second": tokens / seconds,
                "seconds": seconds,
                "held_out_fvu": fvu(held_out, x_hat),
                "l0": l0,
            }
        )
        print(f"{name:55s} {tokens / seconds:9,.0f} tok/s   FVU {results[-1]['held_out_fvu']:.4f}")

    peer = next(r["tokens_per_second"] for r in results if r["run"] == PEER)
    lines = ["| run | tokens/s | × sparsify fp32 | held-out FVU | L0 |", "|---|---:|---:|---:|---:|"]
    for r in results:
        r["ratio_to_sparsify"] = r["tokens_per_second"] / peer
        lines.append(
            f"| {r['run']} | {r['tokens_per_second']:,.0f} | {r['ratio_to_sparsify']:.2f} | "
            f"{r['held_out_fvu']:.4f} | {r['l0']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
