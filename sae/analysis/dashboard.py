"""A static HTML dashboard of SAE latents that needs no server (in the spirit of sae_vis, SAEDashboard and
Neuronpedia).

Layout of the output directory:

    index.html  latent.html  dashboard.js  style.css   the pages (copied from dashboard_assets/)
    index_data.js         one row per latent: density, max, explanation, top tokens; search and sort
    data/chunk_NNNNN.js   full records of `chunk_size` latents each, loaded by latent.html#<id> on demand
    dashboard.json        how it was made (SAE, model, hookpoint, tokens, source)

Data files are scripts (`SAE_DASHBOARD.chunk(n, {...})`), not JSON, because pages opened from file://
may load scripts but not fetch() files. Thousands of latents make many small chunks, not one giant file.

Per-latent explanations and scores (from auto-interpretation, or written by hand) are read from a
JSON-lines file, one object per line:

    {"latent": 12, "explanation": "Python decorators", "scores": {"detection": 0.81, "fuzzing": 0.74}}

`latent` is required; `explanation` (string or null) and `scores` (name -> number) are optional. The
index page has a sortable column for the first score name in the file; latent pages show all scores.
`analyze.py autointerp` writes this file. Steering examples are the JSON files `analyze.py steer` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from sae.analysis.features import PAD_TOKEN, LatentStatistics, Unembedding, histogram_bin_edges
from sae.io import atomic_write_bytes, atomic_write_json, atomic_write_text

ASSETS = Path(__file__).parent / "dashboard_assets"
ASSET_FILES = ("index.html", "latent.html", "dashboard.js", "style.css")
INDEX_COLUMNS = ("latent", "density", "max", "mean", "score", "explanation", "tokens", "logits", "chunk")


@dataclass
class Explanation:
    explanation: str | None = None
    scores: dict[str, float] = field(default_factory=dict)


def read_explanations(path: str | Path) -> dict[int, Explanation]:
    """Read the JSON-lines explanations file (format in the module docstring), strictly."""
    path = Path(path)
    explanations: dict[int, Explanation] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get("latent"), int):
            raise ValueError(f'{where}: expected an object with an integer "latent"')
        unknown = sorted(set(record) - {"latent", "explanation", "scores"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(unknown)}; valid: latent, explanation, scores"
            )
        text, scores = record.get("explanation"), record.get("scores", {})
        if text is not None and not isinstance(text, str):
            raise ValueError(f'{where}: "explanation" must be a string')
        if not isinstance(scores, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
        ):
            raise ValueError(f'{where}: "scores" must map names to numbers')
        if record["latent"] in explanations:
            raise ValueError(f"{where}: latent {record['latent']} is explained twice")
        explanations[record["latent"]] = Explanation(text, {k: float(v) for k, v in scores.items()})
    return explanations


def read_steering_examples(paths: list[str | Path]) -> dict[int, list[dict]]:
    """Steering comparisons (files written by `analyze.py steer`), grouped by latent; a comparison that
    steered several latents together is shown on each of their pages."""
    by_latent: dict[int, list[dict]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("comparisons"), list):
            raise ValueError(
                f'{path}: expected the output of analyze.py steer (an object with "comparisons")'
            )
        for number, comparison in enumerate(data["comparisons"]):
            latents = comparison.get("latents") or [comparison.get("latent")]  # several when steered together
            if not all(isinstance(latent, int) for latent in latents):
                raise ValueError(f"{path}: comparison {number} names no integer latent")
            for latent in latents:
                by_latent.setdefault(latent, []).append(comparison)
    return by_latent


def logit_effects(
    W_dec_rows: Tensor, unembedding: Unembedding, n: int = 10, batch: int = 64
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decoder directions [L, d] through the final norm and unembedding: top and bottom n (values, ids)
    [L, n]."""
    results = [[], [], [], []]
    for start in tqdm(range(0, len(W_dec_rows), batch), desc="logit effects", unit="batch", leave=False):
        logits = unembedding.logits(W_dec_rows[start : start + batch])  # [batch, vocab]
        top, bottom = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
        for out, part in zip(results, (top.values, top.indices, bottom.values, bottom.indices)):
            out.append(part.cpu() if part.dtype == torch.long else part.float().cpu())
    return tuple(torch.cat(parts) for parts in results)


class _Strings:
    """Token strings of one chunk, each stored once; examples refer to them by number."""

    def __init__(self, tokenizer):
        self.tokenizer, self.numbers, self.strings = tokenizer, {}, []

    def __call__(self, token: int) -> int:
        if token == PAD_TOKEN:
            return -1
        if token not in self.numbers:
            self.numbers[token] = len(self.strings)
            self.strings.append(self.tokenizer.decode([token]))
        return self.numbers[token]


def _example(value: float, tokens: list[int], acts: list[float], center: int, strings: _Strings) -> list:
    return [round(value, 4), [strings(t) for t in tokens], [round(a, 3) for a in acts], center]


def _histogram(counts: Tensor, edges: Tensor) -> dict:
    """The non-empty span of a latent's log-binned histogram."""
    filled = counts.nonzero()
    if len(filled) == 0:
        return {"counts": [], "edges": []}
    first, last = filled.min().item(), filled.max().item()
    return {
        "counts": counts[first : last + 1].tolist(),
        "edges": [round(e, 5) for e in edges[first : last + 2].tolist()],
    }


