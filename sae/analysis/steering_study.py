"""Does steering with a token latent make the model write its token? A study whose choice of latents is
fixed before any steering result is seen (`analyze.py steer-study`).

Choice of latents (`token_latents`, then a seeded random sample of them):
  1. the latent's top `TOP_EXAMPLES` activations on the statistics text are all filled, and at least
     `MIN_SHARE` of them sit on one token (its "concept token");
  2. that token decodes to a word of at least 3 letters (so "contains the token" means something in text);
  3. the token is among the top `LOGIT_TOP` tokens of the latent's decoder direction through the final
     norm and unembedding (the latent reads the token and also writes it).

For each chosen latent, on the built-in neutral prompts (`steering.NEUTRAL_PROMPTS`), adding alpha times
its max activation along its decoder direction:
  - next-token KL(clean || steered) for each alpha of a sweep (is it monotone?);
  - the summed next-token probability of its top logit tokens, clean, steered, and under a control: a
    random other latent's decoder direction added with the same strength;
  - greedy completions of every prompt, unsteered, steered and control: how many contain the concept
    word, their perplexity under the clean model, and the latent's activation on them.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.analysis.features import LatentStatistics, Unembedding
from sae.analysis.steering import (
    NEUTRAL_PROMPTS, Intervention, completion_effects, generate, next_token_log_probs, strength_in_units,
)

TOP_EXAMPLES = 20
MIN_SHARE = 0.8
LOGIT_TOP = 10


@dataclass
class TokenLatent:
    latent: int
    token: int
    """The concept token: the commonest token at its top activations."""
    word: str
    """The token's text without surrounding spaces."""
    token_share: float
    logit_rank: int
    """Rank (0 = first) of the token among the decoder direction's logit effects."""
    max_activation: float
    density: float


def token_latents(stats: LatentStatistics, sae, unembedding: Unembedding, tokenizer) -> list[TokenLatent]:
    """Every tracked latent that meets the three conditions of the module docstring, by latent id."""
    chosen = []
    for i in range(len(stats.latents)):
        examples = stats.examples(i)
        if len(examples) < TOP_EXAMPLES:
            continue
        centre = [tokens[stats.center] for _, tokens, _ in examples[:TOP_EXAMPLES]]
        token = max(set(centre), key=lambda t: (centre.count(t), -t))
        share = centre.count(token) / len(centre)
        word = tokenizer.decode([token]).strip()
        if share < MIN_SHARE or not (word.isalpha() and len(word) >= 3):
            continue
        latent = stats.latents[i].item()
        top = unembedding.logits(sae.W_dec[latent].detach()).topk(LOGIT_TOP).indices.tolist()
        if token not in top:
            continue
        chosen.append(TokenLatent(latent, token, word, share, top.index(token), stats.max_activation[i].item(),
                                  stats.fire_count[i].item() / stats.tokens_seen))
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
    top_logit_tokens: list[str]
    p_top_clean: float
    p_top: list[float]
    """Summed probability of the top logit tokens, mean over prompt positions, per alpha."""
    p_top_control: list[float]
    p_word_clean: float
    p_word: list[float]
    """Probability of the concept token itself, per alpha."""
    completion_alpha: float
    completions: dict[str, CompletionSet] = field(default_factory=dict)
    """unsteered, steered, control."""

    @property
    def kl_monotone(self) -> bool:
        return all(a < b for a, b in zip(self.kl, self.kl[1:]))


def _completions(model, sae, prompts: list[str], intervention: Intervention | None, latent: TokenLatent,
                 max_new_tokens: int) -> CompletionSet:
    generated = [generate(model, sae, prompt, intervention, max_new_tokens) for prompt in prompts]
    return measure_completions(model, sae, prompts, generated, latent)


def measure_completions(model, sae, prompts: list[str], generated: list[Tensor], latent: TokenLatent) -> CompletionSet:
    """Completions (tokens [1, prompt + new] per prompt) measured with the clean model for `latent`."""
    texts, log_perplexities, activations = [], [], []
    for prompt, tokens in zip(prompts, generated):
        effects = completion_effects(model, sae, tokens, model.to_tokens(prompt).shape[1], latent.latent, None, None)
        texts.append(effects.text)
        log_perplexities.append(torch.tensor(effects.perplexity).log().item())
        activations.append(effects.latent_activation_mean)
    return CompletionSet(texts, sum(contains_word(t, latent.word) for t in texts),
                         float(torch.tensor(log_perplexities).mean().exp()), sum(activations) / len(activations))


