"""Fast tests of autointerp: metrics, prompts and parsing, streaming records, the HTTP client's retries,
timeouts, concurrency and rate limits against a scripted loopback server, and failure accounting through
the whole pipeline. The real LLM server is exercised in test_autointerp_server.py (slow)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from sae.analysis.autointerp.clients import OpenAIClient, RequestFailed
from sae.analysis.autointerp.explainer import (
    EXPLANATION_PREFIX,
    ExplainerConfig,
    explainer_prompt,
    parse_explanation,
)
from sae.analysis.autointerp.pipeline import AutointerpConfig, interpret, pair_controls, summary_table
from sae.analysis.autointerp.prompts import mark_tokens
from sae.analysis.autointerp.records import Example, LatentRecord, RecordConfig, collect_records
from sae.analysis.autointerp.scorers import ScorerConfig, auroc, binary_metrics, detection_score

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "in",
    "park",
    "apple",
    "pear",
    "red",
    "a",
    "and",
    "it",
    "was",
]


def token_strings(ids: list[int]) -> list[str]:
    return [" " + WORDS[i % len(WORDS)] for i in ids]


# --- metrics and text ------------------------------------------------------------------------------------


def test_binary_metrics_and_auroc():
    m = binary_metrics([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1])
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert math.isnan(
        binary_metrics([1, 1], [0, 0])["precision"]
    )  # nothing predicted positive: undefined, not 0
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auroc([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))


def test_mark_tokens_merges_runs_and_keeps_spaces_outside():
    pieces = [" the", " red", " apple", " fell", "\n"]
    assert mark_tokens(pieces, [False, True, True, False, False]) == " the <<red apple>> fell\\n"
    assert mark_tokens(pieces, [True, False, False, False, True]) == " <<the>> red apple fell<<\\n>>"


@pytest.mark.parametrize(
    "answer, expected",
    [
        (" names of animals\nExamples:", "names of animals"),
        (' "the word cat".', "the word cat"),
        ("Explanation: colours", "colours"),
        ("   \n  ", None),
        ("1. the <<cat>> sat", None),  # echoes an example instead of explaining
        ("Examples:", None),
        (' the word "2006"', 'the word "2006"'),  # quotes inside the answer stay balanced
        (' "system" in code\\n    if (all is', '"system" in code'),  # ran on past a written newline into code
        (
            ' "\\n" at the ends of lines',
            '"\\n" at the ends of lines',
        ),  # a quoted newline is part of the answer
        (' "sys" in code\\n"', '"sys" in code'),
        ('._" (26), "_" (3), "append" (1),', None),  # repeats the prompt's marked-token counts
    ],
)
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


def test_explainer_prompt_marks_activating_tokens_and_shows_values():
    record = LatentRecord(
        latent=3,
        fire_count=50,
        tokens_seen=1000,
        max_activation=2.0,
        top=[Example([0, 1, 2], [0.0, 2.0, 0.0])],
        quantiles=[[Example([5, 6], [1.0, 0.0])]],
    )
    prompt = explainer_prompt(record, token_strings, ExplainerConfig(show_values=True))
    assert "<<cat>>" in prompt and "'cat': 10" in prompt and "<<dog>>" in prompt and "'dog': 5" in prompt
    assert prompt.endswith(EXPLANATION_PREFIX)


# --- records: one streaming pass -------------------------------------------------------------------------


def test_collect_records_top_quantiles_negatives_and_rare_latents():
    """Latent 0 fires on token 'cat' (id 1, in half the contexts) with a value rising with position; latent 1
    fires once; the
    negatives of latent 0 never contain its firing; latent 1 is reported as having too few activations."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for b in range(6):
        tokens = torch.randint(2, len(WORDS), (4, 40), generator=generator)
        tokens[:2, ::7] = 1
        x = torch.zeros(4, 40, 2)
        x[..., 0] = (
            (tokens == 1) * (1 + torch.arange(40)) / 40
        )  # the "SAE input" is the activation itself here
        if b == 0:
            x[0, 3, 1] = 5.0
        batches.append((tokens, x, torch.ones(4, 40, dtype=torch.bool)))
    config = RecordConfig(
        n_top=5,
        n_quantile_groups=3,
        n_per_quantile=2,
        n_negatives=8,
        window_before=6,
        window_after=2,
        min_examples=3,
        negative_pool=64,
    )
    records = collect_records(lambda x: x, 2, iter(batches), torch.tensor([0, 1]), config)
    cat, rare = records
    assert cat.fire_count == 6 * 2 * 6 and not cat.too_few_activations
    assert cat.max_activation == pytest.approx(36 / 40)  # last 'cat' position is 35
    assert [len(e.tokens) for e in cat.top] == [9] * 5
    assert all(e.tokens[6] == 1 and e.acts[6] == max(e.acts) for e in cat.top)  # centred on the firing
    assert len(cat.quantiles) == 3 and all(len(g) == 2 for g in cat.quantiles)
    assert cat.quantiles[0][0].max_act >= cat.quantiles[-1][-1].max_act  # highest interval first
    assert cat.negatives and all(1 not in e.tokens and max(e.acts) == 0 for e in cat.negatives)
    assert rare.fire_count == 1 and rare.too_few_activations and rare.top[0].max_act == 5.0


