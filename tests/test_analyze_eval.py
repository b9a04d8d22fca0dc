"""`analyze.py eval` on our SAE and on the same SAE exported to SAELens's format: same figures."""

import json

import pytest

import sae
from sae.cli import analyze


def test_eval_of_ours_and_of_its_saelens_export_agree(tiny_lm_dir, tmp_path):
    cfg = sae.SAEConfig(
        architecture="topk",
        d_in=32,
        d_sae=64,
        k=4,
        hookpoint="blocks.1.hook_resid_post",
        model_name=str(tiny_lm_dir),
    )
    model = sae.SparseAutoencoder.from_config(cfg, seed=0)
    model.save(tmp_path / "ours")
    sae.export(model, tmp_path / "saelens", "saelens")
    results = {}
    for name in ("ours", "saelens"):
        args = [
            "eval",
            str(tmp_path / name),
            "--tokens",
            "300",
            "--context-size",
            "32",
            "--out",
            str(tmp_path / f"{name}_eval"),
        ]
        if name == "saelens":
            args += [
                "--model",
                str(tiny_lm_dir),
            ]  # model names are carried over; pass it anyway for the export
        assert analyze.main(args) == 0
        results[name] = json.loads((tmp_path / f"{name}_eval" / "eval.json").read_text())
        assert (tmp_path / f"{name}_eval" / "feature_density.png").stat().st_size > 0
    for key in ("ce_loss_clean", "ce_loss_spliced", "fvu", "l0", "kl_clean_spliced"):
        assert results["ours"][key] == pytest.approx(results["saelens"][key], rel=1e-5), key
    assert results["ours"]["tokens"] >= 300 and results["ours"]["l0"] == pytest.approx(4.0)


def test_eval_names_a_bad_option(tmp_path, capsys):
    assert analyze.main(["eval", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_an_sae_of_the_wrong_width_is_named(tiny_lm_dir, tmp_path, capsys):
    cfg = sae.SAEConfig(
        architecture="topk",
        d_in=48,
        d_sae=64,
        k=4,
        hookpoint="blocks.1.hook_resid_post",
        model_name=str(tiny_lm_dir),
    )
    sae.export(sae.SparseAutoencoder.from_config(cfg, seed=0), tmp_path / "wide", "saelens")
    assert (
        analyze.main(
            [
                "eval",
                str(tmp_path / "wide"),
                "--model",
                str(tiny_lm_dir),
                "--tokens",
                "64",
                "--context-size",
                "32",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "SAE reads d_in=48 (saelens SAE" in err and "blocks.1.hook_resid_post has width 32" in err