def steer_latent(
    model, sae, latent: TokenLatent, control_latent: int, prompts: list[str], alphas: list[float],
    completion_alpha: float, max_new_tokens: int, clean: list[Tensor] | None = None,
    unsteered: CompletionSet | None = None,
) -> LatentSteeringResult:
    """All measurements of the module docstring for one latent (`clean`: the prompts' clean log-probs)."""
    prompt_tokens = [model.to_tokens(p) for p in prompts]
    clean = clean or [next_token_log_probs(model, sae, t, None) for t in prompt_tokens]
    clean_lp = torch.cat(clean)  # [positions, vocab]
    top = Unembedding(model).logits(sae.W_dec[latent.latent].detach()).topk(LOGIT_TOP).indices.to(clean_lp.device)
    probability = lambda lp, ids: lp[:, ids].exp().sum(-1).mean().item()  # noqa: E731
    kl, p_top, p_top_control, p_word = [], [], [], []
    for alpha in alphas:
        strength = strength_in_units(alpha, latent.max_activation)
        steered = torch.cat([next_token_log_probs(model, sae, t, Intervention(latent.latent, "add", strength))
                             for t in prompt_tokens])
        control = torch.cat([next_token_log_probs(model, sae, t, Intervention(control_latent, "add", strength))
                             for t in prompt_tokens])
        kl.append(F.kl_div(steered, clean_lp, log_target=True, reduction="batchmean").item())
        p_top.append(probability(steered, top))
        p_top_control.append(probability(control, top))
        p_word.append(probability(steered, [latent.token]))

    strength = strength_in_units(completion_alpha, latent.max_activation)
    completions = {
        "unsteered": unsteered or _completions(model, sae, prompts, None, latent, max_new_tokens),
        "steered": _completions(model, sae, prompts, Intervention(latent.latent, "add", strength), latent, max_new_tokens),
        "control": _completions(model, sae, prompts, Intervention(control_latent, "add", strength), latent, max_new_tokens),
    }
    decode = lambda ids: [model.tokenizer.decode([t]) for t in ids]  # noqa: E731
    return LatentSteeringResult(
        latent, control_latent, list(alphas), kl, decode(top.tolist()), probability(clean_lp, top), p_top, p_top_control,
        probability(clean_lp, [latent.token]), p_word, completion_alpha, completions,
    )


def results_table(results: list[LatentSteeringResult], prompts: int) -> str:
    """Markdown: one row per latent at the completion alpha, then the totals."""
    head = ("| latent | token (share, logit rank) | KL monotone | p(top-10 logit tokens) clean → steered (control) "
            "| p(token) clean → steered | completions with the word: unsteered / steered / control "
            f"(of {prompts}) | perplexity unsteered / steered |")
    lines = [head, "|" + "---|" * 7]
    for r in results:
        a = r.alphas.index(r.completion_alpha)
        c = r.completions
        lines.append(
            f"| {r.latent.latent} | `{r.latent.word}` ({r.latent.token_share:.2f}, {r.latent.logit_rank}) "
            f"| {'yes' if r.kl_monotone else 'no'} | {r.p_top_clean:.4f} → {r.p_top[a]:.4f} ({r.p_top_control[a]:.4f}) "
            f"| {r.p_word_clean:.2e} → {r.p_word[a]:.2e} | {c['unsteered'].with_word} / {c['steered'].with_word} / "
            f"{c['control'].with_word} | {c['unsteered'].perplexity:.1f} / {c['steered'].perplexity:.1f} |"
        )
    return "\n".join(lines)


# --- command line (analyze.py steer-study) --------------------------------------------------------


@dataclass
class StudyOptions:
    sae: str
    out: str
    cache: str | None = None
    dataset: str = "python-stdlib"
    tokens: int = 262144
    context_size: int = 128
    latents: int = 8
    seed: int = 0
    alpha: list[float] = field(default_factory=list)
    completion_alpha: float = 4.0
    max_new_tokens: int = 24
    model: str | None = None
    device: str = "cpu"


