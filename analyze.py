"""python analyze.py SUBCOMMAND SAE_DIR [options]: analyses of a trained (or loaded) SAE.

    eval       the SAE spliced into the model on held-out text: CE loss recovered, KL, FVU, L0, density
    steer      steered and unsteered completions side by side, with measured effects
    steer-study  token latents chosen by a fixed rule, steered: KL, probability of their tokens, completions
    dashboard  a static HTML site of latents (open DIR/index.html in a browser; no server)
    circuits   attention heads a task uses: discrete-SAE head codes, patching baselines, evaluation
    autointerp explain latents with an LLM and score the explanations (real vs shuffled control)

Each subcommand is a pair of functions registered in SUBCOMMANDS: `add_<name>_arguments(parser)` and
`run_<name>(args) -> int`; a new analysis (eval, circuits, autointerp) adds its own pair. Options are
checked strictly by a dataclass (`sae.config.from_dict`) and the resolved options are written into
the output, so every report says how it was made.

Examples:

    python analyze.py steer out/default/<sae> --latent 123 --prompt "The weather today" --alpha 2 --alpha 4
    python analyze.py steer out/default/<sae> --latent 123 --target-kl 0.5 --explanation "Python imports"
    python analyze.py dashboard out/default/<sae> --cache out/cache/<dir> --latents 0-999 --out out/dashboard
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

# --- shared ---------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Options that do not fit together."""


def load_sae_and_model(sae_path: str, model_name: str | None, device: str):
    """The SAE, and the model it reads from (its cfg.model_name unless `model_name` is given)."""
    import sae as sae_lib
    from sae.lm import load_model

    loaded = sae_lib.load(sae_path, device=device).eval()
    name = model_name or loaded.cfg.model_name
    if name is None:
        raise UsageError(f"{sae_path}: the SAE's config names no model; pass --model")
    if loaded.cfg.hookpoint is None:
        raise UsageError(f"{sae_path}: the SAE's config names no hookpoint; it cannot be hooked into a model")
    print(
        f"model {name}, SAE {sae_path} ({loaded.cfg.architecture}, d_sae {loaded.cfg.d_sae}, {loaded.cfg.hookpoint})"
    )
    return loaded, load_model(name, "float32", device)


def parse_latents(spec: str) -> list[int]:
    """'3,7,10-12' -> [3, 7, 10, 11, 12] (each latent once, in order of first mention)."""
    latents = []
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        try:
            latents.extend(range(int(low), int(high) + 1) if high else [int(low)])
        except ValueError:
            raise UsageError(f"--latents {spec!r}: expected numbers and ranges such as 3,7,10-12") from None
    return list(dict.fromkeys(latents))


