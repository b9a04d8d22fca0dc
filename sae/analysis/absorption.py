"""Feature absorption (Chanin et al. 2024, "A is for Absorption"; the metric of SAEBench): a latent that
reads "starts with S" stays silent on some S-words because a more specific latent ("short") absorbed the
direction and fires instead.

Ground truth is a linear probe for the first letter of single-token words, trained on the model's raw
activations at the word. For each letter:

1. main latents: the latents whose mean activation rises most on the letter's words; the k-sparse probe
   on the top-k of them grows from k = 1 while each extra latent lifts the test F1 by more than
   `f1_jump` (SAEBench's feature splits);
2. on each test word that the ground-truth probe gets right, with p̂ the letter's unit probe direction,
   x·p̂ the word's probe projection and c_i = f_i (d_i·p̂) latent i's share of it:
   - absorption fraction: the part of x·p̂ that the main latents leave out and that at most 3 other
     latents aligned with p̂ (cos ≥ 0.1, c_i > 0) supply, a/(a + Σ_main c_i) with a = min(Σ_top3 c_i,
     x·p̂ − Σ_main c_i); 0 when the main latents cover x·p̂ or the others supply under 40 % of it;
   - full absorption: no main latent fires, and the single latent with the largest c_i is aligned
     (cos ≥ 0.025) and supplies at least 40 % of x·p̂.

The scores are the means over letters of the per-letter mean fraction and full-absorption rate, with
95 % intervals from a seeded bootstrap over the test words. SAEBench weights latent i by f_i cos(d_i, p̂);
here it is f_i d_i·p̂, the latent's actual part of the projection (the same for unit-norm decoder rows).

    data = first_letter_data(model, "blocks.6.hook_resid_post")
    result = absorption(data, sae.encode, sae.W_dec)
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from sae.analysis.probing import fit_logistic

LETTERS = string.ascii_lowercase
_WORD_START = ("▁", "Ġ")  # SentencePiece and byte-level BPE markers of a token that starts a word


class NotComputable(ValueError):
    """The metric has no answer for this tokenizer or sample (too few single-token words)."""


# --- data: first letters of single-token words -------------------------------------------------------


@dataclass
class FirstLetterData:
    acts: Tensor  # [n_words, d] activations at the word token
    letters: Tensor  # [n_words] long, index into LETTERS
    words: list[str]
    prompt: str  # the in-context prefix every word followed


def single_token_words(tokenizer, min_length: int = 2) -> dict[int, str]:
    """{token id: word} for the tokens that are a whole word of ASCII letters after a word-start marker."""
    words = {}
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if not piece or not piece.startswith(_WORD_START):
            continue
        word = piece[1:]
        if len(word) >= min_length and word.isascii() and word.isalpha():
            words[token_id] = word
    return words


def first_letter_data(
    model,
    hookpoint: str,
    words_per_letter: int = 200,
    examples: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> FirstLetterData:
    """Activations of `hookpoint` at single-token words (up to `words_per_letter` of each first letter,
    drawn with `seed`), each read after the same prefix of `examples` in-context spellings
    ("tree has the first letter: T"). Causal attention: the text after the word cannot change them."""
    from sae.lm import capture, stop_layer

    tokenizer = model.tokenizer
    vocabulary = single_token_words(tokenizer)
    if not vocabulary:
        raise NotComputable(
            f"{type(tokenizer).__name__}: no single-token words (no ▁ or Ġ word-start tokens)"
        )
    generator = torch.Generator().manual_seed(seed)
    ids = list(vocabulary)
    ids = [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]
    shots, ids = ids[:examples], ids[examples:]
    prompt = "".join(f"{vocabulary[i]} has the first letter: {vocabulary[i][0].upper()}\n" for i in shots)
    per_letter: dict[str, list[int]] = {letter: [] for letter in LETTERS}
    for token_id in ids:
        bucket = per_letter.get(vocabulary[token_id][0].lower())
        if bucket is not None and len(bucket) < words_per_letter:
            bucket.append(token_id)
    chosen = [(i, letter) for letter, bucket in per_letter.items() for i in bucket]
    prefix = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stop = stop_layer([hookpoint], model.cfg.n_layers)
    acts = []
    for first in range(0, len(chosen), batch_size):
        batch = torch.tensor([[*prefix, i] for i, _ in chosen[first : first + batch_size]])
        acts.append(capture(model, batch.to(model.cfg.device), [hookpoint], stop)[hookpoint][:, -1])
    return FirstLetterData(
        acts=torch.cat(acts).flatten(1).float().cpu().clone(),  # a plain tensor, not an inference one
        letters=torch.tensor([LETTERS.index(letter) for _, letter in chosen]),
        words=[vocabulary[i] for i, _ in chosen],
        prompt=prompt,
    )


# --- the metric ------------------------------------------------------------------------------------------


@dataclass
class LetterAbsorption:
    letter: str
    main_latents: list[int]
    main_f1: float  # test F1 of the k-sparse probe on the main latents
    n_test_words: int  # the probe's true positives among the letter's test words
    mean_fraction: float
    full_rate: float


@dataclass
class AbsorptionResult:
    mean_absorption_fraction: float
    fraction_ci95: tuple[float, float]
    full_absorption_rate: float
    full_ci95: tuple[float, float]
    probe_accuracy: float  # the ground-truth probe on all test words
    n_train_words: int
    n_test_words: int
    letters: list[LetterAbsorption] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # letter -> why

    def to_dict(self) -> dict:
        return asdict(self)


def absorption(
    data: FirstLetterData,
    encode: Callable[[Tensor], Tensor],
    decoder: Tensor,
    test_fraction: float = 0.2,
    max_k: int = 10,
    f1_jump: float = 0.03,
    min_words: int = 20,
    bootstrap: int = 1000,
    seed: int = 0,
) -> AbsorptionResult:
    """Absorption of the first-letter concept in the dictionary `encode` (acts [n, d] -> [n, d_sae]) with
    decoder rows `decoder` [d_sae, d]. Letters with fewer than `min_words` words are skipped, saying so."""
    if decoder.shape[1] != data.acts.shape[1]:
        raise ValueError(
            f"decoder rows have {decoder.shape[1]} dimensions, the activations {data.acts.shape[1]}"
        )
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(data.letters, minlength=len(LETTERS))
    skipped = {
        LETTERS[i]: f"{int(c)} single-token words (fewer than {min_words})"
        for i, c in enumerate(counts.tolist())
        if c < min_words
    }
    kept = torch.tensor([LETTERS[i] not in skipped for i in range(len(LETTERS))])[data.letters]
    if kept.sum() == 0:
        raise NotComputable(f"no letter has {min_words} single-token words (of {len(data.words)} drawn)")
    acts, letters = data.acts[kept], data.letters[kept]
    order = torch.randperm(len(acts), generator=generator)
    n_test = max(1, int(len(acts) * test_fraction))
    test, train = order[:n_test], order[n_test:]

    classes = sorted(set(letters.tolist()))
    probe = _letter_probe(acts[train], letters[train], classes)
    predicted = probe(acts[test])
    probe_accuracy = (predicted == letters[test]).float().mean().item()
    with torch.no_grad():
        latents = torch.cat([encode(chunk).float() for chunk in acts.split(4096)])
    decoder = decoder.detach().float()
    decoder_norms = decoder.norm(dim=-1).clamp_min(1e-12)

    per_letter, word_scores = [], []  # word_scores: (fractions [m], full [m]) per letter
    for c in classes:
        direction = probe.directions[classes.index(c)]
        is_letter_test = letters[test] == c
        main, f1 = _main_latents(
            latents[train], letters[train] == c, latents[test], is_letter_test, max_k, f1_jump
        )
        words = test[is_letter_test & (predicted == c)]
        alignment = decoder @ direction  # [d_sae]: d_i·p̂
        fractions, full = _word_absorption(
            acts[words] @ direction, latents[words], alignment, alignment / decoder_norms, main
        )
        word_scores.append((fractions, full))
        per_letter.append(
            LetterAbsorption(
                LETTERS[c],
                main,
                f1,
                len(words),
                fractions.mean().item() if len(words) else float("nan"),
                full.float().mean().item() if len(words) else float("nan"),
            )
        )
    scored = [(f, u) for f, u in word_scores if len(f)]
    fraction, full_rate = _mean_over_letters(scored)
    boot = [_mean_over_letters(_resample(scored, generator)) for _ in range(bootstrap)]
    return AbsorptionResult(
        mean_absorption_fraction=fraction,
        fraction_ci95=_quantiles([b[0] for b in boot]),
        full_absorption_rate=full_rate,
        full_ci95=_quantiles([b[1] for b in boot]),
        probe_accuracy=probe_accuracy,
        n_train_words=len(train),
        n_test_words=int(sum(len(f) for f, _ in scored)),
        letters=per_letter,
        skipped=skipped,
    )


@dataclass
class _LetterProbe:
    directions: Tensor  # [classes, d] unit rows
    weight: Tensor  # [classes, d]
    bias: Tensor  # [classes]
    classes: list[int]

    def __call__(self, x: Tensor) -> Tensor:
        return torch.tensor(self.classes)[(x @ self.weight.T + self.bias).argmax(-1)]


def _letter_probe(
    x: Tensor, letters: Tensor, classes: list[int], l2: float = 1e-4, steps: int = 200
) -> _LetterProbe:
    """Multinomial logistic regression on raw activations (scaled by one number, so each row of the
    weight is a direction of the activation space)."""
    scale = x.norm(dim=-1).mean().clamp_min(1e-12)
    targets = torch.tensor([classes.index(c) for c in letters.tolist()])
    weight = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / scale @ weight.T + bias, targets)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may hold no_grad for the encoder; the fit needs gradients
        optimizer.step(closure)
    weight = weight.detach() / scale
    return _LetterProbe(
        weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12), weight, bias.detach(), classes
    )


def _main_latents(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, max_k: int, f1_jump: float
) -> tuple[list[int], float]:
    """The top-k latents by mean activation difference, k grown from 1 while each step lifts the
    k-sparse probe's test F1 by more than `f1_jump`; -> (latents, their F1)."""
    ranked = (train_f[train_y].mean(0) - train_f[~train_y].mean(0)).topk(min(max_k, train_f.shape[1])).indices
    best_k, best_f1 = 1, _sparse_f1(train_f, train_y, test_f, test_y, ranked[:1])
    for k in range(2, len(ranked) + 1):
        f1 = _sparse_f1(train_f, train_y, test_f, test_y, ranked[:k])
        if f1 - best_f1 <= f1_jump:
            break
        best_k, best_f1 = k, f1
    return ranked[:best_k].tolist(), best_f1


