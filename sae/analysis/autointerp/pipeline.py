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
from sae.analysis.autointerp.explainer import ExplainerConfig, Explanation, copied_demonstration, explain
from sae.analysis.autointerp.prompts import TokenStrings
from sae.analysis.autointerp.records import LatentRecord
from sae.analysis.autointerp.scorers import (
    EmbeddingScorer,
    Score,
    ScorerConfig,
    detection_score,
    fuzzing_score,
)
from sae.analysis.autointerp.simulation import SimulationConfig, simulation_score
from sae.io import atomic_write_json, atomic_write_text

LLM_SCORERS = ("detection", "fuzzing", "simulation")
SCORERS = (*LLM_SCORERS, "embedding", "intervention")


@dataclass
class AutointerpConfig:
    explainer: ExplainerConfig = field(default_factory=ExplainerConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)  # detection, fuzzing and embedding
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
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
    explanation_retries: int = 0  # explainer requests repeated because the answer copied a demonstration
    control_explanation: str | None = None
    control_from_latent: int | None = None
    scores: dict[str, dict] = field(default_factory=dict)
    control_scores: dict[str, dict] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    n_neighbour_negatives: int = 0  # of the negatives, hard ones from decoder neighbours
    too_few_activations: bool = False

    def to_json(self) -> str:
        return json.dumps(json_safe(asdict(self)), allow_nan=False)


def json_safe(value):
    """NaN and infinities (an undefined metric) as null, so every file is strict JSON; the summary counts
    them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def pair_controls(explanations: list[Explanation], seed: int) -> dict[int, Explanation]:
    """latent -> another latent's explanation: a random cyclic shift over the explained latents."""
    explained = [e for e in explanations if e.text is not None]
    if len(explained) < 2:
        return {}
    order = random.Random(seed).sample(explained, len(explained))
    return {order[i].latent: order[(i + 1) % len(order)] for i in range(len(order))}


@dataclass
class Scorers:
    """The scorers that need more than the LLM client: MiniLM for embedding, the subject model for
    intervention."""

    embedding: EmbeddingScorer | None = None
    intervention: object | None = (
        None  # intervention.InterventionScorer (imported lazily: it needs torch models)
    )


async def _run_scorer(
    name: str,
    client: Client,
    text: str,
    record: LatentRecord,
    token_strings: TokenStrings,
    config: AutointerpConfig,
    scorers: Scorers,
) -> Score:
    if name == "detection":
        return await detection_score(client, text, record, token_strings, config.scorer)
    if name == "fuzzing":
        return await fuzzing_score(client, text, record, token_strings, config.scorer)
    if name == "simulation":
        return await simulation_score(client, text, record, token_strings, config.simulation)
    if name == "embedding":  # in a thread: the event loop keeps serving other latents' requests
        return await asyncio.to_thread(scorers.embedding.score, text, record)
    if name == "intervention":
        return await scorers.intervention.score(client, text, record)
    raise ValueError(f"unknown scorer {name!r}")


async def score_latent(
    client: Client,
    record: LatentRecord,
    explanation: Explanation,
    control: Explanation | None,
    token_strings: TokenStrings,
    config: AutointerpConfig,
    scorers: Scorers,
) -> LatentResult:
    result = LatentResult(
        latent=record.latent,
        fire_count=record.fire_count,
        max_activation=record.max_activation,
        n_activating_examples=len(record.activating),
        n_negative_examples=len(record.negatives),
        explanation=explanation.text,
        explanation_failure=explanation.failure,
        explanation_detail=explanation.detail,
        explanation_retries=explanation.retries,
        control_explanation=control.text if control else None,
        control_from_latent=control.latent if control else None,
        prompt_tokens=explanation.prompt_tokens,
        completion_tokens=explanation.completion_tokens,
        n_neighbour_negatives=record.n_neighbour_negatives,
        too_few_activations=record.too_few_activations,
    )
    if explanation.text is None:
        return result
    runs = [("scores", explanation.text)] + ([("control_scores", control.text)] if control else [])
    for slot, text in runs:
        scores: list[Score] = list(
            await asyncio.gather(
                *(
                    _run_scorer(name, client, text, record, token_strings, config, scorers)
                    for name in config.scorers
                )
            )
        )
        for score in scores:
            getattr(result, slot)[score.scorer] = score.to_dict()
            result.prompt_tokens += score.prompt_tokens
    return result


