"""Fixtures for the library's tests (tests/) and the studies' tests (studies/*/tests/): a tiny random
GPT-2 with a real tokenizer, built once per session (tests/tiny_lm.py)."""

from pathlib import Path

import pytest

from tests.tiny_lm import make_tiny_lm


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm") / "model")


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    from sae.lm import load_model

    return load_model(str(tiny_lm_dir))
