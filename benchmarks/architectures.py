"""Every architecture our trainer offers and the peers' equivalents, on the same batches of the default cache.

    python benchmarks/architectures.py            # about an hour on the 2-core CPU (peer training dominates)
    python benchmarks/architectures.py --quick    # smoke test: 12 batches, 2 slices, 2 of ours + 1 per peer
    python benchmarks/architectures.py --reuse    # evaluate the dictionaries already trained under --out

Data: the default job's cache (`python train.py`: Gemma 3 270M, blocks.6.hook_resid_post, d_in 640, 1M
tokens, BOS excluded). Its first 232 batches of 4,096 rows, in the order the rows sit in the cache (not
shuffled), train every dictionary, all in the same order; the rows after them are held out.

Trained (d_sae 8192, k 32 where an architecture has one):
- ours: one `sae.Trainer` with every trainable architecture, one read of the data (jumprelu: k is the L0
  its two-sided penalty targets; topafa: k 64 is a cap; relu: no k, its default l1), default `TrainConfig`
  but batch 4096; then TopK alone, for a tokens/s not shared with six other SAEs;
- dictionary_learning 0.1.0: BatchTopK, JumpReLU, Matryoshka with benchmarks/peer_dictionary_learning.py
  in the peer's virtualenv (`--peer-python`), its demo configuration and its trainers' defaults;
- sparsify 1.3.3: TopK `SparseCoder` in the loop of studies/optimizer_gap/gap.py (`sparsify_run`, which
  mimics `sparsify.Trainer`), with sparsify's default optimizer (signum, schedule-free) in float32, and
  with Adam (its lr and 1000-step warm-up) under CPU bf16 autocast.

Measured, for every dictionary on the same held-out slices (the text right after the cached contexts, 16
slices of 4 contexts x 128 tokens) with our model-in-the-loop eval, `sae.evals.evaluate`, once per slice:
FVU, CE loss recovered, KL(clean || spliced) and AFA ratio as mean ± sd over slices, L0, the latents that
fire on no slice; FVU and L0 on the cache's held-out rows; training tokens/s. The clean and zero-ablated
forwards of a slice are the same for every dictionary, so `SharedForwards` runs them once per slice and
replays them (checked bit-exact against a plain `evaluate` on slice 0): 14 forwards a slice instead of
36. Writes benchmarks/results/architectures.json (every figure, per slice) and the table in
benchmarks/architectures_section.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py: shared CPUs

import torch
from safetensors.torch import load_file, save_file

import sae
from cache import read_manifest
from sae.cli.run_config import load_run_config
from sae.data import token_batches
from sae.evals import evaluate
from sae.lm import load_model
from sae.sites import read_site
from sae.trainer import sae_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "architectures.json"
PEER_PYTHON = "/work/peers/dictlearn/bin/python"
HOOK = "blocks.6.hook_resid_post"
D_SAE, K, BATCH, TRAIN_BATCHES, SEED = 8192, 32, 4096, 232, 0
OURS = {  # architecture -> k (jumprelu: the target L0; topafa: a cap; relu: none)
    "topk": 32,
    "relu": None,
    "batchtopk": 32,
    "jumprelu": 32,
    "matryoshka": 32,
    "topafa": 64,
    "codebook": 32,
}
DICTIONARY_LEARNING = ["batchtopk", "jumprelu", "matryoshka"]
SPARSIFY = {  # variant -> (gap.sparsify_run overrides, bf16 autocast)
    "signum": ({"optimizer": "signum"}, False),
    "adam-bf16": ({}, True),
}
QUICK = {
    "ours": ["topk", "jumprelu"],
    "dictionary_learning": ["batchtopk"],
    "sparsify": ["adam-bf16"],
    "train_batches": 12,
    "slices": 2,
}
METRICS = ("fvu", "ce_loss_recovered", "kl_clean_spliced", "delta_lm_loss", "l0", "afa_ratio", "afa_error")


@dataclass
class Trained:
    """A dictionary ready for evaluation: where `sae.load` reads it and how it was trained."""

    name: str  # row label, e.g. "ours topk"
    library: str
    architecture: str
    k: int | None
    path: str
    train: dict[str, Any]


# --- machine and data ------------------------------------------------------------------------------


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def machine() -> dict[str, Any]:
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    return {
        "cpu": " ".join(cpu.split(":", 1)[-1].split()),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }


def wait_for_default_job(report: Path) -> None:
    """The cache is the default job's (`python train.py`); its report marks the cache complete."""
    while not report.exists():
        print(f"waiting for {report} (the default job builds the cache) ...", flush=True)
        time.sleep(60)