async def interpret(
    client: Client,
    records: list[LatentRecord],
    token_strings: TokenStrings,
    config: AutointerpConfig,
    embedding: EmbeddingScorer | None = None,
    results_path: str | Path | None = None,
    intervention=None,
    run_settings: dict | None = None,
) -> tuple[list[LatentResult], dict]:
    """Explain and score `records`; write one JSON line per latent (in completion order) and return the
    results (in latent order) with the summary. `intervention`: an `intervention.InterventionScorer`.

    With `results_path`, a killed run resumes: explanations and scored latents already on disk are reused, not
    asked again (see `RunProgress`). `run_settings`: what else the results depend on (SAE, cache, model...);
    resuming a run made with other settings or config is an error.
    """
    if "embedding" in config.scorers and embedding is None:
        raise ValueError("the embedding scorer is selected but no EmbeddingScorer was given")
    if "intervention" in config.scorers and intervention is None:
        raise ValueError(
            "the intervention scorer is selected but no InterventionScorer (subject model + SAE) was given"
        )
    scorers = Scorers(embedding, intervention)
    settings = {"config": asdict(config), "latents": [r.latent for r in records], **(run_settings or {})}
    progress = RunProgress(results_path, settings)
    started = time.monotonic()
    explanations = await _explain_all(client, records, token_strings, config, progress)
    controls = pair_controls(explanations, config.seed) if config.control else {}
    tasks = [
        score_latent(client, r, e, controls.get(r.latent), token_strings, config, scorers)
        for r, e in zip(records, explanations)
        if r.latent not in progress.results
    ]
    results = list(progress.results.values())
    resumed = len(results)
    try:
        for next_done in asyncio.as_completed(tasks):
            result = await next_done
            progress.add_result(result)
            results.append(result)
    finally:
        progress.close()
    progress.finish()
    results.sort(key=lambda r: r.latent)
    return results, summarize(results, time.monotonic() - started, resumed)


async def _explain_all(
    client: Client,
    records: list[LatentRecord],
    token_strings: TokenStrings,
    config: AutointerpConfig,
    progress: RunProgress,
) -> list[Explanation]:
    """Every record's explanation, in record order: those on disk reused, the others asked for and saved."""

    async def explain_and_save(record: LatentRecord) -> Explanation:
        explanation = await explain(client, record, token_strings, config.explainer)
        progress.add_explanation(explanation)
        return explanation

    missing = [r for r in records if r.latent not in progress.explanations]
    await asyncio.gather(*(explain_and_save(r) for r in missing))
    return [progress.explanations[r.latent] for r in records]


class RunProgress:
    """A run's progress on disk, so a killed run resumes where it stopped and nothing already paid for is
    asked again: `<results>.explanations.partial` and `<results>.partial` are appended a line at a time as
    explanations and scored latents arrive; `<results>.run.json` holds the settings they were made with.
    Once every latent is scored the results file takes its final name and the rest is removed, so a finished
    results file is never half-written. Without a path nothing is kept (and nothing resumes)."""

    def __init__(self, results_path: str | Path | None, settings: dict):
        self.explanations: dict[int, Explanation] = {}
        self.results: dict[int, LatentResult] = {}
        self.path = Path(results_path) if results_path else None
        if self.path is None:
            self.explanation_file = self.result_file = None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        settings = json_safe(json.loads(json.dumps(settings, default=str)))
        settings_path = self._sibling(".run.json")
        partials = [self._sibling(".explanations.partial"), self._sibling(".partial")]
        if any(p.exists() for p in partials):
            saved = json.loads(settings_path.read_text()) if settings_path.exists() else {}
            if saved != settings:
                raise ValueError(
                    f"{self.path.parent} holds an unfinished run made with other settings "
                    f"(differing: {', '.join(_differing_keys(saved, settings))}); "
                    f"use another output directory, or delete {partials[0].name} and {partials[1].name} "
                    "to start again"
                )
        else:
            atomic_write_json(settings_path, settings)
        for line in _complete_lines(partials[0]):
            self.explanations[line["latent"]] = Explanation(**line)
        for line in _complete_lines(partials[1]):
            self.results[line["latent"]] = LatentResult(**line)
        self.explanation_file = open(partials[0], "a")
        self.result_file = open(partials[1], "a")

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def add_explanation(self, explanation: Explanation) -> None:
        self.explanations[explanation.latent] = explanation
        _append(self.explanation_file, json.dumps(json_safe(asdict(explanation)), allow_nan=False))

    def add_result(self, result: LatentResult) -> None:
        self.results[result.latent] = result
        _append(self.result_file, result.to_json())

    def close(self) -> None:
        for file in (self.explanation_file, self.result_file):
            if file:
                file.close()

    def finish(self) -> None:
        """Every latent scored: the results file takes its final name; the explanations and settings go."""
        if self.path is None:
            return
        self._sibling(".partial").replace(self.path)
        self._sibling(".explanations.partial").unlink()
        self._sibling(".run.json").unlink()


