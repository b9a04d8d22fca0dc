"""Does steering with a token latent make the model write the token that follows it? A study whose choice
of latents is fixed before any steering result is seen (the table and findings: README.md beside this).

    python studies/steering/study.py SAE --cache CACHE --out DIR [--latents 5] [--completion-alpha 4] ...

Choice of latents (`token_latents`, then a seeded random sample of them):
  1. the latent's top `TOP_EXAMPLES` activations on the statistics text are all filled, and at least
     `MIN_SHARE` of them sit on one token (it reads one token);
  2. at least `MIN_FOLLOWER_SHARE` of them are followed by one token (its "concept token"), which decodes
     to a word of at least 3 letters (so "the completion contains it" means something in text).

A first rule, fixed the same way, asked instead that the token read be among the top 10 tokens of the
decoder direction through the final norm and unembedding (as Neuronpedia's logit lists show): on the
default layer-6 Gemma 3 270M SAE no latent met it (of 806 that read or precede one word, the best rank
was 12); twelve layers later, the direct logit effects of a layer-6 direction are mostly noise tokens.

For each chosen latent, on the built-in neutral prompts (`steering.NEUTRAL_PROMPTS`), adding alpha times
its max activation along its decoder direction at every position:
  - next-token KL(clean || steered) for each alpha of a sweep (is it monotone?);
  - the next-token probability of its concept token, and the summed probability of its top-10 direct
    logit tokens, clean, steered, and under a control: a random other latent's decoder direction added
    with the same strength;
  - greedy completions of every prompt at each completion alpha, unsteered, steered and control: how
    many contain the concept word, their perplexity under the clean model, the latent's activation on them.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cache import CacheError
from sae.analysis.features import (
    PAD_TOKEN,
    LatentStatistics,
    Unembedding,
    activation_batches,
    collect_statistics,
)
from sae.analysis.steering import (
    NEUTRAL_PROMPTS,
    Intervention,
    completion_effects,
    generate,
    next_token_log_probs,
    strength_in_units,
)
from sae.data import OFFLINE_CORPUS, DataConfig
from sae.io import atomic_write_json, atomic_write_text
from sae.sites import load_sae_and_model
from sae.typed_config import ConfigError, add_arguments, from_args, option

TOP_EXAMPLES = 20
MIN_SHARE = 0.8
MIN_FOLLOWER_SHARE = 0.5
LOGIT_TOP = 10


@dataclass
class TokenLatent:
    latent: int
    token: int
    """The token it reads: the commonest token at its top activations."""
    token_share: float
    concept: int
    """The concept token: the commonest token right after its top activations."""
    word: str
    """The concept token's text without surrounding spaces."""
    concept_share: float
    max_activation: float
    density: float


def _commonest(tokens: list[int]) -> tuple[int, float]:
    token = max(set(tokens), key=lambda t: (tokens.count(t), -t))
    return token, tokens.count(token) / TOP_EXAMPLES


def token_latents(stats: LatentStatistics, tokenizer) -> list[TokenLatent]:
    """Every tracked latent that meets the conditions of the module docstring, by latent id
    (`stats` needs window_after >= 1)."""
    after = stats.center + 1
    if after >= stats.top.tokens.shape[2]:
        raise ValueError("token_latents needs statistics with window_after >= 1")
    chosen = []
    for i in range(len(stats.latents)):
        examples = stats.examples(i)[:TOP_EXAMPLES]
        if len(examples) < TOP_EXAMPLES:
            continue
        token, share = _commonest([tokens[stats.center] for _, tokens, _ in examples])
        following = [tokens[after] for _, tokens, _ in examples if tokens[after] != PAD_TOKEN]
        if share < MIN_SHARE or not following:
            continue
        concept, concept_share = _commonest(following)
        word = tokenizer.decode([concept]).strip()
        if concept_share < MIN_FOLLOWER_SHARE or not (word.isalpha() and len(word) >= 3):
            continue
        chosen.append(
            TokenLatent(
                stats.latents[i].item(),
                token,
                share,
                concept,
                word,
                concept_share,
                stats.max_activation[i].item(),
                stats.fire_count[i].item() / stats.tokens_seen,
            )
        )
    return chosen


def sample(candidates: list, n: int, seed: int) -> list:
    """n of the candidates drawn without replacement by a seeded permutation, returned by latent id."""
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted((candidates[j] for j in order.tolist()), key=lambda c: c.latent)


def contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, flags=re.IGNORECASE) is not None


@dataclass
class CompletionSet:
    """Greedy completions of every prompt under one condition, measured with the clean model."""

    texts: list[str]
    with_word: int
    """How many of the completions contain the concept word."""
    perplexity: float
    """Geometric mean over prompts of the completion's perplexity under the clean model."""
    latent_activation: float
    """Mean over prompts of the latent's mean activation on the completion."""


