"""The re-initialised-model control: the same architecture with its learnt weights replaced by random ones.

A method run on it should not find the trained model's circuit (AUC against the trained model's ground
truth near 0.5). Far above 0.5 means the method reads something that does not need training (depth,
weight norms); far below means it systematically prefers the heads that are *not* in the circuit, which
is equally a property of the method and not of the task.
"""

from __future__ import annotations

import copy

import torch


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
