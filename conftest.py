"""Fixtures for the library's tests (tests/) and the studies' tests (studies/*/tests/): a tiny random
GPT-2 with a real tokenizer and a tiny Gemma 3 on it, built once per session (tests/tiny_lm.py). Under
CI=true a skipped test fails: CI has Chromium and every extra, so a skip there is a test that did not run."""

import os
from pathlib import Path

import pytest

from tests.tiny_lm import make_tiny_gemma, make_tiny_lm


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm") / "model")


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from sae.lm import load_model

    return load_model(str(tiny_lm_dir))


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, tiny_lm_dir):
    from sae.lm import load_model

    return load_model(str(make_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma") / "model", tiny_lm_dir)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {report.longrepr}"
