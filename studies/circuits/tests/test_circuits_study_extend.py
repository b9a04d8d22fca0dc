"""`study.py --extend` on the toy models: rows already in report.json are kept, only new methods run (with
their re-initialised and own-init controls), and a run with other settings or another ground truth is
refused; and the table's parts. Trains one small toy twice (~1 min)."""

from __future__ import annotations

import json

import pytest

import study

SETTINGS = ["--seeds", "0", "--steps", "300", "--prompts", "40"]


def test_toy_extend_adds_methods_and_their_controls_and_keeps_old_rows(tmp_path):
    out = tmp_path / "run"
    study.main(["--out", str(out), *SETTINGS, "--methods", "random", "codebook_overlap"])
    before = json.loads((out / "report.json").read_text())["per_seed"][0]
    assert before["ground_truth_source"] == "computed" and "error" not in before, before.get("error")
    assert set(before["shuffled_control"]) == {"codebook_overlap"}  # random has no prompt labels to shuffle
    # an older report without one of the controls: extending with the method fills in just that
    report = json.loads((out / "report.json").read_text())
    del report["per_seed"][0]["shuffled_control"]["codebook_overlap"]
    (out / "report.json").write_text(json.dumps(report))

    study.main(
        [
            "--out",
            str(out),
            *SETTINGS,
            "--extend",
            "--methods",
            "codebook_overlap",
            "codebook_overlap_normalised",
        ]
    )
    after = json.loads((out / "report.json").read_text())
    seed0 = after["per_seed"][0]
    assert list(seed0["methods"]) == ["random", "codebook_overlap", "codebook_overlap_normalised"]
    for old in ("random", "codebook_overlap"):  # kept as they were, not recomputed
        assert seed0["methods"][old] == before["methods"][old]
    for control in ("reinit_control", "init_control"):
        assert seed0[control]["codebook_overlap"] == before[control]["codebook_overlap"]
        assert "codebook_overlap_normalised" in seed0[control]

    def timeless(summary: dict) -> dict:
        return {k: v for k, v in summary.items() if k != "seconds"}

    # the filled-in control is the one the first run made: seeded
    refilled, original = (
        seed0["shuffled_control"]["codebook_overlap"],
        before["shuffled_control"]["codebook_overlap"],
    )
    assert timeless(refilled) == timeless(original)
    assert "codebook_overlap_normalised" in seed0["shuffled_control"]
    assert seed0["extended_effects_max_abs_difference"] < 1e-4  # the retrained toy is the same model
    assert "codebook_overlap_normalised" in after["table"]
    assert after["args"]["methods"] == ["codebook_overlap", "codebook_overlap_normalised"]
    assert [run["methods"] for run in after["args"]["earlier_runs"]] == [["random", "codebook_overlap"]]

    with pytest.raises(ValueError, match="--steps"):
        study.main(
            [
                "--out",
                str(out),
                "--seeds",
                "0",
                "--steps",
                "200",
                "--prompts",
                "40",
                "--extend",
                "--methods",
                "oneill",
            ]
        )
    report = json.loads((out / "report.json").read_text())
    report["per_seed"][0]["ground_truth"][0] = [1 - x for x in report["per_seed"][0]["ground_truth"][0]]
    (out / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="ground truth"):
        study.main(["--out", str(out), *SETTINGS, "--extend", "--methods", "oneill"])


def test_control_verdict_names_the_controls_outside_the_chance_band():
    assert study.control_verdict({"shuffled": [0.45, 0.55], "re-init": [0.5]}) == "yes: shuffled, re-init"
    assert study.control_verdict({"shuffled": [], "re-init": [0.5]}) == "yes: re-init"
    assert study.control_verdict({"shuffled": [0.5], "re-init": [0.2, 0.3]}) == "no: re-init 0.25"
    assert study.control_verdict({"shuffled": [0.9], "re-init": []}) == "no: shuffled 0.90"
    assert study.control_verdict({"shuffled": [], "re-init": []}) == "not run"


def test_table_of_a_partly_extended_run_has_every_method():
    evaluation = {
        "roc_auc": 0.5,
        "roc_auc_within_layers": None,
        "at_k": {"precision": 0.0, "recall": 0.0},
        "at_threshold": {"f1": 0.0},
        "oracle_best_f1": 0.0,
        "forward_prompts": 0,
        "backward_prompts": 0,
        "seconds": 0.0,
    }
    per_seed = [
        {
            "seed": 0,
            "methods": {"random": evaluation, "new": evaluation | {"roc_auc": 0.9}},
            "reinit_control": {},
        },
        {"seed": 1, "methods": {"random": evaluation}, "reinit_control": {}},
    ]  # not extended yet
    table = study.results_table(per_seed)
    assert "| random | 0.500 ± 0.000 |" in table and "| new | 0.900 ± 0.000 |" in table
    # a control that ran on fewer seeds than its method says so
    per_seed[0]["reinit_control"] = {"new": {"roc_auc": 0.3}}
    assert "0.300 ± 0.000 (1 of 1 seeds)" not in study.results_table(per_seed)  # "new" ran on seed 0 only
    per_seed[1]["methods"]["new"] = per_seed[0]["methods"]["new"]
    assert "0.300 ± 0.000 (1 of 2 seeds) | no: re-init 0.30 |" in study.results_table(per_seed)


def test_extending_some_seeds_keeps_the_others():
    """Seeds an extending run does not ask for stay in the report, in their order, beside the re-run ones."""
    previous = {
        0: {"seed": 0, "methods": {"a": 1}},
        1: {"seed": 1, "methods": {"a": 2}},
        2: {"seed": 2, "methods": {}},
    }
    merged = study.with_earlier_seeds(previous, [{"seed": 1, "methods": {"a": 2, "b": 3}}])
    assert [r["seed"] for r in merged] == [0, 1, 2] and merged[1]["methods"] == {"a": 2, "b": 3}
    assert study.with_earlier_seeds({}, [{"seed": 4}]) == [{"seed": 4}]
