"""Scoring a head ranking against a ground-truth head set, with nothing tuned on the ground truth
except what is labelled `oracle`.

scores, truth: [layers, heads] (float, bool). Reported:
    roc_auc                  Mann-Whitney AUC, ties counted half
    roc_auc_within_layers    mean AUC over the layers holding both circuit and other heads (blind to
                             depth, which a trivial "later layer = more important" scorer exploits)
    at_k                     precision/recall/F1 of the top |truth| heads (ties broken by head index)
    at_threshold             ... of heads whose min-max normalised score >= a threshold fixed in advance
    oracle_best_f1           best F1 over all thresholds (chosen WITH the ground truth; for comparison only)
    oracle_best_f1_oneill    O'Neill & Bui's variant, max of 2·TPR·(1-FPR)/(TPR+1-FPR)
Controls are runs of a method on altered inputs (controls.py: shuffled prompt labels, a re-initialised
model), scored with the same `evaluate`; `CHANCE_BAND` is what counts as near chance for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_THRESHOLD = 0.5  # on min-max normalised scores; fixed before any result was seen
# a control's mean AUC over seeds counts as near chance inside this band (fixed before the runs that use it)
CHANCE_BAND = (0.40, 0.60)


def near_chance(auc: float) -> bool:
    """Whether a control's AUC (or mean AUC over seeds) lies inside CHANCE_BAND."""
    low, high = CHANCE_BAND
    return low <= auc <= high


def _check(scores: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    if scores.shape != truth.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and ground truth {tuple(truth.shape)} differ in shape"
        )
    truth = truth.bool().flatten()
    if truth.all() or not truth.any():
        raise ValueError(
            f"ground truth has {int(truth.sum())} of {truth.numel()} heads: AUC needs both classes"
        )
    return scores.flatten().double(), truth


def roc_auc(scores: Tensor, truth: Tensor) -> float:
    """P(score of a circuit head > score of another head), ties counted half."""
    s, t = _check(scores, truth)
    pos, neg = s[t], s[~t]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_auc_within_layers(scores: Tensor, truth: Tensor) -> float | None:
    """Mean over layers of the AUC among that layer's heads; None when no layer has both classes."""
    aucs = [roc_auc(scores[L], truth[L]) for L in range(len(truth)) if truth[L].any() and not truth[L].all()]
    return sum(aucs) / len(aucs) if aucs else None


def precision_recall_f1(predicted: Tensor, truth: Tensor) -> dict[str, float]:
    predicted, truth = predicted.bool().flatten(), truth.bool().flatten()
    tp = int((predicted & truth).sum())
    precision = tp / max(int(predicted.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted": int(predicted.sum())}


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(scores)


def normalised(scores: Tensor) -> Tensor:
    low, high = scores.min(), scores.max()
    return torch.zeros_like(scores) if high == low else (scores - low) / (high - low)


def oracle_best_f1(scores: Tensor, truth: Tensor) -> dict[str, float]:
    """Best F1 and O'Neill & Bui's TPR/FPR 'F1' over every threshold: chosen with the ground truth."""
    s, t = _check(scores, truth)
    best, best_oneill = 0.0, 0.0
    for threshold in s.unique():
        predicted = s >= threshold
        best = max(best, precision_recall_f1(predicted, t)["f1"])
        tpr = float((predicted & t).sum() / t.sum())
        tnr = float((~predicted & ~t).sum() / (~t).sum())
        if tpr + tnr:
            best_oneill = max(best_oneill, 2 * tpr * tnr / (tpr + tnr))
    return {"oracle_best_f1": best, "oracle_best_f1_oneill": best_oneill}


def evaluate(scores: Tensor, truth: Tensor, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Everything in the module docstring for one ranking, as plain JSON-ready numbers."""
    k = int(truth.sum())
    return {
        "roc_auc": roc_auc(scores, truth),
        "roc_auc_within_layers": roc_auc_within_layers(scores, truth),
        "at_k": {"k": k, **precision_recall_f1(top_k_mask(scores, k), truth)},
        "at_threshold": {
            "threshold": threshold,
            **precision_recall_f1(normalised(scores) >= threshold, truth),
        },
        **oracle_best_f1(scores, truth),
    }
