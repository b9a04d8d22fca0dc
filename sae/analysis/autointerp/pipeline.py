"""The autointerp pipeline as small async stages: records -> explain all -> pair controls -> score all.

Explanations are made for every latent first, because the control for a latent is another latent's
explanation (a derangement: no latent keeps its own); then each latent is scored with its real and its
control explanation on the same examples. Requests of all latents run concurrently; the client's
semaphore and rate limit bound what reaches the server.

Every latent appears in the results: latents with too few activations, failed explanations and failed
requests are reported with their reason and counted in the summary.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sae.analysis.autointerp.clients import Client
from sae.analysis.autointerp.explainer import ExplainerConfig, Explanation, explain
from sae.analysis.autointerp.prompts import TokenStrings
from sae.analysis.autointerp.records import LatentRecord
from sae.analysis.autointerp.scorers import (
    EmbeddingScorer, Score, ScorerConfig, detection_score, fuzzing_score,
)

LLM_SCORERS = {"detection": detection_score, "fuzzing": fuzzing_score}
SCORERS = (*LLM_SCORERS, "embedding")


@dataclass
class AutointerpConfig:
    explainer: ExplainerConfig = field(default_factory=ExplainerConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    scorers: tuple[str, ...] = SCORERS
    control: bool = True  # score a shuffled explanation (another latent's) beside each real one
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.scorers if s not in SCORERS]
        if unknown:
            raise ValueError(f"unknown scorer(s) {', '.join(unknown)}; choose from {', '.join(SCORERS)}")


@dataclass
class LatentResult:
    latent: int
    fire_count: int
    max_activation: float
    n_activating_examples: int
    n_negative_examples: int
    explanation: str | None
    explanation_failure: str | None
    explanation_detail: str
    control_explanation: str | None = None
    control_from_latent: int | None = None
    scores: dict[str, dict] = field(default_factory=dict)
    control_scores: dict[str, dict] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=True)


def pair_controls(explanations: list[Explanation], seed: int) -> dict[int, Explanation]:
    """latent -> another latent's explanation: a random cyclic shift over the explained latents."""
    explained = [e for e in explanations if e.text is not None]
    if len(explained) < 2:
        return {}
    order = random.Random(seed).sample(explained, len(explained))
    return {order[i].latent: order[(i + 1) % len(order)] for i in range(len(order))}


async def score_latent(
    client: Client, record: LatentRecord, explanation: Explanation, control: Explanation | None,
    token_strings: TokenStrings, config: AutointerpConfig, embedding: EmbeddingScorer | None,
) -> LatentResult:
    result = LatentResult(
        latent=record.latent, fire_count=record.fire_count, max_activation=record.max_activation,
        n_activating_examples=len(record.activating), n_negative_examples=len(record.negatives),
        explanation=explanation.text, explanation_failure=explanation.failure, explanation_detail=explanation.detail,
        control_explanation=control.text if control else None, control_from_latent=control.latent if control else None,
        prompt_tokens=explanation.prompt_tokens, completion_tokens=explanation.completion_tokens,
    )
    if explanation.text is None:
        return result
    runs = [("scores", explanation.text)] + ([("control_scores", control.text)] if control else [])
    for slot, text in runs:
        llm = [name for name in config.scorers if name in LLM_SCORERS]
        scores: list[Score] = list(await asyncio.gather(
            *(LLM_SCORERS[name](client, text, record, token_strings, config.scorer) for name in llm)
        ))
        if "embedding" in config.scorers:  # in a thread: the event loop keeps serving other latents' requests
            scores.append(await asyncio.to_thread(embedding.score, text, record))
        for score in scores:
            getattr(result, slot)[score.scorer] = score.to_dict()
            result.prompt_tokens += score.prompt_tokens
    return result


