"""The layering of the package (pyproject.toml's import-linter contracts): text/LM -> cache -> SAE core ->
analyses -> CLIs, and no import cycle between the modules of a package."""

from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent


def test_imports_follow_the_layers_and_form_no_cycle():
    assert lint_imports(config_filename=str(REPO / "pyproject.toml")) == 0, "see the broken contracts above"
