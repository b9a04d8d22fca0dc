"""Activation records for explaining and scoring latents, streamed from a cache with bounded memory.

`features.LatentStatistics` (shared with the dashboards) keeps, per latent, the running top-k windows and a
uniform random sample of firings from which quantile-stratified examples are drawn. What it does not
keep is non-activating windows, which scorers need as negatives: `NegativePool` adds them, a reservoir of
uniformly random context windows with every tracked latent's activations there, so a window can be used as
a negative for exactly the latents that are zero across it. Memory: pool_size * window * latents floats.

With `RecordConfig.neighbour_negatives`, part of the negatives are hard ones (`NeighbourNegatives`): windows
where a latent's nearest latents by decoder cosine similarity fire most strongly while the latent itself is
zero throughout, i.e. text about something close that the latent does not respond to.

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
    quantiles: list[list[Example]] = field(
        default_factory=list
    )  # random firings by value interval, highest first
    negatives: list[Example] = field(default_factory=list)  # windows where the latent is zero throughout
    too_few_activations: bool = False
    n_neighbour_negatives: int = 0  # how many of `negatives` (the first ones) come from decoder neighbours
    neighbours: list[int] = field(default_factory=list)  # the latents those came from

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
    """A uniform reservoir of `pool_size` context windows (bottom-k of random keys), with tracked
    latents' acts."""

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

    def negatives(self, i: int, n: int, generator: torch.Generator) -> list[Example]:
        """Up to n filled windows where tracked latent number i is zero at every token, drawn at random.

        Each latent draws its own sample (`generator`): taking the pool's first n silent windows gave nearly
        every latent the same few windows, so one unlucky set biased every latent's scores the same way
        (measured: a constant query's embedding AUROC was 0.12-0.47 across latents against those shared
        windows).
        """
        filled = self.keys.isfinite()
        silent = ((self.acts[:, :, i] <= 0).all(1) & filled).nonzero().flatten()
        chosen = silent[torch.randperm(len(silent), generator=generator)[:n]]
        return [_example(self.tokens[j], self.acts[j, :, i]) for j in chosen.tolist()]


def decoder_neighbours(decoder: Tensor, latents: Tensor, n: int) -> Tensor:
    """decoder [d_sae, d_in] -> [len(latents), n] the latents with the most similar decoder directions
    (cosine), each latent itself excluded."""
    unit = torch.nn.functional.normalize(decoder.detach().float(), dim=-1)
    similarity = unit[latents] @ unit.T  # [L, d_sae]
    similarity[torch.arange(len(latents)), latents] = -math.inf
    return similarity.topk(n, dim=-1).indices


class NeighbourNegatives:
    """Per tracked latent, the `k` windows where its neighbours' largest activation at the centre token is
    highest and the latent itself is zero across the whole window. Memory: L * k * window tokens."""

    def __init__(self, neighbours: Tensor, k: int, window_before: int, window_after: int):
        self.neighbours = neighbours  # [L, n] latent ids
        self.before, self.after = window_before, window_after
        n_latents, window = len(neighbours), window_before + window_after + 1
        self.values = torch.full((n_latents, k), -math.inf)  # neighbour activation at the centre, best kept
        self.tokens = torch.full((n_latents, k, window), PAD_TOKEN, dtype=torch.int32)

    def update(self, tokens: Tensor, own: Tensor, neighbour_acts: Tensor, valid: Tensor | None) -> None:
        """tokens [b, t]; own [b, t, L] the tracked latents; neighbour_acts [b, t, L, n] each one's
        neighbours."""
        b, t, n_latents = own.shape
        window = self.before + self.after + 1
        fires = (own > 0).float().permute(0, 2, 1).reshape(b * n_latents, 1, t)  # [b*L, 1, t]
        # any firing in [p - before, p + after]: max-pool of the padded sequence
        padded = torch.nn.functional.pad(fires, (self.before, self.after), value=0.0)
        fires_near = torch.nn.functional.max_pool1d(padded, window, stride=1).reshape(b, n_latents, t)
        score = neighbour_acts.float().amax(-1).permute(0, 2, 1)  # [b, L, t]
        ok = (fires_near == 0) & (score > 0)
        if valid is not None:
            ok &= valid.cpu()[:, None, :]
        score = score.masked_fill(~ok, -math.inf).permute(1, 0, 2).reshape(n_latents, b * t)  # [L, b*t]
        k = min(self.values.shape[1], b * t)
        best, rows = score.topk(k, dim=-1)  # [L, k] positions in the flattened batch
        offsets = torch.arange(-self.before, self.after + 1)
        centre = rows % t
        inside = (centre[..., None] + offsets >= 0) & (centre[..., None] + offsets < t)  # [L, k, window]
        flat = tokens.reshape(-1).to(torch.int32).cpu()
        windows = flat[(rows[..., None] + offsets).clamp(0, b * t - 1)].masked_fill(~inside, PAD_TOKEN)
        values, order = torch.cat([self.values, best], 1).topk(self.values.shape[1], dim=-1)
        self.tokens = torch.cat([self.tokens, windows], 1).gather(1, order[..., None].expand(-1, -1, window))
        self.values = values

    def negatives(self, i: int) -> list[Example]:
        keep = self.values[i].isfinite()
        return [_example(tokens, torch.zeros(len(tokens))) for tokens in self.tokens[i][keep]]