def add_steer_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae", help="SAE directory")
    parser.add_argument("--out", required=True, help="output directory: study.json and study.md")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cache", help="activation cache for the latent statistics (no model forward)")
    source.add_argument("--dataset", default="python-stdlib", help="text to run the model over for the statistics")
    parser.add_argument("--tokens", type=int, default=262144, help="tokens for the latent statistics")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--latents", type=int, default=8, help="how many qualifying latents to steer (random sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that sample and of the control latents")
    parser.add_argument("--alpha", type=float, action="append", default=[],
                        help="alphas of the KL/probability sweep (repeatable; default 0.5 1 2 4 8)")
    parser.add_argument("--completion-alpha", type=float, default=4.0, help="alpha of the greedy completions (one of --alpha)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")


def run_steer_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analyze import load_sae_and_model, options, text_token_batches
    from sae.analysis.features import cache_batches, collect_statistics, model_batches
    from sae.io import atomic_write_json, atomic_write_text

    opts = options(StudyOptions, args)
    alphas = opts.alpha or [0.5, 1.0, 2.0, 4.0, 8.0]
    if opts.completion_alpha not in alphas:
        raise ValueError(f"--completion-alpha {opts.completion_alpha} is not one of the sweep's alphas {alphas}")
    sae, model = load_sae_and_model(opts.sae, opts.model, opts.device)
    started = time.time()
    if opts.cache:
        batches, total, source = cache_batches(opts.cache, sae, max_tokens=opts.tokens), None, f"cache {opts.cache}"
    else:
        token_batches = text_token_batches(model, opts.dataset, opts.tokens, opts.context_size)
        batches, total, source = model_batches(model, sae, token_batches), len(token_batches), opts.dataset
    stats = collect_statistics(sae, batches, total_batches=total, k_top=TOP_EXAMPLES, k_sample=1,
                               window_before=0, window_after=0)
    candidates = token_latents(stats, sae, Unembedding(model), model.tokenizer)
    chosen = sample(candidates, opts.latents, opts.seed)
    print(f"{len(candidates)} latents qualify on {stats.tokens_seen} tokens; steering {[c.latent for c in chosen]}")
    if not chosen:
        raise ValueError("no latent meets the study's conditions (see sae/analysis/steering_study.py)")

    fired = (stats.fire_count > 0).nonzero().flatten().tolist()
    excluded = {c.latent for c in candidates}
    pool = [i for i in fired if i not in excluded]
    controls = torch.randperm(len(pool), generator=torch.Generator().manual_seed(opts.seed + 1))[: len(chosen)]
    prompts = list(NEUTRAL_PROMPTS)
    clean = [next_token_log_probs(model, sae, model.to_tokens(p), None) for p in prompts]
    unsteered_texts = [generate(model, sae, p, None, opts.max_new_tokens) for p in prompts]

    results = []
    for latent, control in zip(chosen, controls.tolist()):
        unsteered = measure_completions(model, sae, prompts, unsteered_texts, latent)
        result = steer_latent(model, sae, latent, pool[control], prompts, alphas, opts.completion_alpha,
                              opts.max_new_tokens, clean, unsteered)
        results.append(result)
        print(results_table([result], len(prompts)).splitlines()[-1], flush=True)

    out = Path(opts.out)
    table = results_table(results, len(prompts))
    summary = summarise(results, len(prompts))
    atomic_write_json(out / "study.json", {
        "options": asdict(opts), "alphas": alphas, "source": source, "tokens": stats.tokens_seen,
        "qualifying_latents": len(candidates), "conditions": {"top_examples": TOP_EXAMPLES, "min_share": MIN_SHARE,
                                                              "logit_top": LOGIT_TOP},
        "summary": summary, "results": [asdict(r) for r in results], "seconds": time.time() - started,
    })
    atomic_write_text(out / "study.md", table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()) + "\n")
    print(table)
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return 0


def summarise(results: list[LatentSteeringResult], prompts: int) -> dict:
    """Totals over the latents at the completion alpha."""
    a = [r.alphas.index(r.completion_alpha) for r in results]
    ratio = lambda x, y: x / y if y > 0 else float("inf")  # noqa: E731
    rises = [ratio(r.p_top[i], r.p_top_clean) for r, i in zip(results, a)]
    control_rises = [ratio(r.p_top_control[i], r.p_top_clean) for r, i in zip(results, a)]
    total = lambda name: sum(r.completions[name].with_word for r in results)  # noqa: E731
    return {
        "latents": len(results),
        "kl_monotone": sum(r.kl_monotone for r in results),
        "p_top_rise_median": float(torch.tensor(rises).median()),
        "p_top_rise_min": min(rises),
        "p_top_control_rise_median": float(torch.tensor(control_rises).median()),
        "p_top_steered_above_control": sum(r.p_top[i] > r.p_top_control[i] for r, i in zip(results, a)),
        "completions_with_word": f"unsteered {total('unsteered')}, steered {total('steered')}, control "
                                 f"{total('control')} of {prompts * len(results)}",
        "perplexity_geomean": {name: float(torch.tensor([r.completions[name].perplexity for r in results]).log().mean().exp())
                               for name in ("unsteered", "steered", "control")},
    }
