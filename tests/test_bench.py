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
