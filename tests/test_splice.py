"""SAEs spliced into the tiny model with their errors kept: the output is the model's own, gradients
reach every node and pass upstream as through the unspliced model, interventions edit nodes."""

import pytest
import torch

from sae.analysis.circuits.splice import SiteNodes, SplicedModel
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

RESID, Z, MLP = "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"


def make_sae(hookpoint: str, architecture: str = "topk", seed: int = 0, **overrides) -> SparseAutoencoder:
    layout = "heads" if hookpoint.endswith("hook_z") else "flat"
    cfg = SAEConfig(
        architecture=architecture,
        d_in=32,
        d_sae=64,
        k=4 if architecture == "topk" else None,
        hookpoint=hookpoint,
        hook_layout=layout,
        **overrides,
    )
    sae = SparseAutoencoder.from_config(cfg, seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


@pytest.fixture
def saes():
    return [
        make_sae(RESID),
        make_sae(Z, "relu", seed=1),
        make_sae(MLP, seed=2, input_norm="layernorm", skip_connection=True),
    ]


@pytest.fixture
def tokens(tiny_lm):
    return tiny_lm.to_tokens(["def f(x):\n    return x", "import os, sys"], padding_side="right")[:, :8]


def test_the_spliced_model_outputs_the_models_own_logits(tiny_lm, saes, tokens):
    spliced = SplicedModel(tiny_lm, saes)
    with torch.no_grad():
        clean = tiny_lm(tokens)
        logits, nodes = spliced.run(tokens)
    torch.testing.assert_close(logits, clean, atol=1e-5, rtol=1e-5)
    assert set(nodes) == {RESID, Z, MLP}
    assert nodes[Z].latents.shape == (*tokens.shape, 64) and nodes[Z].error.shape == (*tokens.shape, 32)

    def reconstruction_only(site: SiteNodes) -> SiteNodes:
        return SiteNodes(site.latents, torch.zeros_like(site.error))

    with torch.no_grad():  # the check can fail: without its error the SAE's reconstruction moves the logits
        moved, _ = spliced.run(tokens, {RESID: reconstruction_only})
    assert not torch.allclose(moved, clean, atol=1e-3)


def test_gradients_reach_every_node_and_pass_upstream_unchanged(tiny_lm, saes, tokens):
    """The error node's gradient is the gradient the unspliced model has at that activation; a latent's is
    the error's through the decoder row (plain SAE); upstream gradients are not cut by downstream sites."""
    captured = {}

    def keep(name: str):
        def hook(acts, hook):
            if not acts.requires_grad:  # the embeddings: the model's weights are frozen
                acts = acts.detach().requires_grad_()
            acts.retain_grad()
            captured[name] = acts
            return acts

        return hook

    with tiny_lm.hooks(fwd_hooks=[(RESID, keep(RESID)), ("blocks.0.hook_resid_pre", keep("embedded"))]):
        tiny_lm(tokens)[:, -1, 7].sum().backward()
    logits, nodes = SplicedModel(tiny_lm, saes).run(tokens)
    logits[:, -1, 7].sum().backward()

    resid = nodes[RESID]
    torch.testing.assert_close(resid.error.grad[:, 1:], captured[RESID].grad[:, 1:], atol=1e-6, rtol=1e-5)
    assert (resid.error.grad[:, 0] == 0).all()  # BOS is not spliced
    sae = saes[0]
    torch.testing.assert_close(resid.latents.grad, resid.error.grad @ sae.W_dec.T, atol=1e-6, rtol=1e-5)
    for site in nodes.values():
        assert site.latents.grad.abs().sum() > 0 and site.error.grad.abs().sum() > 0
    # through all three sites to the embeddings, as without them (x' = x, d x'/d x = I)
    embedding_grad = captured["embedded"].grad
    with tiny_lm.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep("embedded"))]):
        logits, _ = SplicedModel(tiny_lm, saes).run(tokens)
        logits[:, -1, 7].sum().backward()
    torch.testing.assert_close(captured["embedded"].grad, embedding_grad, atol=1e-5, rtol=1e-4)


def test_an_intervention_patches_latents_and_keeps_the_error(tiny_lm, saes, tokens):
    spliced = SplicedModel(tiny_lm, saes[:1])
    sae = saes[0]

    with torch.no_grad():
        _, clean_nodes = spliced.run(tokens)
        latent = int((clean_nodes[RESID].latents[:, 1:] > 0).sum((0, 1)).argmax())  # fires on these tokens

        def ablate(site: SiteNodes) -> SiteNodes:
            return SiteNodes(site.latents * (torch.arange(64) != latent), site.error)

        patched, nodes = spliced.run(tokens, {RESID: ablate})

        def by_hand(acts, hook):
            moved = clean_nodes[RESID].latents[..., latent, None] * sae.W_dec[latent]  # [b, t, d_in]
            return torch.cat([acts[:, :1], acts[:, 1:] - moved[:, 1:]], dim=1)

        with tiny_lm.hooks(fwd_hooks=[(RESID, by_hand)]):
            expected = tiny_lm(tokens)
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nodes[RESID].error, clean_nodes[RESID].error)


