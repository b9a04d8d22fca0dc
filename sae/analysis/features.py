"""Per-latent statistics and examples, streamed over tokens with bounded memory.

`LatentStatistics.update` takes one batch of contexts at a time and keeps, for each tracked latent:
firing count, activation sum and max; an exact histogram of its non-zero activations on fixed
log-spaced bins; a running top-k of its activations with their context windows; and a uniform random
sample of its non-zero activations (a bottom-k sketch: each firing gets a random key, the k largest keys
are kept), from which quantile examples are drawn. Memory is O(latents * (k_top + k_sample) * window),
whatever the number of tokens. Sources: a model run over token batches (`model_batches`) or an
activation cache (`cache_batches`, which stores token ids beside the activations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from sae.data import DataConfig, token_batches
from sae.lm import capture, hookpoints_ready, stop_layer
from sae.sites import read_site

# Histogram bins: log10(activation) from -4 to 5 in steps of 0.05 (exact counts, any activation scale).
HIST_LOG10_LOW, HIST_LOG10_STEP, HIST_BINS = -4.0, 0.05, 180
PAD_TOKEN = -1  # window positions outside the context


@dataclass
class Examples:
    """k examples of one latent per row: values [L, k] (-inf: empty slot), tokens and acts [L, k, window]."""

    values: Tensor
    tokens: Tensor
    acts: Tensor

    @classmethod
    def empty(cls, n_latents: int, k: int, window: int) -> Examples:
        return cls(
            torch.full((n_latents, k), -math.inf),
            torch.full((n_latents, k, window), PAD_TOKEN, dtype=torch.int32),
            torch.zeros(n_latents, k, window),
        )

    def merge(self, scores: Tensor, candidates: Examples) -> tuple[Examples, Tensor]:
        """Keep the k highest of (self, candidates) by score; `scores` [L, k + k'] rank both, in that
        order."""
        k = self.values.shape[1]
        kept_scores, order = scores.topk(k, dim=1)  # [L, k]
        values = torch.cat([self.values, candidates.values], 1).gather(1, order)
        window = self.tokens.shape[2]
        order_w = order[:, :, None].expand(-1, -1, window)
        tokens = torch.cat([self.tokens, candidates.tokens], 1).gather(1, order_w)
        acts = torch.cat([self.acts, candidates.acts], 1).gather(1, order_w)
        return Examples(values, tokens, acts), kept_scores


class LatentStatistics:
    """Streaming statistics of `latents` (default: all d_sae) of one SAE; see the module docstring."""

    def __init__(
        self,
        d_sae: int,
        latents: Tensor | None = None,
        k_top: int = 20,
        k_sample: int = 40,
        window_before: int = 12,
        window_after: int = 4,
        seed: int = 0,
    ):
        self.latents = torch.arange(d_sae) if latents is None else torch.as_tensor(latents, dtype=torch.long)
        if len(self.latents) == 0 or self.latents.min() < 0 or self.latents.max() >= d_sae:
            raise ValueError(
                f"latents must be a non-empty list of indices in [0, {d_sae}), "
                f"got {self.latents.tolist()[:10]}"
            )
        n = len(self.latents)
        self.offsets = torch.arange(-window_before, window_after + 1)  # [window]
        self.center = window_before
        self.tokens_seen = 0
        self.fire_count = torch.zeros(n, dtype=torch.long)
        self.act_sum = torch.zeros(n, dtype=torch.float64)
        self.histogram = torch.zeros(n, HIST_BINS, dtype=torch.long)
        self.top = Examples.empty(n, k_top, len(self.offsets))
        self.sample = Examples.empty(n, k_sample, len(self.offsets))
        self.sample_keys = torch.full((n, k_sample), -math.inf)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def max_activation(self) -> Tensor:
        """[L] the largest activation seen (0 for a latent that never fired)."""
        return self.top.values[:, 0].clamp(min=0)

    def update(self, tokens: Tensor, acts: Tensor, valid: Tensor | None = None) -> None:
        """tokens [b, t]; acts [b, t, L] of the tracked latents; valid [b, t] (False: BOS, padding)."""
        b, t, n = acts.shape
        acts = acts.float().cpu()
        if valid is not None:
            acts = acts * valid.cpu()[:, :, None]
        flat = acts.reshape(b * t, n)  # [N, L]
        fired = flat > 0
        self.tokens_seen += int(valid.sum()) if valid is not None else b * t
        self.fire_count += fired.sum(0)
        self.act_sum += flat.sum(0, dtype=torch.float64)
        self._update_histogram(flat, fired)

        k_top = min(self.top.values.shape[1], b * t)
        top_values, top_rows = flat.topk(k_top, dim=0)  # [k, L]
        candidates = self._windows(tokens, flat, top_rows.T, top_values.T, t)
        self.top, _ = self.top.merge(torch.cat([self.top.values, candidates.values], 1), candidates)

        # Uniform sample of the firings: random keys, -inf where the latent did not fire.
        keys = torch.rand(flat.shape, generator=self.generator).masked_fill(~fired, -math.inf)
        k_sample = min(self.sample.values.shape[1], b * t)
        batch_keys, sample_rows = keys.topk(k_sample, dim=0)  # [k, L]
        sample_values = flat.gather(0, sample_rows).masked_fill(batch_keys.isinf(), -math.inf)
        candidates = self._windows(tokens, flat, sample_rows.T, sample_values.T, t)
        self.sample, self.sample_keys = self.sample.merge(
            torch.cat([self.sample_keys, batch_keys.T], 1), candidates
        )

    def _update_histogram(self, flat: Tensor, fired: Tensor) -> None:
        rows, latent = fired.nonzero(as_tuple=True)
        log_values = flat[rows, latent].log10()
        bins = ((log_values - HIST_LOG10_LOW) / HIST_LOG10_STEP).floor().long().clamp(0, HIST_BINS - 1)
        counts = torch.bincount(latent * HIST_BINS + bins, minlength=self.histogram.numel())
        self.histogram += counts.view_as(self.histogram)

    def _windows(self, tokens: Tensor, flat: Tensor, rows: Tensor, values: Tensor, t: int) -> Examples:
        """Context windows around flat positions `rows` [L, k]: tokens and this latent's acts
        [L, k, window]."""
        position = rows % t
        window_pos = position[:, :, None] + self.offsets  # [L, k, window]
        inside = (window_pos >= 0) & (window_pos < t)
        window_rows = (rows[:, :, None] + self.offsets).clamp(0, flat.shape[0] - 1)
        latent = torch.arange(flat.shape[1])[:, None, None]
        window_acts = (flat[window_rows, latent] * inside).float()
        window_tokens = tokens.reshape(-1).to(torch.int32)[window_rows].masked_fill(~inside, PAD_TOKEN)
        return Examples(values.float(), window_tokens, window_acts)

    def examples(self, i: int, which: str = "top") -> list[tuple[float, list[int], list[float]]]:
        """The filled examples of tracked latent number i (not latent id): (value, tokens, acts), best
        first."""
        source = self.top if which == "top" else self.sample
        keep = source.values[i].isfinite() & (source.values[i] > 0)
        order = source.values[i].argsort(descending=True)
        return [
            (source.values[i, j].item(), source.tokens[i, j].tolist(), source.acts[i, j].tolist())
            for j in order.tolist()
            if keep[j]
        ]

    def following_tokens(self, i: int, n: int = 10) -> list[int]:
        """The distinct tokens right after tracked latent i's top activations, most frequent first
        (up to n)."""
        after = self.center + 1
        if after >= self.top.tokens.shape[2]:
            raise ValueError("following_tokens needs window_after >= 1")
        tokens = [t[after] for _, t, _ in self.examples(i) if t[after] != PAD_TOKEN]
        return sorted(set(tokens), key=lambda t: (-tokens.count(t), tokens.index(t)))[:n]

    def quantile_examples(self, i: int, groups: int = 4, per_group: int = 4) -> list[dict]:
        """The random sample of firings split by value into `groups` intervals, a few examples from each."""
        sample = self.examples(i, "sample")[::-1]  # ascending value
        if not sample:
            return []
        out = []
        for g in range(groups):
            part = sample[g * len(sample) // groups : (g + 1) * len(sample) // groups]
            if part:
                picks = [part[j * len(part) // per_group] for j in range(min(per_group, len(part)))]
                out.append(
                    {
                        "label": f"{100 * g // groups}-{100 * (g + 1) // groups}% of firings",
                        "low": part[0][0],
                        "high": part[-1][0],
                        "examples": picks[::-1],
                    }
                )
        return out[::-1]  # highest interval first


def histogram_bin_edges() -> Tensor:
    """[HIST_BINS + 1] activation values at the edges of the histogram bins."""
    return 10 ** (HIST_LOG10_LOW + HIST_LOG10_STEP * torch.arange(HIST_BINS + 1, dtype=torch.float64))


# --- sources of (tokens, activations) batches ------------------------------------------------------


def model_batches(
    model,
    sae,
    token_batches: Iterable[Tensor],
    exclude_bos: bool = True,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Run `model` up to the SAE's hookpoint on token batches [b, t]: yields tokens, SAE inputs
    [b, t, d_in], valid [b, t]."""
    hookpoint = sae.cfg.hookpoint
    stop = stop_layer([hookpoint], model.cfg.n_layers)
    device = next(sae.parameters()).device
    with hookpoints_ready(model, [hookpoint]):
        for tokens in token_batches:
            hook_acts = capture(model, tokens.to(model.cfg.device), [hookpoint], stop)[hookpoint]
            valid = torch.ones(tokens.shape, dtype=torch.bool)
            if exclude_bos:
                valid[:, 0] = False  # BOS: the SAE never saw it (Gemma's residual norm there is ~5e4)
            yield tokens, read_site(sae, hook_acts).float().to(device), valid


def cache_batches(
    cache_dir: str | Path,
    sae,
    contexts_per_batch: int = 16,
    max_tokens: int | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Contexts of an activation cache in order (the first `max_tokens` or so): tokens [b, t], SAE inputs
    [b, t, d_in], valid [b, t].

    The cache stores, per shard, the token ids beside the activations; every context has the same number
    of stored positions, so a shard reshapes into [contexts, positions].
    """
    from safetensors import safe_open

    from cache import ActivationReader
    from cache.manifest import TOKENS_KEY, CacheError

    reader = ActivationReader(cache_dir, sae.cfg.hookpoint, batch_size=1, head_index=sae.cfg.hook_head_index)
    if reader.d_in != sae.cfg.d_in:
        raise CacheError(
            f"{cache_dir}: {sae.cfg.hookpoint} has d_in {reader.d_in}, the SAE expects {sae.cfg.d_in}"
        )
    served = 0
    for index, shard in enumerate(reader.shards):
        if max_tokens is not None and served >= max_tokens:
            return
        acts = reader.read_shard(index)  # [tokens, d_in], checked against the manifest
        with safe_open(str(reader.cache_dir / shard["file"]), framework="pt") as f:
            tokens = f.get_tensor(TOKENS_KEY).long()
        per_context = shard["tokens"] // shard["contexts"]
        tokens, acts = (
            tokens.view(shard["contexts"], per_context),
            acts.view(shard["contexts"], per_context, -1),
        )
        for start in range(0, shard["contexts"], contexts_per_batch):
            if max_tokens is not None and served >= max_tokens:
                return
            batch_tokens = tokens[start : start + contexts_per_batch]
            served += batch_tokens.numel()
            yield (
                batch_tokens,
                acts[start : start + contexts_per_batch].float(),
                torch.ones(batch_tokens.shape, dtype=torch.bool),
            )


@dataclass
class ActivationBatches:
    """(tokens [b, t], SAE inputs [b, t, d_in], valid [b, t]) batches for `collect_statistics`, how many
    there are where known, and where they come from (for reports)."""

    batches: Iterator[tuple[Tensor, Tensor, Tensor]]
    total: int | None
    source: str


def activation_batches(
    model,
    sae,
    tokens: int,
    cache: str | Path | None = None,
    data: DataConfig | None = None,
    count_bos: bool = False,
) -> ActivationBatches:
    """About `tokens` tokens of the SAE's inputs: the first ones of the activation cache `cache`, else
    `model` run over `data` (default: the offline corpus in 128-token contexts), 8 contexts a batch.
    `count_bos`: whether BOS positions count toward `tokens` from text (they are never valid)."""
    if cache is not None:
        return ActivationBatches(cache_batches(cache, sae, max_tokens=tokens), None, f"cache {cache}")
    data = data or DataConfig()
    text = token_batches(data, model.tokenizer, tokens, batch_contexts=8, exclude_bos=not count_bos)
    return ActivationBatches(model_batches(model, sae, text), len(text), data.dataset)


def collect_statistics(
    sae,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    latents: Tensor | None = None,
    total_batches: int | None = None,
    **statistics_kwargs,
) -> LatentStatistics:
    """Encode each batch with `sae` and stream it into a `LatentStatistics` of `latents`."""
    stats = LatentStatistics(sae.cfg.d_sae, latents, **statistics_kwargs)
    with torch.inference_mode():
        for tokens, x, valid in tqdm(batches, desc="latent statistics", unit="batch", total=total_batches):
            acts = sae.encode(x)[..., stats.latents.to(x.device)]  # [b, t, L]
            stats.update(tokens, acts, valid)
    if stats.tokens_seen == 0:
        raise ValueError("collect_statistics: no tokens were given")
    return stats


# --- direct logit effects -------------------------------------------------------------------------


class Unembedding:
    """How a residual-stream direction reaches the logits: through the final norm's linear part, then W_U.

    The final norm is folded in as sae_vis does on models with folded LayerNorm: LayerNorm centres the
    direction and scales it by its weight; RMSNorm scales it by its gain (Gemma's is 1 + weight, with
    weights up to ~300, so leaving it out would rank tokens by the wrong metric). The per-token 1/rms
    factor is positive and the same for every token, so rankings do not depend on it.
    """

    def __init__(self, model):
        norm = getattr(getattr(model, "ln_final", None), "_original_component", None)
        if norm is None:
            raise ValueError(f"{type(model).__name__} has no ln_final: cannot compute logit effects")
        self.W_U = model.W_U.detach()  # [d_model, vocab]
        self.center = isinstance(norm, torch.nn.LayerNorm)
        if self.center:
            self.gain = norm.weight.detach()
        elif "RMSNorm" in type(norm).__name__:
            with (
                torch.no_grad()
            ):  # the RMSNorm of a vector of ones is its per-dimension gain, whatever its convention
                ones = torch.ones(1, self.W_U.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
                self.gain = norm(ones)[0].detach()
        else:
            raise ValueError(
                f"final norm {type(norm).__name__} is neither LayerNorm nor RMSNorm: cannot fold it"
            )

    def logits(self, directions: Tensor) -> Tensor:
        """directions [..., d_model] -> direct logit effects [..., vocab]."""
        directions = directions.to(self.W_U.dtype)
        if self.center:
            directions = directions - directions.mean(-1, keepdim=True)
        return (directions * self.gain) @ self.W_U
