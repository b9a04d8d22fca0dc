"""Controls: a method run on them should not find the trained model's circuit (AUC against the trained
model's ground truth near 0.5).

* `reinitialised_copy` — the same architecture with its learnt weights replaced by random ones. Far above
  0.5 means the method reads something that does not need training (depth, weight norms); far below means
  it systematically prefers the heads that are *not* in the circuit, equally a property of the method.
* `shuffled_labels` — the same model with clean and corrupted prompts swapped in each pair with
  probability 1/2, so "positive" and "negative" prompts no longer mean anything: a code method, which
  scores what separates the two sets, should find nothing. (Swapping exactly half of the pairs instead
  makes a split that is balanced against the truth as no random relabelling is, and a method calibrated
  against random relabellings then ranks the heads that truly differ below chance; synthetic check in
  tests/test_circuits.py.) It is no null for the patching and gradient baselines (noising one head of a
  clean run is not undone by denoising it in a corrupted run), so they are not run on it.
Both run a method with all the "clean" prompts as its positives (`run_on_shuffled_labels`,
`run_on_untrained`): which ones the model solves would leak the labels back, and an untrained model
solves none.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from .methods import CodeMethod, run_method
from .patching import MethodScores
from .scoring import random_swaps
from .tasks import Task


@torch.no_grad()
def reinitialised_copy(model, seed: int = 0):
    """A deep copy of `model` whose every matrix (parameter with >= 2 dimensions: embeddings, attention
    and MLP weights, unembedding) is redrawn from a normal distribution with the same mean and standard
    deviation as the trained one, so activations keep their scale; vectors (norm weights, biases) are kept.
    """
    generator = torch.Generator().manual_seed(seed)
    fresh = copy.deepcopy(model)
    redrawn = 0
    for parameter in fresh.parameters():
        if parameter.ndim < 2:
            continue
        values = parameter.detach().float()
        noise = torch.randn(parameter.shape, generator=generator)
        parameter.copy_((values.mean() + values.std() * noise).to(parameter.dtype))
        redrawn += 1
    if redrawn == 0:
        raise ValueError("the model has no matrix parameters to re-initialise")
    return fresh


def shuffled_labels(task: Task, seed: int) -> Task:
    """`task` with clean and corrupted prompts swapped in each pair with probability 1/2 (`random_swaps`);
    the answer tokens stay with their pair."""
    swapped = random_swaps(len(task), torch.Generator().manual_seed(seed))
    clean = torch.where(swapped[:, None], task.corrupted_tokens, task.clean_tokens)
    corrupted = torch.where(swapped[:, None], task.clean_tokens, task.corrupted_tokens)
    return replace(
        task,
        name=f"{task.name} (labels shuffled, seed {seed})",
        clean_tokens=clean,
        corrupted_tokens=corrupted,
    )


def run_on_shuffled_labels(method: str | CodeMethod, model, task: Task, seed: int) -> MethodScores:
    """A code method (by name, or a CodeMethod) on `shuffled_labels(task, seed)`."""
    return run_method(method, model, shuffled_labels(task, seed), seed, positives_from="all")


def run_on_untrained(method: str | CodeMethod, untrained_model, task: Task, seed: int) -> MethodScores:
    """A method (by name, or a CodeMethod) on an untrained model (`reinitialised_copy`, or a toy never
    trained)."""
    return run_method(method, untrained_model, task, seed, positives_from="all")
