"""The steering study: its fixed latent-selection rule on statistics with known answers, and the whole
script on the real tiny transformer (the rule's candidates given, since a random SAE has none), called
with a command line as a user runs it; `python studies/steering/study.py` itself as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from itertools import islice
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder
from sae.analysis.features import LatentStatistics

SCRIPT = Path(__file__).resolve().parents[1] / "study.py"
HOOK = "blocks.0.hook_resid_post"


def _load_study():
    """studies/steering/study.py as a module of its own name (other studies have a study.py too)."""
    spec = importlib.util.spec_from_file_location("steering_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


study = _load_study()
TokenLatent = study.TokenLatent


class Words:
    """A tokenizer stand-in for the rule: token id -> text."""

    texts: ClassVar[dict[int, str]] = {1: " import", 2: " os", 3: " sys", 4: "(", 5: " re", 6: " the"}

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
    kept = study.token_latents(stats, Words())
    assert [(c.latent, c.token, c.concept, c.word) for c in kept] == [(0, 1, 3, "sys"), (5, 4, 6, "the")]
    assert kept[0].token_share == 0.9 and kept[0].concept_share == 0.6
    assert study.sample(kept, 1, seed=0) == study.sample(kept, 1, seed=0)
    assert len(study.sample(kept, 5, seed=0)) == 2


def test_a_word_is_found_whole_not_inside_another():
    assert study.contains_word("x = os.path", "os") and study.contains_word("Import sys", "import")
    assert not study.contains_word("the process", "os") and not study.contains_word("important", "import")


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
    result = study.steer_latent(
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


def test_study_script_writes_its_table(tiny_lm, tiny_lm_dir, tmp_path, monkeypatch):
    sae = SparseAutoencoder.from_config(
        SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint=HOOK), seed=0
    )
    sae.cfg.model_name = str(tiny_lm_dir)
    sae.save(tmp_path / "sae")
    concept = tiny_lm.to_tokens(" return", prepend_bos=False)[0, 0].item()
    given = [TokenLatent(latent, 0, 1.0, concept, "return", 1.0, 2.0, 0.01) for latent in (3, 7, 11)]
    monkeypatch.setattr(study, "token_latents", lambda stats, tokenizer: given)
    monkeypatch.setattr(study, "NEUTRAL_PROMPTS", ("def f(x):", "x = 1\n"))
    argv = [
        str(tmp_path / "sae"),
        "--out",
        str(tmp_path / "study"),
        "--tokens",
        "512",
        "--context-size",
        "32",
    ]
    argv += ["--latents", "2", "--alpha", "1", "--alpha", "4", "--completion-alpha", "4"]
    assert study.main([*argv, "--max-new-tokens", "3"]) == 0
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    assert report["qualifying_latents"] == 3 and len(report["results"]) == 2
    assert report["summary"]["alpha 4"]["completions_with_word"]["of"] == 4
    controls = [r["control_latent"] for r in report["results"]]
    assert not set(controls) & {3, 7, 11}, "controls are never candidates"
    assert (tmp_path / "study" / "study.md").read_text().startswith("| latent |")


def test_study_script_runs_as_a_script_and_rejects_bad_options(tmp_path):
    """`python studies/steering/study.py ...` from the repository root, as the README gives it."""

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            cwd=SCRIPT.parents[2],
            capture_output=True,
            text=True,
            timeout=300,
        )

    out = str(tmp_path / "x")
    bad_alpha = script(str(tmp_path / "sae"), "--out", out, "--completion-alpha", "3")
    assert bad_alpha.returncode == 1 and "not all among the sweep's alphas" in bad_alpha.stderr
    both = script(str(tmp_path / "sae"), "--out", out, "--cache", "c", "--dataset", "d")
    assert both.returncode == 1 and "give one of them" in both.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_gemma_steering_moves_the_output_towards_each_latent_of_a_fixed_sample():
    """Gemma 3 270M and a small TopK SAE trained here on layer 6. The latents are those of the study's
    rule (they read one token and precede one word), five drawn with a fixed seed, each against a random
    other latent added with the same strength. For every one, KL grows with alpha and its own top logit
    tokens become likelier than unsteered; over the five, the median rise of those tokens is above the
    controls' median rise (the summary study.py reports; no tuned threshold).

    Beating its own control latent by latent is not asserted: the SAE trained here differs between CPUs
    (bf16 matmuls), and on an AMD EPYC one of the five drawn latents (571) raised its tokens x100 at
    alpha = 2 while its control raised them x388."""
    import sae as sae_lib
    from sae.analysis.features import collect_statistics, model_batches
    from sae.analysis.steering import NEUTRAL_PROMPTS
    from sae.data import context_batches, iter_documents, pack_contexts
    from sae.lm import load_model

    torch.manual_seed(0)
    model = load_model("gemma-3-270m")
    hook = "blocks.6.hook_resid_post"
    contexts = pack_contexts(iter_documents("python-stdlib"), model.tokenizer, 128)
    token_batches = list(islice(context_batches(contexts, 8), 24))  # 24.6k tokens
    probe = SparseAutoencoder.from_config(
        SAEConfig(architecture="topk", d_in=640, d_sae=16, k=1, hookpoint=hook)
    )
    acts = torch.cat(
        [x[valid] for _, x, valid in model_batches(model, probe, token_batches)]
    )  # [tokens, 640]
    cfg = SAEConfig(
        architecture="topk", d_in=640, d_sae=1024, k=16, hookpoint=hook, model_name="gemma-3-270m"
    )
    trained = sae_lib.train(
        acts,
        sae_lib.TrainConfig(
            batch_size=1024,
            total_tokens=4 * len(acts),
            log_every=1000,
            checkpoint_every=10**9,
            out_dir=str(Path(tempfile.mkdtemp())),
        ),
        cfg,
    )

    stats = collect_statistics(
        trained,
        model_batches(model, trained, token_batches),
        k_top=20,
        k_sample=1,
        window_before=0,
        window_after=1,
    )
    candidates = study.token_latents(stats, model.tokenizer)
    chosen = study.sample(candidates, 5, seed=0)
    assert len(chosen) == 5, f"only {len(candidates)} latents meet the rule"
    controls = study.control_latents(stats, candidates, 5, seed=0)
    alphas = [0.5, 1.0, 2.0, 4.0]
    at = alphas.index(2.0)
    rises, control_rises = [], []
    for latent, control in zip(chosen, controls, strict=True):
        result = study.steer_latent(
            model,
            trained,
            latent,
            control,
            list(NEUTRAL_PROMPTS[:4]),
            alphas,
            completion_alphas=[],
            max_new_tokens=0,
        )
        described = (latent, control, result.kl, result.p_top_clean, result.p_top, result.p_top_control)
        print(described)  # the figures, for pytest -s
        assert result.kl_monotone, described
        assert result.p_top[at] > result.p_top_clean, described
        rises.append(result.p_top[at] / result.p_top_clean)
        control_rises.append(result.p_top_control[at] / result.p_top_clean)
    assert torch.tensor(rises).median() > torch.tensor(control_rises).median(), (rises, control_rises)