@dataclass
class LatentSteeringResult:
    latent: TokenLatent
    control_latent: int
    alphas: list[float]
    kl: list[float]
    """Mean next-token KL(clean || steered) on the neutral prompts, per alpha."""
    p_concept_clean: float
    p_concept: list[float]
    """Next-token probability of the concept token, mean over prompt positions, per alpha."""
    p_concept_control: list[float]
    top_logit_tokens: list[str]
    p_top_clean: float
    p_top: list[float]
    """Summed probability of the top-10 direct logit tokens, mean over prompt positions, per alpha."""
    p_top_control: list[float]
    unsteered: CompletionSet | None
    """None when no completions were asked for."""
    completions: list[dict] = field(default_factory=list)
    """Per completion alpha: {"alpha": a, "steered": CompletionSet, "control": CompletionSet}."""

    @property
    def kl_monotone(self) -> bool:
        return all(a < b for a, b in zip(self.kl, self.kl[1:], strict=False))


def _completions(
    model,
    sae,
    prompts: list[str],
    intervention: Intervention | None,
    latent: TokenLatent,
    max_new_tokens: int,
) -> CompletionSet:
    generated = [generate(model, sae, prompt, intervention, max_new_tokens) for prompt in prompts]
    return measure_completions(model, sae, prompts, generated, latent)


def measure_completions(
    model, sae, prompts: list[str], generated: list[Tensor], latent: TokenLatent
) -> CompletionSet:
    """Completions (tokens [1, prompt + new] per prompt) measured with the clean model for `latent`."""
    texts, log_perplexities, activations = [], [], []
    for prompt, tokens in zip(prompts, generated, strict=True):
        effects = completion_effects(
            model, sae, tokens, model.to_tokens(prompt).shape[1], latent.latent, None, None
        )
        texts.append(effects.text)
        log_perplexities.append(torch.tensor(effects.perplexity).log().item())
        activations.append(effects.latent_activation_mean)
    return CompletionSet(
        texts,
        sum(contains_word(t, latent.word) for t in texts),
        float(torch.tensor(log_perplexities).mean().exp()),
        sum(activations) / len(activations),
    )


def steer_latent(
    model,
    sae,
    latent: TokenLatent,
    control_latent: int,
    prompts: list[str],
    alphas: list[float],
    completion_alphas: list[float],
    max_new_tokens: int,
    clean: list[Tensor] | None = None,
    unsteered: CompletionSet | None = None,
) -> LatentSteeringResult:
    """All measurements of the module docstring for one latent (`clean`: the prompts' clean log-probs)."""
    prompt_tokens = [model.to_tokens(p) for p in prompts]
    clean = clean or [next_token_log_probs(model, sae, t, None) for t in prompt_tokens]
    clean_lp = torch.cat(clean)  # [positions, vocab]
    top = Unembedding(model).logits(sae.W_dec[latent.latent].detach()).topk(LOGIT_TOP).indices.tolist()
    probability = lambda lp, ids: lp[:, ids].exp().sum(-1).mean().item()  # noqa: E731
    kl, p_concept, p_concept_control, p_top, p_top_control = [], [], [], [], []
    for alpha in alphas:
        strength = strength_in_units(alpha, latent.max_activation)
        steered = torch.cat(
            [
                next_token_log_probs(model, sae, t, Intervention(latent.latent, "add", strength))
                for t in prompt_tokens
            ]
        )
        control = torch.cat(
            [
                next_token_log_probs(model, sae, t, Intervention(control_latent, "add", strength))
                for t in prompt_tokens
            ]
        )
        kl.append(F.kl_div(steered, clean_lp, log_target=True, reduction="batchmean").item())
        p_concept.append(probability(steered, [latent.concept]))
        p_concept_control.append(probability(control, [latent.concept]))
        p_top.append(probability(steered, top))
        p_top_control.append(probability(control, top))

    if completion_alphas and unsteered is None:
        unsteered = _completions(model, sae, prompts, None, latent, max_new_tokens)
    completions = []
    for alpha in completion_alphas:
        strength = strength_in_units(alpha, latent.max_activation)
        completions.append(
            {
                "alpha": alpha,
                **{
                    name: _completions(
                        model, sae, prompts, Intervention(which, "add", strength), latent, max_new_tokens
                    )
                    for name, which in (("steered", latent.latent), ("control", control_latent))
                },
            }
        )
    return LatentSteeringResult(
        latent,
        control_latent,
        list(alphas),
        kl,
        probability(clean_lp, [latent.concept]),
        p_concept,
        p_concept_control,
        [model.tokenizer.decode([t]) for t in top],
        probability(clean_lp, top),
        p_top,
        p_top_control,
        unsteered,
        completions,
    )