def cache_rows(cache_dir: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """-> (manifest, every cached row [N, d_in] in the cache's own order: shard by shard, as written)."""
    manifest = read_manifest(cache_dir)
    parts = []
    for shard in manifest["shards"]:
        tensors = load_file(cache_dir / shard["file"])
        key = next(k for k in tensors if HOOK in k)
        parts.append(tensors[key].reshape(-1, tensors[key].shape[-1]))  # [tokens, 640], bf16
    return manifest, torch.cat(parts)


# --- training: ours ---------------------------------------------------------------------------------


def fresh(path: Path, reuse: bool) -> bool:
    """True when `path` must be trained; without --reuse it is emptied first (a left-over checkpoint in
    an out_dir would make the trainer resume instead of starting over)."""
    if reuse and path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def our_config(architecture: str, k: int | None, model_name: str) -> sae.SAEConfig:
    return sae.SAEConfig(
        architecture=architecture, d_in=640, d_sae=D_SAE, k=k, model_name=model_name, hookpoint=HOOK
    )


def train_ours(
    batches: list[torch.Tensor], archs: list[str], out: Path, model_name: str, reuse: bool, label: str
) -> list[Trained]:
    """All `archs` from one read of `batches` (each [4096, 640]); tokens/s from each SAE's metrics.json
    (the one loop's throughput: every SAE in it shares it)."""
    cfgs = [our_config(a, OURS[a], model_name) for a in archs]
    names = [sae_name(c) for c in cfgs]
    if fresh(out, reuse):
        print(f"training ours ({', '.join(archs)}) into {out}", flush=True)
        sae.Trainer(cfgs, sae.TrainConfig(batch_size=BATCH, out_dir=str(out))).fit(batches)
    rows = []
    for arch, name in zip(archs, names):
        metrics = json.loads((out / name / "metrics.json").read_text())
        train = {
            "tokens": metrics["tokens"],
            "seconds": metrics["train_seconds_this_run"],
            "tokens_per_second": metrics["tokens_per_second_this_run"],
            "saes_in_the_loop": len(archs),
            "final_window_metrics": metrics,
        }
        rows.append(Trained(f"{label} {arch}", "ours", arch, OURS[arch], str(out / name), train))
    return rows


# --- training: dictionary_learning -------------------------------------------------------------------


def train_dictionary_learning(
    train_rows: torch.Tensor, archs: list[str], out: Path, peer_python: str, reuse: bool
) -> list[Trained]:
    """benchmarks/peer_dictionary_learning.py in the peer's virtualenv, on the same rows in the same order
    (a safetensors file "train" [N, 640], bf16 as cached; the peer casts each batch to float32)."""
    todo = [a for a in archs if fresh(out / a, reuse)]
    if todo:
        data = out / "train_rows.safetensors"
        data.parent.mkdir(parents=True, exist_ok=True)
        save_file({"train": train_rows.contiguous()}, data)
        command = [peer_python, str(ROOT / "benchmarks" / "peer_dictionary_learning.py"), "--data", str(data)]
        command += ["--batch-size", str(BATCH), "--d-sae", str(D_SAE), "--k", str(K), "--out", str(out)]
        command += ["--device", "cpu", "--lm-name", "gemma-3-270m", "--layer", "6", "--archs", *todo]
        print(f"training dictionary_learning ({', '.join(todo)}): {' '.join(command)}", flush=True)
        try:
            subprocess.run(command, check=True, cwd=ROOT)
        finally:
            data.unlink(missing_ok=True)  # 1.2 GB
    rows = []
    for arch in archs:
        timing = json.loads((out / arch / "timing.json").read_text())
        train = {k: timing[k] for k in ("tokens", "seconds", "tokens_per_second", "tokens_per_second_all")}
        train |= {"trainer_class": timing["trainer_class"], "lr": timing["trainer_args"]["lr"]}
        train |= {"note": "update() calls only; tokens_per_second leaves out step 0 (geometric median)"}
        name = f"dictionary_learning {arch}"
        rows.append(Trained(name, "dictionary_learning", arch, K, str(out / arch), train))
    return rows


# --- training: sparsify ----------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_coders():
    """Within the block, every `sparsify.SparseCoder` made is appended to the yielded list (gap.sparsify_run
    returns figures, not its coder)."""
    import sparsify

    made, original = [], sparsify.SparseCoder

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    sparsify.SparseCoder = Recorded
    try:
        yield made
    finally:
        sparsify.SparseCoder = original


def in_cache_order_for(rows: torch.Tensor) -> torch.Tensor:
    """`rows` [N, d] placed so that gap.sparsify_run's `TensorBatches(x, 4096, seed)` (a seeded permutation)
    serves them in their own order: batch i is rows[i * 4096 : (i + 1) * 4096]."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED))  # as TensorBatches
    placed = torch.empty_like(rows)
    placed[order] = rows
    first = next(sae.TensorBatches(placed, BATCH, SEED).batches())
    assert torch.equal(first, rows[:BATCH]), "TensorBatches no longer permutes as assumed"
    return placed


def train_sparsify(
    train_rows: torch.Tensor, held_rows: torch.Tensor, variants: list[str], out: Path, reuse: bool
) -> list[Trained]:
    """sparsify's TopK SparseCoder in gap.sparsify_run's loop; saved with `save_to_disk` under
    out/<variant>/layers.6 (sparsify's name for blocks.6.hook_resid_post)."""
    sys.path.insert(0, str(ROOT / "studies" / "optimizer_gap"))
    import gap  # sets SPARSIFY_DISABLE_TRITON: the plain-PyTorch path (no triton on CPU)

    placed = None
    rows = []
    for variant in variants:
        overrides, bf16 = SPARSIFY[variant]
        folder = out / variant / "layers.6"
        if fresh(out / variant, reuse):
            placed = in_cache_order_for(train_rows) if placed is None else placed
            print(f"training sparsify TopK ({variant}) into {folder}", flush=True)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with recorded_coders() as made, autocast:
                started = time.perf_counter()
                held, features = held_rows[:BATCH].float(), torch.eye(640)[:1]  # MMCS means nothing here
                sizes = (SEED, len(train_rows), BATCH, D_SAE, K)
                _, loop_fvu = gap.sparsify_run(placed, held, features, *sizes, dict(overrides))
                seconds = time.perf_counter() - started
            made[-1].save_to_disk(folder)
            train = {"tokens": len(train_rows), "seconds": seconds}
            train |= {"tokens_per_second": len(train_rows) / seconds, "bf16_autocast": bf16}
            train |= {"optimizer": overrides.get("optimizer", "adam")}
            train |= {"loop_fvu_first_held_out_batch": loop_fvu}
            train |= {"note": "wall time of the gap.sparsify_run call (setup and one held-out FVU included)"}
            (out / variant / "timing.json").write_text(json.dumps(train, indent=2) + "\n")
        train = json.loads((out / variant / "timing.json").read_text())
        rows.append(Trained(f"sparsify topk {variant}", "sparsify", "topk", K, str(folder), train))
    return rows


# --- evaluation ---------------------------------------------------------------------------------------


class SharedForwards:
    """The model, as `sae.evals.evaluate` sees it, replaying forwards it already ran on the same tokens.

    evaluate() runs three forwards per batch: clean (a hook that only captures), spliced and zero-ablated
    (one hook that returns a replacement). A forward whose hook returns None on the clean activations is the
    clean forward; one whose replacement equals an earlier one's, at the same site on the same tokens, gives
    the same logits. Both are replayed: the zero-ablation (zeros after BOS) is the same for every SAE at the
    site, so per slice the model runs once clean, once zero-ablated and once spliced per dictionary.
    """

    def __init__(self, model):
        self.model = model
        self.tokens: torch.Tensor | None = None  # the slice whose forwards are held [b, t]
        self.clean_logits: torch.Tensor | None = None  # [b, t, vocab]
        self.acts: dict[str, torch.Tensor] = {}  # hook -> clean activations [b, t, d]
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (hook, replacement, logits), last 2
        self.forwards = self.replays = 0

    def __getattr__(self, name: str):  # tokenizer, hook_dict, cfg, ...: the model's
        return getattr(self.model, name)

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks):
        if len(fwd_hooks) != 1:
            return self._run(tokens, fwd_hooks)
        ((name, hook),) = fwd_hooks
        replacement = hook(self._clean_acts(tokens, name).clone(), self.model.hook_dict[name])
        if replacement is None:  # it only looked: the clean forward
            self.replays += 1
            return self.clean_logits
        for i, (seen_name, seen_replacement, logits) in enumerate(self.seen):
            if seen_name == name and torch.equal(seen_replacement, replacement):
                self.seen.append(self.seen.pop(i))
                self.replays += 1
                return logits
        logits = self._run(tokens, fwd_hooks)
        self.seen = [*self.seen, (name, replacement, logits)][-2:]
        return logits

    def _clean_acts(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        held = self.tokens
        if held is None or held.shape != tokens.shape or not torch.equal(held, tokens):
            self.tokens, self.acts, self.seen = tokens.clone(), {}, []
        if name not in self.acts:
            captured: dict[str, torch.Tensor] = {}
            self.clean_logits = self._run(
                tokens, [(name, lambda acts, hook: captured.__setitem__(name, acts.clone()))]
            )
            self.acts[name] = captured[name]
        return self.acts[name]

    def _run(self, tokens: torch.Tensor, fwd_hooks) -> torch.Tensor:
        self.forwards += 1
        return self.model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)


def held_out_slices(
    config, tokenizer, skip_contexts: int, n_slices: int, contexts: int
) -> list[torch.Tensor]:
    """`n_slices` token batches [contexts, 128] of the text right after the cached contexts."""
    per_context = config.data.context_size - (1 if config.cache.exclude_bos else 0)
    tokens = n_slices * contexts * per_context
    exclude_bos = config.cache.exclude_bos
    batches = token_batches(config.data, tokenizer, tokens, contexts, skip_contexts, exclude_bos)
    assert len(batches) == n_slices and all(len(b) == contexts for b in batches), "the text ran out"
    return batches


@torch.inference_mode()
def latents_fired(model_sae, acts: torch.Tensor, first: int) -> torch.Tensor:
    """acts [b, t, d] at the SAE's site -> bool [d_sae]: which latents fire on any token from `first` on."""
    f = model_sae.encode(read_site(model_sae, acts)[:, first:].float())  # [b, t', d_sae]
    return (f != 0).flatten(0, 1).any(0)


def check_shared_forwards(model, shared: SharedForwards, model_sae, tokens: torch.Tensor, kw) -> float:
    """Largest difference over the eval figures between plain and replayed forwards (expected: 0)."""
    plain = evaluate(model, model_sae, [tokens], progress=False, **kw).to_dict()
    replayed = evaluate(shared, model_sae, [tokens], progress=False, **kw).to_dict()
    shared.replays = shared.forwards = 0
    return max(abs(plain[k] - replayed[k]) for k in plain)


def evaluate_all(model, saes: dict[str, Any], slices: list[torch.Tensor], config, share: bool) -> dict:
    """Every SAE on every slice, one `evaluate` each (slices outer: one slice's logits held at a time)."""
    kw = {"exclude_bos": config.cache.exclude_bos, "dense_threshold": config.train.dense_threshold}
    first = 1 if config.cache.exclude_bos else 0
    shared = SharedForwards(model)
    check = check_shared_forwards(model, shared, next(iter(saes.values())), slices[0], kw) if share else None
    if share:
        print(f"shared forwards against plain evaluate on slice 0: largest difference {check}", flush=True)
    per_slice = {name: [] for name in saes}
    fired = {name: torch.zeros(s.cfg.d_sae, dtype=torch.bool) for name, s in saes.items()}
    started = time.perf_counter()
    for i, tokens in enumerate(slices):
        for name, model_sae in saes.items():
            result = evaluate(shared if share else model, model_sae, [tokens], progress=False, **kw)
            per_slice[name].append(result.to_dict())
            if share:
                fired[name] |= latents_fired(model_sae, shared.acts[model_sae.cfg.hookpoint], first)
        elapsed = time.perf_counter() - started
        left = elapsed / (i + 1) * (len(slices) - i - 1)
        print(
            f"eval slice {i + 1}/{len(slices)}: {elapsed:.0f} s, ~{left:.0f} s left; "
            f"forwards {shared.forwards}, replayed {shared.replays}; load {loadavg()}",
            flush=True,
        )
    if not share:  # the activations were not kept: one more capture per slice
        for tokens in slices:
            shared._clean_acts(tokens, HOOK)
            for name, model_sae in saes.items():
                fired[name] |= latents_fired(model_sae, shared.acts[HOOK], first)
    return {
        "per_slice": per_slice,
        "dead_all_slices": {name: 1 - f.double().mean().item() for name, f in fired.items()},
        "shared_forwards": {"used": share, "check_max_abs_difference": check},
        "forwards": shared.forwards,
        "replayed": shared.replays,
        "seconds": time.perf_counter() - started,
    }


@torch.inference_mode()
def cache_held_out(model_sae, rows: torch.Tensor) -> dict[str, float]:
    """FVU and L0 on the cache's held-out rows [N, 640] (the rows after the 232 training batches)."""
    error, l0, total = 0.0, 0.0, torch.zeros(rows.shape[1], dtype=torch.float64)
    for part in rows.split(BATCH):
        x = part.float()
        error += (x - model_sae(x)).double().pow(2).sum().item()
        l0 += (model_sae.encode(x) != 0).sum().item()
        total += x.double().sum(0)
    mean = total / len(rows)
    variance = sum((part.double() - mean).pow(2).sum().item() for part in rows.split(BATCH))
    return {"rows": len(rows), "fvu": error / variance, "l0": l0 / len(rows)}


# --- report ------------------------------------------------------------------------------------------


def summarize(slices: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sd over slices of each eval figure."""
    out = {}
    for key in (*METRICS, "dead_fraction", "dense_fraction"):
        values = [s[key] for s in slices]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = {"mean": statistics.mean(values), "sd": sd}
    return out


def label(entry: dict[str, Any]) -> str:
    arch, k = entry["architecture"], entry["k"]
    setting = {"jumprelu": f"target L0 {k}", "topafa": f"cap {k}", "relu": "l1 5.0, no k"}.get(arch, f"k {k}")
    if entry["library"] == "sparsify":
        optimizer = "signum (its default), fp32" if entry["train"]["optimizer"] == "signum" else "Adam, bf16"
        return f"sparsify TopK, {optimizer} ({setting})"
    return f"{entry['library']} {arch} ({setting})"


def throughput(entry: dict[str, Any]) -> str:
    tps = f"{entry['train']['tokens_per_second']:,.0f}"
    shared = entry["train"].get("saes_in_the_loop", 1)
    return f"{tps} (loop of {shared})" if shared > 1 else tps


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| dictionary | L0 | FVU | CE loss recovered | KL(clean ‖ spliced) | never fired | AFA ratio "
        "| FVU, cache held-out rows | train tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["dictionaries"].values():
        s, cache = entry["eval"]["summary"], entry["cache_held_out"]
        lines.append(
            f"| {label(entry)} | {s['l0']['mean']:.1f} | {s['fvu']['mean']:.3f} ± {s['fvu']['sd']:.3f} "
            f"| {100 * s['ce_loss_recovered']['mean']:.2f} ± {100 * s['ce_loss_recovered']['sd']:.2f} % "
            f"| {s['kl_clean_spliced']['mean']:.3f} ± {s['kl_clean_spliced']['sd']:.3f} "
            f"| {100 * entry['eval']['dead_all_slices']:.1f} % | {s['afa_ratio']['mean']:.3f} "
            f"| {cache['fvu']:.3f} | {throughput(entry)} |"
        )
    return lines


def setup_line(results: dict[str, Any]) -> str:
    """The paragraph above the table: data, eval, machine, load, wall time."""
    m, e, d = results["machine"], results["eval_setup"], results["data"]
    load = {when: " ".join(value.split()[:3]) for when, value in results["loadavg"].items()}  # 1, 5, 15 min
    return (
        f"Every dictionary trained on the same {d['train_rows']:,} rows of the default job's cache (Gemma 3 "
        f"270M, `{HOOK}`: the first {d['train_batches']} batches of {BATCH:,} in cache order, the same order "
        f"for all), {D_SAE:,} latents, then evaluated with `sae.evals.evaluate` on the same {e['slices']} "
        f"held-out slices of {e['contexts_per_slice']} contexts of {e['context_size']} tokens "
        f"({e['tokens_per_slice']:,} tokens each, the text after the cached contexts): mean ± sd over "
        f"slices; L0 and AFA ratio are means; 'never fired' counts over all slices together; the cache FVU "
        f"is on the {d['held_out_rows']:,} cached rows after the training ones. Machine: {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}, {m['torch_threads']} threads; load average {load['start']} "
        f"at the start and {load['end']} at the end (other jobs shared the cores: tokens/s compare within "
        f"this run, roughly). Wall time {results['seconds']['total'] / 60:.0f} min."
    )


def markdown(results: dict[str, Any]) -> str:
    lines = ["## Architectures side by side", "", "```bash", results["command"], "```", ""]
    lines += [setup_line(results), "", *table(results), ""]
    ours = [d for d in results["dictionaries"].values() if d["library"] == "ours"]
    if (alone := results.get("topk_alone")) and ours:
        lines.append(
            f"Our tokens/s is that of one loop training all {len(ours)} of our SAEs on each batch; TopK "
            f"alone in the same conditions: {alone['tokens_per_second']:,.0f} tokens/s."
        )
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 12 batches, 2 slices, 4 dictionaries")
    p.add_argument("--reuse", action="store_true", help="evaluate what is already trained under --out")
    p.add_argument("--slices", type=int, default=16, help="held-out slices")
    p.add_argument("--contexts", type=int, default=4, help="contexts of 128 tokens per slice")
    p.add_argument("--out", type=Path, default=None, help="default out/architectures (quick: _quick)")
    p.add_argument("--results", type=Path, default=None, help="default benchmarks/results/architectures.json")
    p.add_argument("--markdown", type=Path, default=None, help="default benchmarks/architectures_section.md")
    p.add_argument("--peer-python", default=PEER_PYTHON, help="python of the dictionary_learning venv")
    p.add_argument("--no-shared-forwards", dest="share", action="store_false", help="3 forwards per eval")
    args = p.parse_args()
    args.out = args.out or ROOT / "out" / ("architectures_quick" if args.quick else "architectures")
    # a quick run writes its figures next to its dictionaries, not over the real results
    results_dir, markdown_dir = (args.out, args.out) if args.quick else (RESULTS.parent, ROOT / "benchmarks")
    args.results = args.results or results_dir / RESULTS.name
    args.markdown = args.markdown or markdown_dir / "architectures_section.md"
    if args.quick:
        args.slices = QUICK["slices"]
    return args


def train_everything(args, config, train_rows: torch.Tensor, held_rows: torch.Tensor, seconds: dict):
    """-> (every trained dictionary, the TopK-alone timing); stage times into `seconds`."""
    batches = list(train_rows.split(BATCH))  # [4096, 640] each, in cache order
    ours = QUICK["ours"] if args.quick else list(OURS)
    peers_dl = QUICK["dictionary_learning"] if args.quick else DICTIONARY_LEARNING
    peers_sp = QUICK["sparsify"] if args.quick else list(SPARSIFY)
    name, out, reuse = config.model.name, args.out, args.reuse
    stages = [
        ("train_ours", lambda: train_ours(batches, ours, out / "ours", name, reuse, "ours")),
        ("train_topk_alone", lambda: train_ours(batches, ["topk"], out / "topk_alone", name, reuse, "alone")),
        (
            "train_dictionary_learning",
            lambda: train_dictionary_learning(
                train_rows, peers_dl, out / "dictionary_learning", args.peer_python, reuse
            ),
        ),
        ("train_sparsify", lambda: train_sparsify(train_rows, held_rows, peers_sp, out / "sparsify", reuse)),
    ]
    trained: list[Trained] = []
    alone = None
    for stage, run in stages:
        started = time.perf_counter()
        rows = run()
        seconds[stage] = time.perf_counter() - started
        print(f"{stage}: {seconds[stage]:.0f} s, load {loadavg()}", flush=True)
        if stage == "train_topk_alone":
            alone = rows[0].train
        else:
            trained += rows
    return trained, alone


def main() -> None:
    args = parse_args()
    started, seconds = time.perf_counter(), {}
    config = load_run_config(None, [])  # the default job: its cache, model, data and eval settings
    wait_for_default_job(ROOT / config.train.out_dir / "report.json")
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/architectures.py", *sys.argv[1:]]),
        "machine": machine(),
        "loadavg": {"start": loadavg()},
    }
    print(f"{results['machine']}; load {results['loadavg']['start']}", flush=True)
    cache_dir = ROOT / config.cache.dir
    manifest, rows = cache_rows(cache_dir)
    n_train = (QUICK["train_batches"] if args.quick else TRAIN_BATCHES) * BATCH
    train_rows = rows[:n_train]  # quick: fewer training rows, the same held-out ones
    held_rows = rows[TRAIN_BATCHES * BATCH :].clone()  # [~49.9k, 640]
    results["data"] = {
        "cache": str(cache_dir),
        "cache_tokens": manifest["tokens"],
        "train_batches": n_train // BATCH,
        "train_rows": n_train,
        "held_out_rows": len(held_rows),
        "order": "as stored (shards in manifest order), not shuffled: batch i = rows[4096 i, 4096 (i + 1))",
    }
    trained, results["topk_alone"] = train_everything(args, config, train_rows, held_rows, seconds)
    del rows, train_rows

    step = time.perf_counter()
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    seconds["load_model"] = time.perf_counter() - step
    slices = held_out_slices(config, model.tokenizer, manifest["contexts"], args.slices, args.contexts)
    saes = {t.name: sae.load(t.path).eval() for t in trained}
    for t in trained:
        assert saes[t.name].cfg.hookpoint == HOOK, f"{t.path}: hookpoint {saes[t.name].cfg.hookpoint}"
    print(f"evaluating {len(saes)} dictionaries on {len(slices)} slices of {slices[0].shape}", flush=True)
    step = time.perf_counter()
    evaluation = evaluate_all(model, saes, slices, config, args.share)
    seconds["eval"] = time.perf_counter() - step

    results["eval_setup"] = {
        "slices": len(slices),
        "contexts_per_slice": args.contexts,
        "context_size": config.data.context_size,
        "tokens_per_slice": evaluation["per_slice"][trained[0].name][0]["tokens"],
        "skip_contexts": manifest["contexts"],
        "model": asdict(config.model),
        "exclude_bos": config.cache.exclude_bos,
        **{k: evaluation[k] for k in ("shared_forwards", "forwards", "replayed")},
    }
    results["dictionaries"] = {}
    for t in trained:
        results["dictionaries"][t.name] = {
            **asdict(t),
            "eval": {
                "summary": summarize(evaluation["per_slice"][t.name]),
                "dead_all_slices": evaluation["dead_all_slices"][t.name],
                "per_slice": evaluation["per_slice"][t.name],
            },
            "cache_held_out": cache_held_out(saes[t.name], held_rows),
        }
    seconds["total"] = time.perf_counter() - started
    results["seconds"], results["loadavg"]["end"] = seconds, loadavg()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    args.markdown.write_text(markdown(results))
    print("\n".join(table(results)))
    print(f"wrote {args.results} and {args.markdown}; {seconds['total'] / 60:.1f} min, load {loadavg()}")


if __name__ == "__main__":
    main()
