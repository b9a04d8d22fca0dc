"""sae-analyze SUBCOMMAND SAE [options]   (or: python analyze.py ...): analyses of a trained or loaded SAE.

    eval        the SAE spliced into its model on held-out text: CE loss recovered, KL, FVU, L0, density
    steer       steered and unsteered completions side by side, with measured effects
    dashboard   a static HTML site of latents (open OUT/index.html; no server)
    circuits    the attention heads a task uses: SAE-code methods, patching baselines, evaluation
    feature-circuit  the latents of spliced SAEs a task uses, their edges, faithfulness curves, a graph
    autointerp  explain latents with an LLM and score the explanations (real vs shuffled control)
    bench       several dictionaries side by side: core metrics, shrinkage, sparse probing

Examples:

    sae-analyze eval out/default/<sae> --tokens 16384
    sae-analyze steer out/default/<sae> --latent 123 --alpha 2 --alpha 4
    sae-analyze dashboard out/default/<sae> --cache out/cache/<dir> --latents 0-999 --out out/dashboard

Each subcommand is an options dataclass (every field is a command-line option, written once) and a
function that runs it; the resolved options go into the output, so every report says how it was made.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from sae.cli.common import Subcommand, exclusive, parse_latents
from sae.data import OFFLINE_CORPUS, DataConfig, token_batches
from sae.typed_config import ConfigError, option

SAE_HELP = "SAE directory or file (ours or a supported foreign format)"
MODEL_HELP = "model name or directory (default: the SAE config's model_name)"


def load_sae_and_model(sae_path: str, model_name: str | None, device: str):
    from sae.sites import load_sae_and_model as load

    sae, model = load(sae_path, model_name, device)
    print(
        f"model {model_name or sae.cfg.model_name}, SAE {sae_path} ({sae.cfg.architecture}, "
        f"d_sae {sae.cfg.d_sae}, {sae.cfg.hookpoint})"
    )
    return sae, model


# --- eval -----------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    sae: str = option(help=SAE_HELP, positional=True)
    model: str | None = option(None, help=MODEL_HELP)
    dataset: str = option("python-stdlib", help="held-out text: python-stdlib, a hub name or local files")
    tokens: int = option(16384, help="tokens to evaluate on (BOS not counted)")
    skip_contexts: int = option(
        0, help="contexts of the dataset to skip first (a cache's manifest 'contexts': text it did not hold)"
    )
    context_size: int = option(128, help="tokens per context, BOS included")
    batch_contexts: int = option(4, help="contexts per forward")
    dense_threshold: float = option(0.1, help="a latent firing on more than this fraction is dense")
    device: str = option("cpu", help="torch device")
    out: str | None = option(None, help="folder for eval.json and feature_density.png (default: the SAE's)")


def run_eval(opts: EvalOptions) -> int:
    from sae.evals import evaluate, format_report

    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    data = DataConfig(dataset=opts.dataset, context_size=opts.context_size)
    held_out = token_batches(data, model.tokenizer, opts.tokens, opts.batch_contexts, opts.skip_contexts)
    sae_path = Path(opts.sae)
    out = Path(opts.out) if opts.out else (sae_path if sae_path.is_dir() else sae_path.parent)
    result = evaluate(
        model,
        sae,
        [b.to(opts.device) for b in held_out],
        dense_threshold=opts.dense_threshold,
        out_dir=out,
        total_batches=len(held_out),
    )
    print(format_report(result))
    print(f"wrote {out / 'eval.json'} and {out / 'feature_density.png'}")
    return 0


# --- steer ----------------------------------------------------------------------------------------


@dataclass
class SteerOptions:
    sae: str = option(help=SAE_HELP, positional=True)
    latent: list[int] = option(help="latent to steer; repeat it to steer several together")
    prompt: list[str] = option(
        default_factory=list, help="prompt to complete (repeatable; default: three built-in neutral prompts)"
    )
    mode: Literal["add", "clamp", "ablate", "force", "suppress"] = option("add", help="the intervention")
    alpha: list[float] = option(
        default_factory=list,
        help="strength in units of the latent's max activation (repeatable; default 2)",
    )
    strength: float | None = option(None, help="strength in activation units (instead of --alpha)")
    target_kl: float | None = option(
        None, help="calibrate alpha to this mean next-token KL on neutral prompts (instead of --alpha)"
    )
    max_activation: float | None = option(
        None,
        help="the latent's max activation (default: measured on --stat-tokens of --dataset, which also "
        "finds the tokens following its top activations, whose probability is reported)",
    )
    dataset: str = option("python-stdlib", help="text for measuring the max activation")
    stat_tokens: int = option(16384, help="tokens of --dataset to measure on")
    context_size: int = option(128, help="tokens per context of --dataset")
    explanation: str | None = option(None, help="the latent's explanation, for the concept score")
    explanations: str | None = option(
        None, help="JSON-lines explanations (autointerp's explanations.jsonl) to take it from"
    )
    max_new_tokens: int = option(30, help="tokens to generate per completion")
    temperature: float = option(0.0, help="sampling temperature; 0: greedy")
    seed: int = option(0, help="sampling seed")
    model: str | None = option(None, help=MODEL_HELP)
    device: str = option("cpu", help="torch device")
    out: str | None = option(None, help="write the comparisons as JSON here (the dashboard shows them)")

    def __post_init__(self) -> None:
        exclusive(self, "alpha", "strength", "target_kl")
        exclusive(self, "explanation", "explanations")


def run_steer(opts: SteerOptions) -> int:
    from sae.analysis import steering
    from sae.analysis.dashboard import read_explanations
    from sae.analysis.features import activation_batches, collect_statistics
    from sae.io import atomic_write_json
    from sae.typed_config import to_dict

    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    steering.check_interventions(
        sae, [steering.Intervention(i, opts.mode) for i in opts.latent]
    )  # fail early
    explanation = opts.explanation
    if opts.explanations:
        explained = [read_explanations(opts.explanations).get(i) for i in opts.latent]
        if any(e is None or e.explanation is None for e in explained):
            raise ConfigError(f"{opts.explanations}: no explanation for latent(s) {opts.latent}")
        explanation = "; ".join(e.explanation for e in explained)
    embed = steering.sentence_embedder() if explanation else None

    # The latent on ordinary text: its max activation (the unit of alpha) and the tokens that follow its
    # top activations (whose probability steering should raise).
    data = DataConfig(dataset=opts.dataset, context_size=opts.context_size)
    activations = activation_batches(model, sae, opts.stat_tokens, data=data)
    stats = collect_statistics(
        sae,
        activations.batches,
        latents=opts.latent,
        total_batches=activations.total,
        k_top=20,
        k_sample=1,
        window_before=0,
        window_after=1,
    )
    concept_tokens = list(
        dict.fromkeys(t for i in range(len(opts.latent)) for t in stats.following_tokens(i))
    )
    maxima = [
        m if opts.max_activation is None else opts.max_activation for m in stats.max_activation.tolist()
    ]
    for i, latent in enumerate(opts.latent):
        following = [model.tokenizer.decode([t]) for t in stats.following_tokens(i)]
        print(
            f"latent {latent}: max activation {stats.max_activation[i].item():.4g} on {stats.tokens_seen} "
            f"tokens of {opts.dataset}; tokens after its top activations: {following}"
        )
        if opts.mode in ("add", "clamp") and opts.strength is None and maxima[i] <= 0:
            raise ConfigError(
                f"latent {latent} never fired on {stats.tokens_seen} tokens; "
                "pass --strength or --max-activation"
            )

    # settings: (alpha or None, one strength per latent)
    if opts.mode in ("ablate", "force", "suppress"):
        settings = [(None, [0.0] * len(opts.latent))]
    elif opts.strength is not None:
        settings = [(None, [opts.strength] * len(opts.latent))]
    elif opts.target_kl is not None:
        alpha, kl = steering.calibrate_to_kl(
            model, sae, opts.latent, opts.target_kl, mode=opts.mode, max_activation=maxima
        )
        print(
            f"calibrated alpha {alpha:.4g} (mean next-token KL {kl:.4g} on "
            f"{len(steering.NEUTRAL_PROMPTS)} neutral prompts)"
        )
        settings = [(alpha, [steering.strength_in_units(alpha, m) for m in maxima])]
    else:
        settings = [(a, [steering.strength_in_units(a, m) for m in maxima]) for a in opts.alpha or [2.0]]

    comparisons = []
    for prompt in opts.prompt or list(steering.NEUTRAL_PROMPTS[:3]):
        for alpha, strengths in settings:
            interventions = [steering.Intervention(i, opts.mode, s) for i, s in zip(opts.latent, strengths)]
            result = steering.compare(
                model,
                sae,
                prompt,
                interventions,
                alpha=alpha,
                max_new_tokens=opts.max_new_tokens,
                temperature=opts.temperature,
                seed=opts.seed,
                explanation=explanation,
                embed=embed,
                concept_tokens=concept_tokens,
            )
            print(steering.format_comparison(result) + "\n")
            comparisons.append(result.to_dict())
    if opts.out:
        report = {
            "options": asdict(opts),
            "max_activation": maxima[0],
            "max_activations": maxima,
            "explanation": explanation,
            "sae_cfg": to_dict(sae.cfg),
            "comparisons": comparisons,
        }
        atomic_write_json(opts.out, report)
        print(f"wrote {opts.out}")
    return 0


# --- dashboard ------------------------------------------------------------------------------------


@dataclass
class DashboardOptions:
    sae: str = option(help=SAE_HELP, positional=True)
    out: str = option(help="output directory; open OUT/index.html")
    latents: str | None = option(None, help="e.g. 0-999, 0:1000 or 3,7,10-12 (default: all)")
    cache: str | None = option(None, help="activation cache to read examples from (no model forward)")
    dataset: str | None = option(None, help="text to run the model over instead (default: python-stdlib)")
    tokens: int = option(65536, help="tokens to read (the cache's first ones) or run the model over")
    context_size: int = option(128, help="tokens per context of --dataset")
    explanations: str | None = option(None, help="JSON-lines explanations and scores (autointerp's)")
    steering: list[str] = option(default_factory=list, help="JSON written by `steer --out` (repeatable)")
    top_examples: int = option(20, help="top-activating examples kept per latent")
    quantile_sample: int = option(40, help="random firings kept per latent for the quantile examples")
    chunk_size: int = option(64, help="latents per data file")
    title: str | None = option(None, help="page title")
    model: str | None = option(None, help=MODEL_HELP)
    device: str = option("cpu", help="torch device")

    def __post_init__(self) -> None:
        exclusive(self, "cache", "dataset")


def run_dashboard(opts: DashboardOptions) -> int:
    import torch

    from sae.analysis.dashboard import read_explanations, read_steering_examples, write_dashboard
    from sae.analysis.features import Unembedding, activation_batches, collect_statistics

    explanations = read_explanations(opts.explanations) if opts.explanations else {}
    steering = read_steering_examples(opts.steering)
    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    latents = torch.tensor(parse_latents(opts.latents)) if opts.latents else None
    data = DataConfig(dataset=opts.dataset or OFFLINE_CORPUS, context_size=opts.context_size)
    activations = activation_batches(model, sae, opts.tokens, cache=opts.cache, data=data)
    stats = collect_statistics(
        sae,
        activations.batches,
        latents,
        total_batches=activations.total,
        k_top=opts.top_examples,
        k_sample=opts.quantile_sample,
    )
    in_residual_stream = "resid" in (sae.cfg.hookpoint or "") and sae.cfg.d_in == model.W_U.shape[0]
    index = write_dashboard(
        opts.out,
        sae,
        stats,
        model.tokenizer,
        unembedding=Unembedding(model) if in_residual_stream else None,
        explanations=explanations,
        steering=steering,
        source=activations.source,
        model_name=opts.model or sae.cfg.model_name,
        chunk_size=opts.chunk_size,
        title=opts.title,
    )
    print(f"dashboard of {len(stats.latents)} latents on {stats.tokens_seen} tokens: {index}")
    return 0


# --- entry point ----------------------------------------------------------------------------------


def subcommands() -> dict[str, Subcommand]:
    from sae.cli import autointerp, bench, circuits, feature_circuit

    return {
        "eval": Subcommand(
            EvalOptions, run_eval, "evaluate an SAE with the model in the loop on held-out text"
        ),
        "steer": Subcommand(SteerOptions, run_steer, "steer the model with latents and measure the effects"),
        "dashboard": Subcommand(DashboardOptions, run_dashboard, "write a static HTML dashboard of latents"),
        "circuits": circuits.SUBCOMMAND,
        "feature-circuit": feature_circuit.SUBCOMMAND,
        "autointerp": autointerp.SUBCOMMAND,
        "bench": bench.SUBCOMMAND,
    }


def main(argv: list[str] | None = None) -> int:
    from cache import CacheError

    parser = argparse.ArgumentParser(
        prog="sae-analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    registry = subcommands()
    for name, subcommand in registry.items():
        subcommand.add_parser(commands, name)
    args = parser.parse_args(argv)
    try:
        return registry[args.command](args, f"sae-analyze {args.command}")
    except (ConfigError, CacheError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
