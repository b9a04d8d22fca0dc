"""`sae-analyze feature-circuit` end to end on the tiny model with SAEs saved to disk, and its named errors
for SAEs that do not fit the model."""

import dataclasses
import json

import pytest
from test_splice import RESID, Z, make_sae

from sae.cli.analyze import main

ARGS = ["--task", "induction", "--prompts", "6", "--steps", "2", "--sizes", "2", "5", "--random-draws", "1"]


@pytest.fixture
def sae_paths(tiny_lm_dir, tmp_path):
    paths = []
    for sae in (make_sae(RESID, "relu"), make_sae(Z, "relu", seed=1)):
        sae.cfg = dataclasses.replace(sae.cfg, model_name=str(tiny_lm_dir))
        paths.append(str(sae.save(tmp_path / sae.cfg.hookpoint)))
    return paths


def test_feature_circuit_writes_its_report_curves_and_graph(tiny_lm_dir, sae_paths, tmp_path):
    out = tmp_path / "circuit"
    explanations = tmp_path / "explanations.jsonl"
    explanations.write_text(
        "".join(json.dumps({"latent": i, "explanation": f"latent {i}"}) + "\n" for i in range(64))
    )
    argv = ["feature-circuit", "--model", str(tiny_lm_dir), "--saes", *sae_paths, "--out", str(out), *ARGS]
    argv += ["--check-per-site", "4", "--graph-nodes", "6", "--explanations", f"{Z}={explanations}"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["curves"]) == {"mean", "resample"} and set(report["raw_basis_curves"]) == {
        "mean",
        "resample",
    }
    for curve in report["curves"].values():
        assert (
            curve["sizes"] == [2, 5] and len(curve["faithfulness"]) == len(curve["random_faithfulness"]) == 2
        )
    assert len(report["heads"][Z]) == 4  # the hook_z site's heads
    assert set(report["patching_check"]["pearson"]) == {
        "integrated_gradients",
        "attribution_patching",
        "relp",
    }
    graph = report["graph"]
    assert len(graph["nodes"]) == 6 and graph["sites"] == [RESID, Z]
    ids = {n["id"] for n in graph["nodes"]}
    assert all(e["source"] in ids and (e["target"] in ids or e["target"] == "metric") for e in graph["edges"])
    z_latents = [n for n in graph["nodes"] if n["site"] == Z and n["latent"] >= 0]
    assert all(n["explanation"] == f"latent {n['latent']}" for n in z_latents)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "graph-data" in (out / "graph.html").read_text()
    assert report["seconds"]["nodes"] > 0 and report["method"]["forwards"] == 2 + 2 * 2


def test_saes_that_do_not_fit_the_model_are_named(tiny_lm_dir, sae_paths, tmp_path, capsys):
    other = make_sae(RESID, "relu")
    other.cfg = dataclasses.replace(other.cfg, model_name="gpt2")
    wrong_model = str(other.save(tmp_path / "other"))
    narrow = make_sae(RESID, "relu")
    narrow.cfg = dataclasses.replace(narrow.cfg, d_in=16, d_out=16, model_name=str(tiny_lm_dir))
    import torch

    narrow.W_enc, narrow.W_dec = (
        torch.nn.Parameter(torch.randn(64, 16)),
        torch.nn.Parameter(torch.randn(64, 16)),
    )
    narrow.b_dec = torch.nn.Parameter(torch.zeros(16))
    wrong_width = str(narrow.save(tmp_path / "narrow"))
    elsewhere = make_sae("blocks.7.hook_resid_post", "relu")  # the tiny model has 2 blocks
    elsewhere.cfg = dataclasses.replace(elsewhere.cfg, model_name=str(tiny_lm_dir))
    wrong_hook = str(elsewhere.save(tmp_path / "elsewhere"))
    cases = [
        (wrong_model, "trained on model 'gpt2'"),
        (wrong_width, "d_in=16"),
        (wrong_hook, "unknown hookpoint(s) ['blocks.7.hook_resid_post']"),
    ]
    for path, message in cases:
        argv = [
            "feature-circuit",
            "--model",
            str(tiny_lm_dir),
            "--saes",
            path,
            "--out",
            str(tmp_path / "x"),
            *ARGS,
        ]
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "report.json").exists()
