"""`analyze.py bench`: dictionaries side by side on the same tokens, with sparse probing, on the tiny LM."""

import json

import sae
from sae.cli import analyze

HOOK = "blocks.1.hook_resid_post"


def save(tmp_path, tiny_lm_dir, name: str, **kw) -> str:
    cfg = sae.SAEConfig(d_in=32, d_sae=64, hookpoint=HOOK, model_name=str(tiny_lm_dir), **kw)
    sae.SparseAutoencoder.from_config(cfg, seed=0).save(tmp_path / name)
    return str(tmp_path / name)


def test_bench_compares_dictionaries_and_probes_token_classes(tiny_lm_dir, tmp_path):
    saes = [
        save(tmp_path, tiny_lm_dir, "topk", architecture="topk", k=4),
        save(tmp_path, tiny_lm_dir, "relu", architecture="relu"),
    ]
    args = ["bench", *saes, "--out", str(tmp_path / "bench"), "--tokens", "300", "--context-size", "32"]
    assert analyze.main([*args, "--probe-tokens", "3000", "--ks", "1", "2", "--per-class", "100"]) == 0
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert list(report["dictionaries"]) == saes and report["samples"]["probe_tokens"] == 3000
    for entry in report["dictionaries"].values():
        assert entry["core"]["l0"] > 0 and 0 < entry["core"]["shrinkage"]
        probed = {r["concept"] for r in entry["probing"]}
        assert {"keyword", "identifier", "operator"} <= probed  # common in any 3,000 tokens of source
        assert probed.isdisjoint(entry["probing_skipped"])  # each concept scored or said why not
        assert all(0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1 for r in entry["probing"])
    assert {r["concept"] for r in report["probing_raw_dimensions"]} == probed
    assert "| raw dimensions |" in (tmp_path / "bench" / "bench.md").read_text()
    assert (tmp_path / "bench" / "pareto.png").stat().st_size and (
        tmp_path / "bench" / "probing.png"
    ).stat().st_size


def test_bench_refuses_dictionaries_of_different_sites(tiny_lm_dir, tmp_path, capsys):
    first = save(tmp_path, tiny_lm_dir, "a", architecture="topk", k=4)
    cfg = sae.SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint="blocks.0.hook_resid_post")
    sae.SparseAutoencoder.from_config(cfg, seed=0).save(tmp_path / "b")
    assert analyze.main(["bench", first, str(tmp_path / "b"), "--out", str(tmp_path / "bench")]) == 1
    assert "must share one known hookpoint" in capsys.readouterr().err


def test_bench_scores_absorption_and_autointerp_or_says_why_not(tiny_lm, tiny_lm_dir, tmp_path):
    """The embedding score against a scripted explainer on a real tiny cache; absorption, which the tiny
    vocabulary cannot support (tests/test_absorption.py checks it on planted words), and a transcoder's
    absorption skipped with their reasons."""
    from test_autointerp import EXPLANATION_PREFIX, ScriptedServer, completion_payload
    from tiny_lm import tiny_run_config

    from cache import build_cache

    run_config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"tokens": 2000, "dtype": "float32"})
    cache_dir = build_cache(run_config, tiny_lm)
    saes = [save(tmp_path, tiny_lm_dir, "topk", architecture="topk", k=4)]
    transcoder = sae.SAEConfig(
        architecture="topk",
        d_in=32,
        d_sae=64,
        k=4,
        transcoder=True,
        hookpoint="blocks.1.mlp.hook_in",
        output_hookpoint="blocks.1.mlp.hook_out",
        model_name=str(tiny_lm_dir),
    )
    sae.SparseAutoencoder.from_config(transcoder, seed=0).save(tmp_path / "transcoder")

    def reply(n, path, body):
        assert body["prompt"].endswith(EXPLANATION_PREFIX)  # the embedding scorer needs no LLM judge
        return 200, completion_payload(" the word def"), 0

    args = ["bench", *saes, "--out", str(tmp_path / "bench"), "--tokens", "300", "--context-size", "32"]
    args += ["--probe-tokens", "2000", "--ks", "1", "--per-class", "50", "--absorption-words", "40"]
    with ScriptedServer(reply) as server:
        args += [
            "--autointerp-cache",
            str(cache_dir),
            "--autointerp-latents",
            "6",
            "--autointerp-tokens",
            "2000",
        ]
        assert analyze.main([*args, "--autointerp-backend", "http", "--autointerp-base-url", server.url]) == 0
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    entry = report["dictionaries"][saes[0]]
    # the tiny BPE vocabulary (320 tokens) has 6 single-token words: the metric says so, not a number
    assert "single-token words" in entry["absorption"]["not_computed"]
    score = entry["autointerp"]
    assert len(score["latents"]) == 6 and score["latents_paired"] > 0
    assert 0 <= score["real"] <= 1 and 0 <= score["control"] <= 1
    text = (tmp_path / "bench" / "bench.md").read_text()
    assert "Feature absorption" in text and "Autointerp embedding score" in text

    assert (
        analyze.main(
            [
                "bench",
                str(tmp_path / "transcoder"),
                "--out",
                str(tmp_path / "tc"),
                "--tokens",
                "300",
                "--context-size",
                "32",
                "--probe-tokens",
                "2000",
                "--ks",
                "1",
                "--per-class",
                "50",
                "--absorption-words",
                "40",
            ]
        )
        == 0
    )
    entry = json.loads((tmp_path / "tc" / "bench.json").read_text())["dictionaries"][
        str(tmp_path / "transcoder")
    ]
    assert "transcoder" in entry["absorption"]["not_computed"]
    assert entry["autointerp"] == {"not_computed": "no --autointerp-cache"}
