"""`sae-analyze autointerp SAE --cache CACHE --latents 0:200 --out OUT`: explain latents with an LLM and
score the explanations against a shuffled control.

Writes into OUT: results.jsonl (one line per latent, every failure counted), summary.json and summary.md
(real vs shuffled-control explanations on every scorer, throughput), explanations.jsonl (the dashboard's
format: `sae-analyze dashboard --explanations OUT/explanations.jsonl`), options.json (how it was made).

LLM backends: `in-process` (default; Gemma 3 270M GGUF through llama-cpp-python, with our own greedy
decoding and top-k logprobs: llama-cpp-python's own logprobs sort the 262k vocabulary in Python, 0.4 s
per token, which makes the echoed prompts of the simulation and intervention scorers take minutes each),
`local-server` (the same model under llama-cpp-python's OpenAI-compatible server on loopback, started and
stopped here), `http` (any OpenAI-compatible server: --base-url, --llm-model, API key from the environment
variable named by --api-key-env).

Scorers: detection, fuzzing, simulation (LLM), embedding (MiniLM), intervention (steers the subject model,
loaded from the SAE's cfg.model_name, then asks the LLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from sae.analysis.autointerp.clients import LlamaCppClient, OpenAIClient
from sae.analysis.autointerp.explainer import ExplainerConfig
from sae.analysis.autointerp.pipeline import (
    SCORERS,
    AutointerpConfig,
    LatentResult,
    interpret,
    summary_table,
    write_reports,
)
from sae.analysis.autointerp.prompts import token_strings_from_tokenizer
from sae.analysis.autointerp.records import RecordConfig, collect_records
from sae.analysis.autointerp.scorers import EmbeddingScorer, ScorerConfig, minilm_embedder
from sae.analysis.autointerp.simulation import SimulationConfig
from sae.cli.common import Subcommand, parse_latents
from sae.typed_config import option


@dataclass
class AutointerpOptions:
    sae: str = option(help="SAE directory or file (ours or a supported foreign format)", positional=True)
    cache: str = option(help="activation cache to read examples from (streamed; token ids come from it)")
    out: str = option(help="output directory")
    latents: str = option("0:200", help="latents to explain, e.g. 0:200 or 3,7,10-12")
    tokens: int | None = option(None, help="read at most this many tokens of the cache (default: all)")
    scorers: str = option(",".join(SCORERS), help="comma-separated scorers")
    backend: Literal["in-process", "local-server", "http"] = option("in-process", help="the LLM")
    base_url: str | None = option(None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (http)")
    llm_model: str = option("local", help="model name sent to the server")
    api_key_env: str | None = option(None, help="name of the environment variable that holds the API key")
    concurrency: int = option(4, help="requests in flight at most")
    requests_per_second: float | None = option(None, help="rate limit (default: none)")
    timeout: float = option(120.0, help="seconds per request")
    use_chat: bool = option(False, help="use the chat endpoint (instruction-tuned models)")
    show_values: bool = option(False, help="show activation values 0-10 to the explainer")
    n_examples: int = option(20, help="examples shown to the explainer")
    n_score: int = option(10, help="activating (and as many non-activating) examples per LLM scorer")
    n_simulation: int = option(4, help="activating (and non-activating) examples simulated, one request each")
    n_embedding: int = option(20, help="activating (and non-activating) examples for the embedding scorer")
    embedding_window: str = option(
        "6,1", help='tokens "BEFORE,AFTER" each peak that the embedding scorer embeds, or "full"'
    )
    neighbour_negatives: int = option(
        0, help="of the negatives kept per latent, how many from its nearest latents by decoder cosine"
    )
    target_kl: float = option(0.5, help="intervention scorer: steering calibrated to this next-token KL")
    min_examples: int = option(10, help="latents firing fewer times are reported, not explained")
    no_control: bool = option(False, help="skip the shuffled-explanation control")
    model: str | None = option(None, help="tokenizer's model name or directory (default: the SAE's)")
    device: str = option("cpu", help="torch device")
    seed: int = option(0, help="seed of every draw")


def parse_window(spec: str) -> tuple[int, int] | None:
    """'6,1' -> (6, 1); 'full' -> None."""
    if spec == "full":
        return None
    try:
        before, after = (int(part) for part in spec.split(","))
    except ValueError:
        raise ValueError(
            f'--embedding-window {spec!r}: expected "BEFORE,AFTER" (e.g. "6,1") or "full"'
        ) from None
    if before < 0 or after < 0:
        raise ValueError(f"--embedding-window {spec!r}: token counts must be >= 0")
    return before, after


def run_autointerp(opts: AutointerpOptions) -> int:
    results, summary = asyncio.run(autointerp_from_cache(opts))
    print(summary_table(summary))
    print(f"{len(results)} latents: {Path(opts.out) / 'results.jsonl'}")
    return 0


async def autointerp_from_cache(opts: AutointerpOptions) -> tuple[list[LatentResult], dict]:
    """The whole command from Python: records from the cache, then explain and score with the chosen
    backend."""
    import torch
    from transformers import AutoTokenizer

    import sae as sae_lib
    from sae.analysis.features import cache_batches
    from sae.lm import resolve_model_path

    scorers = tuple(s.strip() for s in opts.scorers.split(",") if s.strip())
    config = AutointerpConfig(
        explainer=ExplainerConfig(
            n_examples=opts.n_examples, show_values=opts.show_values, use_chat=opts.use_chat, seed=opts.seed
        ),
        scorer=ScorerConfig(
            n_positive=opts.n_score,
            n_negative=opts.n_score,
            use_chat=opts.use_chat,
            seed=opts.seed,
            n_embedding=opts.n_embedding,
            embedding_window=parse_window(opts.embedding_window),
        ),
        simulation=SimulationConfig(
            n_positive=opts.n_simulation, n_negative=opts.n_simulation, seed=opts.seed
        ),
        scorers=scorers,
        control=not opts.no_control,
        seed=opts.seed,
    )
    model = sae_lib.load(opts.sae, device=opts.device).eval()
    model_name = opts.model or model.cfg.model_name
    if model_name is None:
        raise ValueError(f"{opts.sae}: the SAE's config names no model; pass --model for the tokenizer")
    token_strings = token_strings_from_tokenizer(
        AutoTokenizer.from_pretrained(resolve_model_path(model_name))
    )
    latents = torch.tensor(parse_latents(opts.latents))
    if latents.max() >= model.cfg.d_sae:
        raise ValueError(f"--latents {opts.latents}: latent {int(latents.max())} >= d_sae {model.cfg.d_sae}")
    n_negatives = max(2 * opts.n_score, 2 * opts.n_simulation, opts.n_embedding)
    records = collect_records(
        model.encode,
        model.cfg.d_sae,
        cache_batches(opts.cache, model, max_tokens=opts.tokens),
        latents,
        RecordConfig(
            n_negatives=n_negatives,
            neighbour_negatives=opts.neighbour_negatives,
            min_examples=opts.min_examples,
            seed=opts.seed,
        ),
        decoder=model.W_dec,
    )
    embedding = (
        EmbeddingScorer(minilm_embedder(), token_strings, config.scorer) if "embedding" in scorers else None
    )
    intervention = None
    if "intervention" in scorers:
        from sae.analysis.autointerp.intervention import InterventionConfig, InterventionScorer
        from sae.lm import load_model

        if model.cfg.hookpoint is None:
            raise ValueError(
                f"{opts.sae}: the SAE's config names no hookpoint; the intervention scorer cannot steer"
            )
        subject = load_model(model_name, "float32", opts.device)
        intervention = InterventionScorer(subject, model, InterventionConfig(target_kl=opts.target_kl))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)  # the local server's log goes here before any result does
    async with llm_client(opts) as client:
        results, summary = await interpret(
            client,
            records,
            token_strings,
            config,
            embedding,
            out / "results.jsonl",
            intervention,
            run_settings=result_settings(opts),
        )
    write_reports(out, results, summary, asdict(opts))
    return results, summary


@contextlib.asynccontextmanager
async def llm_client(opts: AutointerpOptions):
    if opts.backend == "http":
        if not opts.base_url:
            raise ValueError("--backend http needs --base-url")
        api_key = None
        if opts.api_key_env:
            api_key = os.environ.get(opts.api_key_env)
            if not api_key:
                raise ValueError(f"--api-key-env {opts.api_key_env}: that environment variable is not set")
        async with OpenAIClient(
            opts.base_url, opts.llm_model, api_key, opts.concurrency, opts.requests_per_second, opts.timeout
        ) as client:
            yield client
    elif opts.backend == "local-server":
        from sae.analysis.autointerp.local_server import LlamaServer, default_gguf_path

        with LlamaServer(default_gguf_path(), log_path=Path(opts.out) / "llama_server.log") as server:
            async with OpenAIClient(
                server.base_url,
                server.model_alias,
                None,
                opts.concurrency,
                opts.requests_per_second,
                opts.timeout,
            ) as client:
                yield client
    elif opts.backend == "in-process":
        from sae.analysis.autointerp.local_server import default_gguf_path

        yield LlamaCppClient(str(default_gguf_path()))
    else:
        raise AssertionError(f"unknown backend {opts.backend!r}")  # AutointerpOptions.backend allows no other


def result_settings(opts: AutointerpOptions) -> dict:
    """The options the results depend on (a killed run resumes only with the same ones); how requests are
    made (concurrency, rate, timeout, device) may change between the two."""
    operational = {"out", "concurrency", "requests_per_second", "timeout", "device"}
    return {k: v for k, v in asdict(opts).items() if k not in operational}


SUBCOMMAND = Subcommand(AutointerpOptions, run_autointerp, "explain and score latents with an LLM")
