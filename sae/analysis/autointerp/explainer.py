"""Explainer: a few-shot prompt of a latent's examples (activating tokens marked `<<…>>`, optionally with
activation values 0–10) -> a short natural-language explanation.

Parsing is strict about what it accepts and explicit about what it rejects: an empty answer, an answer that
only echoes the prompt's format, or a request error gives an `Explanation` with `text=None` and `failure`
set ("parse" or "error"); the pipeline counts it and reports the latent, it never scores a made-up string.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from sae.analysis.autointerp.clients import Client, RequestFailed
from sae.analysis.autointerp.prompts import TokenStrings, render_example, split_few_shot
from sae.analysis.autointerp.records import LatentRecord, latent_seed

INSTRUCTIONS = (
    "We study features of a language model. Each example is a short text; the tokens where the feature is "
    "active are marked <<like this>>. Explain in a few words what the feature responds to."
)

# Demonstrations fix the answer format for small base models. Gemma 3 270M copied a demonstration's
# explanation verbatim for 5 of 6 latents of the default SAE when the explanations were abstract ("the
# built-in function len"); here each explanation starts by quoting its own most frequent marked tokens, so
# the form a small model copies is "quote the marked tokens of these examples", which grounds it in the
# latent's own evidence (the LLM still writes the explanation). Topics are kept away from the concepts the
# tests use.
DEMONSTRATIONS = (
    (
        [
            "I bought three <<apples>> and two <<pears>> at the market",
            "She put a <<banana>> in her lunch box",
            "The <<orange>> tree in the garden grew tall",
            "a bowl of <<cherries>> and <<grapes>>",
        ],
        '"apples", "pears" and other fruit names',
    ),
    (
        ["    n = <<len>>(self.items)", "if <<len>>(args) > 2:\\n", "    total += <<len>>(line)"],
        '"len" calls in Python code',
    ),
    (
        ["It will <<rain>> tomorrow", "a <<sunny>> and <<windy>> afternoon", "the <<snow>> kept falling"],
        '"rain", "snow" and other weather words',
    ),
    (
        [
            "He said <<that>> he would come",
            "It is clear <<that>> the plan failed",
            "They hoped <<that>> it would rain",
        ],
        '"that" in English sentences',
    ),
)
Demonstration = tuple[list[str], str]

# The prompt ends mid-sentence, so a base model continues on the same line instead of starting another
# list of examples (Gemma 3 270M did that for 6 of 8 latents when the prompt ended at "Explanation:").
EXPLANATION_PREFIX = "Explanation: the feature responds to"
_MARKED = re.compile(r"<<(.+?)>>")
_RUN_ON = re.compile(r"(?<![\"'`])\\n")
_ECHO = re.compile(r"^(examples?|features?|explanations?|text|answer)\b|^\d+\.", re.IGNORECASE)
_COUNTS = re.compile(r"[\"']\s*\(\d+\)")  # the prompt's marked-token counts repeated: '"x" (26), "y" (3)


@dataclass
class Explanation:
    latent: int
    text: str | None
    failure: str | None = None  # None | "parse" | "error" | "too_few_activations" | "copied_demonstration"
    detail: str = ""  # the raw answer (parse failure, copy) or the error message
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0  # requests made again because the answer repeated a demonstration's explanation


@dataclass
class ExplainerConfig:
    n_examples: int = 20  # examples shown, drawn from the top and from every quantile interval
    show_values: bool = False
    max_tokens: int = 24
    list_marked: bool = True  # add a line listing the marked spans (see marked_summary)
    use_chat: bool = (
        False  # base models (the local default) continue a few-shot prompt; chat models get turns
    )
    seed: int = 0


def choose_examples(record: LatentRecord, n: int, rng: random.Random) -> list:
    """A few top examples plus an even share from each quantile interval, so explanations cover the whole
    range of activations rather than only the peak (Paulo et al.: more general explanations)."""
    groups = [g for g in record.quantiles if g]
    n_top = max(1, n // (len(groups) + 1)) if groups else n
    chosen = record.top[:n_top]
    for group in groups:
        chosen += rng.sample(group, min(len(group), (n - n_top) // len(groups)))
    seen, unique = set(), []
    for example in chosen:
        if tuple(example.tokens) not in seen:
            seen.add(tuple(example.tokens))
            unique.append(example)
    rng.shuffle(unique)
    return unique


def marked_summary(texts: list[str], limit: int = 8) -> str:
    """'Marked tokens (count): "a" (5), "b" (2), ...': the distinct <<marked>> spans, most frequent first.

    Why: a small model (Gemma 3 270M) mostly copies the demonstrations' explanations when it has to find
    the common thread across 20 windows itself; a line naming the marked spans and how often each is marked
    gives it this latent's own evidence right before the answer.
    """
    counts = Counter(span.strip() for text in texts for span in _MARKED.findall(text))
    return "Marked tokens (count): " + ", ".join(f'"{span}" ({n})' for span, n in counts.most_common(limit))


def explainer_prompt(
    record: LatentRecord,
    token_strings: TokenStrings,
    config: ExplainerConfig,
    demonstrations: tuple[Demonstration, ...] = DEMONSTRATIONS,
) -> str:
    rng = random.Random(latent_seed(config.seed, record.latent))
    blocks = [INSTRUCTIONS]
    examples = choose_examples(record, config.n_examples, rng)
    rendered = [render_example(e, token_strings, record.max_activation, config.show_values) for e in examples]
    for texts, explanation in [*demonstrations, (rendered, None)]:
        lines = [f"{i + 1}. {text}" for i, text in enumerate(texts)]
        if config.list_marked:
            lines.append(marked_summary(texts))
        lines.append(EXPLANATION_PREFIX + (f" {explanation}" if explanation else ""))
        blocks.append("Examples:\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def parse_explanation(answer: str) -> str | None:
    """The first line of the answer (up to a written, unquoted "\\n"), without quotes or a repeated
    'Explanation:'; None if nothing usable."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if not lines:
        return None
    # Examples show newlines as a visible "\\n" (prompts.one_line); an answer that writes one has run on into
    # code (seen: '"system" in the language model\\n    if (all is'), so it ends there. A quoted "\\n" (the
    # explanation of a newline latent) is kept.
    text = _RUN_ON.split(lines[0], maxsplit=1)[0]
    for prefix in (EXPLANATION_PREFIX, "Explanation:"):  # a model may repeat the prompt's prefix
        if text.lower().startswith(prefix.lower()):
            text = text[len(prefix) :].strip()
    text = text.strip().rstrip(".").strip()
    if (
        len(text) > 1 and text[0] == text[-1] and text[0] in "\"'`"
    ):  # only a quote that wraps the whole answer
        text = text[1:-1].strip().rstrip(".")
    if not text or _ECHO.match(text) or _COUNTS.search(text) or "<<" in text:
        return None
    return text


