"""The steering study: its fixed latent-selection rule on statistics with known answers, and the whole
command on the real tiny transformer (the rule's candidates given, since a random SAE has none)."""

from __future__ import annotations

import json

import torch

from sae import SAEConfig, SparseAutoencoder
from sae.analysis.features import LatentStatistics
from sae.analysis.steering_study import TokenLatent, contains_word, sample, steer_latent, token_latents
from tiny_lm import tiny_lm, tiny_lm_dir  # noqa: F401  (fixtures)

HOOK = "blocks.0.hook_resid_post"


class Words:
    """A tokenizer stand-in for the rule: token id -> text."""

    texts = {1: " import", 2: " os", 3: " sys", 4: "(", 5: " re", 6: " the"}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def statistics(pairs_per_latent: list[list[tuple[int, int]]]) -> LatentStatistics:
    """Latent l fires once on each (token, next token) pair of its list, with decreasing values."""
    stats = LatentStatistics(len(pairs_per_latent), k_top=20, k_sample=1, window_before=0, window_after=1)
    for latent, pairs in enumerate(pairs_per_latent):
        tokens = torch.tensor([[t, n] for t, n in pairs])  # [contexts, 2]
        acts = torch.zeros(len(pairs), 2, len(pairs_per_latent))
        acts[:, 0, latent] = torch.linspace(2, 1, len(pairs))
        stats.update(tokens, acts)
    return stats


def test_the_rule_keeps_latents_that_read_one_token_and_precede_one_word():
    stats = statistics(
        [
            [(1, 3)] * 12 + [(1, 2)] * 6 + [(4, 4)] * 2,  # reads ' import' (0.9), then ' sys' (0.6): kept
            [(1, 3)] * 12 + [(4, 3)] * 8,  # reads ' import' only 0.6 of the time: dropped
            [(1, 2)] * 20,  # followed by ' os': under 3 letters, dropped
            [(1, 6)] * 9 + [(1, 3)] * 9 + [(1, 4)] * 2,  # no follower reaches half: dropped
            [(4, 6)] * 19,  # fewer than 20 activations: dropped
            [(4, 6)] * 20,  # reads '(' then ' the': kept
        ]
    )
    kept = token_latents(stats, Words())
    assert [(c.latent, c.token, c.concept, c.word) for c in kept] == [(0, 1, 3, "sys"), (5, 4, 6, "the")]
    assert kept[0].token_share == 0.9 and kept[0].concept_share == 0.6
    assert sample(kept, 1, seed=0) == sample(kept, 1, seed=0) and len(sample(kept, 5, seed=0)) == 2


def test_a_word_is_found_whole_not_inside_another():
    assert contains_word("x = os.path", "os") and contains_word("Import sys", "import")
    assert not contains_word("the process", "os") and not contains_word("important", "import")


def test_steering_a_latent_measures_kl_probabilities_and_completions(tiny_lm):
    sae = SparseAutoencoder.from_config(
        SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint=HOOK), seed=0
    )
    concept = tiny_lm.to_tokens(" return", prepend_bos=False)[0, 0].item()
    latent = TokenLatent(
        latent=5,
        token=0,
        token_share=1.0,
        concept=concept,
        word="return",
        concept_share=1.0,
        max_activation=2.0,
        density=0.01,
    )
    prompts = ["def f(x):", "import os\n"]
    result = steer_latent(
        tiny_lm,
        sae,
        latent,
        control_latent=9,
        prompts=prompts,
        alphas=[0.5, 2.0, 8.0],
        completion_alphas=[8.0],
        max_new_tokens=4,
    )
    assert len(result.kl) == 3 and result.kl_monotone, result.kl
    assert result.p_concept_clean > 0 and len(result.p_concept) == len(result.p_concept_control) == 3
    assert result.p_top[-1] > result.p_top_clean, "adding a direction raises its own direct logit tokens"
    block = result.completions[0]
    assert block["alpha"] == 8.0 and len(block["steered"].texts) == len(result.unsteered.texts) == 2
    assert block["steered"].texts != result.unsteered.texts and block["steered"].perplexity > 0


def test_study_command_writes_its_table(tiny_lm, tiny_lm_dir, tmp_path, monkeypatch):
    from analyze import main
    from sae.analysis import steering_study

    sae = SparseAutoencoder.from_config(
        SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint=HOOK), seed=0
    )
    sae.cfg.model_name = str(tiny_lm_dir)
    sae.save(tmp_path / "sae")
    concept = tiny_lm.to_tokens(" return", prepend_bos=False)[0, 0].item()
    given = [TokenLatent(latent, 0, 1.0, concept, "return", 1.0, 2.0, 0.01) for latent in (3, 7, 11)]
    monkeypatch.setattr(steering_study, "token_latents", lambda stats, tokenizer: given)
    monkeypatch.setattr(steering_study, "NEUTRAL_PROMPTS", ("def f(x):", "x = 1\n"))
    code = main(
        [
            "steer-study",
            str(tmp_path / "sae"),
            "--out",
            str(tmp_path / "study"),
            "--tokens",
            "512",
            "--context-size",
            "32",
            "--latents",
            "2",
            "--alpha",
            "1",
            "--alpha",
            "4",
            "--completion-alpha",
            "4",
            "--max-new-tokens",
            "3",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    assert report["qualifying_latents"] == 3 and len(report["results"]) == 2
    assert report["summary"]["alpha 4"]["completions_with_word"]["of"] == 4
    controls = [r["control_latent"] for r in report["results"]]
    assert not set(controls) & {3, 7, 11}, "controls are never candidates"
    assert (tmp_path / "study" / "study.md").read_text().startswith("| latent |")
    assert (
        main(["steer-study", str(tmp_path / "sae"), "--out", str(tmp_path / "x"), "--completion-alpha", "3"])
        == 1
    )
