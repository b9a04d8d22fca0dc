"""Latent statistics stream exactly (checked against the whole activation matrix), and the static
dashboard built from the real tiny transformer loads in a real headless Chromium without JavaScript
errors, with highlighted tokens on its screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from sae import SAEConfig, SparseAutoencoder
from sae.analysis.dashboard import read_explanations, write_dashboard
from sae.analysis.features import LatentStatistics, Unembedding, collect_statistics, model_batches
from sae.data import context_batches, pack_contexts, stdlib_source_files

CHROMIUM = Path("/usr/bin/chromium")
HOOK = "blocks.1.hook_resid_post"


def test_streamed_top_examples_and_counts_match_the_full_matrix():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (12, 10), generator=generator)
    acts = torch.randn(12, 10, 5, generator=generator).relu() * torch.rand(
        5, generator=generator
    )  # [b, t, L]
    stats = LatentStatistics(5, k_top=6, k_sample=8, window_before=2, window_after=1, seed=0)
    for b in range(0, 12, 3):  # four batches
        stats.update(tokens[b : b + 3], acts[b : b + 3])
    flat = acts.reshape(-1, 5)
    for latent in range(5):
        expected = flat[:, latent].topk(6).values
        got = torch.tensor([v for v, _, _ in stats.examples(latent)])
        assert torch.allclose(got, expected[expected > 0]), latent
        value, window_tokens, window_acts = stats.examples(latent)[0]
        row = int(flat[:, latent].argmax())
        context, position = divmod(row, 10)
        assert window_tokens[2] == tokens[context, position] and window_acts[2] == pytest.approx(value)
        if position == 0:
            assert window_tokens[:2] == [-1, -1], "positions before the context are padding"
        assert len(stats.examples(latent, "sample")) == min(8, int((flat[:, latent] > 0).sum()))
    assert torch.equal(stats.fire_count, (flat > 0).sum(0))
    assert torch.equal(stats.histogram.sum(1), stats.fire_count)
    assert stats.tokens_seen == 120


def test_explanations_file_is_read_strictly(tmp_path):
    good = tmp_path / "explanations.jsonl"
    good.write_text('{"latent": 3, "explanation": "commas", "scores": {"detection": 0.8}}\n\n{"latent": 4}\n')
    explanations = read_explanations(good)
    assert explanations[3].explanation == "commas" and explanations[3].scores == {"detection": 0.8}
    assert explanations[4].explanation is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"latent": 3, "explantion": "typo"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown key\(s\) explantion"):
        read_explanations(bad)


@pytest.fixture(scope="module")
def dashboard_dir(tiny_lm, tmp_path_factory):
    cfg = SAEConfig(architecture="topk", d_in=32, d_sae=96, k=4, hookpoint=HOOK)
    sae = SparseAutoencoder.from_config(cfg, seed=1)
    documents = (p.read_text(errors="replace") for p in stdlib_source_files()[:4])
    batches = context_batches(pack_contexts(documents, tiny_lm.tokenizer, 32), 8)
    token_batches = [b for _, b in zip(range(4), batches)]
    stats = collect_statistics(
        sae, model_batches(tiny_lm, sae, token_batches), latents=torch.arange(0, 96, 2)
    )
    explanations = tmp_path_factory.mktemp("explain") / "explanations.jsonl"
    explanations.write_text(
        json.dumps({"latent": 4, "explanation": "a <b>bold</b> </script> test", "scores": {"detection": 0.5}})
        + "\n"
    )
    steering = tmp_path_factory.mktemp("steer") / "steer.json"
    steering.write_text(
        json.dumps(
            {
                "comparisons": [
                    {
                        "prompt": "def f(",
                        "latent": 4,
                        "mode": "add",
                        "alpha": 2.0,
                        "strength": 3.0,
                        "next_token_kl": 0.1,
                        "unsteered": {"text": " x)", "latent_activation_mean": 0.1, "perplexity": 9.0},
                        "steered": {"text": " y)", "latent_activation_mean": 0.9, "perplexity": 11.0},
                    }
                ]
            }
        )
    )
    from sae.analysis.dashboard import read_steering_examples

    out = tmp_path_factory.mktemp("dashboard")
    write_dashboard(
        out,
        sae,
        stats,
        tiny_lm.tokenizer,
        unembedding=Unembedding(tiny_lm),
        explanations=read_explanations(explanations),
        steering=read_steering_examples([steering]),
        source="python-stdlib",
        model_name="tiny",
        chunk_size=16,
    )
    return out


def test_dashboard_is_split_into_chunks(dashboard_dir):
    chunks = sorted((dashboard_dir / "data").glob("chunk_*.js"))
    assert len(chunks) == 3  # 48 latents, 16 per chunk
    assert (dashboard_dir / "index_data.js").read_text().startswith("SAE_DASHBOARD.index(")
    assert "</script>" not in (dashboard_dir / "data" / "chunk_00000.js").read_text()


def run_chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                *flags,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def console_messages(result: subprocess.CompletedProcess) -> list[str]:
    """Every console message and uncaught exception the page produced (our pages log nothing)."""
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_pages_load_in_chromium_without_errors_and_show_highlighted_tokens(dashboard_dir, tmp_path):
    index = run_chromium(f"file://{dashboard_dir}/index.html#sort=latent&asc=1", "--dump-dom")
    assert console_messages(index) == [], console_messages(index)
    assert index.stdout.count('href="latent.html#') == 48
    assert (
        index.stdout.index('latent.html#0"')
        < index.stdout.index('latent.html#2"')
        < index.stdout.index('latent.html#94"')
    )

    searched = run_chromium(f"file://{dashboard_dir}/index.html#q=bold", "--dump-dom")
    assert console_messages(searched) == [] and searched.stdout.count('href="latent.html#') == 1
    assert "&lt;b&gt;bold&lt;/b&gt;" in searched.stdout, "explanations are text, never HTML"
    assert '<th data-key="score">detection</th>' in searched.stdout and ">0.500<" in searched.stdout

    page = run_chromium(f"file://{dashboard_dir}/latent.html#4", "--dump-dom")
    assert console_messages(page) == [], console_messages(page)
    assert "Top activations" in page.stdout and "Top logits" in page.stdout and "Steering" in page.stdout
    assert "<th>perplexity (clean model)</th>" in page.stdout and "<th>concept score</th>" in page.stdout
    assert page.stdout.count('class="tok center"') >= 5 and "<svg" in page.stdout
    assert 'data-tip="' in page.stdout, "hovering a token shows it with its activation"

    missing = run_chromium(
        f"file://{dashboard_dir}/latent.html#5", "--dump-dom"
    )  # odd latents were not tracked
    assert "is not in this dashboard" in missing.stdout

    screenshot = tmp_path / "latent.png"
    shot = run_chromium(
        f"file://{dashboard_dir}/latent.html#4", f"--screenshot={screenshot}", "--window-size=1200,1400"
    )
    assert console_messages(shot) == [] and screenshot.is_file()
    from PIL import Image

    pixels = (
        torch.from_numpy(np.array(Image.open(screenshot).convert("RGB"))).reshape(-1, 3).int()
    )  # [h*w, 3]
    r, g, b = pixels.T
    highlighted = (r > 230) & (g > 120) & (g < 225) & (b < 190) & (r - b > 60)  # orange token backgrounds
    assert highlighted.sum() > 500, f"only {int(highlighted.sum())} highlight pixels on the screenshot"


def test_examples_from_a_cache_match_examples_from_the_model(tiny_lm, tiny_lm_dir, tmp_path):
    from tiny_lm import tiny_run_config

    from cache import build_cache, read_manifest
    from sae.analysis.features import cache_batches
    from sae.data import token_contexts

    run = tiny_run_config(tiny_lm_dir, tmp_path, cache={"tokens": 1000, "dtype": "float32"})
    cache_dir = build_cache(run, tiny_lm)
    contexts = read_manifest(cache_dir)["contexts"]
    sae = SparseAutoencoder.from_config(
        SAEConfig(architecture="topk", d_in=32, d_sae=48, k=4, hookpoint=HOOK), seed=2
    )
    from_cache = collect_statistics(sae, cache_batches(cache_dir, sae, contexts_per_batch=5), k_top=5)
    token_batches = list(context_batches(islice(token_contexts(run.data, tiny_lm.tokenizer), contexts), 8))
    from_model = collect_statistics(sae, model_batches(tiny_lm, sae, token_batches), k_top=5)
    assert from_cache.tokens_seen == from_model.tokens_seen == contexts * 31
    assert torch.equal(from_cache.fire_count, from_model.fire_count)
    for latent in range(0, 48, 7):
        cached, direct = from_cache.examples(latent), from_model.examples(latent)
        assert [round(v, 4) for v, _, _ in cached] == [round(v, 4) for v, _, _ in direct]
        # the cache has no BOS position, so its windows are the model's windows without BOS
        assert [t[from_cache.center] for _, t, _ in cached] == [t[from_model.center] for _, t, _ in direct]


def test_logit_effects_fold_the_final_norm(tiny_lm_dir):
    """Direct logit effects track the model's own logit change for a small step along a direction."""
    from sae.lm import load_model

    tiny_lm = load_model(str(tiny_lm_dir))  # a private copy: its final norm gets an uneven gain
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=generator)
    tokens = tiny_lm.to_tokens("x = 1")
    with torch.no_grad():
        tiny_lm.ln_final._original_component.weight.copy_(torch.rand(32, generator=generator) * 5)
        _, cache = tiny_lm.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
        resid = cache["blocks.1.hook_resid_post"][0, -1]  # [d_model]
        ln = tiny_lm.ln_final._original_component
        step = 1e-3
        change = (
            tiny_lm.unembed(ln(resid + step * direction)) - tiny_lm.unembed(ln(resid))
        ) / step  # [vocab]
    predicted = Unembedding(tiny_lm).logits(direction)
    # LayerNorm's Jacobian also divides by the residual's std and projects out the residual itself: compare
    # rankings through the correlation, which the fold must make near 1 (a raw W_U product does not need to)
    correlation = torch.corrcoef(torch.stack([change, predicted]))[0, 1]
    assert correlation > 0.9, correlation
    unfolded = torch.corrcoef(torch.stack([change, direction @ tiny_lm.W_U.detach()]))[0, 1]
    assert unfolded < correlation - 0.1, "the check tells a folded norm from a bare W_U"


