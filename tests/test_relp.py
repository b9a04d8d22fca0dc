"""RelP's rules on the tiny Gemma 3 (RMSNorm, q/k norms, GeGLU) and GPT-2 (LayerNorm, GELU): the forward
is untouched, each rule gives the gradient it states, and RelP joins the node estimates."""

import pytest
import torch
from test_feature_attribution import task  # noqa: F401  (fixture)
from test_splice import MLP, RESID, Z, make_sae

from sae.analysis.circuits import patching
from sae.analysis.circuits.feature_attribution import (
    attribution_patching_nodes,
    integrated_gradients_nodes,
    patching_check,
    relp_nodes,
    site_values,
)
from sae.analysis.circuits.lrp import half_rule, identity_rule, quiet_norm_edits, relp_hooks
from sae.analysis.circuits.splice import SiteNodes, SplicedModel
from sae.analysis.circuits.tasks import task_metric

TOKENS = torch.tensor([[0, 17, 45, 99, 120, 7, 64, 200]])


@pytest.mark.parametrize("model_name", ["tiny_lm", "tiny_gemma"])
def test_the_rules_leave_the_forward_unchanged(model_name, request):
    model = request.getfixturevalue(model_name)
    with torch.no_grad(), quiet_norm_edits():
        plain = model(TOKENS)
        with model.hooks(fwd_hooks=relp_hooks(model)):
            ruled = model(TOKENS)
    torch.testing.assert_close(ruled, plain, atol=1e-5, rtol=1e-5)


def test_the_mlp_rules_conserve_relevance():
    generator = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64).requires_grad_().unbind(0)
    h = torch.nn.functional.gelu(gate, approximate="tanh") * up
    ruled = half_rule(h, gate, up)
    torch.testing.assert_close(ruled, h)
    g_gate, g_up = torch.autograd.grad(ruled.sum(), [gate, up])
    # half of the product's relevance (gradient x input) to each factor, so they sum to the output
    torch.testing.assert_close(gate * g_gate, h / 2)
    torch.testing.assert_close(up * g_up, h / 2)
    pre = gate.detach().requires_grad_()
    (g_pre,) = torch.autograd.grad(identity_rule(torch.nn.functional.gelu(pre), pre).sum(), pre)
    torch.testing.assert_close(pre * g_pre, torch.nn.functional.gelu(pre))  # as if a(x) were linear


def _gradients_at_block_1(model, rules: bool) -> dict[str, torch.Tensor | None]:
    """The gradient of a logit at ln1's input of block 1 (made a leaf there), at its output and at the
    block's queries; and the norm's scale."""
    kept = {}

    def leaf(x, hook):
        kept["x"] = x.detach().requires_grad_()
        return kept["x"]

    def keep(name):
        def hook(tensor, hook):
            kept[name] = tensor

        return hook

    hooks = [
        ("blocks.1.ln1.hook_in", leaf),
        ("blocks.1.ln1.hook_scale", keep("scale")),
        ("blocks.1.ln1.hook_out", keep("y")),
        ("blocks.1.attn.hook_q_normed", keep("q")),
    ]
    with quiet_norm_edits(), model.hooks(fwd_hooks=hooks + (relp_hooks(model) if rules else [])):
        logit = model(TOKENS)[0, -1, 5]
        grads = torch.autograd.grad(logit, [kept["x"], kept["y"], kept["q"]], allow_unused=True)
    return {**dict(zip(["x", "y", "q"], grads, strict=True)), "scale": kept["scale"].detach()}


def test_the_norm_and_attention_rules_hold_in_the_model(tiny_gemma):
    ruled, plain = _gradients_at_block_1(tiny_gemma, True), _gradients_at_block_1(tiny_gemma, False)
    # the attention weights are constants: the queries, which only shape them, get no gradient
    assert ruled["q"] is None or (ruled["q"] == 0).all()
    assert plain["q"] is not None and plain["q"].abs().sum() > 0
    # the RMS denominator is a constant: ln1 is the diagonal map x -> x (1 + w) / scale
    weight = 1 + tiny_gemma.blocks[1].ln1.original_component.weight.detach()
    torch.testing.assert_close(ruled["x"], ruled["y"] * weight / ruled["scale"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(plain["x"], plain["y"] * weight / plain["scale"], atol=1e-6)


def test_relp_node_estimates_and_patching_check(tiny_gemma, task):  # noqa: F811
    saes = [make_sae(RESID), make_sae(Z.replace("1.", "0."), "relu", seed=1), make_sae(MLP, seed=2)]
    spliced = SplicedModel(tiny_gemma, saes)
    relp, atp = relp_nodes(spliced, task), attribution_patching_nodes(spliced, task)
    assert relp.method == "relp" and (relp.forwards, relp.backwards) == (2, 1)
    assert not torch.allclose(relp.latents[MLP], atp.latents[MLP])
    # the spliced model still outputs the model's logits under the rules
    with torch.no_grad(), quiet_norm_edits():
        ruled, _ = spliced.run(task.clean_tokens, extra_hooks=relp_hooks(tiny_gemma))
        plain = tiny_gemma(task.clean_tokens)
    torch.testing.assert_close(ruled, plain, atol=1e-5, rtol=1e-5)

    ig = integrated_gradients_nodes(spliced, task, steps=16)
    check = patching_check(spliced, task, [atp, relp, ig], per_site=8)
    assert check.forwards == 3 + sum(len(n) for n in check.nodes.values())
    # the check's real effect of one node is what patching that node by hand gives
    h = MLP
    pos, latent = check.nodes[h][0].tolist()
    corrupt = site_values(spliced, task.corrupted_tokens)

    def patch(site: SiteNodes) -> SiteNodes:
        latents = site.latents.clone()
        latents[:, pos, latent] = corrupt[h].latents[:, pos, latent]
        return SiteNodes(latents, site.error)

    with torch.no_grad():
        clean_metric = task_metric(task, spliced.run(task.clean_tokens)[0][:, -1]).mean()
        patched = task_metric(task, spliced.run(task.clean_tokens, {h: patch})[0][:, -1]).mean()
    assert check.patched[h][0].item() == pytest.approx(float(clean_metric - patched), abs=1e-6)
    table = check.pearson()
    assert set(table) == {"attribution_patching", "relp", "integrated_gradients"}
    assert table["integrated_gradients"]["all"] > 0.9  # single-latent patches on a smooth random model


def test_heads_from_a_hook_z_sae_sum_to_the_heads_attribution(tiny_lm, task):  # noqa: F811
    spliced = SplicedModel(tiny_lm, [make_sae(Z, "relu", seed=1)])
    effects = attribution_patching_nodes(spliced, task)
    heads = effects.heads(Z)  # [heads]
    # the latents' parts summed over heads are the latents' estimates summed
    torch.testing.assert_close(
        effects.head_latents[Z].sum(1), effects.latents[Z].sum(1), atol=1e-5, rtol=1e-4
    )
    # latents and error together are the head's own attribution patching estimate on hook_z
    plain = patching.attribution_patching(tiny_lm, task).details["estimated_effects"][1]
    torch.testing.assert_close(heads, plain, atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError, match="reads every head"):
        effects.heads("blocks.0.hook_resid_post")