def _sparse_f1(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, chosen: Tensor) -> float:
    predict = fit_logistic(train_f[:, chosen], train_y, balanced=True)
    predicted = predict(test_f[:, chosen])
    true_positives = (predicted & test_y).sum().item()
    denominator = predicted.sum().item() + test_y.sum().item()
    return 2 * true_positives / denominator if denominator else 0.0


def _word_absorption(
    projection: Tensor, latents: Tensor, alignment: Tensor, cosines: Tensor, main: list[int]
) -> tuple[Tensor, Tensor]:
    """projection [m] (x·p̂), latents [m, d_sae] (f), alignment [d_sae] (d_i·p̂), cosines [d_sae]
    (cos(d_i, p̂)) -> (absorption fraction [m], full absorption [m] bool)."""
    contributions = latents * alignment  # [m, d_sae]: c_i = f_i d_i·p̂
    main_mask = torch.zeros(contributions.shape[1], dtype=torch.bool)
    main_mask[main] = True
    main_part = contributions[:, main_mask].sum(-1)
    others = contributions.masked_fill(main_mask | (cosines < 0.1), 0.0).clamp_min(0.0)
    supplied = others.topk(min(3, others.shape[1]), dim=-1).values.sum(-1)
    share = supplied / projection
    absorbed = torch.minimum(supplied, projection - main_part)
    fraction = torch.where(
        main_part <= 0, torch.ones_like(projection), absorbed / (absorbed + main_part).clamp_min(1e-12)
    ).clamp(0.0, 1.0)
    fraction = torch.where((main_part >= projection) | (share < 0.4), torch.zeros_like(fraction), fraction)

    silent = (latents[:, main_mask].abs() < 1e-8).all(-1)
    top = contributions.argmax(-1)
    top_share = contributions.gather(1, top[:, None]).squeeze(1) / projection
    full = silent & (cosines[top] >= 0.025) & (projection >= 0) & (top_share >= 0.4)
    return fraction, full


def _mean_over_letters(scores: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    fractions = torch.stack([f.mean() for f, _ in scores]).mean().item()
    full = torch.stack([u.float().mean() for _, u in scores]).mean().item()
    return fractions, full


def _resample(scores: list[tuple[Tensor, Tensor]], generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    out = []
    for fractions, full in scores:
        pick = torch.randint(len(fractions), (len(fractions),), generator=generator)
        out.append((fractions[pick], full[pick]))
    return out


def _quantiles(values: list[float]) -> tuple[float, float]:
    ordered = torch.tensor(values).quantile(torch.tensor([0.025, 0.975]))
    return (ordered[0].item(), ordered[1].item())