def text_token_batches(model, dataset: str, tokens: int, context_size: int, batch_contexts: int = 8):
    """Packed contexts [b, context_size] of `dataset` (sae.data sources), about `tokens` tokens in all."""
    from sae.data import context_batches, iter_documents, pack_contexts

    contexts = pack_contexts(iter_documents(dataset), model.tokenizer, context_size)
    n_batches = -(-tokens // (context_size * batch_contexts))
    return [batch for _, batch in zip(range(n_batches), context_batches(contexts, batch_contexts))]


def options(cls, args: argparse.Namespace):
    """The subcommand's dataclass from the parsed arguments, strictly (names its bad key)."""
    from sae.config import from_dict

    fields = cls.__dataclass_fields__
    return from_dict(cls, {k: v for k, v in vars(args).items() if k in fields}, f"analyze.py {args.command}")


# --- steer ----------------------------------------------------------------------------------------


@dataclass
class SteerOptions:
    sae: str
    latent: list[int]
    """One latent, or several steered together (same mode and alpha, each in its own max-activation units)."""
    prompt: list[str] = field(default_factory=list)
    mode: str = "add"
    alpha: list[float] = field(default_factory=list)
    """Strengths in units of the latent's maximum activation."""
    strength: float | None = None
    """A strength in activation units (instead of alpha)."""
    target_kl: float | None = None
    max_activation: float | None = None
    """The latent's maximum activation; measured on `stat_tokens` tokens of `dataset` when not given
    (that pass also finds the tokens following its top activations, whose probability is reported)."""
    dataset: str = "python-stdlib"
    stat_tokens: int = 16384
    context_size: int = 128
    explanation: str | None = None
    explanations: str | None = None
    max_new_tokens: int = 30
    temperature: float = 0.0
    seed: int = 0
    model: str | None = None
    device: str = "cpu"
    out: str | None = None


def add_steer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae", help="SAE directory (ours or a supported foreign format)")
    parser.add_argument(
        "--latent",
        type=int,
        action="append",
        required=True,
        help="repeatable: several latents are steered together",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help="repeatable; default: built-in neutral prompts"
    )
    parser.add_argument("--mode", default="add", choices=["add", "clamp", "ablate", "force", "suppress"])
    strength = parser.add_mutually_exclusive_group()
    strength.add_argument(
        "--alpha",
        type=float,
        action="append",
        default=[],
        help="strength in units of the latent's max activation (repeatable; default 2)",
    )
    strength.add_argument("--strength", type=float, help="strength in activation units")
    strength.add_argument(
        "--target-kl", type=float, help="calibrate alpha to this mean next-token KL on neutral prompts"
    )
    parser.add_argument(
        "--max-activation", type=float, help="the latent's max activation (default: measured)"
    )
    parser.add_argument("--dataset", default="python-stdlib", help="text for measuring the max activation")
    parser.add_argument("--stat-tokens", type=int, default=16384)
    parser.add_argument("--context-size", type=int, default=128)
    explain = parser.add_mutually_exclusive_group()
    explain.add_argument("--explanation", help="the latent's explanation, for the concept score")
    explain.add_argument("--explanations", help="JSON-lines explanations file (see sae.analysis.dashboard)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model name or directory (default: the SAE's cfg.model_name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the comparisons as JSON here (the dashboard shows them)")


def run_steer(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sae.analysis import steering
    from sae.analysis.dashboard import read_explanations
    from sae.analysis.features import collect_statistics, model_batches
    from sae.config import to_dict
    from sae.io import atomic_write_json

    opts = options(SteerOptions, args)
    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    steering.check_interventions(
        sae, [steering.Intervention(i, opts.mode) for i in opts.latent]
    )  # fail early
    explanation = opts.explanation
    if opts.explanations:
        explained = [read_explanations(opts.explanations).get(i) for i in opts.latent]
        if any(e is None or e.explanation is None for e in explained):
            raise UsageError(f"{opts.explanations}: no explanation for latent(s) {opts.latent}")
        explanation = "; ".join(e.explanation for e in explained)
    embed = steering.sentence_embedder() if explanation else None

    # The latent on ordinary text: its max activation (the unit of alpha) and the tokens that follow its
    # top activations (whose probability steering should raise).
    batches = text_token_batches(model, opts.dataset, opts.stat_tokens, opts.context_size)
    stats = collect_statistics(
        sae,
        model_batches(model, sae, batches),
        latents=opts.latent,
        total_batches=len(batches),
        k_top=20,
        k_sample=1,
        window_before=0,
        window_after=1,
    )
    concept_tokens = list(
        dict.fromkeys(t for i in range(len(opts.latent)) for t in stats.following_tokens(i))
    )
    maxima = [
        opts.max_activation if opts.max_activation is not None else m for m in stats.max_activation.tolist()
    ]
    for i, latent in enumerate(opts.latent):
        print(
            f"latent {latent}: max activation {stats.max_activation[i].item():.4g} on {stats.tokens_seen} tokens of "
            f"{opts.dataset}; tokens after its top activations: {[model.tokenizer.decode([t]) for t in stats.following_tokens(i)]}"
        )
        if opts.mode in ("add", "clamp") and opts.strength is None and maxima[i] <= 0:
            raise UsageError(
                f"latent {latent} never fired on {stats.tokens_seen} tokens; pass --strength or --max-activation"
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
            f"calibrated alpha {alpha:.4g} (mean next-token KL {kl:.4g} on {len(steering.NEUTRAL_PROMPTS)} neutral prompts)"
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
        atomic_write_json(
            opts.out,
            {
                "options": asdict(opts),
                "max_activation": maxima[0],
                "max_activations": maxima,
                "explanation": explanation,
                "sae_cfg": to_dict(sae.cfg),
                "comparisons": comparisons,
            },
        )
        print(f"wrote {opts.out}")
    return 0


# --- dashboard ------------------------------------------------------------------------------------


@dataclass
class DashboardOptions:
    sae: str
    out: str
    latents: str | None = None
    """'0-999' or '3,7,10-12'; default: all latents."""
    cache: str | None = None
    dataset: str = "python-stdlib"
    tokens: int = 65536
    context_size: int = 128
    explanations: str | None = None
    steering: list[str] = field(default_factory=list)
    top_examples: int = 20
    quantile_sample: int = 40
    chunk_size: int = 64
    title: str | None = None
    model: str | None = None
    device: str = "cpu"


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae", help="SAE directory (ours or a supported foreign format)")
    parser.add_argument("--out", required=True, help="output directory; open OUT/index.html")
    parser.add_argument("--latents", help="e.g. 0-999 or 3,7,10-12 (default: all)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cache", help="activation cache to read examples from (no model forward needed)")
    source.add_argument("--dataset", default="python-stdlib", help="text to run the model over (default)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=65536,
        help="tokens to read (first ones of the cache) or run the model over",
    )
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument(
        "--explanations", help="JSON-lines explanations and scores (format: sae.analysis.dashboard)"
    )
    parser.add_argument(
        "--steering", action="append", default=[], help="JSON written by analyze.py steer (repeatable)"
    )
    parser.add_argument("--top-examples", type=int, default=20)
    parser.add_argument(
        "--quantile-sample", type=int, default=40, help="random firings kept per latent for quantiles"
    )
    parser.add_argument("--chunk-size", type=int, default=64, help="latents per data file")
    parser.add_argument("--title")
    parser.add_argument("--model", help="model name or directory (default: the SAE's cfg.model_name)")
    parser.add_argument("--device", default="cpu")


def run_dashboard(args: argparse.Namespace) -> int:
    import torch

    from sae.analysis.dashboard import read_explanations, read_steering_examples, write_dashboard
    from sae.analysis.features import Unembedding, cache_batches, collect_statistics, model_batches

    opts = options(DashboardOptions, args)
    explanations = read_explanations(opts.explanations) if opts.explanations else {}
    steering = read_steering_examples(opts.steering)
    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    latents = torch.tensor(parse_latents(opts.latents)) if opts.latents else None
    if opts.cache:
        batches, total, source = (
            cache_batches(opts.cache, sae, max_tokens=opts.tokens),
            None,
            f"cache {opts.cache}",
        )
    else:
        token_batches = text_token_batches(model, opts.dataset, opts.tokens, opts.context_size)
        batches, total, source = model_batches(model, sae, token_batches), len(token_batches), opts.dataset
    stats = collect_statistics(
        sae, batches, latents, total_batches=total, k_top=opts.top_examples, k_sample=opts.quantile_sample
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
        source=source,
        model_name=opts.model or sae.cfg.model_name,
        chunk_size=opts.chunk_size,
        title=opts.title,
    )
    print(f"dashboard of {len(stats.latents)} latents on {stats.tokens_seen} tokens: {index}")
    return 0


# --- eval -----------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    sae: str
    model: str | None = None
    dataset: str = "python-stdlib"
    tokens: int = 16384
    skip_contexts: int = 0
    """Contexts of `dataset` to skip first: pass a cache's `contexts` to evaluate on text it did not hold."""
    context_size: int = 128
    batch_contexts: int = 4
    dense_threshold: float = 0.1
    device: str = "cpu"
    out: str | None = None


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae", help="SAE directory or file (ours or a supported foreign format)")
    parser.add_argument("--model", help="the model the SAE reads (default: the SAE config's model_name)")
    parser.add_argument(
        "--dataset", default="python-stdlib", help="held-out text: python-stdlib, a hub name or local files"
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate on")
    parser.add_argument(
        "--skip-contexts",
        type=int,
        default=0,
        help="contexts to skip (a cache's manifest 'contexts': evaluate on text after it)",
    )
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-contexts", type=int, default=4)
    parser.add_argument("--dense-threshold", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", help="folder for eval.json and feature_density.png (default: the SAE's folder)"
    )


def run_eval(args: argparse.Namespace) -> int:
    from itertools import islice
    from pathlib import Path

    from sae.data import context_batches, iter_documents, pack_contexts
    from sae.evals import evaluate, format_report

    opts = options(EvalOptions, args)
    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    contexts = pack_contexts(iter_documents(opts.dataset), model.tokenizer, opts.context_size)
    n_contexts = -(-opts.tokens // (opts.context_size - 1))  # BOS is not evaluated
    held_out = list(
        context_batches(
            islice(contexts, opts.skip_contexts, opts.skip_contexts + n_contexts), opts.batch_contexts
        )
    )
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


# --- circuits (sae/analysis/circuits/cli.py) ------------------------------------------------------


def add_circuits_arguments(parser: argparse.ArgumentParser) -> None:
    from sae.analysis.circuits.cli import add_circuits_arguments as add

    add(parser)


def run_circuits(args: argparse.Namespace) -> int:
    from sae.analysis.circuits.cli import run_circuits as run

    return run(args)


# --- steer-study (sae/analysis/steering_study.py) --------------------------------------------------


def add_steer_study_arguments(parser: argparse.ArgumentParser) -> None:
    from sae.analysis.steering_study import add_steer_study_arguments as add

    add(parser)


def run_steer_study(args: argparse.Namespace) -> int:
    from sae.analysis.steering_study import run_steer_study as run

    return run(args)


# --- autointerp (sae/analysis/autointerp/cli.py) --------------------------------------------------


def add_autointerp_arguments(parser: argparse.ArgumentParser) -> None:
    from sae.analysis.autointerp.cli import add_autointerp_arguments as add

    add(parser)


def run_autointerp(args: argparse.Namespace) -> int:
    from sae.analysis.autointerp.cli import run_autointerp as run

    return run(args)


# --- entry point ----------------------------------------------------------------------------------

SUBCOMMANDS = {
    "eval": (add_eval_arguments, run_eval, "evaluate an SAE with the model in the loop on held-out text"),
    "steer": (
        add_steer_arguments,
        run_steer,
        "steer the model with one or more latents and measure the effects",
    ),
    "steer-study": (
        add_steer_study_arguments,
        run_steer_study,
        "steer a random sample of token latents (chosen by a fixed rule) and measure the effects",
    ),
    "dashboard": (add_dashboard_arguments, run_dashboard, "write a static HTML dashboard of latents"),
    "circuits": (add_circuits_arguments, run_circuits, "find the attention heads a task uses"),
    "autointerp": (add_autointerp_arguments, run_autointerp, "explain and score latents with an LLM"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python analyze.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in SUBCOMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)

    from cache import CacheError
    from sae.config import ConfigError

    try:
        return SUBCOMMANDS[args.command][1](args)
    except (UsageError, ConfigError, CacheError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
