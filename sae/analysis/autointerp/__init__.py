"""Automated interpretation of SAE latents (after Paulo et al. 2024, EleutherAI delphi; Bills et al. 2023).

Stages, each usable alone from Python:
    records.collect_records     stream a cache once -> per latent: top, quantile and negative examples
    explainer.explain           few-shot prompt with <<marked>> tokens -> a short explanation
                                (or a counted failure)
    scorers.*                   detection, fuzzing (LLM) and embedding (MiniLM) scores with failure counts
    simulation.simulation_score per-token activations predicted from the LLM's digit logprobs, correlated
    intervention.InterventionScorer  steer the latent to a target KL, compare the explanation's likelihood
                                after clean vs steered completions
    pipeline.interpret          explain all, pair shuffled controls, score all, summarise
LLM access goes through `clients.Client` (async `complete` and `chat`): `OpenAIClient` for any
OpenAI-compatible server, `LlamaCppClient` for a GGUF in process.
"""

from sae.analysis.autointerp.clients import (
    Client,
    Completion,
    LlamaCppClient,
    OpenAIClient,
    RequestFailed,
    TokenLogprob,
)
from sae.analysis.autointerp.explainer import ExplainerConfig, Explanation, explain
from sae.analysis.autointerp.pipeline import AutointerpConfig, LatentResult, interpret, summary_table
from sae.analysis.autointerp.records import Example, LatentRecord, RecordConfig, collect_records
from sae.analysis.autointerp.scorers import (
    EmbeddingScorer,
    Score,
    ScorerConfig,
    detection_score,
    fuzzing_score,
)
from sae.analysis.autointerp.simulation import SimulationConfig, simulation_score

__all__ = [
    "AutointerpConfig",
    "Client",
    "Completion",
    "EmbeddingScorer",
    "Example",
    "ExplainerConfig",
    "Explanation",
    "LatentRecord",
    "LatentResult",
    "LlamaCppClient",
    "OpenAIClient",
    "RecordConfig",
    "RequestFailed",
    "Score",
    "ScorerConfig",
    "SimulationConfig",
    "TokenLogprob",
    "collect_records",
    "detection_score",
    "explain",
    "fuzzing_score",
    "interpret",
    "simulation_score",
    "summary_table",
]
