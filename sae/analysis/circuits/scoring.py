"""Head scores from discrete codes of positive (solved) and negative (corrupted) prompts.

Input codes: [prompts, layers, heads, k] (one vector per head) or [prompts, pos, layers, heads, k]
(one per position), LongTensor, NO_CODE (-1) for "no code". A head's *symbols* are its codes, paired
with the position when there is one, so the same code at two positions counts as two symbols.

* `oneill_head_scores` — faithful: number of distinct symbols seen in positives and never in negatives,
  softmax over all heads. The count grows with how many prompts are scored and how varied a head is,
  whatever its role; NO_CODE entries are ignored (with argmax codes there are none: see codes.py).
* `oneill_edge_head_scores` — their co-occurrence variant: per head pair, the distinct code pairs seen
  only in positives; a head's score is the sum over its pairs (the paper scores edges against heads too).
* `overlap_head_scores` — ours: total-variation distance between the head's symbol frequencies in
  positives and in negatives, in [0, 1]; 0 when both sets use codes alike. Frequencies are normalised,
  so it does not grow with sample size, and "no code" is a symbol of its own rather than dropped.
* `permutation_calibrated` — any of these minus its mean over random relabellings of the prompts: with
  finitely many prompts a head's overlap is above 0 even when positives and negatives do not differ, and
  more so the more distinct symbols the head uses; subtracting that expected value leaves the part the
  labels explain. Two nulls: relabel the pooled prompts freely, or (given the pairing) swap the two prompts
  of each clean/corrupted pair with probability 1/2, so that the two prompts of a pair are always on
  opposite sides, as with the real labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .codes import NO_CODE


def _symbols(codes: Tensor, d_sae: int) -> Tensor:
    """codes [prompts, (pos,) layers, heads, k] -> symbols [prompts, layers, heads, (pos·)k], in
    [0, (pos)·(d_sae + 1)); the symbol d_sae (per position) stands for NO_CODE."""
    codes = torch.where(codes == NO_CODE, torch.full_like(codes, d_sae), codes)
    if codes.ndim == 5:
        n_pos = codes.shape[1]
        offsets = torch.arange(n_pos).view(1, n_pos, 1, 1, 1) * (d_sae + 1)
        codes = (codes + offsets).permute(0, 2, 3, 1, 4).flatten(3)
    elif codes.ndim != 4:
        raise ValueError(
            f"codes must be [prompts, layers, heads, k] or [prompts, pos, layers, heads, k], "
            f"got {tuple(codes.shape)}"
        )
    return codes


def symbol_counts(codes: Tensor, d_sae: int) -> Tensor:
    """-> counts [layers, heads, n_symbols]: how often each symbol occurs for each head."""
    symbols = _symbols(codes, d_sae)
    n_positions = codes.shape[1] if codes.ndim == 5 else 1
    n_symbols = n_positions * (d_sae + 1)
    one_hot = torch.zeros(*symbols.shape[1:3], n_symbols)
    flat = symbols.permute(1, 2, 0, 3).flatten(2)  # [layers, heads, prompts·(pos·)k]
    return one_hot.scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.float32))


def _no_code_mask(codes: Tensor, d_sae: int) -> Tensor:
    """[n_symbols] bool: the symbols that stand for NO_CODE."""
    n_positions = codes.shape[1] if codes.ndim == 5 else 1
    mask = torch.zeros(n_positions, d_sae + 1, dtype=torch.bool)
    mask[:, d_sae] = True
    return mask.flatten()


def oneill_head_scores(positive_codes: Tensor, negative_codes: Tensor, d_sae: int) -> Tensor:
    """-> [layers, heads]: softmax over heads of the number of positive-only symbols."""
    pos, neg = symbol_counts(positive_codes, d_sae), symbol_counts(negative_codes, d_sae)
    only_positive = (pos > 0) & (neg == 0) & ~_no_code_mask(positive_codes, d_sae)
    counts = only_positive.sum(-1).float()
    return counts.flatten().softmax(0).view_as(counts)


def overlap_head_scores(positive_codes: Tensor, negative_codes: Tensor, d_sae: int) -> Tensor:
    """-> [layers, heads]: total variation between positive and negative symbol frequencies, in [0, 1]."""
    pos, neg = symbol_counts(positive_codes, d_sae), symbol_counts(negative_codes, d_sae)
    p = pos / pos.sum(-1, keepdim=True)
    n = neg / neg.sum(-1, keepdim=True)
    return 0.5 * (p - n).abs().sum(-1)


def oneill_edge_head_scores(positive_codes: Tensor, negative_codes: Tensor, d_sae: int) -> Tensor:
    """Codes [prompts, layers, heads, 1] -> [layers, heads]: per head, the sum over its partner heads of
    the distinct (code, partner code) pairs seen in positives and never in negatives."""
    if positive_codes.ndim != 4 or positive_codes.shape[-1] != 1:
        raise ValueError("the edge variant takes one code per head: [prompts, layers, heads, 1]")
    n_layers, n_heads = positive_codes.shape[1:3]
    n_sites, n_pairs = n_layers * n_heads, (d_sae + 1) ** 2

    def pair_keys(codes: Tensor) -> Tensor:
        c = _symbols(codes, d_sae).flatten(1)  # [prompts, sites]
        pair = c[:, :, None] * (d_sae + 1) + c[:, None, :]  # [prompts, sites, sites]
        site_pair = torch.arange(n_sites * n_sites).view(n_sites, n_sites)
        return (site_pair * n_pairs + pair).flatten().unique()

    pos_keys, neg_keys = pair_keys(positive_codes), pair_keys(negative_codes)
    only_positive = pos_keys[~torch.isin(pos_keys, neg_keys)]
    per_site_pair = torch.bincount(only_positive // n_pairs, minlength=n_sites * n_sites).view(
        n_sites, n_sites
    )
    per_site_pair.fill_diagonal_(0)  # a head paired with itself is the node score, not an edge
    return per_site_pair.sum(1).float().view(n_layers, n_heads)


HeadScorer = Callable[[Tensor, Tensor, int], Tensor]


def permutation_calibrated(
    scorer: HeadScorer,
    positive_codes: Tensor,
    negative_codes: Tensor,
    d_sae: int,
    n_permutations: int,
    seed: int,
    pair_of_positive: Tensor | None = None,
) -> Tensor:
    """-> [layers, heads]: scorer(positives, negatives) minus its mean over `n_permutations` relabellings.

    pair_of_positive None: each relabelling splits the pooled prompts at random into groups of the same two
    sizes. pair_of_positive [positives] (LongTensor, distinct indices into the negatives): positive i and
    negative pair_of_positive[i] are a pair, and each relabelling swaps each pair with probability 1/2
    (`random_swaps`, as `controls.shuffled_labels` does); negatives in no pair stay negatives.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    if pair_of_positive is not None:
        if pair_of_positive.shape != (len(positive_codes),) or pair_of_positive.unique().numel() != len(
            positive_codes
        ):
            raise ValueError(
                f"pair_of_positive must hold {len(positive_codes)} distinct negative indices, "
                f"got shape {tuple(pair_of_positive.shape)}"
            )
        out_of_range = (pair_of_positive < 0) | (pair_of_positive >= len(negative_codes))
        if out_of_range.any():
            raise ValueError(f"pair_of_positive indexes past the {len(negative_codes)} negatives")
    generator = torch.Generator().manual_seed(seed)
    null = torch.zeros(positive_codes.shape[-3:-1])  # [layers, heads]
    for _ in range(n_permutations):
        null += scorer(*_relabelled(positive_codes, negative_codes, pair_of_positive, generator), d_sae)
    return scorer(positive_codes, negative_codes, d_sae) - null / n_permutations


def random_swaps(n_pairs: int, generator: torch.Generator) -> Tensor:
    """-> [n_pairs] bool: each pair swapped with probability 1/2, independently. Not "exactly half": the
    method sees only the labels it is given, so its own relabellings of an exactly balanced split are not
    balanced against the truth; a split drawn like the null's draws is one more draw of it."""
    return torch.rand(n_pairs, generator=generator) < 0.5


def _relabelled(
    positive_codes: Tensor,
    negative_codes: Tensor,
    pair_of_positive: Tensor | None,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """One draw of the null: (positives, negatives) relabelled as `permutation_calibrated` says."""
    if pair_of_positive is None:
        pooled = torch.cat([positive_codes, negative_codes])
        order = torch.randperm(len(pooled), generator=generator)
        return pooled[order[: len(positive_codes)]], pooled[order[len(positive_codes) :]]
    swap = random_swaps(len(positive_codes), generator)
    partners = negative_codes[pair_of_positive]
    positives = torch.where(swap.view(-1, *[1] * (positive_codes.ndim - 1)), partners, positive_codes)
    negatives = negative_codes.clone()
    negatives[pair_of_positive[swap]] = positive_codes[swap]
    return positives, negatives