def results_table(results: list[LatentSteeringResult], prompts: int, tokenizer) -> str:
    """Markdown: one row per latent (probabilities at the largest completion alpha), then nothing else."""
    alphas = [c["alpha"] for c in results[0].completions]
    at = alphas[-1]
    words = " / ".join(f"α={a:g} steered, control" for a in alphas)
    lines = [
        f"| latent | reads → concept (shares) | KL monotone | p(concept) clean → α={at:g} (control) "
        f"| p(top-10 logit tokens) clean → α={at:g} (control) "
        f"| completions with the word (of {prompts}): unsteered / {words} "
        f"| perplexity: unsteered / {' / '.join(f'α={a:g}' for a in alphas)} |",
        "|" + "---|" * 7,
    ]
    for r in results:
        i = r.alphas.index(at)
        read = tokenizer.decode([r.latent.token]).strip() or repr(tokenizer.decode([r.latent.token]))
        counts = " / ".join(f"{c['steered'].with_word}, {c['control'].with_word}" for c in r.completions)
        perplexities = " / ".join(f"{c['steered'].perplexity:.1f}" for c in r.completions)
        lines.append(
            f"| {r.latent.latent} | `{read}` → `{r.latent.word}` "
            f"({r.latent.token_share:.2f}, {r.latent.concept_share:.2f}) "
            f"| {'yes' if r.kl_monotone else 'no'} "
            f"| {r.p_concept_clean:.2e} → {r.p_concept[i]:.2e} ({r.p_concept_control[i]:.2e}) "
            f"| {r.p_top_clean:.2e} → {r.p_top[i]:.2e} ({r.p_top_control[i]:.2e}) "
            f"| {r.unsteered.with_word} / {counts} | {r.unsteered.perplexity:.1f} / {perplexities} |"
        )
    return "\n".join(lines)


def control_latents(stats: LatentStatistics, candidates: list[TokenLatent], n: int, seed: int) -> list[int]:
    """n random latents that fired and are not candidates (seeded apart from the sample of candidates)."""
    excluded = {c.latent for c in candidates}
    pool = [
        latent
        for latent, count in zip(stats.latents.tolist(), stats.fire_count.tolist(), strict=True)
        if count > 0 and latent not in excluded
    ]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))[:n]
    return [pool[j] for j in order.tolist()]


def summarise(results: list[LatentSteeringResult], prompts: int) -> dict:
    """Totals over the latents: probabilities at each completion alpha, completions with the word."""
    summary: dict = {"latents": len(results), "kl_monotone": sum(r.kl_monotone for r in results)}
    for block in results[0].completions:
        a = block["alpha"]
        i = results[0].alphas.index(a)
        at = [next(c for c in r.completions if c["alpha"] == a) for r in results]
        summary[f"alpha {a:g}"] = {
            "p_concept_rise_median": _median_rise(results, "p_concept", "p_concept", i),
            "p_concept_control_rise_median": _median_rise(results, "p_concept_control", "p_concept", i),
            "p_concept_above_control": sum(r.p_concept[i] > r.p_concept_control[i] for r in results),
            "p_top_rise_median": _median_rise(results, "p_top", "p_top", i),
            "p_top_control_rise_median": _median_rise(results, "p_top_control", "p_top", i),
            "p_top_above_control": sum(r.p_top[i] > r.p_top_control[i] for r in results),
            "completions_with_word": {
                "unsteered": sum(r.unsteered.with_word for r in results),
                "steered": sum(c["steered"].with_word for c in at),
                "control": sum(c["control"].with_word for c in at),
                "of": prompts * len(results),
            },
            "perplexity_geomean": {
                "unsteered": _geomean([r.unsteered.perplexity for r in results]),
                "steered": _geomean([c["steered"].perplexity for c in at]),
                "control": _geomean([c["control"].perplexity for c in at]),
            },
        }
    return summary


def _median_rise(results: list[LatentSteeringResult], measured: str, clean: str, i: int) -> float:
    """Median over the latents of measurement `measured` at alpha index i over its clean value."""
    return float(
        torch.tensor([getattr(r, measured)[i] / getattr(r, clean + "_clean") for r in results]).median()
    )


def _geomean(values: list[float]) -> float:
    return float(torch.tensor(values).log().mean().exp())


# --- command line ---------------------------------------------------------------------------------


