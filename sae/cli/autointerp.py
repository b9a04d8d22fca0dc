"""`python analyze.py autointerp SAE_DIR --cache CACHE_DIR --latents 0:200 --out OUT`, and the same from Python.

Writes into OUT: results.jsonl (one line per latent, every failure counted), summary.json and summary.md
(real vs shuffled-control explanations on every scorer, throughput), explanations.jsonl (the dashboard's
format: `analyze.py dashboard --explanations OUT/explanations.jsonl`), options.json (how it was made).

LLM backends: `in-process` (default; Gemma 3 270M GGUF through llama-cpp-python, with our own greedy decoding
and top-k logprobs: llama-cpp-python's own logprobs sort the 262k vocabulary in Python, 0.4 s per token,
which makes the echoed prompts of the simulation and intervention scorers take minutes each), `local-server`
(the same model under llama-cpp-python's OpenAI-compatible server on loopback, started and stopped here),
`http` (any OpenAI-compatible server: --base-url, --llm-model, API key from the env var --api-key-env).

Scorers: detection, fuzzing, simulation (LLM), embedding (MiniLM), intervention (steers the subject model,
which is loaded from the SAE's cfg.model_name, then asks the LLM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from sae.analysis.autointerp.clients import LlamaCppClient, OpenAIClient
from sae.analysis.autointerp.explainer import ExplainerConfig
from sae.analysis.autointerp.pipeline import SCORERS, AutointerpConfig, LatentResult, interpret, summary_table
from sae.analysis.autointerp.prompts import token_strings_from_tokenizer
from sae.analysis.autointerp.records import RecordConfig, collect_records
from sae.analysis.autointerp.scorers import EmbeddingScorer, ScorerConfig, minilm_embedder
from sae.analysis.autointerp.simulation import SimulationConfig

BACKENDS = ("in-process", "local-server", "http")


@dataclass
class AutointerpOptions:
    sae: str
    cache: str
    out: str
    latents: str = "0:200"
    tokens: int | None = None  # read at most this many tokens of the cache (default: all of it, streamed)
    scorers: str = ",".join(SCORERS)
    backend: str = "in-process"
    base_url: str | None = None
    llm_model: str = "local"
    api_key_env: str | None = None
    concurrency: int = 4
    requests_per_second: float | None = None
    timeout: float = 120.0
    use_chat: bool = False
    show_values: bool = False
    n_examples: int = 20
    n_score: int = 10  # activating and as many non-activating examples per scorer
    n_simulation: int = 4  # activating and as many non-activating examples simulated (one request each)
    n_embedding: int = 20  # activating and as many non-activating examples for the embedding scorer (no LLM)
    embedding_window: str = (
        "6,1"  # tokens before,after each example's peak that the embedding scorer embeds; "full"
    )
    neighbour_negatives: int = (
        0  # of the 2 * n_score negatives kept per latent, how many from decoder neighbours
    )
    target_kl: float = 0.5  # intervention scorer: steering strength calibrated to this next-token KL
    min_examples: int = 10
    no_control: bool = False
    model: str | None = None  # tokenizer source (default: the SAE's cfg.model_name)
    device: str = "cpu"
    seed: int = 0


def parse_latent_spec(spec: str) -> list[int]:
    """'0:200' (start:stop, stop excluded), '3,7,10-12' (ranges inclusive) or a mix; each latent once."""
    latents: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                start, stop = part.split(":")
                latents.extend(range(int(start), int(stop)))
            elif "-" in part.lstrip("-"):
                low, high = part.split("-")
                latents.extend(range(int(low), int(high) + 1))
            else:
                latents.append(int(part))
        except ValueError:
            raise ValueError(f"--latents {spec!r}: expected e.g. 0:200, 3,7,10-12") from None
    if not latents:
        raise ValueError(f"--latents {spec!r} selects no latents")
    return list(dict.fromkeys(latents))


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


def add_autointerp_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = AutointerpOptions("", "", "")
    parser.add_argument("sae", help="SAE directory (ours or a supported foreign format)")
    parser.add_argument("--cache", required=True, help="activation cache (streamed; token ids come from it)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--latents", default=defaults.latents, help="e.g. 0:200 or 3,7,10-12 (default %(default)s)"
    )
    parser.add_argument("--tokens", type=int, help="read at most this many cache tokens (default: all)")
    parser.add_argument("--scorers", default=defaults.scorers, help="comma-separated: " + ", ".join(SCORERS))
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend)
    parser.add_argument(
        "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (backend http)"
    )
    parser.add_argument("--llm-model", default=defaults.llm_model, help="model name sent to the server")
    parser.add_argument("--api-key-env", help="name of the environment variable that holds the API key")
    parser.add_argument(
        "--concurrency", type=int, default=defaults.concurrency, help="requests in flight at most"
    )
    parser.add_argument("--requests-per-second", type=float, help="rate limit (default: none)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request")
    parser.add_argument("--use-chat", action="store_true", help="chat endpoint (instruction-tuned models)")
    parser.add_argument(
        "--show-values", action="store_true", help="show activation values 0-10 to the explainer"
    )
    parser.add_argument(
        "--n-examples", type=int, default=defaults.n_examples, help="examples shown to the explainer"
    )
    parser.add_argument(
        "--n-score",
        type=int,
        default=defaults.n_score,
        help="activating (and non-activating) examples per scorer",
    )
    parser.add_argument(
        "--n-simulation",
        type=int,
        default=defaults.n_simulation,
        help="activating (and non-activating) examples per latent for the simulation scorer",
    )
    parser.add_argument(
        "--n-embedding",
        type=int,
        default=defaults.n_embedding,
        help="activating (and non-activating) examples for the embedding scorer",
    )
    parser.add_argument(
        "--embedding-window",
        default=defaults.embedding_window,
        help='tokens "BEFORE,AFTER" the peak embedded by the embedding scorer, or "full" (default %(default)s)',
    )
    parser.add_argument(
        "--neighbour-negatives",
        type=int,
        default=defaults.neighbour_negatives,
        help="hard negatives per latent from its nearest latents by decoder cosine (default none)",
    )
    parser.add_argument(
        "--target-kl",
        type=float,
        default=defaults.target_kl,
        help="intervention scorer: next-token KL the steering strength is calibrated to",
    )
    parser.add_argument(
        "--min-examples",
        type=int,
        default=defaults.min_examples,
        help="fewer firings: reported, not explained",
    )
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-explanation control")
    parser.add_argument(
        "--model", help="tokenizer's model name or directory (default: the SAE's cfg.model_name)"
    )
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run_autointerp(args: argparse.Namespace) -> int:
    from sae.config import from_dict

    fields = AutointerpOptions.__dataclass_fields__
    opts = from_dict(
        AutointerpOptions, {k: v for k, v in vars(args).items() if k in fields}, "analyze.py autointerp"
    )
    results, summary = asyncio.run(autointerp_from_cache(opts))
    print(summary_table(summary))
    print(f"{len(results)} latents: {Path(opts.out) / 'results.jsonl'}")
    return 0


async def autointerp_from_cache(opts: AutointerpOptions) -> tuple[list[LatentResult], dict]:
    """The whole command from Python: records from the cache, then explain and score with the chosen backend."""
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
    latents = torch.tensor(parse_latent_spec(opts.latents))
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
        raise ValueError(f"--backend {opts.backend!r} is not one of {', '.join(BACKENDS)}")


def result_settings(opts: AutointerpOptions) -> dict:
    """The options the results depend on (a killed run resumes only with the same ones); how requests are
    made (concurrency, rate, timeout, device) may change between the two."""
    operational = {"out", "concurrency", "requests_per_second", "timeout", "device"}
    return {k: v for k, v in asdict(opts).items() if k not in operational}


def write_reports(out: Path, results: list[LatentResult], summary: dict, options: dict) -> None:
    from sae.io import atomic_write_json, atomic_write_text

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
