"""`sae-analyze bench SAE [SAE ...] --out DIR`: dictionaries of one model and hookpoint judged side by side
on the same held-out tokens, offline: the core metrics (with the model in the loop), shrinkage, sparse
probing on the token classes of Python source against the same activations' raw dimensions, feature
absorption on the first letters of single-token words, and (given a cache to read examples from) the
autointerp embedding score of a seeded sample of live latents against its shuffled control.

Writes bench.json, bench.md and pareto.png / probing.png. Each figure states its sample size; a metric
that cannot be computed for a dictionary (a probing concept with too few tokens, absorption of a
transcoder) is listed with the reason instead of a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from sae.cli.common import Subcommand
from sae.typed_config import ConfigError, option

if TYPE_CHECKING:
    from sae.analysis.absorption import FirstLetterData


@dataclass
class BenchOptions:
    saes: list[str] = option(
        metavar="SAE", help="dictionaries to compare (any that sae.load reads)", positional=True
    )
    out: str = option(help="directory for bench.json, bench.md and the plots")
    model: str | None = option(None, help="the model (default: the first SAE's cfg.model_name)")
    tokens: int = option(16384, help="held-out tokens of the core evaluation")
    skip_contexts: int = option(
        0, help="contexts of the corpus to skip first (a cache's manifest 'contexts')"
    )
    context_size: int = option(128, help="tokens per context, BOS included")
    probe_tokens: int = option(32768, help="tokens of labelled Python source for the probes")
    ks: list[int] = option(default_factory=lambda: [1, 2, 5, 10, 20], metavar="K", help="probe sizes")
    per_class: int = option(1000, help="tokens per class and concept (train + test)")
    absorption_words: int = option(200, help="single-token words per first letter (0: no absorption)")
    autointerp_cache: str | None = option(
        None, help="a cache of this model and hookpoint: score explanations of latents (default: skip)"
    )
    autointerp_latents: int = option(50, help="live latents explained per dictionary, drawn with a seed")
    autointerp_tokens: int = option(131072, help="cache tokens the explainer's examples come from")
    autointerp_backend: Literal["in-process", "local-server", "http"] = option(
        "in-process", help="the explainer LLM, as `sae-analyze autointerp --backend`"
    )
    autointerp_base_url: str | None = option(
        None, help="OpenAI-compatible server (--autointerp-backend http)"
    )
    device: str = option("cpu", help="torch device")

    def __post_init__(self) -> None:
        if not self.saes:
            raise ConfigError("give at least one SAE")
        if min(self.ks, default=0) < 1:
            raise ConfigError(f"--ks must be positive, got {self.ks}")


def run_bench(opts: BenchOptions) -> int:
    import sae
    from sae.analysis.absorption import NotComputable, first_letter_data
    from sae.analysis.probing import python_probing_data, sparse_probing
    from sae.data import DataConfig, token_batches
    from sae.evals import evaluate
    from sae.lm import load_model

    dictionaries = {path: sae.load(path, device=opts.device).eval() for path in opts.saes}
    first = next(iter(dictionaries.values()))
    sites = {(d.cfg.hookpoint, d.cfg.output_hookpoint) for d in dictionaries.values()}
    if len(sites) > 1 or first.cfg.hookpoint is None:
        raise ConfigError(
            f"the dictionaries must share one known hookpoint; they read {sorted(map(str, sites))}"
        )
    model_name = opts.model or first.cfg.model_name
    if model_name is None:
        raise ConfigError(f"{opts.saes[0]}: its cfg names no model; pass --model")
    model = load_model(model_name, device=opts.device)
    data = DataConfig(context_size=opts.context_size)
    held_out = token_batches(data, model.tokenizer, opts.tokens, 4, opts.skip_contexts)
    acts, labels = python_probing_data(model, first.cfg.hookpoint, opts.probe_tokens, opts.context_size)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    report: dict = {"model": model_name, "hookpoint": first.cfg.hookpoint, "dictionaries": {}}
    report["samples"] = {"core_tokens": sum(b[:, 1:].numel() for b in held_out), "probe_tokens": len(acts)}
    report["probe_classes"] = {name: int(mask.sum()) for name, mask in labels.items()}
    letters: FirstLetterData | str = "--absorption-words 0"  # the data, or why there is none
    if opts.absorption_words:
        try:
            letters = first_letter_data(model, first.cfg.hookpoint, opts.absorption_words)
            report["samples"]["absorption_words"] = len(letters.words)
            report["absorption_prompt"] = letters.prompt
        except NotComputable as why:
            letters = str(why)
    raw = None
    for path, model_sae in dictionaries.items():
        core = evaluate(model, model_sae, [b.to(opts.device) for b in held_out], out_dir=None)
        shrinkage = None  # ‖x̂‖/‖x‖: of an SAE; a transcoder's output is at another site
        if not model_sae.cfg.transcoder:
            with torch.no_grad():
                x_hat = torch.cat([model_sae(chunk) for chunk in acts.split(4096)])
            shrinkage = (x_hat.norm(dim=-1) / acts.norm(dim=-1).clamp_min(1e-12)).mean().item()
        results, skipped = sparse_probing(acts, labels, model_sae.encode, tuple(opts.ks), opts.per_class)
        entry = {"core": core.to_dict() | {"explained_variance": 1 - core.fvu, "shrinkage": shrinkage}}
        entry["probing"] = [r.to_dict() for r in results if r.basis == "latents"]
        entry["probing_skipped"] = skipped
        entry["absorption"] = absorption_entry(model_sae, letters)
        entry["autointerp"] = autointerp_entry(path, model_sae, opts)
        report["dictionaries"][path] = entry
        raw = raw or [r.to_dict() for r in results if r.basis == "dimensions"]  # the same for every SAE
        print(f"{path}: FVU {core.fvu:.3f}, L0 {core.l0:.1f}, CE recovered {core.ce_loss_recovered:.2%}")
    report["probing_raw_dimensions"] = raw
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report, opts.ks))
    plots(report, opts.ks, out)
    print(f"wrote {out / 'bench.md'}, bench.json, pareto.png and probing.png")
    return 0


def absorption_entry(model_sae, letters: FirstLetterData | str) -> dict:
    """The absorption result as a dict, or {"not_computed": why}."""
    from sae.analysis.absorption import NotComputable, absorption

    if isinstance(letters, str):
        return {"not_computed": letters}
    if model_sae.cfg.transcoder:
        return {"not_computed": "a transcoder: its decoder writes to another site than the probe reads"}
    try:
        return absorption(letters, model_sae.encode, model_sae.W_dec).to_dict()
    except NotComputable as why:
        return {"not_computed": str(why)}


def autointerp_entry(path: str, model_sae, opts: BenchOptions) -> dict:
    """The embedding score (real and shuffled control) of `autointerp_latents` latents drawn with seed 0
    among those firing at least 10 times in the explainer's tokens, or {"not_computed": why}."""
    import asyncio

    from sae.analysis.features import cache_batches
    from sae.cli.autointerp import AutointerpOptions, autointerp_from_cache

    if opts.autointerp_cache is None:
        return {"not_computed": "no --autointerp-cache"}
    batches = cache_batches(opts.autointerp_cache, model_sae, max_tokens=opts.autointerp_tokens)
    with torch.no_grad():
        firings = sum((model_sae.encode(x[valid].to(opts.device)) > 0).sum(0) for _, x, valid in batches)
    live = (firings >= 10).nonzero().flatten().cpu()
    drawn = live[torch.randperm(len(live), generator=torch.Generator().manual_seed(0))]
    latents = sorted(drawn[: opts.autointerp_latents].tolist())
    if not latents:
        return {"not_computed": f"no latent fires 10 times in {opts.autointerp_tokens:,} tokens"}
    autointerp_opts = AutointerpOptions(
        sae=path,
        cache=opts.autointerp_cache,
        out=str(Path(opts.out) / "autointerp" / Path(path).name),
        latents=",".join(map(str, latents)),
        tokens=opts.autointerp_tokens,
        scorers="embedding",
        backend=opts.autointerp_backend,
        base_url=opts.autointerp_base_url,
        device=opts.device,
    )
    _, summary = asyncio.run(autointerp_from_cache(autointerp_opts))
    auroc = summary["scorers"]["embedding"]["auroc"]
    keep = (
        "real",
        "control",
        "real_minus_control",
        "real_minus_control_ci95",
        "real_higher",
        "latents_paired",
    )
    return {"live_latents": len(live), "latents": latents} | {key: auroc[key] for key in keep}


