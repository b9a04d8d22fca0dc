"""Sparse probing (SAEBench, Karvonen et al. 2025): how well do a dictionary's k best latents, alone, tell
a binary concept apart, against the k best raw dimensions of the same activations?

For each concept the tokens are balanced (as many negatives as positives, drawn with a seed) and split
into train and test. On train, the k latents (or dimensions) whose mean value differs most between the
classes are chosen and a logistic probe is fitted on them; its accuracy on test is reported with a Wilson
95 % interval over the test tokens. Concepts that need no hub: the token classes of Python source from
the standard `tokenize` module (`python_token_classes`), labelled onto a model's tokens by character
offsets.

    acts, labels = python_probing_data(model, "blocks.6.hook_resid_post", tokens=32768)
    results, skipped = sparse_probing(acts, labels, sae.encode, ks=(1, 2, 5))
"""

from __future__ import annotations

import builtins
import io
import keyword
import math
import token as token_types
import tokenize
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

KS = (1, 2, 5, 10, 20)
TOKEN_CLASSES = ("keyword", "builtin", "identifier", "string", "docstring", "comment", "number", "operator")
_BUILTINS = frozenset(dir(builtins))
_LINE_STARTS = {
    token_types.NEWLINE,
    token_types.NL,
    token_types.INDENT,
    token_types.DEDENT,
    token_types.ENCODING,
}


# --- concepts: Python token classes ----------------------------------------------------------------------


def python_character_classes(source: str) -> list[str | None]:
    """The `TOKEN_CLASSES` class of each character of `source` (None: whitespace, or a file `tokenize`
    rejects from there on). A docstring is a string that is a statement of its own."""
    classes: list[str | None] = [None] * len(source)
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    tokens = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            tokens.append(tok)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass  # keep the classes of what was tokenized
    for i, tok in enumerate(tokens):
        kind = _token_class(tok, tokens[i - 1] if i else None, tokens[i + 1] if i + 1 < len(tokens) else None)
        if kind is None:
            continue
        start = line_starts[tok.start[0] - 1] + tok.start[1]
        end = line_starts[tok.end[0] - 1] + tok.end[1]
        classes[start:end] = [kind] * (end - start)
    return classes


def _token_class(tok: tokenize.TokenInfo, previous, following) -> str | None:
    if tok.type == token_types.NAME:
        if keyword.iskeyword(tok.string):
            return "keyword"
        return "builtin" if tok.string in _BUILTINS else "identifier"
    if tok.type == token_types.STRING:
        starts_line = previous is None or previous.type in _LINE_STARTS
        ends_line = following is None or following.type in (token_types.NEWLINE, token_types.ENDMARKER)
        return "docstring" if starts_line and ends_line else "string"
    return {token_types.COMMENT: "comment", token_types.NUMBER: "number", token_types.OP: "operator"}.get(
        tok.type
    )


def python_token_classes(source: str, tokenizer) -> tuple[Tensor, dict[str, Tensor]]:
    """-> (token ids [tokens], {class: [tokens] bool}) for `source` under a Hugging Face fast tokenizer
    (no special tokens): a model token takes the class of its first non-whitespace character."""
    encoded = tokenizer(source, return_offsets_mapping=True, add_special_tokens=False)
    characters = python_character_classes(source)
    labels = {name: torch.zeros(len(encoded["input_ids"]), dtype=torch.bool) for name in TOKEN_CLASSES}
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        kind = next((characters[c] for c in range(start, end) if not source[c].isspace()), None)
        if kind is not None:
            labels[kind][i] = True
    return torch.tensor(encoded["input_ids"]), labels


def python_probing_data(
    model, hookpoint: str, tokens: int, context_size: int = 128, batch_contexts: int = 8, seed: int = 0
) -> tuple[Tensor, dict[str, Tensor]]:
    """-> (activations [tokens, d] of `hookpoint`, {class: [tokens] bool}) on standard-library files taken
    from the end of the offline corpus's seeded order (caches read it from the start). Each file is cut
    into contexts of BOS + (context_size - 1) of its tokens; BOS positions are left out."""
    from sae.data import stdlib_source_files
    from sae.lm import capture, stop_layer

    bos = model.tokenizer.bos_token_id
    contexts, context_labels = [], []
    for path in reversed(stdlib_source_files(seed)):
        if sum(len(c) for c in contexts) >= tokens:
            break
        ids, labels = python_token_classes(
            path.read_text(encoding="utf-8", errors="replace"), model.tokenizer
        )
        for start in range(0, len(ids) - context_size + 2, context_size - 1):  # whole contexts only
            contexts.append(ids[start : start + context_size - 1])
            context_labels.append(
                {name: mask[start : start + context_size - 1] for name, mask in labels.items()}
            )
    if not contexts:
        raise ValueError("no standard-library file gave a whole context")
    stop = stop_layer([hookpoint], model.cfg.n_layers)
    acts = []
    for first in range(0, len(contexts), batch_contexts):
        batch = torch.stack(contexts[first : first + batch_contexts])
        batch = torch.cat([torch.full((len(batch), 1), bos), batch], dim=1).to(model.cfg.device)
        acts.append(
            capture(model, batch, [hookpoint], stop)[hookpoint][:, 1:].flatten(0, 1).flatten(1).float().cpu()
        )
    labels = {name: torch.cat([c[name] for c in context_labels]) for name in TOKEN_CLASSES}
    return torch.cat(acts)[:tokens], {name: mask[:tokens] for name, mask in labels.items()}