def test_explanations_written_by_autointerp_are_read_and_shown(tmp_path):
    """The dashboard reads the explanations.jsonl that `analyze.py autointerp` writes (its own writer)."""
    from sae.analysis.autointerp.pipeline import LatentResult, summarize, write_reports

    results = [
        LatentResult(
            latent=7,
            fire_count=10,
            max_activation=3.0,
            n_activating_examples=5,
            n_negative_examples=5,
            explanation="the keyword raise",
            explanation_failure=None,
            explanation_detail="",
            scores={
                "detection": {
                    "metrics": {"accuracy": 0.75, "auroc": float("nan")},
                    "n_examples": 10,
                    "parse_failures": 0,
                    "errors": 0,
                }
            },
        ),
        LatentResult(
            latent=9,
            fire_count=3,
            max_activation=1.0,
            n_activating_examples=3,
            n_negative_examples=3,
            explanation=None,
            explanation_failure="no answer",
            explanation_detail="",
        ),
    ]
    write_reports(tmp_path, results, summarize(results, seconds=1.0), {})
    explanations = read_explanations(tmp_path / "explanations.jsonl")
    assert explanations[7].explanation == "the keyword raise"
    assert explanations[7].scores == {"detection_accuracy": 0.75}, "undefined (NaN) scores are left out"
    assert explanations[9].explanation is None and explanations[9].scores == {}