def copied_demonstration(text: str) -> str | None:
    """The demonstration explanation that `text` repeats (case and a trailing period ignored), or None.
    Checked against every demonstration, also those a retry's prompt leaves out."""
    key = text.strip().rstrip(".").strip().lower()
    return next((explanation for _, explanation in DEMONSTRATIONS if explanation.lower() == key), None)


def without_demonstration(copied: str) -> tuple[Demonstration, ...]:
    """The demonstrations without the copied one, the rest in reverse order: a different last demonstration,
    whose form a small base model follows most."""
    return tuple(d for d in reversed(DEMONSTRATIONS) if d[1] != copied)


async def explain(
    client: Client, record: LatentRecord, token_strings: TokenStrings, config: ExplainerConfig
) -> Explanation:
    """One explanation; an answer that repeats a demonstration is asked again once with another
    demonstration set (counted in `retries`), and if that repeats one too it is a "copied_demonstration"
    failure, never kept."""
    if record.too_few_activations:
        return Explanation(record.latent, None, "too_few_activations", f"{record.fire_count} firings")
    demonstrations, retries, prompt_tokens, completion_tokens = DEMONSTRATIONS, 0, 0, 0
    while True:
        prompt = explainer_prompt(record, token_strings, config, demonstrations)
        try:
            if config.use_chat:
                completion = await client.chat(split_few_shot(prompt), config.max_tokens)
            else:
                completion = await client.complete(prompt, config.max_tokens, stop=["\n"])
        except RequestFailed as e:
            return Explanation(
                record.latent, None, "error", str(e), prompt_tokens, completion_tokens, retries
            )
        prompt_tokens += completion.prompt_tokens
        completion_tokens += completion.completion_tokens
        text = parse_explanation(completion.text)
        if text is None:
            return Explanation(
                record.latent, None, "parse", completion.text, prompt_tokens, completion_tokens, retries
            )
        copied = copied_demonstration(text)
        if copied is None:
            return Explanation(record.latent, text, None, "", prompt_tokens, completion_tokens, retries)
        if retries == 1:
            return Explanation(
                record.latent, None, "copied_demonstration", text, prompt_tokens, completion_tokens, retries
            )
        demonstrations, retries = without_demonstration(copied), retries + 1