# --- the probes -------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    concept: str
    basis: str  # "latents" or "dimensions"
    k: int
    accuracy: float
    ci95: tuple[float, float]  # Wilson interval over the test tokens
    chosen: list[int]  # the k latents or dimensions, by decreasing mean difference
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        return asdict(self)


def balanced_split(
    labels: Tensor, per_class: int, test_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor] | None:
    """Indices (train, test) with equal positives and negatives (at most `per_class` each), or None when
    either class has fewer than 10 tokens."""
    positives, negatives = labels.nonzero().flatten(), (~labels).nonzero().flatten()
    n = min(per_class, len(positives), len(negatives))
    if n < 10:
        return None
    pick = lambda idx: idx[torch.randperm(len(idx), generator=generator)[:n]]  # noqa: E731
    chosen_pos, chosen_neg = pick(positives), pick(negatives)
    n_test = max(1, int(n * test_fraction))
    train = torch.cat([chosen_pos[n_test:], chosen_neg[n_test:]])
    test = torch.cat([chosen_pos[:n_test], chosen_neg[:n_test]])
    return train, test


def top_mean_difference(features: Tensor, labels: Tensor, k: int) -> Tensor:
    """[k] columns of features [n, d] whose mean differs most (in absolute value) between the classes."""
    difference = features[labels].mean(0) - features[~labels].mean(0)
    return difference.abs().topk(min(k, features.shape[1])).indices


def fit_logistic(
    train_x: Tensor, train_y: Tensor, l2: float = 1e-3, steps: int = 100, balanced: bool = False
) -> Callable[[Tensor], Tensor]:
    """An L2-regularised logistic regression fitted by L-BFGS on train_x [n, k] standardised by train's
    mean and std; -> a predictor x [m, k] -> [m] bool. `balanced` weighs each class by the inverse of its
    frequency (for a rare positive class)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x = (train_x - mean) / std
    weight = torch.zeros(train_x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    targets = train_y.float()
    positives = targets.mean().clamp(1e-6, 1 - 1e-6)
    pos_weight = (1 - positives) / positives if balanced else None

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = train_x @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may hold no_grad for the encoder; the fit needs gradients
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda x: ((x - mean) / std) @ weight + bias > 0


def logistic_probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float = 1e-3, steps: int = 100
) -> float:
    """Test accuracy of `fit_logistic` fitted on (train_x [n, k], train_y [n])."""
    predict = fit_logistic(train_x, train_y, l2, steps)
    return (predict(test_x) == test_y).float().mean().item()


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sparse_probing(
    acts: Tensor,
    labels: dict[str, Tensor],
    encode: Callable[[Tensor], Tensor],
    ks: tuple[int, ...] = KS,
    per_class: int = 1000,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[ProbeResult], dict[str, str]]:
    """Probes on the top-k latents (`encode(acts)`, [n, d_sae]) and the top-k raw dimensions of
    acts [n, d_in] for every concept of `labels` ({name: [n] bool}); -> (results, {concept: why it was
    skipped})."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = torch.cat([encode(chunk).float() for chunk in acts.split(4096)])
    bases = {"latents": latents, "dimensions": acts.float()}
    results, skipped = [], {}
    for concept, concept_labels in labels.items():
        split = balanced_split(concept_labels, per_class, test_fraction, generator)
        if split is None:
            positives = int(concept_labels.sum())
            skipped[concept] = f"{positives} positive and {len(concept_labels) - positives} negative tokens"
            continue
        train, test = split
        for basis, features in bases.items():
            ranked = top_mean_difference(features[train], concept_labels[train], max(ks))
            for k in ks:
                chosen = ranked[:k]
                accuracy = logistic_probe_accuracy(
                    features[train][:, chosen],
                    concept_labels[train],
                    features[test][:, chosen],
                    concept_labels[test],
                )
                correct = round(accuracy * len(test))
                results.append(
                    ProbeResult(
                        concept,
                        basis,
                        k,
                        accuracy,
                        wilson_interval(correct, len(test)),
                        chosen.tolist(),
                        len(train),
                        len(test),
                    )
                )
    return results, skipped