def test_steering_several_latents_together_is_shown_on_each_page(tmp_path):
    from sae.analysis.dashboard import read_steering_examples

    path = tmp_path / "steer.json"
    path.write_text(
        json.dumps(
            {"comparisons": [{"latent": 3, "latents": [3, 8], "prompt": "p"}, {"latent": 5, "prompt": "q"}]}
        )
    )
    by_latent = read_steering_examples([path])
    assert [c["prompt"] for c in by_latent[3]] == [c["prompt"] for c in by_latent[8]] == ["p"]
    assert [c["prompt"] for c in by_latent[5]] == ["q"]
    path.write_text(json.dumps({"comparisons": [{"prompt": "p"}]}))
    with pytest.raises(ValueError, match="comparison 0 names no integer latent"):
        read_steering_examples([path])


N_MANY = 2000


@pytest.fixture(scope="module")
def many_latent_dashboard(tiny_lm, tmp_path_factory):
    """2,000 latents of random statistics (the writer's cost does not depend on where they came from)."""
    generator = torch.Generator().manual_seed(3)
    sae = SparseAutoencoder.from_config(
        SAEConfig(architecture="topk", d_in=32, d_sae=N_MANY, k=8, hookpoint=HOOK), seed=0
    )
    stats = LatentStatistics(N_MANY, k_top=10, k_sample=16, window_before=8, window_after=2)
    for _ in range(4):
        tokens = torch.randint(3, 300, (8, 32), generator=generator)
        acts = torch.randn(8, 32, N_MANY, generator=generator).sub(1.5).relu()  # [b, t, L], about 7% firing
        stats.update(tokens, acts)
    out = tmp_path_factory.mktemp("many")
    write_dashboard(out, sae, stats, tiny_lm.tokenizer, unembedding=Unembedding(tiny_lm), model_name="tiny")
    return out


def test_thousands_of_latents_are_split_into_small_files(many_latent_dashboard):
    chunks = sorted((many_latent_dashboard / "data").glob("chunk_*.js"))
    assert len(chunks) == -(-N_MANY // 64), "64 latents per data file by default"
    sizes = [c.stat().st_size for c in chunks]
    index_size = (many_latent_dashboard / "index_data.js").stat().st_size
    assert max(sizes) < 2 * sum(sizes) / len(sizes), "no chunk is much bigger than the others"
    assert index_size < sum(sizes) / 4, "the index holds one short row per latent, not the examples"
    assert '"latents":{"1984":' in chunks[-1].read_text()[:200], "the last chunk holds the last latents"


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_thousands_of_latents_load_in_chromium(many_latent_dashboard):
    index = run_chromium(f"file://{many_latent_dashboard}/index.html#sort=latent&asc=1", "--dump-dom")
    assert console_messages(index) == [], console_messages(index)
    assert f"{N_MANY} latents of {N_MANY}" in index.stdout
    assert index.stdout.count('href="latent.html#') == 200, "the index draws 200 rows at a time"
    assert f"show more ({N_MANY - 200} hidden)" in index.stdout
    found = run_chromium(f"file://{many_latent_dashboard}/index.html#q=1999", "--dump-dom")
    assert console_messages(found) == [] and found.stdout.count('href="latent.html#') == 1
    last = run_chromium(f"file://{many_latent_dashboard}/latent.html#1999", "--dump-dom")
    assert console_messages(last) == [], console_messages(last)
    assert "Latent 1999" in last.stdout and "Top activations" in last.stdout
