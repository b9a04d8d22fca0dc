"""Feature circuits on the tiny model: nodes ranked by estimate, faithfulness and completeness curves with
their controls, the raw basis as a dictionary, and edges between latents checked by finite differences."""

import pytest
import torch
from test_feature_attribution import mean_metric, task  # noqa: F401  (fixture)
from test_splice import MLP, RESID, Z, make_sae

from sae.analysis.circuits.feature_attribution import integrated_gradients_nodes, site_values
from sae.analysis.circuits.feature_circuit import (
    ERROR,
    Node,
    circuit_of,
    curves,
    random_like,
    ranked_nodes,
    raw_basis,
)
from sae.analysis.circuits.feature_edges import feature_edges
from sae.analysis.circuits.splice import SiteNodes, SplicedModel

UPSTREAM, DOWNSTREAM = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture
def spliced(tiny_lm):
    return SplicedModel(tiny_lm, [make_sae(RESID), make_sae(Z, "relu", seed=1), make_sae(MLP, seed=2)])


@pytest.fixture
def effects(spliced, task):  # noqa: F811
    return integrated_gradients_nodes(spliced, task, steps=8)


def test_nodes_rank_by_estimate_and_make_masks(spliced, task, effects):  # noqa: F811
    nodes = ranked_nodes(effects, n=25)
    values = [
        float(
            effects.errors[n.site][n.position]
            if n.latent == ERROR
            else effects.latents[n.site][n.position, n.latent]
        )
        for n in nodes
    ]
    assert len(nodes) == 25 and values == sorted(values, reverse=True)
    everything = torch.cat(
        [e.flatten() for h in effects.latents for e in (effects.latents[h], effects.errors[h])]
    )
    assert values[0] == float(everything.max())
    above = ranked_nodes(effects, threshold=values[9])
    assert above == nodes[: len(above)] and len(above) >= 10
    circuit = circuit_of(nodes, spliced, task.clean_tokens.shape[1])
    assert sum(int(m.latents.sum() + m.error.sum()) for m in circuit.values()) == 25
    clean, corrupt = site_values(spliced, task.clean_tokens), site_values(spliced, task.corrupted_tokens)
    drawn = random_like(circuit, clean, corrupt, seed=0)
    for h in circuit:  # the same count per site, among active latents past BOS
        assert (
            drawn[h].latents.sum() == circuit[h].latents.sum()
            and drawn[h].error.sum() == circuit[h].error.sum()
        )
        active = ((clean[h].latents != 0) | (corrupt[h].latents != 0)).any(0)
        assert not (drawn[h].latents & ~active).any() and not drawn[h].latents[0].any()


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_curves_run_from_the_empty_to_the_whole_model(spliced, task, effects, ablation):  # noqa: F811
    every = sum(e.numel() for h in effects.latents for e in (effects.latents[h], effects.errors[h]))
    result = curves(spliced, task, effects, sizes=[20, every], ablation=ablation, random_draws=2)
    # every node kept: nothing ablated, the model itself; its complement ablates every node
    assert result.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert result.completeness[-1] == pytest.approx(0.0, abs=1e-4)
    assert result.metric_model == pytest.approx(mean_metric(spliced, task), abs=1e-5)
    assert result.metric_model != result.metric_empty
    # the random control is measured at every size (whether a circuit beats it is a finding, for the study)
    assert len(result.random_faithfulness) == len(result.random_completeness) == 2
    assert result.random_faithfulness[-1] == pytest.approx(1.0, abs=1e-4)  # all nodes again
    assert result.forwards == 2 + 2 * 2 * 3
    with pytest.raises(ValueError, match="unknown ablation"):
        curves(spliced, task, effects, sizes=[5], ablation="zero")