def _append(file, line: str) -> None:
    if file:
        file.write(line + "\n")
        file.flush()


def _complete_lines(path: Path) -> list[dict]:
    """The whole lines of an append-only JSON-lines file. A torn last line (killed mid-write) is dropped and
    the file rewritten without it, so lines appended later start clean."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    complete = lines[:-1]  # whatever follows the last newline is torn (or empty)
    rows = []
    for number, line in enumerate(complete, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {number} is not JSON ({e.msg}); the file is corrupt: delete it to "
                f"redo that stage"
            ) from None
    if lines[-1]:
        atomic_write_text(path, "".join(line + "\n" for line in complete))
    return rows


def _differing_keys(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in _differing_keys(a, b)]
        elif a != b:
            out.append(key)
    return out


def _defined(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float]) -> float | None:
    defined = _defined(values)
    return sum(defined) / len(defined) if defined else None


def paired_interval(differences: list[float], seed: int = 0, resamples: int = 10_000) -> list[float] | None:
    """95 % bootstrap interval (percentiles) of the mean of per-latent real - control differences: with a few
    dozen latents the mean alone does not say whether a margin is more than the draw of latents."""
    if len(differences) < 2:
        return None
    import torch

    values = torch.tensor(differences, dtype=torch.float64)
    rows = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[rows].mean(1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def _score_counts(results: list[LatentResult], name: str) -> dict[str, int]:
    """Failure counts of one scorer over real and control explanations."""
    counts = {
        "latents_scored": 0,
        "examples_asked": 0,
        "parse_failures": 0,
        "errors": 0,
        "missing_predictions": 0,
    }
    for r in results:
        if name not in r.scores:
            continue
        counts["latents_scored"] += 1
        for score in (r.scores[name], r.control_scores.get(name)):
            if score is not None:
                counts["examples_asked"] += score["n_examples"]
                counts["parse_failures"] += score["parse_failures"]
                counts["errors"] += score["errors"]
                counts["missing_predictions"] += score.get("missing_predictions", 0)
    return counts


def summarize(results: list[LatentResult], seconds: float, resumed: int = 0) -> dict:
    """Counts of every failure kind, and per scorer and metric the mean for real and control explanations
    and their difference (over latents that have both defined). An undefined metric (e.g. precision with no
    positive prediction, a correlation of constant predictions) is left out of the mean and counted in
    `undefined`; the summary holds null, never NaN."""
    failures: dict[str, int] = {}
    for r in results:
        if r.explanation_failure:
            failures[r.explanation_failure] = failures.get(r.explanation_failure, 0) + 1
    scorers: dict[str, dict] = {}
    for name in sorted({n for r in results for n in r.scores}):
        entry: dict = _score_counts(results, name)
        scored = [r for r in results if name in r.scores]
        for metric in scored[0].scores[name]["metrics"]:
            real = [r.scores[name]["metrics"][metric] for r in scored]
            values: dict = {"real": _mean(real), "undefined": len(real) - len(_defined(real))}
            paired = [
                (r.scores[name]["metrics"][metric], r.control_scores[name]["metrics"][metric])
                for r in scored
                if name in r.control_scores
            ]
            paired = [(a, b) for a, b in paired if _defined([a]) and _defined([b])]
            if any(name in r.control_scores for r in scored):
                control = [
                    r.control_scores[name]["metrics"][metric] for r in scored if name in r.control_scores
                ]
                values["control"] = _mean(control)
                values["control_undefined"] = len(control) - len(_defined(control))
                values["real_minus_control"] = _mean([a - b for a, b in paired])
                values["real_minus_control_ci95"] = paired_interval([a - b for a, b in paired])
                values["latents_paired"] = len(paired)
                values["real_higher"] = sum(
                    a > b for a, b in paired
                )  # latents where the real explanation wins
                values["control_higher"] = sum(a < b for a, b in paired)
            entry[metric] = values
        scorers[name] = entry
    return json_safe(
        {
            "latents": len(results),
            "explained": sum(r.explanation is not None for r in results),
            "explanation_failures": failures,
            # The explainer asks again once when an answer repeats a demonstration and fails the latent if
            # the retry repeats one too ("copied_demonstration" above), so kept explanations should never
            # copy one.
            "explanation_retries_after_a_copy": sum(r.explanation_retries for r in results),
            "explanations_copying_a_demonstration": sum(
                copied_demonstration(r.explanation or "") is not None for r in results
            ),
            "scorers": scorers,
            "seconds": seconds,
            "latents_resumed": resumed,  # scored by an earlier, killed run; not counted in the rate below
            "latents_per_minute": 60 * (len(results) - resumed) / seconds if seconds > 0 else None,
            "prompt_tokens_per_latent": sum(r.prompt_tokens for r in results) / max(1, len(results)),
        }
    )


def _number(value: float | None, sign: bool = False) -> str:
    return "n/a" if value is None else (f"{value:+.3f}" if sign else f"{value:.3f}")


def _interval(values: dict) -> str:
    interval = values.get("real_minus_control_ci95")
    return "" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def summary_table(summary: dict) -> str:
    """The summary as a Markdown table: one row per scorer and metric, real vs control and the margin."""
    rate = summary["latents_per_minute"]
    lines = [
        f"latents {summary['latents']}, explained {summary['explained']} "
        f"({summary['explanations_copying_a_demonstration']} copying a demonstration, "
        f"{summary['explanation_retries_after_a_copy']} retries after a copy), explanation failures "
        f"{summary['explanation_failures'] or 'none'}; "
        + (
            f"{summary['latents_resumed']} resumed from a killed run; "
            if summary.get("latents_resumed")
            else ""
        )
        + f"{_number(rate)} latents/min, "
        f"{summary['prompt_tokens_per_latent']:.0f} prompt tokens/latent",
        "",
        "| scorer | metric | real | control | real − control [95 % bootstrap] "
        "| latents real / control higher | undefined real/control "
        "| asked | parse failures | errors | missing predictions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in summary["scorers"].items():
        for metric, values in entry.items():
            if isinstance(values, dict):
                lines.append(
                    f"| {name} | {metric} | {_number(values['real'])} | {_number(values.get('control'))} | "
                    f"{_number(values.get('real_minus_control'), sign=True)} {_interval(values)} | "
                    f"{values.get('real_higher', 'n/a')} / {values.get('control_higher', 'n/a')} "
                    f"of {values.get('latents_paired', 0)} | "
                    f"{values['undefined']}/{values.get('control_undefined', 'n/a')} | "
                    f"{entry['examples_asked']} | {entry['parse_failures']} | {entry['errors']} | "
                    f"{entry['missing_predictions']} |"
                )
    return "\n".join(lines)


def write_reports(out: Path, results: list[LatentResult], summary: dict, options: dict) -> None:
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_table(summary) + "\n")
    atomic_write_json(out / "options.json", options)
    lines = []
    for r in results:  # flat numeric scores, as the dashboard reads them; NaN (undefined) left out
        scores = {
            f"{name}_{metric}": value
            for name, score in r.scores.items()
            for metric, value in score["metrics"].items()
            if value == value and value is not None
        }
        lines.append(json.dumps({"latent": r.latent, "explanation": r.explanation, "scores": scores}))
    atomic_write_text(out / "explanations.jsonl", "\n".join(lines) + "\n")
