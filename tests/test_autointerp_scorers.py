"""Fast tests of the fuzzing, simulation and intervention scorers, decoder-neighbour negatives, and the
strict-JSON summary (null and a count for undefined metrics, never NaN or -1), against a scripted
OpenAI-shaped server on loopback and the real tiny transformer. The real LLM is in
test_autointerp_server.py."""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest
import torch
from test_autointerp import WORDS, ScriptedServer, completion_payload, token_strings

from sae.analysis.autointerp.clients import OpenAIClient
from sae.analysis.autointerp.explainer import (
    DEMONSTRATIONS,
    EXPLANATION_PREFIX,
    ExplainerConfig,
    copied_demonstration,
    explainer_prompt,
    without_demonstration,
)
from sae.analysis.autointerp.intervention import JUDGE_SUFFIX, InterventionConfig, InterventionScorer
from sae.analysis.autointerp.pipeline import AutointerpConfig, interpret, summary_table
from sae.analysis.autointerp.records import Example, LatentRecord, RecordConfig, collect_records
from sae.analysis.autointerp.scorers import ScorerConfig, fuzzing_score
from sae.analysis.autointerp.simulation import PLACEHOLDER, SimulationConfig, pearson, simulation_score


def cat_record(latent: int = 0) -> LatentRecord:
    """A latent that fires on ' cat' (token 1) with values 1..4; negatives never contain ' cat'."""
    top = [Example([0, 1, 2 + i, 3], [0.0, 1.0 + i, 0.0, 0.0]) for i in range(4)]
    negatives = [Example([5, 6, 7 + i], [0.0, 0.0, 0.0]) for i in range(4)]
    return LatentRecord(latent, 40, 1000, 4.0, top=top, negatives=negatives)


def final_text(prompt: str) -> str:
    return prompt.rsplit("Text:", 1)[1]


def run_with_server(reply, coro_factory):
    async def go(url):
        async with OpenAIClient(url, max_concurrency=4, backoff_s=0.001) as client:
            return await coro_factory(client)

    with ScriptedServer(reply) as server:
        return asyncio.run(go(server.url)), server


# --- fuzzing -----------------------------------------------------------------------------------------------


def test_fuzzing_marks_true_tokens_in_positives_and_as_many_random_tokens_in_negatives():
    """A judge that answers 1 exactly when ' cat' is marked scores the right marks perfectly; every prompt
    holds as many marks as a true example, so the count of marks gives nothing away."""
    record = cat_record()
    texts = []

    def reply(n, path, body):
        text = final_text(body["prompt"])
        texts.append(text)
        yes = "<<cat>>" in text
        return (
            200,
            completion_payload(
                " 1" if yes else " 0", {" 1": -0.1 if yes else -2.0, " 0": -2.0 if yes else -0.1}
            ),
            0,
        )

    score, _ = run_with_server(
        reply,
        lambda c: fuzzing_score(
            c, "the word cat", record, token_strings, ScorerConfig(n_positive=4, n_negative=4)
        ),
    )
    assert score.n_examples == 8 and score.n_scored == 8 and score.parse_failures == score.errors == 0
    assert score.metrics["balanced_accuracy"] == 1.0 and score.metrics["auroc"] == 1.0
    assert sum("<<cat>>" in t for t in texts) == 4
    assert all(len(re.findall(r"<<.+?>>", t.split("\nAnswer:")[0])) == 1 for t in texts)


# --- simulation -----------------------------------------------------------------------------------


