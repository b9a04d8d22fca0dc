"""Why does our TopK trainer learn slower than sparsify's SparseCoder early on?

Trains, on the same planted-dictionary data and the same batch order, our `sae.Trainer` (with one
difference at a time changed) and sparsify's `SparseCoder` in a plain Adam loop that mimics
`sparsify.Trainer` (lr 2e-4/sqrt(num_latents/2^14), torch Adam with its default eps 1e-8,
`get_linear_schedule_with_warmup(adam, 1000, num_batches)`, b_dec = mean of the first batch,
decoder renormalised before each forward, radial decoder gradient removed, auxk_alpha 0, no input
normalisation). Reports MMCS (`feature_recovery`) and held-out FVU after 300k and 900k tokens
(separate runs, each with its own full schedule), mean +- sd over seeds.

    python studies/optimizer_gap/gap.py                 # main table
    python studies/optimizer_gap/gap.py --only ours,sparsify
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
import torch

import sae
import sae.trainer as trainer_mod
from sae.batches import TensorBatches
from sae.synthetic import feature_recovery, sparse_feature_data

DATA_SEED = 123  # as tests/test_trainer.py: differs from every model seed
HELD_OUT = 8192


def gao_lr(d_sae):
    """The old default (and sparsify's Adam lr): 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


# --- our trainer, with one difference changed at a time ------------------------------------------


def our_run(x, held, features, seed, total, bs, d_sae, k, v):
    """v: TrainConfig overrides, plus
    enc_init: 'tied' (ours: W_enc = W_dec, unit rows) | 'sparsify' (nn.Linear's kaiming-uniform W_enc,
              W_dec = its rows normalised) | float s (W_enc = s * W_dec)
    b_dec: 'mean' (ours) | 'zero'
    schedule: 'ours' | 'sparsify' (1000 warm-up steps, then linear decay to 0 over the whole run)"""
    v = dict(v)
    enc_init, b_dec, schedule = v.pop("enc_init", "tied"), v.pop("b_dec", "mean"), v.pop("schedule", "ours")
    arch = v.pop("arch", "topk")
    warm_steps = v.pop("warmup_steps", 1000)
    if "lr_mult" in v:
        v["lr"] = v.pop("lr_mult") * gao_lr(d_sae)  # multiples of the old default, whatever the code's is
    orig_from_config, orig_init, orig_lr_factor = (
        trainer_mod.SparseAutoencoder.from_config,
        trainer_mod.init_from_data,
        trainer_mod.lr_factor,
    )

    def from_config(cfg, seed=None):
        m = orig_from_config(cfg, seed=seed)
        with torch.no_grad():
            if enc_init == "sparsify":
                torch.manual_seed(seed)
                W = torch.nn.Linear(cfg.d_in, cfg.d_sae).weight.data
                m.W_enc.copy_(W)
                m.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
            elif isinstance(enc_init, float):
                m.W_enc.copy_(enc_init * m.W_dec)
        return m

    def init(model, xs, ys, cfg, gen):
        orig_init(model, xs, ys, cfg, gen)
        if b_dec == "zero":
            model.b_dec.data.zero_()

    def lr_factor(tokens, tot, cfg):
        if schedule == "ours":
            return orig_lr_factor(tokens, tot, cfg)
        step, n = tokens // bs, math.ceil(tot / bs)
        if step < warm_steps:
            return step / warm_steps
        return max(0.0, (n - step) / max(1, n - warm_steps))

    trainer_mod.SparseAutoencoder.from_config = from_config
    trainer_mod.init_from_data = init
    trainer_mod.lr_factor = lr_factor
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = sae.TrainConfig(
                **(
                    dict(
                        total_tokens=total,
                        batch_size=bs,
                        seed=seed,
                        out_dir=out,
                        log_every=10**9,
                        checkpoint_every=10**9,
                    )
                    | v
                )
            )
            t = sae.Trainer(
                sae.SAEConfig(
                    architecture=arch, d_in=x.shape[1], d_sae=d_sae, k=None if arch == "relu" else k
                ),
                cfg,
            )
            with contextlib.redirect_stderr(io.StringIO()):
                (model,) = t.fit(x)
    finally:
        trainer_mod.SparseAutoencoder.from_config = orig_from_config
        trainer_mod.init_from_data = orig_init
        trainer_mod.lr_factor = orig_lr_factor
    with torch.no_grad():
        fvu = ((held - model(held)).pow(2).sum() / (held - held.mean(0)).pow(2).sum()).item()
        l0 = (model.encode(held) > 0).float().sum(-1).mean().item()
    return feature_recovery(model.W_dec.detach(), features), fvu, l0


# --- sparsify's SparseCoder in a loop that mimics sparsify.Trainer --------------------------------


def sparsify_run(x, held, features, seed, total, bs, d_sae, k, v):
    """v: warmup_steps (1000), eps (1e-8: torch default, what sparsify gets without bitsandbytes),
    normalize_inputs (False), enc_init ('sparsify' | 'tied': W_enc = W_dec unit rows as ours)."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), dtype=torch.float32)
    if v.get("enc_init", "sparsify") == "tied":
        with torch.no_grad():
            coder.encoder.weight.copy_(coder.W_dec)
    n_steps = math.ceil(total / bs)
    lr = v.get("lr") or 2e-4 / (d_sae / 2**14) ** 0.5
    if v.get("optimizer", "adam") == "signum":  # sparsify.TrainConfig's default optimizer
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        adam = ScheduleFreeWrapper(
            SignSGD(coder.parameters(), lr=v.get("lr") or 5e-3 / (d_sae / 2**14) ** 0.5), momentum=0.95
        )
        adam.train()
        sched = None
    else:
        adam = torch.optim.Adam(coder.parameters(), lr=lr, eps=v.get("eps", 1e-8))
        sched = (
            None
            if v.get("constant_lr")
            else get_linear_schedule_with_warmup(adam, v.get("warmup_steps", 1000), n_steps)
        )
    batches = TensorBatches(x, bs, seed).batches()
    scale = 1.0
    for step in range(n_steps):
        xb = next(batches).float()
        if step == 0:
            if v.get("normalize_inputs", False):
                scale = math.sqrt(x.shape[1]) / xb.norm(dim=1).mean().item()
            coder.b_dec.data = (xb * scale).mean(0)
        xb = xb * scale
        coder.set_decoder_norm_to_unit_norm()
        out = coder(xb)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()
        if sched is not None:
            sched.step()
    if sched is None and hasattr(adam, "eval"):
        adam.eval()  # schedule-free: sparsify saves the averaged weights (Trainer._checkpoint)
    coder.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        h = held * scale
        fvu = ((h - coder(h).sae_out).pow(2).sum() / (h - h.mean(0)).pow(2).sum()).item()
    return feature_recovery(coder.W_dec.detach(), features), fvu


# --- variants -------------------------------------------------------------------------------------

VARIANTS = {
    # reference points
    "ours": ("ours", {}),  # the code's defaults (this clone: lr = 8x the Gao lr)
    "ours:lr×1": ("ours", {"lr_mult": 1.0}),  # the old default
    "sparsify": ("sparsify", {}),
    # our trainer, one difference at a time made like sparsify's
    "ours:schedule=sparsify": ("ours", {"schedule": "sparsify"}),
    "ours:warmup=0": ("ours", {"lr_warmup_fraction": 0.0}),
    "ours:warmup=0.1": ("ours", {"lr_warmup_fraction": 0.1}),
    "ours:decay=0": ("ours", {"lr_decay_fraction": 0.0}),
    "ours:decay=1.0": ("ours", {"lr_decay_fraction": 1.0}),
    "ours:eps=1e-8": ("ours", {"adam_eps": 1e-8}),
    "ours:enc_init=sparsify": ("ours", {"enc_init": "sparsify"}),
    "ours:b_dec=zero": ("ours", {"b_dec": "zero"}),
    "ours:normalize_inputs=False": ("ours", {"normalize_inputs": False}),
    "ours:compute_dtype=float32": ("ours", {"compute_dtype": "float32"}),
    "ours:auxk=0": ("ours", {"auxk_coefficient": 0.0}),
    "ours:dead_after=100k": ("ours", {"dead_after_tokens": 100_000}),
    "ours:lr×2": ("ours", {"lr_mult": 2.0}),
    "ours:lr×4": ("ours", {"lr_mult": 4.0}),
    "ours:lr×8": ("ours", {"lr_mult": 8.0}),
    "ours:lr×16": ("ours", {"lr_mult": 16.0}),
    "ours:lr×32": ("ours", {"lr_mult": 32.0}),
    # ReLU SAEs: the L1 coefficient (default 5.0), at the default lr
    **{
        f"relu:l1={c}": ("ours", {"arch": "relu", "l1_coefficient": c})
        for c in (5.0, 2.0, 1.0, 0.5, 0.3, 0.1)
    },
    **{
        f"relu:l1={c}:lr×8": ("ours", {"arch": "relu", "l1_coefficient": c, "lr_mult": 8.0})
        for c in (5.0, 2.0, 1.0, 0.5, 0.3, 0.1)
    },
    "codebook": ("ours", {"arch": "codebook"}),
    "codebook:lr×8": ("ours", {"arch": "codebook", "lr_mult": 8.0}),
    # sparsify's loop, one difference at a time made like ours
    "sparsify:enc_init=tied": ("sparsify", {"enc_init": "tied"}),
    "sparsify:normalize_inputs": ("sparsify", {"normalize_inputs": True}),
    "sparsify:warmup=1%": ("sparsify", {"warmup_steps": "1%"}),
    "sparsify:warmup=0": ("sparsify", {"warmup_steps": 0}),
    "sparsify:constant_lr": ("sparsify", {"constant_lr": True}),
    "sparsify:signum": ("sparsify", {"optimizer": "signum"}),
}


def run_variant(name, x, held, features, seeds, budgets, bs, d_sae, k, base_lr_mult=None):
    kind, v = VARIANTS[name]
    if kind == "ours" and base_lr_mult is not None and "lr_mult" not in v:
        v = {**v, "lr_mult": base_lr_mult}
    fn = our_run if kind == "ours" else sparsify_run
    rows = {}
    for total in budgets:
        vv = dict(v)
        if vv.get("warmup_steps") == "1%":
            vv["warmup_steps"] = max(1, round(0.01 * math.ceil(total / bs)))
        res = [fn(x, held, features, s, total, bs, d_sae, k, vv) for s in seeds]
        rows[total] = res
    return rows


def fmt(vals):
    m = statistics.mean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.3f}±{sd:.3f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budgets", default="300000,900000")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--base-lr-mult",
        type=float,
        default=None,
        help="ours variants without their own lr: this multiple of 2e-4/sqrt(d_sae/2^14) "
        "(1: the old default, whatever the code's default is)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    budgets = [int(b) for b in a.budgets.split(",")]
    data, features = sparse_feature_data(
        max(budgets) + HELD_OUT, d=64, n_features=256, active=5, seed=DATA_SEED
    )
    x, held = data[:-HELD_OUT], data[-HELD_OUT:]
    seeds = list(range(a.seeds))
    print(f"d_sae={a.d_sae} k={a.k} batch={a.batch_size} seeds={seeds}; MMCS / held-out FVU, mean±sd")
    head = " | ".join(f"MMCS@{b // 1000}k  FVU@{b // 1000}k" for b in budgets)
    print(f"{'variant':32s} | {head}")
    out = {}
    for name in a.only.split(","):
        t0 = time.perf_counter()
        rows = run_variant(
            name, x, held, features, seeds, budgets, a.batch_size, a.d_sae, a.k, a.base_lr_mult
        )
        cells = " | ".join(
            f"{fmt([r[0] for r in rows[b]])} {fmt([r[1] for r in rows[b]])}"
            + (f" L0 {fmt([r[2] for r in rows[b]])}" if name.startswith(("relu", "codebook")) else "")
            for b in budgets
        )
        print(f"{name:32s} | {cells}   ({time.perf_counter() - t0:.0f}s)", flush=True)
        out[name] = {str(b): rows[b] for b in budgets}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
