"""The run config of `sae-train`: defaults in one place, strict reading, partial sections, and a TOML
round trip through `--print-config`."""

import subprocess
import sys
from pathlib import Path

import pytest

from sae.cli.run_config import RunConfig, SAESection, load_run_config
from sae.config import SAEConfig
from sae.typed_config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_print_config_writes_the_defaults_as_a_file_that_reads_back_as_them(tmp_path):
    printed = subprocess.run(
        [sys.executable, "train.py", "--print-config"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    path = tmp_path / "default.toml"
    path.write_text(printed)
    assert load_run_config(path) == RunConfig() == load_run_config()


def test_a_section_given_in_part_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nbatch_size = 512\n[sae]\nk = 16\n")
    config = load_run_config(path, ["cache.tokens=2000"])
    assert config.train.batch_size == 512 and config.train.out_dir == RunConfig().train.out_dir
    assert config.sae.k == 16 and config.sae.d_sae == SAESection().d_sae
    assert config.cache.tokens == 2000 and config.cache.hookpoints == RunConfig().cache.hookpoints


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sae.kk=3"], r"config\.sae: unknown key 'kk'; valid keys: architecture, d_sae, k"),
        (["sae.architecture=gated"], r"config\.sae\.architecture: 'gated' is not one of"),
        (["sae.k=0"], r"sae.k must satisfy 0 < k <= d_sae"),
        (["sae.hookpoint=blocks.2.hook_resid_post"], r"not cached; cache.hookpoints"),
        (['sae.hookpoints=["a", "a"]'], r"distinct"),
        (['sae.hookpoints="all"', "sae.hookpoint=blocks.6.hook_resid_post"], r"leave out sae.hookpoint"),
        (["train.batch_size=big"], r"config\.train\.batch_size: expected an integer"),
        (["model.dtype=int8"], r"config\.model\.dtype: 'int8' is not one of"),
        (["cache.shard_contexts=20"], r"multiple of cache.batch_contexts"),
    ],
)
def test_bad_values_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_every_trainable_sae_config_field_is_a_run_config_key_or_comes_from_the_model():
    """A field added to SAEConfig must be reachable from a run config, or be listed here as given by the
    model and the cache, or as only meaningful for loaded dictionaries."""
    # transcoder and d_out follow from sae.output_hookpoint and the width cached there
    from_model_and_cache = {"d_in", "d_out", "transcoder", "model_name", "hook_layout"}
    load_only = {"apply_b_dec_to_input", "input_norm", "dtype", "source_format"}
    section = set(SAESection.__dataclass_fields__)
    assert set(SAEConfig.__dataclass_fields__) - section == from_model_and_cache | load_only
    assert section - set(SAEConfig.__dataclass_fields__) == {"hookpoints"}


def test_the_sae_config_is_completed_by_the_model_and_the_cache():
    config = load_run_config(None, ["sae.architecture=codebook", "sae.similarity=inner", "sae.k=4"])
    cfg = config.sae_config(d_in=640, hook_layout="flat")
    assert (cfg.architecture, cfg.d_in, cfg.k, cfg.similarity) == ("codebook", 640, 4, "inner")
    assert (cfg.model_name, cfg.hookpoint) == ("gemma-3-270m", "blocks.6.hook_resid_post")