async def interpret(
    client: Client, records: list[LatentRecord], token_strings: TokenStrings, config: AutointerpConfig,
    embedding: EmbeddingScorer | None = None, results_path: str | Path | None = None,
) -> tuple[list[LatentResult], dict]:
    """Explain and score `records`; write one JSON line per latent (in completion order) and return the
    results (in latent order) with the summary."""
    if "embedding" in config.scorers and embedding is None:
        raise ValueError("the embedding scorer is selected but no EmbeddingScorer was given")
    started = time.monotonic()
    explanations = await asyncio.gather(*(explain(client, r, token_strings, config.explainer) for r in records))
    controls = pair_controls(explanations, config.seed) if config.control else {}
    tasks = [
        score_latent(client, r, e, controls.get(r.latent), token_strings, config, embedding)
        for r, e in zip(records, explanations)
    ]
    results = []
    out = _JsonLines(results_path)
    try:
        for next_done in asyncio.as_completed(tasks):
            result = await next_done
            out.write(result.to_json())
            results.append(result)
    finally:
        out.close()
    results.sort(key=lambda r: r.latent)
    return results, summarize(results, time.monotonic() - started)


class _JsonLines:
    """Lines appended as results arrive (a crash keeps what was done) into `path.partial`, renamed to `path`
    once complete, so a finished results file is never half-written."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path.with_name(self.path.name + ".partial"), "w")

    def write(self, line: str) -> None:
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.path.with_name(self.path.name + ".partial").replace(self.path)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(results: list[LatentResult], seconds: float) -> dict:
    """Counts of every failure kind, and per scorer the mean of each metric for real and control
    explanations and their difference (computed over latents that have both)."""
    failures: dict[str, int] = {}
    for r in results:
        if r.explanation_failure:
            failures[r.explanation_failure] = failures.get(r.explanation_failure, 0) + 1
    scorers: dict[str, dict] = {}
    for name in sorted({n for r in results for n in r.scores}):
        both = [r for r in results if name in r.scores and name in r.control_scores]
        entry = {
            "latents_scored": sum(name in r.scores for r in results),
            "parse_failures": sum(r.scores[name]["parse_failures"] + r.control_scores.get(name, {}).get("parse_failures", 0)
                                  for r in results if name in r.scores),
            "errors": sum(r.scores[name]["errors"] + r.control_scores.get(name, {}).get("errors", 0)
                          for r in results if name in r.scores),
            "examples_asked": sum(r.scores[name]["n_examples"] + r.control_scores.get(name, {}).get("n_examples", 0)
                                  for r in results if name in r.scores),
        }
        for metric in next(r.scores[name]["metrics"] for r in results if name in r.scores):
            real = _mean([r.scores[name]["metrics"][metric] for r in results if name in r.scores])
            entry[metric] = {"real": real}
            if both:
                real_paired = _mean([r.scores[name]["metrics"][metric] for r in both])
                control = _mean([r.control_scores[name]["metrics"][metric] for r in both])
                entry[metric].update(control=control, real_minus_control=real_paired - control)
        scorers[name] = entry
    return {
        "latents": len(results),
        "explained": sum(r.explanation is not None for r in results),
        "explanation_failures": failures,
        "scorers": scorers,
        "seconds": seconds,
        "latents_per_minute": 60 * len(results) / seconds if seconds > 0 else math.nan,
        "prompt_tokens_per_latent": sum(r.prompt_tokens for r in results) / max(1, len(results)),
    }


def summary_table(summary: dict) -> str:
    """The summary as a Markdown table: one row per scorer and metric, real vs control."""
    lines = [
        f"latents {summary['latents']}, explained {summary['explained']}, explanation failures "
        f"{summary['explanation_failures'] or 'none'}; {summary['latents_per_minute']:.2f} latents/min, "
        f"{summary['prompt_tokens_per_latent']:.0f} prompt tokens/latent",
        "",
        "| scorer | metric | real | control | real − control | parse failures | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in summary["scorers"].items():
        for metric, values in entry.items():
            if isinstance(values, dict):
                lines.append(
                    f"| {name} | {metric} | {values['real']:.3f} | {values.get('control', math.nan):.3f} | "
                    f"{values.get('real_minus_control', math.nan):+.3f} | {entry['parse_failures']} | {entry['errors']} |"
                )
    return "\n".join(lines)