def write_dashboard(
    out_dir: str | Path,
    sae,
    stats: LatentStatistics,
    tokenizer,
    unembedding: Unembedding | None = None,
    explanations: dict[int, Explanation] | None = None,
    steering: dict[int, list[dict]] | None = None,
    source: str = "",
    model_name: str | None = None,
    chunk_size: int = 64,
    title: str | None = None,
) -> Path:
    """Write the dashboard of the latents tracked by `stats` into `out_dir`; returns the index.html path.

    `unembedding`: the model's final norm and W_U, for logit effects (None: the hookpoint is not in the
    residual stream, and the pages say so).
    """
    out_dir = Path(out_dir)
    explanations, steering = explanations or {}, steering or {}
    latents = stats.latents.tolist()
    if unembedding is not None and unembedding.W_U.shape[0] != sae.cfg.d_in:
        raise ValueError(
            f"W_U has {unembedding.W_U.shape[0]} rows but the SAE's d_in is {sae.cfg.d_in}: "
            "not a residual-stream SAE"
        )
    logits = (
        logit_effects(sae.W_dec.detach()[stats.latents], unembedding) if unembedding is not None else None
    )

    # The index sorts by one score: the first one the explanations file names (all scores are on latent
    # pages).
    score_name = next((name for e in explanations.values() for name in e.scores), None)
    rows = []  # the index: one row per latent, INDEX_COLUMNS
    for chunk_start in tqdm(range(0, len(latents), chunk_size), desc="dashboard chunks", unit="chunk"):
        chunk = chunk_start // chunk_size
        strings, records = _Strings(tokenizer), {}
        for i in range(chunk_start, min(chunk_start + chunk_size, len(latents))):
            latent, explained = latents[i], explanations.get(latents[i], Explanation())
            records[latent] = _latent_record(
                stats, i, strings, tokenizer, logits, explained, steering.get(latent, [])
            )
            rows.append(_index_row(stats, i, records[latent], tokenizer, explained, chunk, score_name))
        _write_script(
            out_dir / "data" / f"chunk_{chunk:05d}.js",
            f"SAE_DASHBOARD.chunk({chunk}, ",
            {"latents": records, "strings": strings.strings},
        )

    meta = {
        "title": title or f"SAE latents: {sae.cfg.hookpoint}",
        "d_sae": sae.cfg.d_sae,
        "hookpoint": sae.cfg.hookpoint,
        "model": model_name or sae.cfg.model_name,
        "tokens": stats.tokens_seen,
        "source": source,
        "chunk_size": chunk_size,
        "score_name": score_name,
        "logit_effects": "decoder direction through the final norm's gain and W_U"
        if logits is not None
        else "not computed (not a residual-stream SAE)",
    }
    _write_script(
        out_dir / "index_data.js",
        "SAE_DASHBOARD.index(",
        {"meta": meta, "columns": list(INDEX_COLUMNS), "rows": rows},
    )
    for name in ASSET_FILES:
        atomic_write_bytes(out_dir / name, (ASSETS / name).read_bytes())
    atomic_write_json(
        out_dir / "dashboard.json", {**meta, "latents": len(latents), "sae_cfg": sae.cfg.__dict__}
    )
    return out_dir / "index.html"


def _latent_record(
    stats: LatentStatistics,
    i: int,
    strings: _Strings,
    tokenizer,
    logits,
    explained: Explanation,
    steering: list[dict],
) -> dict:
    """Everything latent.html shows about tracked latent number i."""
    fires = stats.fire_count[i].item()
    decode = lambda ids: [tokenizer.decode([t]) for t in ids.tolist()]  # noqa: E731
    example = lambda v, t, a: _example(v, t, a, stats.center, strings)  # noqa: E731
    return {
        "density": fires / max(stats.tokens_seen, 1),
        "max": stats.max_activation[i].item(),
        "mean_firing": stats.act_sum[i].item() / max(fires, 1),
        "histogram": _histogram(stats.histogram[i], histogram_bin_edges()),
        "top": [example(*e) for e in stats.examples(i, "top")],
        "quantiles": [
            {**q, "examples": [example(*e) for e in q["examples"]]} for q in stats.quantile_examples(i)
        ],
        "explanation": explained.explanation,
        "scores": explained.scores or None,
        "steering": steering,
        "logits": None
        if logits is None
        else {
            "top": list(zip(decode(logits[1][i]), [round(v, 3) for v in logits[0][i].tolist()])),
            "bottom": list(zip(decode(logits[3][i]), [round(v, 3) for v in logits[2][i].tolist()])),
        },
    }


def _index_row(
    stats: LatentStatistics,
    i: int,
    record: dict,
    tokenizer,
    explained: Explanation,
    chunk: int,
    score_name: str | None,
) -> list:
    """One row of index_data.js, in INDEX_COLUMNS order; its score column is the score named `score_name`."""
    top_tokens = list(dict.fromkeys(tokenizer.decode([t[stats.center]]) for _, t, _ in stats.examples(i)))[:5]
    top_logits = [token for token, _ in record["logits"]["top"][:5]] if record["logits"] else []
    return [
        stats.latents[i].item(),
        round(record["density"], 6),
        round(record["max"], 4),
        round(stats.act_sum[i].item() / max(stats.tokens_seen, 1), 5),
        explained.scores.get(score_name) if score_name else None,
        explained.explanation,
        top_tokens,
        top_logits,
        chunk,
    ]


def _write_script(path: Path, call: str, data: dict) -> None:
    # "</" would end an inline script; escaping it keeps token strings such as "</div>" inert everywhere.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    atomic_write_text(path, f"{call}{text});\n")
