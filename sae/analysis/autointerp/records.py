"""Activation records for explaining and scoring latents, streamed from a cache with bounded memory.

`features.LatentStatistics` (shared with the dashboards) keeps, per latent, the running top-k windows and a
uniform random sample of firings from which quantile-stratified examples are drawn. What it does not
keep is non-activating windows, which scorers need as negatives: `NegativePool` adds them, a reservoir of
uniformly random context windows with every tracked latent's activations there, so a window can be used as
a negative for exactly the latents that are zero across it. Memory: pool_size * window * latents floats.

A latent with fewer firings than `min_examples` gets a record with `too_few_activations` set: it is reported
in the results, never dropped (delphi crashed or predicted -1 on such latents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from sae.analysis.features import PAD_TOKEN, LatentStatistics


@dataclass
class Example:
    """One context window: token ids and this latent's activation at each token (PAD_TOKEN slots removed)."""

    tokens: list[int]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


@dataclass
class LatentRecord:
    latent: int
    fire_count: int
    tokens_seen: int
    max_activation: float
    top: list[Example] = field(default_factory=list)  # highest activations, best first
    quantiles: list[list[Example]] = field(default_factory=list)  # random firings by value interval, highest first
    negatives: list[Example] = field(default_factory=list)  # windows where the latent is zero throughout
    too_few_activations: bool = False

    @property
    def activating(self) -> list[Example]:
        """Every distinct activating example: top first, then the quantile samples."""
        seen, out = set(), []
        for example in [*self.top, *(e for group in self.quantiles for e in group)]:
            key = tuple(example.tokens)
            if key not in seen:
                seen.add(key)
                out.append(example)
        return out


class NegativePool:
    """A uniform reservoir of `pool_size` context windows (bottom-k of random keys), with tracked latents' acts."""

    def __init__(self, n_latents: int, pool_size: int, window_before: int, window_after: int, seed: int = 0):
        self.offsets = torch.arange(-window_before, window_after + 1)
        window = len(self.offsets)
        self.keys = torch.full((pool_size,), -math.inf)
        self.tokens = torch.full((pool_size, window), PAD_TOKEN, dtype=torch.int32)
        self.acts = torch.zeros(pool_size, window, n_latents)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def update(self, tokens: Tensor, acts: Tensor, valid: Tensor | None = None) -> None:
        """tokens [b, t]; acts [b, t, L]; valid [b, t] (False positions are never window centres)."""
        b, t, n = acts.shape
        keys = torch.rand(b * t, generator=self.generator)
        if valid is not None:
            keys = keys.masked_fill(~valid.reshape(-1).cpu(), -math.inf)
        k = min(len(self.keys), b * t)
        batch_keys, rows = keys.topk(k)
        window_rows = rows[:, None] + self.offsets  # [k, window]
        inside = ((rows % t)[:, None] + self.offsets >= 0) & ((rows % t)[:, None] + self.offsets < t)
        window_rows = window_rows.clamp(0, b * t - 1)
        flat_acts = acts.float().cpu().reshape(b * t, n)
        if valid is not None:
            flat_acts = flat_acts * valid.reshape(-1, 1).cpu()
        cand_tokens = tokens.reshape(-1).to(torch.int32).cpu()[window_rows].masked_fill(~inside, PAD_TOKEN)
        cand_acts = flat_acts[window_rows] * inside[:, :, None]
        all_keys = torch.cat([self.keys, batch_keys])
        self.keys, order = all_keys.topk(len(self.keys))
        self.tokens = torch.cat([self.tokens, cand_tokens])[order]
        self.acts = torch.cat([self.acts, cand_acts])[order]

    def negatives(self, i: int, n: int) -> list[Example]:
        """Up to n filled windows where tracked latent number i is zero at every token."""
        filled = self.keys.isfinite()
        silent = (self.acts[:, :, i] <= 0).all(1) & filled
        return [_example(self.tokens[j], self.acts[j, :, i]) for j in silent.nonzero().flatten()[:n].tolist()]


def _example(tokens: Tensor, acts: Tensor) -> Example:
    keep = tokens != PAD_TOKEN
    return Example(tokens[keep].tolist(), acts[keep].tolist())


@dataclass
class RecordConfig:
    n_top: int = 20
    n_quantile_groups: int = 4
    n_per_quantile: int = 5
    n_negatives: int = 20
    window_before: int = 24  # window of 32 tokens: 24 before, the token, 7 after
    window_after: int = 7
    min_examples: int = 10
    negative_pool: int = 512
    seed: int = 0


def collect_records(
    encode: Callable[[Tensor], Tensor], d_sae: int, batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    latents: Tensor, config: RecordConfig = RecordConfig(), total_batches: int | None = None,
) -> list[LatentRecord]:
    """One pass over (tokens [b, t], SAE inputs [b, t, d_in], valid [b, t]) batches -> a record per latent.

    `encode` maps SAE inputs to dense latent activations [b, t, d_sae] (e.g. `sae.encode`).
    """
    latents = torch.as_tensor(latents, dtype=torch.long)
    stats = LatentStatistics(
        d_sae, latents, k_top=config.n_top, k_sample=config.n_quantile_groups * config.n_per_quantile * 4,
        window_before=config.window_before, window_after=config.window_after, seed=config.seed,
    )
    pool = NegativePool(len(latents), config.negative_pool, config.window_before, config.window_after, config.seed)
    with torch.inference_mode():
        for tokens, x, valid in tqdm(batches, desc="activation records", unit="batch", total=total_batches):
            acts = encode(x)[..., latents.to(x.device)]  # [b, t, L]
            stats.update(tokens, acts, valid)
            pool.update(tokens, acts, valid)
    if stats.tokens_seen == 0:
        raise ValueError("collect_records: the batches held no tokens")
    return [_record(stats, pool, i, int(latent), config) for i, latent in enumerate(latents.tolist())]


def _record(stats: LatentStatistics, pool: NegativePool, i: int, latent: int, config: RecordConfig) -> LatentRecord:
    def examples(items) -> list[Example]:
        return [_example(torch.as_tensor(tokens), torch.as_tensor(acts)) for _, tokens, acts in items]

    quantiles = stats.quantile_examples(i, config.n_quantile_groups, config.n_per_quantile)
    fire_count = int(stats.fire_count[i])
    return LatentRecord(
        latent=latent, fire_count=fire_count, tokens_seen=stats.tokens_seen,
        max_activation=float(stats.max_activation[i]),
        top=examples(stats.examples(i, "top")),
        quantiles=[examples(group["examples"]) for group in quantiles],
        negatives=pool.negatives(i, config.n_negatives),
        too_few_activations=fire_count < config.min_examples,
    )
