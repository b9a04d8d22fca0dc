"""Simulation scorer (Bills et al. 2023, "all at once"): the LLM predicts the latent's activation at every
token of an example from the explanation alone; the score is the correlation of the predictions with the
true activations, over every token of every example (activating and non-activating ones pooled).

One request per example. The prompt lists the example's tokens one per line, each followed by a tab and
a placeholder value; the prompt is echoed with logprobs, and the distribution at each placeholder (which
the model sees only the lines before) gives the prediction: the expected value over the digits 0–9, with
their probabilities renormalised over the digits in the returned top alternatives.

The placeholder is "0", not Bills et al.'s "unknown"-style marker: with a "?" placeholder Gemma 3 270M
predicted "?" again after a few lines and 142 of 256 tokens had no digit among its top 10 (measured). A "0"
keeps digits in the top alternatives; it biases every prediction towards 0 equally, which a correlation
(invariant to scale and shift) and the real-vs-control comparison (same examples, same prompts) tolerate.

Nothing is filled in: an example whose response has no prompt logprobs (a server that ignores `echo`) or
no token offsets is a parse failure; a placeholder whose alternatives hold no digit is a missing prediction,
counted and left out of the correlation.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from sae.analysis.autointerp.clients import Client, Completion, RequestFailed
from sae.analysis.autointerp.prompts import TokenStrings, one_line
from sae.analysis.autointerp.records import Example, LatentRecord, latent_seed
from sae.analysis.autointerp.scorers import Score

INSTRUCTIONS = (
    "We study a feature of a language model. Given an explanation of the feature, predict how strongly it is "
    "active on each token of a text, from 0 (not active) to 9 (most active)."
)
# Two short demonstrations: one where the feature fires, one where it does not, so the model sees both 0s
# and high values before the unknown lines.
DEMONSTRATIONS = (
    (
        "names of fruits",
        [(" I", 0), (" ate", 0), (" an", 0), (" apple", 9), (" and", 0), (" a", 0), (" pear", 7)],
    ),
    ("names of fruits", [(" The", 0), (" bus", 0), (" was", 0), (" late", 0), (" again", 0)]),
)
PLACEHOLDER = "0"
DIGITS = tuple(str(d) for d in range(10))


@dataclass
class SimulationConfig:
    n_positive: int = 4  # activating examples per latent (each one request)
    n_negative: int = 4
    logprobs: int = 10  # top alternatives per position; the digits must be among them to count
    seed: int = 0


def token_line(piece: str) -> str:
    """A token as the text before the tab: newlines and tabs visible, never line or field breaks."""
    return one_line(piece).replace("\t", "\\t")


def simulation_prompt(explanation: str, pieces: list[str]) -> tuple[str, list[int]]:
    """The prompt for one example's token texts, and the character offset of each placeholder."""
    blocks = [INSTRUCTIONS]
    for demo_explanation, rows in DEMONSTRATIONS:
        lines = [f"Explanation: {demo_explanation}", "Text: " + "".join(t for t, _ in rows).strip()]
        lines += [f"{token_line(t)}\t{v}" for t, v in rows]
        blocks.append("\n".join(lines))
    head = (
        "\n\n".join(blocks)
        + "\n\n"
        + f"Explanation: {explanation}\nText: "
        + token_line("".join(pieces)).strip()
    )
    prompt, offsets = head, []
    for piece in pieces:
        prompt += "\n" + token_line(piece) + "\t"
        offsets.append(len(prompt))
        prompt += PLACEHOLDER
    return prompt, offsets


def predicted_values(completion: Completion, offsets: list[int]) -> list[float | None] | None:
    """Expected digit at each placeholder offset (None: no digit among the alternatives there, or no token
    starts there); None for the whole example if the response carries no logprobs for the prompt (no
    offsets, or none before the last placeholder: a server that ignored echo)."""
    if (
        not completion.logprobs
        or completion.text_offsets is None
        or min(completion.text_offsets) > offsets[-1]
    ):
        return None
    at_offset = {offset: entry for offset, entry in zip(completion.text_offsets, completion.logprobs)}
    values: list[float | None] = []
    for offset in offsets:
        entry = at_offset.get(offset)
        mass = [0.0] * 10
        for token, logprob in entry.top.items() if entry else ():
            if token.strip() in DIGITS:  # "5" and " 5" mean the same prediction
                mass[int(token.strip())] += math.exp(logprob)
        total = sum(mass)
        values.append(sum(d * m for d, m in enumerate(mass)) / total if total > 0 else None)
    return values


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than two points."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def simulation_examples(
    record: LatentRecord, config: SimulationConfig
) -> tuple[list[Example], list[Example]]:
    """The same examples for a latent whatever the explanation (real or control)."""
    rng = random.Random(latent_seed(config.seed, record.latent) + 7)
    activating = record.activating
    return (
        rng.sample(activating, min(config.n_positive, len(activating))),
        rng.sample(record.negatives, min(config.n_negative, len(record.negatives))),
    )


async def simulation_score(
    client: Client,
    explanation: str,
    record: LatentRecord,
    token_strings: TokenStrings,
    config: SimulationConfig,
) -> Score:
    positives, negatives = simulation_examples(record, config)
    examples = positives + negatives
    prompts = [simulation_prompt(explanation, token_strings(e.tokens)) for e in examples]

    async def ask(prompt: str) -> Completion | RequestFailed:
        try:  # one generated token: some servers reject max_tokens 0
            return await client.complete(prompt, 1, logprobs=config.logprobs, echo=True)
        except RequestFailed as e:
            return e

    results = await asyncio.gather(*(ask(p) for p, _ in prompts))
    predicted, true, details = [], [], []
    parse_failures = errors = missing = prompt_tokens = n_scored = 0
    for example, (_, offsets), result in zip(examples, prompts, results):
        if isinstance(result, RequestFailed):
            errors += 1
            details.append(f"error: {result}")
            continue
        prompt_tokens += result.prompt_tokens
        values = predicted_values(result, offsets)
        if values is None:
            parse_failures += 1
            details.append("no prompt logprobs or offsets in the response (does the server support echo?)")
            continue
        n_scored += 1
        for value, act in zip(values, example.acts, strict=True):
            if value is None:
                missing += 1
            else:
                predicted.append(value)
                true.append(act)
    if missing:
        details.append(f"{missing} token(s) without a digit among the top {config.logprobs} alternatives")
    return Score(
        "simulation",
        {"correlation": pearson(predicted, true)},
        len(examples),
        n_scored,
        parse_failures,
        errors,
        prompt_tokens=prompt_tokens,
        failure_details=details[:5],
        missing_predictions=missing,
    )