def mean_accuracy(rows: list[dict], k: int) -> tuple[float, int] | None:
    """Mean test accuracy over the concepts probed at this k, and how many there were."""
    values = [r["accuracy"] for r in rows if r["k"] == k]
    return (sum(values) / len(values), len(values)) if values else None


def markdown(report: dict, ks: list[int]) -> str:
    core_keys = [
        ("fvu", "FVU", "{:.3f}"),
        ("explained_variance", "explained variance", "{:.3f}"),
        ("ce_loss_recovered", "CE recovered", "{:.2%}"),
        ("delta_lm_loss", "Δ LM loss", "{:+.4f}"),
        ("kl_clean_spliced", "KL", "{:.4f}"),
        ("l0", "L0", "{:.1f}"),
        ("dead_fraction", "dead", "{:.1%}"),
        ("dense_fraction", "dense", "{:.1%}"),
        ("shrinkage", "‖x̂‖/‖x‖", "{:.3f}"),
        ("afa_ratio", "AFA ratio", "{:.3f}"),
    ]
    samples = report["samples"]
    lines = [
        f"# Bench: {report['model']}, {report['hookpoint']}",
        "",
        f"Core metrics on {samples['core_tokens']:,} held-out tokens; shrinkage and probes on "
        f"{samples['probe_tokens']:,} tokens of standard-library source.",
        "",
        "| dictionary | " + " | ".join(name for _, name, _ in core_keys) + " |",
        "|---" * (len(core_keys) + 1) + "|",
    ]
    for path, entry in report["dictionaries"].items():
        cells = [
            "n/a" if entry["core"][key] is None else fmt.format(entry["core"][key])
            for key, _, fmt in core_keys
        ]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Sparse probing: mean test accuracy over the token classes (balanced classes, Wilson 95 % intervals "
        "per concept in bench.json), top-k latents against the top-k raw dimensions:",
        "",
        "| basis | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---" * (len(ks) + 1) + "|",
    ]
    rows = {"raw dimensions": report["probing_raw_dimensions"]}
    rows |= {path: entry["probing"] for path, entry in report["dictionaries"].items()}
    for name, probes in rows.items():
        cells = []
        for k in ks:
            mean = mean_accuracy(probes, k)
            cells.append("n/a" if mean is None else f"{mean[0]:.3f} ({mean[1]} concepts)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    skipped = next(iter(report["dictionaries"].values()))["probing_skipped"]
    if skipped:
        lines += ["", "Not probed: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + "."]
    lines += ["", *absorption_lines(report), "", *autointerp_lines(report)]
    return "\n".join(lines) + "\n"


def absorption_lines(report: dict) -> list[str]:
    words = report["samples"].get("absorption_words")
    lines = [
        f"Feature absorption (Chanin et al.) on {words:,} single-token words: mean over letters of the "
        "absorption fraction and the full-absorption rate, 95 % bootstrap intervals over the test words "
        "that the first-letter probe gets right:"
        if words
        else "Feature absorption: not run.",
        "",
        "| dictionary | absorption fraction | full absorption | probe accuracy | test words | letters |",
        "|---|---|---|---|---|---|",
    ]
    for path, entry in report["dictionaries"].items():
        result = entry["absorption"]
        if "not_computed" in result:
            lines.append(f"| {path} | not computed: {result['not_computed']} | | | | |")
            continue
        fraction, full = result["fraction_ci95"], result["full_ci95"]
        lines.append(
            f"| {path} | {result['mean_absorption_fraction']:.3f} [{fraction[0]:.3f}, {fraction[1]:.3f}] "
            f"| {result['full_absorption_rate']:.3f} [{full[0]:.3f}, {full[1]:.3f}] "
            f"| {result['probe_accuracy']:.3f} | {result['n_test_words']} "
            f"| {len(result['letters'])} (skipped: {', '.join(result['skipped']) or 'none'}) |"
        )
    return lines


def autointerp_lines(report: dict) -> list[str]:
    lines = [
        "Autointerp embedding score (AUROC of MiniLM similarity between explanation and examples; the "
        "control scores another latent's explanation), latents drawn with seed 0 among those firing at "
        "least 10 times:",
        "",
        "| dictionary | real | control | real − control [95 %] | real higher | latents (live) |",
        "|---|---|---|---|---|---|",
    ]
    for path, entry in report["dictionaries"].items():
        score = entry["autointerp"]
        if "not_computed" in score:
            lines.append(f"| {path} | not run: {score['not_computed']} | | | | |")
            continue
        low, high = score["real_minus_control_ci95"]
        lines.append(
            f"| {path} | {score['real']:.3f} | {score['control']:.3f} | {score['real_minus_control']:+.3f} "
            f"[{low:+.3f}, {high:+.3f}] | {score['real_higher']}/{score['latents_paired']} "
            f"| {len(score['latents'])} ({score['live_latents']:,}) |"
        )
    return lines


def plots(report: dict, ks: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["dictionaries"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path, entry in entries.items():
        name = Path(path).name
        axes[0].scatter(entry["core"]["l0"], entry["core"]["fvu"], label=name)
        axes[1].scatter(entry["core"]["l0"], entry["core"]["ce_loss_recovered"], label=name)
    axes[0].set(xscale="log", xlabel="L0", ylabel="FVU", title="L0 vs FVU")
    axes[1].set(xscale="log", xlabel="L0", ylabel="CE loss recovered", title="L0 vs CE recovered")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    series = {"raw dimensions": report["probing_raw_dimensions"]}
    series |= {Path(p).name: e["probing"] for p, e in entries.items()}
    for name, probes in series.items():
        points = [(k, mean_accuracy(probes, k)) for k in ks]
        points = [(k, m[0]) for k, m in points if m is not None]
        ax.plot([k for k, _ in points], [a for _, a in points], marker="o", label=name)
    ax.set(xscale="log", xlabel="k", ylabel="mean probe accuracy", title="sparse probing")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "probing.png", dpi=110)
    plt.close(fig)


SUBCOMMAND = Subcommand(
    BenchOptions, run_bench, "compare dictionaries: core metrics, probing, absorption, autointerp; offline"
)