def echo_payload(prompt: str, predict) -> dict:
    """An echoed completion whose tokens are the prompt's lines and, after each placeholder's tab, the
    placeholder with top alternatives from predict(token_text_of_that_line) -> {digit: logprob} (or {} for no
    digits)."""
    tokens, offsets, tops = [], [], []
    position = 0
    for match in re.finditer(r"\n([^\n\t]*)\t" + re.escape(PLACEHOLDER), prompt):
        placeholder = match.end() - 1
        tokens.append(prompt[position:placeholder])
        offsets.append(position)
        tops.append({"x": -0.1})
        tokens.append(PLACEHOLDER)
        offsets.append(placeholder)
        tops.append(predict(match.group(1)))
        position = placeholder + 1
    tokens.append(" ok")
    offsets.append(len(prompt))
    tops.append({" ok": -0.1})
    logprobs = {
        "tokens": tokens,
        "token_logprobs": [-0.1] * len(tokens),
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return {
        "choices": [{"text": prompt + " ok", "index": 0, "finish_reason": "length", "logprobs": logprobs}],
        "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1},
    }


def test_simulation_correlates_expected_digits_with_true_activations():
    record = cat_record()

    def reply(n, path, body):
        assert body["echo"] is True and body["logprobs"] == 10

        # a judge that puts 9 on ' cat' with some doubt, and 0 elsewhere; no digits at all on ' pear'
        def predict(token):
            if token == " cat":
                return {"9": -0.2, "0": -1.8}
            return {} if token == " pear" else {"0": -0.05, "1": -3.0}

        return 200, echo_payload(body["prompt"], predict), 0

    config = SimulationConfig(n_positive=4, n_negative=4)
    score, server = run_with_server(
        reply, lambda c: simulation_score(c, "the word cat", record, token_strings, config)
    )
    assert len(server.requests) == 8 and score.n_scored == 8 and score.parse_failures == score.errors == 0
    # ' pear' (token 10 -> WORDS[10]) appears once among the negatives' tokens: its prediction is
    # missing, counted
    n_pear = sum(WORDS[t % len(WORDS)] == "pear" for e in record.negatives for t in e.tokens)
    assert score.missing_predictions == n_pear > 0
    assert score.metrics["correlation"] > 0.8


def test_simulation_without_prompt_logprobs_is_a_counted_parse_failure():
    """A server that ignores echo: only the generated token comes back; no silent zero predictions."""
    record = cat_record()

    def reply(n, path, body):
        payload = completion_payload(" 5", {" 5": -0.1})
        payload["choices"][0]["logprobs"]["text_offset"] = [len(body["prompt"])]
        return 200, payload, 0

    score, _ = run_with_server(
        reply, lambda c: simulation_score(c, "cats", record, token_strings, SimulationConfig(2, 2))
    )
    assert score.parse_failures == 4 and score.n_scored == 0 and math.isnan(score.metrics["correlation"])
    assert "echo" in score.failure_details[0]


def test_pearson_is_undefined_for_constant_predictions():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [0, 1, 2])) and math.isnan(pearson([1.0], [2.0]))


# --- intervention on the real tiny transformer ----------------------------------------------------


def tiny_sae():
    from sae import SAEConfig, SparseAutoencoder

    cfg = SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint="blocks.0.hook_resid_post")
    return SparseAutoencoder.from_config(cfg, seed=0)


def judge_payload(prompt: str, clean_texts: list[str]) -> dict:
    """Echo with one token per word; the explanation's tokens get logprob -2 after a clean text, -1 after
    others."""
    text = prompt.split(JUDGE_SUFFIX)[0].removeprefix("Text: ")
    value = -2.0 if any(text == c.replace("\n", "\\n") for c in clean_texts) else -1.0
    start = prompt.index(JUDGE_SUFFIX) + len(JUDGE_SUFFIX)
    tokens, offsets, logprobs = [prompt[:start]], [0], [-0.5]
    for match in re.finditer(r" \S+", prompt[start:]):
        tokens.append(match.group())
        offsets.append(start + match.start())
        logprobs.append(value)
    tokens.append(".")
    offsets.append(len(prompt))
    logprobs.append(-9.0)  # the generated token: not counted
    lp = {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [{t: v} for t, v in zip(tokens, logprobs)],
        "text_offset": offsets,
    }
    return {
        "choices": [{"text": prompt + ".", "index": 0, "finish_reason": "length", "logprobs": lp}],
        "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1},
    }


def test_intervention_calibrates_steers_and_compares_the_explanation_clean_vs_steered(tiny_lm):
    sae = tiny_sae()
    # The tiny model's KL saturates near 0.011 (measured), so the target sits below it.
    config = InterventionConfig(target_kl=0.009, prompts=("def main():", "x = [1, 2"), max_new_tokens=6)
    scorer = InterventionScorer(tiny_lm, sae, config)
    record = LatentRecord(3, 100, 1000, 1.0)

    def reply(n, path, body):
        return 200, judge_payload(body["prompt"], scorer.clean or []), 0

    async def both(client):
        return (
            await scorer.score(client, "python keywords", record),
            await scorer.score(client, "something else entirely", record),
        )

    (real, control), server = run_with_server(reply, both)
    assert len(server.requests) == 8  # 2 prompts x clean/steered x 2 explanations; steering done once
    info = real.info
    assert info["kl"] == pytest.approx(0.009, rel=0.1) and info["alpha"] > 0
    assert info["steered"] != scorer.clean, "the calibrated steering changed no completion"
    assert real.n_examples == 4 and real.n_scored == 4 and real.parse_failures == real.errors == 0
    # -1 after a steered text, -2 after a clean one (when the steered text differs from the clean one)
    changed = [s != c for s, c in zip(info["steered"], scorer.clean)]
    assert real.metrics["logprob_gain"] == pytest.approx(sum(changed) / len(changed))
    assert control.info == real.info  # the control is judged on the same completions