def latent_seed(seed: int, latent: int) -> int:
    """The seed of every random draw made for one latent (examples, negatives, marks), so a latent's draws do
    not depend on which other latents are in the run."""
    return seed * 1_000_003 + latent


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
    negative_pool: int = (
        512  # random windows kept; each latent draws its n_negatives among those where it is silent
    )
    neighbour_negatives: int = (
        0  # of n_negatives, how many are hard negatives from decoder neighbours (needs the decoder)
    )
    n_neighbours: int = 8  # nearest latents by decoder cosine similarity whose firings give those negatives
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.neighbour_negatives <= self.n_negatives:
            raise ValueError(
                f"neighbour_negatives must be in [0, n_negatives={self.n_negatives}], "
                f"got {self.neighbour_negatives}"
            )


def collect_records(
    encode: Callable[[Tensor], Tensor],
    d_sae: int,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    latents: Tensor,
    config: RecordConfig | None = None,
    total_batches: int | None = None,
    decoder: Tensor | None = None,
) -> list[LatentRecord]:
    """One pass over (tokens [b, t], SAE inputs [b, t, d_in], valid [b, t]) batches -> a record per latent.

    `encode` maps SAE inputs to dense latent activations [b, t, d_sae] (e.g. `sae.encode`); `decoder`
    [d_sae, d_in] (e.g. `sae.W_dec`) is needed for neighbour negatives. `config` defaults to `RecordConfig()`.
    """
    if config is None:
        config = RecordConfig()
    latents = torch.as_tensor(latents, dtype=torch.long)
    hard = None
    if config.neighbour_negatives:
        if decoder is None:
            raise ValueError(
                "neighbour_negatives needs the SAE's decoder (collect_records(..., decoder=sae.W_dec))"
            )
        neighbours = decoder_neighbours(decoder, latents, config.n_neighbours)  # [L, n]
        hard = NeighbourNegatives(
            neighbours, config.neighbour_negatives, config.window_before, config.window_after
        )
    stats = LatentStatistics(
        d_sae,
        latents,
        k_top=config.n_top,
        k_sample=config.n_quantile_groups * config.n_per_quantile * 4,
        window_before=config.window_before,
        window_after=config.window_after,
        seed=config.seed,
    )
    pool = NegativePool(
        len(latents), config.negative_pool, config.window_before, config.window_after, config.seed
    )
    with torch.inference_mode():
        for tokens, x, valid in tqdm(batches, desc="activation records", unit="batch", total=total_batches):
            dense = encode(x)  # [b, t, d_sae]
            acts = dense[..., latents.to(x.device)]  # [b, t, L]
            stats.update(tokens, acts, valid)
            pool.update(tokens, acts, valid)
            if hard is not None:
                hard.update(
                    tokens, acts.float().cpu(), dense[..., hard.neighbours.to(x.device)].float().cpu(), valid
                )
    if stats.tokens_seen == 0:
        raise ValueError("collect_records: the batches held no tokens")
    return [_record(stats, pool, hard, i, int(latent), config) for i, latent in enumerate(latents.tolist())]


def _record(
    stats: LatentStatistics,
    pool: NegativePool,
    hard: NeighbourNegatives | None,
    i: int,
    latent: int,
    config: RecordConfig,
) -> LatentRecord:
    def examples(items) -> list[Example]:
        return [_example(torch.as_tensor(tokens), torch.as_tensor(acts)) for _, tokens, acts in items]

    quantiles = stats.quantile_examples(i, config.n_quantile_groups, config.n_per_quantile)
    fire_count = int(stats.fire_count[i])
    hard_negatives = hard.negatives(i) if hard is not None else []
    # Random negatives fill what the neighbours did not; how many came from each is in the record.
    generator = torch.Generator().manual_seed(latent_seed(config.seed, latent))
    random_negatives = pool.negatives(i, config.n_negatives - len(hard_negatives), generator)
    return LatentRecord(
        latent=latent,
        fire_count=fire_count,
        tokens_seen=stats.tokens_seen,
        max_activation=float(stats.max_activation[i]),
        top=examples(stats.examples(i, "top")),
        quantiles=[examples(group["examples"]) for group in quantiles],
        negatives=hard_negatives + random_negatives,
        too_few_activations=fire_count < config.min_examples,
        n_neighbour_negatives=len(hard_negatives),
        neighbours=hard.neighbours[i].tolist() if hard is not None else [],
    )