@dataclass
class StudyOptions:
    sae: str = option(help="SAE directory or file (ours or a supported foreign format)", positional=True)
    out: str = option(help="output directory: study.json and study.md")
    cache: str | None = option(
        None, help="activation cache for the latent statistics (no model forward; instead of --dataset)"
    )
    dataset: str | None = option(
        None, help="text to run the model over for the statistics (default: python-stdlib)"
    )
    tokens: int = option(131072, help="tokens for the latent statistics")
    context_size: int = option(128, help="tokens per context of --dataset")
    latents: int = option(8, help="how many qualifying latents to steer (random sample)")
    seed: int = option(0, help="seed of that sample and of the control latents")
    alpha: list[float] = option(
        default_factory=list, help="alphas of the KL/probability sweep (repeatable; default 0.5 1 2 4 8)"
    )
    completion_alpha: list[float] = option(
        default_factory=list,
        help="alphas of the greedy completions, each one of --alpha (repeatable; default 4 8)",
    )
    max_new_tokens: int = option(24, help="tokens generated per completion")
    model: str | None = option(None, help="model name or directory (default: the SAE config's model_name)")
    device: str = option("cpu", help="torch device")

    def __post_init__(self) -> None:
        if self.cache is not None and self.dataset is not None:
            raise ConfigError("--cache, --dataset: give one of them, not both")


def run(opts: StudyOptions) -> int:
    alphas = sorted(opts.alpha or [0.5, 1.0, 2.0, 4.0, 8.0])
    completion_alphas = sorted(opts.completion_alpha or [4.0, 8.0])
    if not set(completion_alphas) <= set(alphas):
        raise ValueError(
            f"--completion-alpha {completion_alphas} are not all among the sweep's alphas {alphas}"
        )
    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    print(
        f"model {opts.model or sae.cfg.model_name}, SAE {opts.sae} ({sae.cfg.architecture}, "
        f"d_sae {sae.cfg.d_sae}, {sae.cfg.hookpoint})"
    )
    started = time.time()
    data = DataConfig(dataset=opts.dataset or OFFLINE_CORPUS, context_size=opts.context_size)
    # contexts of context_size tokens, BOS counted, about `tokens` in all
    activations = activation_batches(model, sae, opts.tokens, cache=opts.cache, data=data, count_bos=True)
    stats = collect_statistics(
        sae,
        activations.batches,
        total_batches=activations.total,
        k_top=TOP_EXAMPLES,
        k_sample=1,
        window_before=0,
        window_after=1,
    )
    candidates = token_latents(stats, model.tokenizer)
    chosen = sample(candidates, opts.latents, opts.seed)
    print(
        f"{len(candidates)} latents qualify on {stats.tokens_seen} tokens; "
        f"steering {[c.latent for c in chosen]}"
    )
    if not chosen:
        raise ValueError("no latent meets the study's conditions (see studies/steering/study.py)")
    controls = control_latents(stats, candidates, len(chosen), opts.seed)

    prompts = list(NEUTRAL_PROMPTS)
    clean = [next_token_log_probs(model, sae, model.to_tokens(p), None) for p in prompts]
    unsteered_tokens = [generate(model, sae, p, None, opts.max_new_tokens) for p in prompts]
    results = []
    for latent, control in zip(chosen, controls, strict=False):
        unsteered = measure_completions(model, sae, prompts, unsteered_tokens, latent)
        results.append(
            steer_latent(
                model,
                sae,
                latent,
                control,
                prompts,
                alphas,
                completion_alphas,
                opts.max_new_tokens,
                clean,
                unsteered,
            )
        )
        print(results_table(results[-1:], len(prompts), model.tokenizer).splitlines()[-1], flush=True)

    out = Path(opts.out)
    table = results_table(results, len(prompts), model.tokenizer)
    summary = summarise(results, len(prompts))
    atomic_write_json(
        out / "study.json",
        {
            "options": asdict(opts),
            "alphas": alphas,
            "source": activations.source,
            "tokens": stats.tokens_seen,
            "qualifying_latents": len(candidates),
            "prompts": prompts,
            "conditions": {
                "top_examples": TOP_EXAMPLES,
                "min_share": MIN_SHARE,
                "min_follower_share": MIN_FOLLOWER_SHARE,
            },
            "summary": summary,
            "results": [asdict(r) for r in results],
            "seconds": time.time() - started,
        },
    )
    atomic_write_text(
        out / "study.md", table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()) + "\n"
    )
    print(table)
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"wrote {out / 'study.json'} and {out / 'study.md'} in {time.time() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="studies/steering/study.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, StudyOptions)
    args = parser.parse_args(argv)
    try:
        return run(from_args(StudyOptions, args, "studies/steering/study.py"))
    except (ConfigError, CacheError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