def test_intervention_that_cannot_reach_the_kl_is_a_counted_failure_and_null_in_the_summary(
    tiny_lm, tmp_path
):
    sae = tiny_sae()
    scorer = InterventionScorer(
        tiny_lm, sae, InterventionConfig(target_kl=1e9, prompts=("def main():",), max_new_tokens=2)
    )
    records = [cat_record(3), cat_record(5)]

    def reply(n, path, body):
        if "Explanation: the feature responds to" in body["prompt"][-40:]:
            return 200, completion_payload(" cats" if n % 2 else " dogs"), 0
        return 200, judge_payload(body["prompt"], []), 0

    config = AutointerpConfig(scorers=("intervention",))
    (results, summary), _ = run_with_server(
        reply,
        lambda c: interpret(
            c, records, token_strings, config, results_path=tmp_path / "r.jsonl", intervention=scorer
        ),
    )
    for r in results:
        score = r.scores["intervention"]
        assert score["errors"] == score["n_examples"] == 2 and "calibration" in score["failure_details"][0]
        assert score["metrics"]["logprob_gain"] is None or math.isnan(score["metrics"]["logprob_gain"])
    entry = summary["scorers"]["intervention"]
    assert (
        entry["errors"] == 8
        and entry["logprob_gain"]["real"] is None
        and entry["logprob_gain"]["undefined"] == 2
    )
    text = (tmp_path / "r.jsonl").read_text()
    assert "NaN" not in text and all(json.loads(line) for line in text.splitlines())
    assert "n/a" in summary_table(summary)


# --- strict JSON, small latents -------------------------------------------------------------------


