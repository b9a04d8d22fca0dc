"""Node attribution over spliced SAEs on the tiny model: integrated gradients add up to the effect of
patching a whole site, attribution patching is the metric's derivative along each node's change."""

import pytest
import torch
from test_splice import MLP, RESID, Z, make_sae

from sae.analysis.circuits.feature_attribution import (
    attribution_patching_nodes,
    integrated_gradients_nodes,
    site_values,
)
from sae.analysis.circuits.splice import SiteNodes, SplicedModel
from sae.analysis.circuits.tasks import Task, task_metric


@pytest.fixture
def spliced(tiny_lm):
    return SplicedModel(tiny_lm, [make_sae(RESID), make_sae(Z, "relu", seed=1), make_sae(MLP, seed=2)])


@pytest.fixture
def task():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 300, (6, 8), generator=generator)
    clean[:, 0] = 0  # BOS of the tiny tokenizer
    corrupted = clean.clone()
    corrupted[:, 4:] = torch.randint(3, 300, (6, 4), generator=generator)  # the last token too
    good, bad = torch.randint(3, 300, (2, 6, 1), generator=generator)
    return Task("tiny", clean, corrupted, good, bad, "logit_diff")


def mean_metric(spliced: SplicedModel, task: Task, interventions=None) -> float:
    with torch.no_grad():
        logits, _ = spliced.run(task.clean_tokens, interventions)
    return float(task_metric(task, logits[:, -1]).mean())


def assert_nodes_add_up_to_patching_each_site(spliced: SplicedModel, task: Task, steps: int = 32):
    """Integrated gradients over a site's latents and error sum to patching the whole site."""
    effects = integrated_gradients_nodes(spliced, task, steps=steps)
    corrupt = site_values(spliced, task.corrupted_tokens)
    clean_metric = mean_metric(spliced, task)
    for h in spliced.hookpoints:
        patched = mean_metric(spliced, task, {h: lambda _, h=h: corrupt[h]})
        total = float(effects.latents[h].sum() + effects.errors[h].sum())
        assert abs(clean_metric - patched) > 1e-3, h  # the corruption matters at every site
        assert total == pytest.approx(clean_metric - patched, rel=1e-2, abs=1e-4), h
    return effects


def test_integrated_gradients_add_up_to_patching_the_whole_site(spliced, task):
    effects = assert_nodes_add_up_to_patching_each_site(spliced, task)
    assert effects.forwards == 2 + 3 * 32 and effects.backwards == 3 * 32


def test_attribution_patching_is_the_derivative_along_each_nodes_change(spliced, task):
    effects = attribution_patching_nodes(spliced, task)
    clean, corrupt = site_values(spliced, task.clean_tokens), site_values(spliced, task.corrupted_tokens)
    # the node with the largest estimate, where the first-order term dominates; a small step (float32)
    clean_metric, step = mean_metric(spliced, task), 1e-3
    for h in (RESID, Z):
        pos, latent = divmod(int(effects.latents[h].abs().argmax()), effects.latents[h].shape[1])

        def nudge(site: SiteNodes, h=h, pos=pos, latent=latent) -> SiteNodes:
            latents = site.latents.clone()
            latents[:, pos, latent] += step * (corrupt[h].latents - clean[h].latents)[:, pos, latent]
            return SiteNodes(latents, site.error)

        derivative = (clean_metric - mean_metric(spliced, task, {h: nudge})) / step
        assert effects.latents[h][pos, latent].item() == pytest.approx(derivative, rel=0.05, abs=1e-4), h
    # an error node: its whole d_in vector moves along its change at one position
    pos = int(effects.errors[MLP].abs().argmax())

    def nudge_error(site: SiteNodes) -> SiteNodes:
        error = site.error.clone()
        error[:, pos] += step * (corrupt[MLP].error - clean[MLP].error)[:, pos]
        return SiteNodes(site.latents, error)

    derivative = (clean_metric - mean_metric(spliced, task, {MLP: nudge_error})) / step
    assert effects.errors[MLP][pos].item() == pytest.approx(derivative, rel=0.05, abs=1e-4)
    assert (effects.latents[RESID][0] == 0).all()  # BOS is not spliced: no effect
    assert effects.latents[Z].shape == (8, 64) and effects.errors[Z].shape == (8,)


def test_integrated_gradients_need_a_step(spliced, task):
    with pytest.raises(ValueError, match="steps >= 1"):
        integrated_gradients_nodes(spliced, task, steps=0)


def test_a_transcoders_nodes_add_up_to_patching_its_site(tiny_lm, task):
    """A skip transcoder of block 0's MLP beside an SAE above it: integrated gradients over its latents
    and its error (at the MLP's output) add up to patching it whole."""
    from test_splice import make_transcoder

    spliced = SplicedModel(tiny_lm, [make_transcoder(skip_connection=True), make_sae(RESID)])
    assert_nodes_add_up_to_patching_each_site(spliced, task)