def test_the_raw_basis_is_an_exact_dictionary(tiny_lm, task):  # noqa: F811
    raw = SplicedModel(tiny_lm, [raw_basis(RESID, 32), raw_basis(Z, 32, "heads")])
    with torch.no_grad():
        logits, nodes = raw.run(task.clean_tokens)
        plain = tiny_lm(task.clean_tokens)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    assert nodes[RESID].error.abs().max() < 1e-5 and nodes[RESID].latents.shape[-1] == 64


def test_edges_are_the_direct_effect_weighted_by_the_downstream_gradient(tiny_lm, task):  # noqa: F811
    # two residual sites, nothing in between: an edge u -> d is g_d · ∂d/∂u · (-Δu), checked by a small step
    spliced = SplicedModel(tiny_lm, [make_sae(UPSTREAM, "relu"), make_sae(DOWNSTREAM, "relu", seed=3)])
    effects = integrated_gradients_nodes(spliced, task, steps=4)
    d = next(n for n in ranked_nodes(effects, n=50) if n.site == DOWNSTREAM and n.latent != ERROR)
    result = feature_edges(spliced, task, [d], top=5)
    into = result.into(d)
    assert 0 < len(into) <= 5 and all(e.upstream.site == UPSTREAM for e in into)
    assert [abs(e.weight) for e in into] == sorted((abs(e.weight) for e in into), reverse=True)
    assert len(result.into(None)) == 1 and result.backwards == 3

    clean, corrupt = site_values(spliced, task.clean_tokens), site_values(spliced, task.corrupted_tokens)
    logits, nodes = spliced.run(task.clean_tokens)
    from sae.analysis.circuits.tasks import task_metric

    task_metric(task, logits[:, -1]).sum().backward()
    g_d = nodes[DOWNSTREAM].latents.grad[:, d.position, d.latent]  # [prompts]
    u, step = into[0].upstream, 1e-3

    def nudge(site: SiteNodes) -> SiteNodes:
        if u.latent == ERROR:
            error = site.error.clone()
            error[:, u.position] += step * (corrupt[UPSTREAM].error - clean[UPSTREAM].error)[:, u.position]
            return SiteNodes(site.latents, error)
        latents = site.latents.clone()
        latents[:, u.position, u.latent] += (
            step * (corrupt[UPSTREAM].latents - clean[UPSTREAM].latents)[:, u.position, u.latent]
        )
        return SiteNodes(latents, site.error)

    with torch.no_grad():
        _, moved = spliced.run(task.clean_tokens, {UPSTREAM: nudge})
    change = (moved[DOWNSTREAM].latents - clean[DOWNSTREAM].latents)[:, d.position, d.latent] / step
    assert into[0].weight == pytest.approx(float(-(g_d * change).mean()), rel=0.05, abs=1e-5)


def test_a_node_of_the_first_site_has_only_its_edge_to_the_metric(spliced, task, effects):  # noqa: F811
    first = Node(RESID, 3, int(effects.latents[RESID][3].argmax()))
    result = feature_edges(spliced, task, [first])
    assert [e.downstream for e in result.edges] == [None] and result.backwards == 2


def test_head_codes_are_the_latents_writing_most_into_each_head():
    from sae.analysis.circuits.codes import NO_CODE, head_codes
    from sae.config import SAEConfig
    from sae.model import SparseAutoencoder

    # 2 heads x d_head 2; latent i writes only into head i // 2 (two latents per head)
    cfg = SAEConfig("relu", d_in=4, d_sae=4)
    eye = torch.eye(4)
    sae = SparseAutoencoder.from_tensors(
        cfg, {"W_enc": eye, "b_enc": torch.zeros(4), "W_dec": eye.clone(), "b_dec": torch.zeros(4)}
    )
    z = torch.tensor([[[0.2, 0.9], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.5]]])  # [vectors, heads, d_head]
    codes = head_codes(sae, z).codes  # [vectors, heads, 1]
    assert codes[..., 0].tolist() == [[1, NO_CODE], [0, 3]]
    with pytest.raises(ValueError, match="d_in=4"):
        head_codes(sae, torch.zeros(1, 3, 2))
