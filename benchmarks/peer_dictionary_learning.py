"""Train SAEs with the peer library dictionary_learning (PyPI dictionary-learning 0.1.0) as a baseline.

Run with the peer's own virtualenv (it cannot share ours):

    /work/peers/dictlearn/bin/python benchmarks/peer_dictionary_learning.py --data acts.safetensors \
        --batch-size 4096 --d-sae 8192 --k 32 --archs batchtopk jumprelu matryoshka --out out/peer_dl

`--data` holds a tensor "train" [N, d_in] (float32 or bfloat16), rows in training order. Each architecture
is trained by dictionary_learning's own trainer class (its `update()` step), one pass, N // batch_size
steps, with the loop of its `trainSAE` reproduced step for step: the configuration of its demo
(adamkarvonen/dictionary_learning_demo: activation normalisation to unit mean squared norm, bf16 autocast
on CUDA (trainSAE has none on CPU), LR decay over the last 20%, warmup 1000, sparsity warmup 5000,
Matryoshka group fractions), and the trainers' own defaults for everything else (lr, AuxK, thresholds,
bandwidth, penalty). Step counts are capped for short runs (see `schedule`), which the trainers require.
Each DIR/<arch>/ gets `ae.pt` + `config.json` as trainSAE writes them (read by `sae.load`) and
`timing.json`: the update() calls only, normalisation statistics and saving excluded; tokens_per_second
leaves out step 0 (it also fits the geometric median for b_dec), tokens_per_second_all includes it.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from dictionary_learning.dictionary import JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from safetensors.torch import load_file

# adamkarvonen/dictionary_learning_demo, demo_config.py (the peer README's recommended training setup)
WARMUP_STEPS, SPARSITY_WARMUP_STEPS, DECAY_START_FRACTION, THRESHOLD_START_STEP = 1000, 5000, 0.8, 1000
MATRYOSHKA_GROUP_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]


def schedule(steps: int) -> dict[str, int]:
    """The demo's step counts, capped so that a short run still warms up, learns its threshold and passes
    get_lr_schedule's checks (warmup < decay_start, sparsity warmup < decay_start < steps)."""
    return {
        "warmup_steps": min(WARMUP_STEPS, steps // 10),
        "decay_start": int(steps * DECAY_START_FRACTION),
        "threshold_start_step": min(THRESHOLD_START_STEP, steps // 10),
        "sparsity_warmup_steps": min(SPARSITY_WARMUP_STEPS, steps // 2),
    }


def trainer_args(arch: str, args: argparse.Namespace, d_in: int, steps: int) -> dict[str, Any]:
    s = schedule(steps)
    common = {
        "steps": steps,
        "activation_dim": d_in,
        "dict_size": args.d_sae,
        "layer": args.layer if args.layer is not None else -1,
        "lm_name": args.lm_name,
        "submodule_name": f"resid_post_layer_{args.layer}" if args.layer is not None else None,
        "warmup_steps": s["warmup_steps"],
        "decay_start": s["decay_start"],
        "seed": args.seed,
        "device": args.device,
    }
    if args.lr is not None:
        common["lr"] = args.lr  # else each trainer's default: 2e-4 / sqrt(d_sae / 2**14) or JumpReLU 7e-5
    if arch == "batchtopk":
        return common | {
            "trainer": BatchTopKTrainer,
            "dict_class": BatchTopKSAE,
            "k": args.k,
            "threshold_start_step": s["threshold_start_step"],
        }
    if arch == "matryoshka":
        return common | {
            "trainer": MatryoshkaBatchTopKTrainer,
            "dict_class": MatryoshkaBatchTopKSAE,
            "k": args.k,
            "group_fractions": MATRYOSHKA_GROUP_FRACTIONS,
            "threshold_start_step": s["threshold_start_step"],
        }
    if arch == "jumprelu":
        return common | {
            "trainer": JumpReluTrainer,
            "dict_class": JumpReluAutoEncoder,
            "target_l0": args.k,
            "sparsity_warmup_steps": s["sparsity_warmup_steps"],
        }
    raise ValueError(f"unknown architecture {arch!r}")


def norm_factor(data: torch.Tensor, batch_size: int) -> float:
    """training.get_norm_factor(data, steps=100): sqrt of the mean squared norm over batches 0..100."""
    batches = [data[i * batch_size : (i + 1) * batch_size] for i in range(min(101, len(data) // batch_size))]
    return torch.stack([b.float().pow(2).sum(1).mean() for b in batches]).mean().sqrt().item()


def train(arch: str, data: torch.Tensor, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    steps = len(data) // args.batch_size
    config = trainer_args(arch, args, data.shape[1], steps)
    trainer = config.pop("trainer")(**config)
    dtype = getattr(torch, args.autocast_dtype)
    # trainSAE: autocast on CUDA only; every batch is cast to autocast_dtype on any device
    autocast = torch.autocast("cuda", dtype=dtype) if "cuda" in args.device else nullcontext()
    scale = norm_factor(data, args.batch_size) if args.normalize else 1.0
    if args.normalize:
        trainer.ae.scale_biases(1.0)  # trainSAE checks that the dictionary can rescale

    sync = torch.cuda.synchronize if "cuda" in args.device else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(steps):
        act = data[step * args.batch_size : (step + 1) * args.batch_size].to(dtype=dtype)
        if args.normalize:
            act = act / scale  # not in place: `act` may be a view of `data`
        with autocast:
            trainer.update(step, act)  # returns loss.item(): synchronises every step
        if step == 0:
            sync()
            first = time.perf_counter() - start
    sync()
    seconds = time.perf_counter() - start

    if args.normalize:
        trainer.ae.scale_biases(scale)  # as trainSAE does before saving: the SAE takes raw activations
    save_dir = out / arch
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "config.json").write_text(json.dumps({"trainer": trainer.config}, indent=4))
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, save_dir / "ae.pt")

    tokens = steps * args.batch_size
    config["dict_class"] = config["dict_class"].__name__
    timing = {
        "tokens": tokens,
        "steps": steps,
        "seconds": seconds,
        "first_step_seconds": first,
        "tokens_per_second": (tokens - args.batch_size) / (seconds - first) if steps > 1 else None,
        "tokens_per_second_all": tokens / seconds,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "autocast_dtype": args.autocast_dtype,
        "normalize_activations": args.normalize,
        "norm_factor": scale,
        "trainer_class": type(trainer).__name__,
        "trainer_args": config | {"lr": trainer.lr},
        "trainer_config": trainer.config,
    }
    (save_dir / "timing.json").write_text(json.dumps(timing, indent=2))
    return timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help='safetensors: tensor "train" [N, d_in]')
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32, help="BatchTopK / Matryoshka k; JumpReLU target L0")
    p.add_argument("--lr", type=float, default=None, help="default: each trainer's own")
    p.add_argument(
        "--archs",
        nargs="+",
        default=["batchtopk", "jumprelu", "matryoshka"],
        choices=["batchtopk", "jumprelu", "matryoshka"],
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--autocast-dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="default: the demo's bfloat16 on CUDA; float32 on CPU, where trainSAE has no "
        "autocast and a bf16 batch breaks Matryoshka (its b_dec takes the batch's dtype)",
    )
    p.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="skip trainSAE's normalize_activations (the demo turns it on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-name", default="unknown", help="recorded in config.json")
    p.add_argument("--layer", type=int, default=None, help="recorded as submodule resid_post_layer_<L>")
    args = p.parse_args()
    args.autocast_dtype = args.autocast_dtype or ("bfloat16" if "cuda" in args.device else "float32")

    data = load_file(args.data)["train"].to(args.device)
    steps = len(data) // args.batch_size
    print(f"{args.data}: {tuple(data.shape)} {data.dtype}, {steps} steps of {args.batch_size}")
    for arch in args.archs:
        t = train(arch, data, args, args.out)
        print(
            f"{arch}: {t['steps']} steps, {t['seconds']:.1f} s, {t['tokens_per_second']:,.0f} tokens/s "
            f"(step 0 excluded; {t['tokens_per_second_all']:,.0f} with it), lr {t['trainer_args']['lr']:.3g}"
        )


if __name__ == "__main__":
    main()