def test_each_latent_draws_its_own_random_negatives():
    """Eight latents that never fire share one pool of 64 windows; each draws 4 negatives of its own (taking
    the pool's first silent windows gave every latent the same ones), and the same seed draws the
    same again."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(2, len(WORDS), (4, 40), generator=generator),
            torch.zeros(4, 40, 8),
            torch.ones(4, 40, dtype=torch.bool),
        )
        for _ in range(4)
    ]
    config = RecordConfig(n_negatives=4, window_before=3, window_after=1, negative_pool=64)

    def negative_sets() -> list[set[tuple[int, ...]]]:
        records = collect_records(lambda x: x, 8, iter(batches), torch.arange(8), config)
        return [{tuple(e.tokens) for e in r.negatives} for r in records]

    sets = negative_sets()
    assert all(len(s) == 4 for s in sets)
    assert len({frozenset(s) for s in sets}) == 8  # no two latents got the same windows
    assert sets == negative_sets()


# --- the HTTP client against a scripted loopback server ---------------------------------------------------


class ScriptedServer:
    """An OpenAI-shaped HTTP server on 127.0.0.1 whose replies come from `reply(request_number, path, body)`
    -> (status, payload, delay_s). Records requests and the most that were in flight at once."""

    def __init__(self, reply):
        self.reply, self.requests, self.in_flight, self.max_in_flight = reply, [], 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    number = len(server.requests)
                    server.requests.append((time.monotonic(), self.path, body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, delay = server.reply(number, self.path, body)
                    time.sleep(delay)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion_payload(text: str, top: dict[str, float] | None = None) -> dict:
    logprobs = None
    if top is not None:
        logprobs = {
            "tokens": [text],
            "token_logprobs": [max(top.values())],
            "top_logprobs": [top],
            "text_offset": [0],
        }
    return {
        "choices": [{"text": text, "index": 0, "finish_reason": "length", "logprobs": logprobs}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
    }


def run(coro):
    return asyncio.run(coro)


def test_client_retries_transient_errors_then_succeeds_and_parses_logprobs():
    def reply(n, path, body):
        return (
            (503, {"error": "busy"}, 0)
            if n < 2
            else (200, completion_payload(" 1", {" 1": -0.1, " 0": -2.4}), 0)
        )

    async def go(url):
        async with OpenAIClient(url, backoff_s=0.01, max_retries=3) as client:
            return await client.complete("Answer:", 1, logprobs=2), client.retries

    with ScriptedServer(reply) as server:
        completion, retries = run(go(server.url))
    assert retries == 2 and len(server.requests) == 3 and server.requests[0][1] == "/v1/completions"
    assert server.requests[0][2]["logprobs"] == 2
    assert completion.text == " 1" and completion.prompt_tokens == 7
    assert completion.logprobs[0].top == {" 1": -0.1, " 0": -2.4}


def test_client_gives_up_after_retries_and_does_not_retry_bad_requests():
    async def go(url):
        async with OpenAIClient(url, backoff_s=0.001, max_retries=2) as client:
            with pytest.raises(RequestFailed, match="after 3 attempts"):
                await client.complete("x", 1)
            with pytest.raises(RequestFailed, match="HTTP 400") as bad:
                await client.chat([{"role": "user", "content": "x"}], 1)
            return bad.value.attempts

    def reply(n, path, body):
        return (
            (500, {}, 0) if path.endswith("/completions") and "prompt" in body else (400, {"error": "no"}, 0)
        )

    with ScriptedServer(reply) as server:
        attempts = run(go(server.url))
    assert attempts == 1 and len(server.requests) == 4


def test_client_timeout_is_a_counted_failure():
    async def go(url):
        async with OpenAIClient(url, timeout_s=0.2, max_retries=1, backoff_s=0.001) as client:
            with pytest.raises(RequestFailed, match="Timeout"):
                await client.complete("x", 1)

    with ScriptedServer(lambda n, p, b: (200, completion_payload("late"), 1.0)) as server:
        started = time.monotonic()
        run(go(server.url))
    assert len(server.requests) == 2 and time.monotonic() - started < 2.5


def test_client_limits_concurrency_and_rate():
    async def go(url, **limits) -> float:
        async with OpenAIClient(
            url, **limits
        ) as client:  # (creating the client loads certificates: not timed)
            started = time.monotonic()
            await asyncio.gather(*(client.complete("x", 1) for _ in range(8)))
            return time.monotonic() - started

    # Slow replies (0.3 s), so three requests overlap even on a loaded machine.
    with ScriptedServer(lambda n, p, b: (200, completion_payload("ok"), 0.3)) as server:
        run(go(server.url, max_concurrency=3))
    assert server.max_in_flight == 3  # reached, never exceeded
    # Rate: the 8th request cannot start before 7 intervals have passed (timed on the client, which is
    # what the limiter controls; server arrival times jitter under load).
    with ScriptedServer(lambda n, p, b: (200, completion_payload("ok"), 0)) as server:
        assert run(go(server.url, max_concurrency=8, requests_per_second=10)) >= 7 / 10
    assert len(server.requests) == 8


# --- failure accounting through the pipeline ---------------------------------------------------------------


def toy_records() -> list[LatentRecord]:
    records = []
    for latent in range(3):
        top = [Example([0, 1, 2 + i, 3], [0.0, 1.0 + i, 0.0, 0.0]) for i in range(4)]
        negatives = [Example([5, 6, 7 + i], [0.0, 0.0, 0.0]) for i in range(4)]
        records.append(LatentRecord(latent, 40, 1000, 4.0, top=top, negatives=negatives))
    records.append(LatentRecord(3, 1, 1000, 0.5, top=[Example([1], [0.5])], too_few_activations=True))
    return records


def test_pipeline_counts_every_failure_and_pairs_controls():
    """Latent 0's explanation fails to parse; detection answers cycle through 1, 0 and garbage; every
    failure shows up per latent and in the summary, and latent 3 is reported with too few activations."""

    # Latent 0 is the only one whose examples mark 'dog'; the scripted explainer answers it with blanks.
    records = toy_records()
    records[0].top = [Example([0, 5, 1, 3], [0.0, 2.0, 0.0, 0.0])]

    def reply_by_tokens(n, path, body):
        prompt = body["prompt"]
        if prompt.endswith(EXPLANATION_PREFIX):
            return (
                200,
                completion_payload("   " if "<<dog>>" in prompt.split("\n\n")[-1] else " short words"),
                0,
            )
        return 200, completion_payload([" 1", " 0", " maybe"][n % 3], {" 1": -0.5, " 0": -1.0}), 0

    config = AutointerpConfig(scorers=("detection",), scorer=ScorerConfig(n_positive=3, n_negative=3))

    async def go(url):
        async with OpenAIClient(url, max_concurrency=4) as client:
            return await interpret(client, records, token_strings, config)

    with ScriptedServer(reply_by_tokens) as server:
        results, summary = run(go(server.url))
    by_latent = {r.latent: r for r in results}
    assert by_latent[0].explanation is None and by_latent[0].explanation_failure == "parse"
    assert by_latent[3].explanation_failure == "too_few_activations" and by_latent[3].fire_count == 1
    assert (
        summary["explanation_failures"] == {"parse": 1, "too_few_activations": 1}
        and summary["explained"] == 2
    )
    assert summary["explanations_copying_a_demonstration"] == 0
    for latent in (1, 2):
        for slot in ("scores", "control_scores"):
            score = getattr(by_latent[latent], slot)["detection"]
            assert score["n_scored"] + score["parse_failures"] + score["errors"] == score["n_examples"] == 6
    assert by_latent[1].control_from_latent == 2 and by_latent[2].control_from_latent == 1
    detection = summary["scorers"]["detection"]
    per_latent = sum(
        getattr(by_latent[latent], s)["detection"]["parse_failures"]
        for latent in (1, 2)
        for s in ("scores", "control_scores")
    )
    assert detection["parse_failures"] == per_latent > 0 and detection["examples_asked"] == 24
    assert "real − control" in summary_table(summary)


def test_pair_controls_is_a_derangement():
    from sae.analysis.autointerp.explainer import Explanation

    explanations = [Explanation(i, f"e{i}") for i in range(7)] + [Explanation(7, None, "parse")]
    controls = pair_controls(explanations, seed=3)
    assert sorted(controls) == list(range(7)) and all(controls[i].latent != i for i in controls)
    assert sorted(c.latent for c in controls.values()) == list(range(7))


def test_request_errors_are_counted_not_dropped():
    record = toy_records()[1]

    async def go(url):
        async with OpenAIClient(url, max_retries=0) as client:
            return await detection_score(
                client, "anything", record, token_strings, ScorerConfig(n_positive=2, n_negative=2)
            )

    with ScriptedServer(
        lambda n, p, b: (
            (500, {}, 0) if n % 2 else (200, completion_payload(" 1", {" 1": -0.1, " 0": -3.0}), 0)
        )
    ) as server:
        score = run(go(server.url))
    assert (
        score.errors == 2 and score.n_scored == 2 and score.n_examples == 4 and score.n_with_probability == 2
    )


# --- the command, end to end on a tiny model's cache, against the scripted server -----------------


def test_command_writes_one_line_per_latent_and_a_summary(tiny_lm, tiny_lm_dir, tmp_path):
    """`sae-analyze autointerp` on a real (tiny) cache: every requested latent gets a line, including
    latents that never fire; the dashboard can read explanations.jsonl."""
    from tiny_lm import tiny_run_config

    from cache import build_cache
    from sae import SAEConfig, SparseAutoencoder
    from sae.analysis.dashboard import read_explanations
    from sae.cli.analyze import main

    run_config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"tokens": 1000, "dtype": "float32"})
    cache_dir = build_cache(run_config, tiny_lm)
    sae_config = SAEConfig(
        architecture="topk",
        d_in=32,
        d_sae=48,
        k=4,
        hookpoint="blocks.1.hook_resid_post",
        model_name=str(tiny_lm_dir),
    )
    sae_dir = SparseAutoencoder.from_config(sae_config, seed=2).save(tmp_path / "sae")

    def reply(n, path, body):
        if body["prompt"].endswith(EXPLANATION_PREFIX):
            return 200, completion_payload(" code tokens"), 0
        return 200, completion_payload(" 1" if n % 2 else " 0", {" 1": -0.7, " 0": -0.7}), 0

    out = tmp_path / "autointerp"
    with ScriptedServer(reply) as server:
        status = main(
            [
                "autointerp",
                str(sae_dir),
                "--cache",
                str(cache_dir),
                "--out",
                str(out),
                "--latents",
                "0:6,40-41",
                "--scorers",
                "detection",
                "--backend",
                "http",
                "--base-url",
                server.url,
                "--n-score",
                "3",
                "--min-examples",
                "2",
            ]
        )
    assert status == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(line["latent"] for line in lines) == [0, 1, 2, 3, 4, 5, 40, 41]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["latents"] == 8 and summary["explained"] + sum(summary["explanation_failures"].values()) == 8
    )
    explained = [line for line in lines if line["explanation"] is not None]
    assert explained and all(line["scores"]["detection"]["n_examples"] > 0 for line in explained)
    assert set(read_explanations(out / "explanations.jsonl")) == {0, 1, 2, 3, 4, 5, 40, 41}


def test_embedding_scorer_ranks_examples_by_the_explanation():
    """all-MiniLM-L6-v2 (real weights): a latent on animal sentences, negatives about money. The right
    explanation ranks every activating example above the negatives; the wrong one does not. Whole sentences
    are embedded (a cut at a random position could leave a negative with only 'the')."""
    from sae.analysis.autointerp.scorers import EmbeddingScorer, minilm_embedder

    words = [
        "the",
        "dog",
        "barked",
        "at",
        "cat",
        "horse",
        "ran",
        "across",
        "field",
        "bird",
        "sang",
        "in",
        "tree",
        "bank",
        "raised",
        "interest",
        "rates",
        "stock",
        "prices",
        "fell",
        "loan",
        "was",
        "repaid",
        "taxes",
    ]
    vocab = {w: i for i, w in enumerate(words)}

    def example(sentence: str, firing: str | None) -> Example:
        ids = [vocab[w] for w in sentence.split()]
        return Example(ids, [1.0 if words[i] == firing else 0.0 for i in ids])

    animals = [
        "the dog barked at the cat",
        "the horse ran across the field",
        "the bird sang in the tree",
        "the cat ran in the field",
    ]
    money = [
        "the bank raised interest rates",
        "stock prices fell",
        "the loan was repaid",
        "taxes raised the rates",
    ]
    record = LatentRecord(
        0,
        50,
        1000,
        1.0,
        top=[example(s, s.split()[1]) for s in animals],
        negatives=[example(s, None) for s in money],
    )
    scorer = EmbeddingScorer(
        minilm_embedder(), lambda ids: [" " + words[i] for i in ids], ScorerConfig(embedding_window=None)
    )
    right, wrong = scorer.score("animals", record), scorer.score("finance and money", record)
    assert right.n_examples == 8 and right.metrics["auroc"] == 1.0
    assert wrong.metrics["auroc"] == 0.0


def test_embedding_scorer_embeds_the_text_around_each_peak():
    """With a window of 1 token before and 0 after, an activating example is embedded as the two tokens ending
    at its peak, a negative as at most two tokens ending at some position; `None` embeds whole windows."""
    from sae.analysis.autointerp.scorers import EmbeddingScorer, crop_example

    assert crop_example(Example([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]), 0, 2, 1).tokens == [1, 2]
    embedded: list[str] = []

    def embed(texts: list[str]) -> torch.Tensor:
        embedded.extend(texts)
        return torch.ones(len(texts), 2)

    record = LatentRecord(
        0,
        50,
        1000,
        1.0,
        top=[Example([2, 3, 1, 4, 5], [0.0, 0.0, 2.0, 0.5, 0.0])],
        negatives=[Example([6, 7, 8, 9], [0.0] * 4)],
    )
    EmbeddingScorer(embed, token_strings, ScorerConfig(embedding_window=(1, 0))).score("cats", record)
    positive, negative = embedded[0], embedded[1]
    assert positive == "".join(token_strings([3, 1]))
    assert 1 <= len(negative.split()) <= 2 and negative in "".join(token_strings([6, 7, 8, 9]))
    embedded.clear()
    EmbeddingScorer(embed, token_strings, ScorerConfig(embedding_window=None)).score("cats", record)
    assert embedded[:2] == ["".join(token_strings([2, 3, 1, 4, 5])), "".join(token_strings([6, 7, 8, 9]))]


def test_answer_is_read_after_a_separate_space_token():
    """Gemma writes ' 1' as ' ' then '1': the answer and its probability come from the first non-space
    token."""
    from sae.analysis.autointerp.clients import Completion, TokenLogprob
    from sae.analysis.autointerp.scorers import parse_answer

    logprobs = [
        TokenLogprob(" ", -0.01, {" ": -0.01}),
        TokenLogprob("0", -0.3, {"0": -0.3, "1": -1.4, "yes": -3.0}),
    ]
    answer, probability = parse_answer(Completion(" 0", logprobs, 10, 2, "stop", 0.1))
    assert answer == 0 and probability == pytest.approx(math.exp(-1.4) / (math.exp(-1.4) + math.exp(-0.3)))
    assert parse_answer(Completion(" 10", None, 10, 2, "stop", 0.1)) == (None, None)
    assert parse_answer(
        Completion("yes", [TokenLogprob("yes", -0.1, {"yes": -0.1, "1": -4.0})], 10, 1, "stop", 0.1)
    ) == (None, None)