def test_summary_is_strict_json_with_undefined_metrics_counted_and_small_latents_reported(tmp_path):
    """A judge that always answers 0: precision and F1 are undefined (no positive prediction). The summary
    holds null with a count, never NaN; a latent that never fired and one that fired twice are reported,
    not -1."""
    from sae.io import atomic_write_json

    records = [
        cat_record(0),
        cat_record(1),
        LatentRecord(2, 0, 1000, 0.0, too_few_activations=True),
        LatentRecord(4, 2, 1000, 0.3, top=[Example([1], [0.3])], too_few_activations=True),
    ]

    def reply(n, path, body):
        if body["prompt"].endswith("Explanation: the feature responds to"):
            return 200, completion_payload(" cats"), 0
        return 200, completion_payload(" 0", {" 0": -0.1, " 1": -2.5}), 0

    config = AutointerpConfig(scorers=("detection",), scorer=ScorerConfig(n_positive=3, n_negative=3))
    (results, summary), _ = run_with_server(reply, lambda c: interpret(c, records, token_strings, config))
    atomic_write_json(tmp_path / "summary.json", summary)
    text = (tmp_path / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    precision = summary["scorers"]["detection"]["precision"]
    assert precision["real"] is None and precision["undefined"] == 2 and precision["control_undefined"] == 2
    assert summary["scorers"]["detection"]["balanced_accuracy"]["real"] == pytest.approx(0.5)
    by_latent = {r.latent: r for r in results}
    assert sorted(by_latent) == [0, 1, 2, 4]
    for latent in (2, 4):
        r = by_latent[latent]
        assert r.too_few_activations and r.explanation_failure == "too_few_activations" and r.scores == {}
    assert summary["explanation_failures"] == {"too_few_activations": 2}
    assert summary["explanations_copying_a_demonstration"] == 0 and summary["explained"] == 2
    lines = "\n".join(r.to_json() for r in results)
    assert "NaN" not in lines and "-1" not in re.sub(r"-1\d|-1\.\d", "", lines)


# --- explainer: copied demonstrations -------------------------------------------------------------


def test_an_answer_copying_a_demonstration_is_retried_once_then_counted_as_a_failure():
    """Latent 0 ('cat') first answers with the last demonstration's explanation, then (asked again with other
    demonstrations) with its own; latent 1 ('dog') repeats a demonstration both times and is a counted
    failure, never scored. The retry's prompt leaves the copied demonstration out."""
    dog = cat_record(1)
    dog.top = [Example([0, 5, 2 + i, 3], [0.0, 1.0 + i, 0.0, 0.0]) for i in range(4)]
    records = [cat_record(0), dog]
    last_demonstration = DEMONSTRATIONS[-1][1]
    explainer_prompts: list[str] = []

    def reply(n, path, body):
        prompt = body["prompt"]
        if prompt.endswith(EXPLANATION_PREFIX):
            explainer_prompts.append(prompt)
            if "<<dog>>" in prompt.rsplit("\n\n", 1)[1]:
                return 200, completion_payload(' "LEN" calls in Python code.'), 0  # any case, trailing period
            copied = last_demonstration in prompt
            return 200, completion_payload(f" {last_demonstration}" if copied else " cats"), 0
        return 200, completion_payload(" 1", {" 1": -0.1, " 0": -2.5}), 0

    config = AutointerpConfig(scorers=("detection",), scorer=ScorerConfig(n_positive=2, n_negative=2))
    (results, summary), _ = run_with_server(reply, lambda c: interpret(c, records, token_strings, config))
    cat, dog_result = results
    assert cat.explanation == "cats" and cat.explanation_retries == 1 and "detection" in cat.scores
    assert dog_result.explanation is None and dog_result.explanation_failure == "copied_demonstration"
    assert dog_result.explanation_retries == 1 and dog_result.scores == {}
    assert dog_result.explanation_detail == '"LEN" calls in Python code'
    assert len(explainer_prompts) == 4  # two per latent: the first answer and one retry, no more
    retry_prompts = [p for p in explainer_prompts if last_demonstration not in p]
    assert len(retry_prompts) == 1  # the cat retry; the dog's retry left out the "len" demonstration instead
    assert summary["explanation_failures"] == {"copied_demonstration": 1}
    assert (
        summary["explanation_retries_after_a_copy"] == 2
        and summary["explanations_copying_a_demonstration"] == 0
    )
    assert copied_demonstration("Names of fruits") is None and copied_demonstration(f"{last_demonstration}.")


def test_explainer_prompt_lists_marked_tokens_with_counts():
    record = cat_record(0)
    prompt = explainer_prompt(record, token_strings, ExplainerConfig())
    assert prompt.rsplit("\n", 2)[-2] == 'Marked tokens (count): "cat" (4)'
    shorter = explainer_prompt(
        record, token_strings, ExplainerConfig(), without_demonstration(DEMONSTRATIONS[0][1])
    )
    assert DEMONSTRATIONS[0][1] not in shorter and shorter.count("Examples:") == len(DEMONSTRATIONS)


# --- decoder-neighbour negatives ------------------------------------------------------------------


def test_neighbour_negatives_are_windows_where_a_similar_latent_fires_and_the_latent_does_not():
    """Latent 0 fires on ' cat' (1); latent 2, whose decoder direction is nearly latent 0's, fires on
    ' dog' (5). Hard negatives of latent 0 are centred on ' dog' and never contain ' cat'."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tokens = torch.randint(6, len(WORDS), (4, 40), generator=generator)
        tokens[:, 3::9] = 1
        tokens[:, 7::11] = 5
        x = torch.zeros(4, 40, 3)
        x[..., 0] = (tokens == 1).float()
        x[..., 1] = (tokens == 2).float()  # never fires
        x[..., 2] = (tokens == 5).float() * 2
        batches.append((tokens, x, torch.ones(4, 40, dtype=torch.bool)))
    decoder = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.9, 0.1, 0.0]])
    config = RecordConfig(
        n_top=4,
        n_quantile_groups=2,
        n_per_quantile=2,
        n_negatives=6,
        neighbour_negatives=4,
        n_neighbours=1,
        window_before=2,
        window_after=1,
        min_examples=2,
        negative_pool=32,
    )
    records = collect_records(lambda x: x, 3, iter(batches), torch.tensor([0]), config, decoder=decoder)
    record = records[0]
    assert record.neighbours == [2] and record.n_neighbour_negatives == 4 and len(record.negatives) == 6
    for example in record.negatives[:4]:
        assert example.tokens[2] == 5 and 1 not in example.tokens and max(example.acts) == 0
    with pytest.raises(ValueError, match="decoder"):
        collect_records(lambda x: x, 3, iter(batches), torch.tensor([0]), config)
    with pytest.raises(ValueError, match="neighbour_negatives"):
        RecordConfig(n_negatives=2, neighbour_negatives=3)


def test_paired_interval_brackets_the_mean_difference():
    from sae.analysis.autointerp.pipeline import paired_interval

    assert paired_interval([0.2]) is None
    assert paired_interval([0.1] * 10) == pytest.approx([0.1, 0.1])
    low, high = paired_interval([0.3, -0.3] * 10)
    assert low < 0 < high
    low, high = paired_interval([0.5, 0.1, 0.3, 0.2, 0.4] * 4)
    assert 0.1 < low < 0.3 < high < 0.5


# --- resuming a killed run ------------------------------------------------------------------------


class Killed(Exception):
    pass


class KilledAfter:
    """Returns the first `answers` answers of the real client, then raises `Killed` instead of the next one:
    the run dies mid-way, as under kill -9, with whatever it had written on disk."""

    def __init__(self, client, answers: int):
        self.client, self.answers, self.answered = client, answers, 0

    async def complete(self, *args, **kwargs):
        completion = await self.client.complete(*args, **kwargs)
        self.answered += 1
        if self.answered > self.answers:
            raise Killed
        return completion


def detection_reply(n, path, body):
    if body["prompt"].endswith(EXPLANATION_PREFIX):
        return 200, completion_payload(" cats"), 0
    answer = " 1" if " cat" in final_text(body["prompt"]) else " 0"
    return 200, completion_payload(answer, {answer: -0.1, " 1" if answer == " 0" else " 0": -2.5}), 0


def test_a_killed_run_resumes_without_asking_again_and_ends_as_an_uninterrupted_run(tmp_path):
    """Six latents, detection with 2 + 2 examples (8 requests per latent with the control), one request at a
    time. A run killed at its 43rd answer (6 explanations, then the 24 real scores are queued before any
    control, so latents 0-2 are finished) leaves the explanations and 3 scored latents on disk, and here a
    torn last line; the second run asks nothing for those and its results equal an uninterrupted run's.
    Resuming with other settings is an error that names what differs."""
    records = [cat_record(i) for i in range(6)]
    config = AutointerpConfig(scorers=("detection",), scorer=ScorerConfig(n_positive=2, n_negative=2))
    path = tmp_path / "results.jsonl"

    def run(config, killed_after: int | None = None, results_path=path):
        async def go(url):
            async with OpenAIClient(url, max_concurrency=1) as client:
                client = KilledAfter(client, killed_after) if killed_after else client
                return await interpret(
                    client, records, token_strings, config, None, results_path, run_settings={"sae": "x"}
                )

        with ScriptedServer(detection_reply) as server:
            return asyncio.run(go(server.url)), server

    (reference, _), _ = run(config, results_path=None)
    with pytest.raises(Killed):
        run(config, killed_after=42)
    partial = path.with_name("results.jsonl.partial")
    scored_before = len(partial.read_text().splitlines())
    assert not path.exists() and scored_before == 3
    with open(partial, "a") as file:
        file.write('{"latent": 5, "fire_')  # killed in the middle of a line

    other = AutointerpConfig(scorers=("detection",), scorer=ScorerConfig(n_positive=3, n_negative=2))
    with pytest.raises(ValueError, match=r"config\.scorer\.n_positive"):
        run(other)
    (resumed, summary), server = run(config)
    prompts = [body["prompt"] for _, _, body in server.requests]
    assert not any(p.endswith(EXPLANATION_PREFIX) for p in prompts)  # every explanation was on disk
    assert len(prompts) == 8 * (6 - scored_before)
    assert summary["latents_resumed"] == scored_before
    assert [r.to_json() for r in resumed] == [r.to_json() for r in reference]
    assert sorted(json.loads(line)["latent"] for line in path.read_text().splitlines()) == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_a_corrupt_progress_file_is_an_error_naming_it(tmp_path):
    from sae.analysis.autointerp.pipeline import RunProgress

    RunProgress(tmp_path / "results.jsonl", {"a": 1}).close()  # a run that wrote nothing yet
    (tmp_path / "results.jsonl.partial").write_text('{"latent": 0\n')  # a whole line that is not JSON
    with pytest.raises(ValueError, match=r"results\.jsonl\.partial: line 1 is not JSON"):
        RunProgress(tmp_path / "results.jsonl", {"a": 1})