def test_mismatched_saes_are_named_before_running(tiny_lm):
    narrow = SparseAutoencoder.from_config(SAEConfig("topk", d_in=16, d_sae=32, k=4, hookpoint=RESID))
    with pytest.raises(ValueError, match=r"d_in=16 .* blocks\.0\.hook_resid_post has width 32"):
        SplicedModel(tiny_lm, [narrow])
    with pytest.raises(ValueError, match="unknown hookpoint"):
        SplicedModel(tiny_lm, [make_sae("blocks.9.hook_resid_post")])
    with pytest.raises(ValueError, match="one SAE per hookpoint"):
        SplicedModel(tiny_lm, [make_sae(RESID), make_sae(RESID, seed=1)])
    with pytest.raises(ValueError, match="no SAE is spliced"):
        SplicedModel(tiny_lm, [make_sae(RESID)]).run(torch.zeros(1, 3, dtype=torch.long), {Z: lambda s: s})


def test_the_last_position_alone_gives_the_same_last_logits(tiny_lm, saes, tokens):
    spliced = SplicedModel(tiny_lm, saes)
    with torch.no_grad():
        full, _ = spliced.run(tokens)
        last, nodes = spliced.run(tokens, last_position=True)
    assert last.shape == (len(tokens), 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    assert nodes[Z].latents.shape[1] == tokens.shape[1]  # every position is still spliced


MLP_IN, MLP_OUT = "blocks.0.mlp.hook_in", "blocks.0.mlp.hook_out"


def make_transcoder(seed: int = 3, **overrides) -> SparseAutoencoder:
    transcoder = make_sae(MLP_IN, seed=seed, transcoder=True, output_hookpoint=MLP_OUT, **overrides)
    with torch.no_grad():  # from_config leaves a transcoder's decoder at zero, as training starts it
        transcoder.W_dec.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return transcoder


def test_a_transcoder_replaces_its_output_site_with_prediction_plus_error(tiny_lm, saes, tokens):
    """Latents from the MLP's input, error and gradient at its output, beside SAEs above and below it."""
    transcoder = make_transcoder(skip_connection=True)
    spliced = SplicedModel(tiny_lm, [transcoder, saes[0], saes[1]])
    captured = {}

    def keep(name: str):
        def hook(acts, hook):
            acts = acts if acts.requires_grad else acts.detach().requires_grad_()
            acts.retain_grad()
            captured[name] = acts
            return acts

        return hook

    with tiny_lm.hooks(fwd_hooks=[(MLP_OUT, keep(MLP_OUT)), ("blocks.0.hook_resid_pre", keep("embedded"))]):
        clean = tiny_lm(tokens)
        clean[:, -1, 7].sum().backward()
    logits, nodes = spliced.run(tokens)
    torch.testing.assert_close(logits, clean, atol=1e-5, rtol=1e-5)
    site = nodes[MLP_IN]
    assert site.latents.shape == (*tokens.shape, 64) and site.error.shape == (*tokens.shape, 32)
    with tiny_lm.hooks(fwd_hooks=[(MLP_IN, keep(MLP_IN))]), torch.no_grad():
        tiny_lm(tokens)
    torch.testing.assert_close(site.latents, transcoder.encode(captured[MLP_IN]))

    logits[:, -1, 7].sum().backward()
    torch.testing.assert_close(site.error.grad[:, 1:], captured[MLP_OUT].grad[:, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(site.latents.grad, site.error.grad @ transcoder.W_dec.T, atol=1e-6, rtol=1e-5)
    embedding_grad = captured["embedded"].grad
    with tiny_lm.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep("embedded"))]):
        again, _ = spliced.run(tokens)
        again[:, -1, 7].sum().backward()
    torch.testing.assert_close(captured["embedded"].grad, embedding_grad, atol=1e-5, rtol=1e-4)

    with torch.no_grad():  # the prediction alone, without its error, moves the logits
        moved, _ = spliced.run(tokens, {MLP_IN: lambda s: SiteNodes(s.latents, torch.zeros_like(s.error))})
    assert not torch.allclose(moved, clean, atol=1e-3)

    logits, leaves, computed = spliced.run_connected(tokens)
    torch.testing.assert_close(logits, clean, atol=1e-5, rtol=1e-5)
    assert list(leaves) == [MLP_IN, RESID, Z]  # in the order the forward completes them
    downstream = computed[RESID].latents[:, 1:].sum()  # depends on the transcoder's leaves, not on RESID's
    downstream.backward()
    assert leaves[MLP_IN].latents.grad.abs().sum() > 0 and leaves[RESID].latents.grad is None


def test_transcoder_sites_that_clash_or_do_not_fit_are_named(tiny_lm):
    with pytest.raises(ValueError, match="one SAE per hookpoint"):
        SplicedModel(tiny_lm, [make_transcoder(), make_sae(MLP_OUT)])
    wide = SparseAutoencoder.from_config(
        SAEConfig(
            "topk",
            d_in=32,
            d_sae=64,
            k=4,
            d_out=48,
            transcoder=True,
            hookpoint=MLP_IN,
            output_hookpoint=MLP_OUT,
        )
    )
    with pytest.raises(ValueError, match=r"writes d_out=48 but blocks\.0\.mlp\.hook_out has width 32"):
        SplicedModel(tiny_lm, [wide])
