"""The caching stage on a tiny model: contents match a direct forward, manifest, resume rules, reader."""

import json
from collections import Counter
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import tiny_run_config

from cache import ActivationReader, CacheError, build_cache, load_activations, read_manifest
from cache.manifest import acts_key
from sae.data import token_contexts
from sae.lm import capture, hookpoints_ready
from sae.typed_config import ConfigError

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.attn.hook_result"]


@pytest.fixture(scope="module")
def multi_hook_cache(tiny_lm, tiny_lm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    config = tiny_run_config(tiny_lm_dir, tmp, cache={"hookpoints": HOOKS, "dtype": "float32"})
    return config, build_cache(config, tiny_lm, progress=False)


def test_cache_holds_the_forward_activations_without_bos(multi_hook_cache, tiny_lm):
    config, cache_dir = multi_hook_cache
    manifest = read_manifest(cache_dir)
    shard = load_file(cache_dir / manifest["shards"][0]["file"])
    contexts = torch.tensor(list(islice(token_contexts(config.data, tiny_lm.tokenizer), 16)))
    with hookpoints_ready(tiny_lm, HOOKS):
        expected = capture(tiny_lm, contexts, HOOKS, stop_at_layer=None)
    for hook in HOOKS:
        torch.testing.assert_close(shard[acts_key(hook)], expected[hook][:, 1:].flatten(0, 1))
    assert torch.equal(shard["tokens"], contexts[:, 1:].flatten().int())
    assert shard["positions"][:31].tolist() == list(range(1, 32))


def test_manifest_describes_the_cache(multi_hook_cache):
    _, cache_dir = multi_hook_cache
    manifest = read_manifest(cache_dir)
    assert manifest["complete"] and manifest["tokens"] >= 3000
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"]) == manifest["contexts"] * 31
    assert manifest["hookpoints"] == {
        "blocks.1.hook_resid_post": {"shape": [32], "layout": "flat"},
        "blocks.0.attn.hook_z": {"shape": [4, 8], "layout": "heads"},
        "blocks.0.attn.hook_result": {"shape": [4, 32], "layout": "heads"},
    }
    assert manifest["model"]["weights"].startswith("sha256:") and manifest["dtype"] == "float32"
    assert manifest["data"]["dataset"] == "python-stdlib" and manifest["data"]["context_size"] == 32
    assert all(s["bytes"] == (cache_dir / s["file"]).stat().st_size for s in manifest["shards"])
    stats = manifest["norm_stats"]["blocks.1.hook_resid_post"]
    acts = load_activations(cache_dir, "blocks.1.hook_resid_post")
    assert stats["count"] == len(acts)
    assert stats["mean"] == pytest.approx(acts.norm(dim=1).mean().item(), rel=1e-4)
    assert stats["max"] == pytest.approx(acts.norm(dim=1).max().item(), rel=1e-4)


def test_stop_at_layer_skips_upper_blocks(tiny_lm, tiny_lm_dir, tmp_path):
    config = tiny_run_config(
        tiny_lm_dir, tmp_path, cache={"hookpoints": ["blocks.0.hook_resid_post"], "tokens": 200}
    )
    from sae.lm import stop_layer

    assert stop_layer(["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"], n_layers=2) == 1
    assert stop_layer(["blocks.1.hook_resid_post"], n_layers=2) is None
    ran = []
    handle = tiny_lm.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        build_cache(config, tiny_lm, progress=False)
    finally:
        handle.remove()
    assert ran == []


def test_keeping_bos_and_bf16(tiny_lm, tiny_lm_dir, tmp_path):
    config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"exclude_bos": False, "tokens": 500})
    cache_dir = build_cache(config, tiny_lm, progress=False)
    shard = load_file(cache_dir / "shard_000000.safetensors")
    assert shard["positions"][:3].tolist() == [0, 1, 2]
    assert shard["tokens"][0].item() == tiny_lm.tokenizer.bos_token_id
    assert shard[acts_key("blocks.1.hook_resid_post")].dtype == torch.bfloat16


def test_rerun_is_a_no_op_growing_extends_other_settings_refuse(tiny_lm, tiny_lm_dir, tmp_path):
    config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"tokens": 1000})
    build_cache(config, tiny_lm, progress=False)
    before = read_manifest(config.cache.dir)
    build_cache(config, tiny_lm, progress=False)
    assert read_manifest(config.cache.dir) == before
    bigger = tiny_run_config(tiny_lm_dir, tmp_path, cache={"tokens": 2000})
    build_cache(bigger, tiny_lm, progress=False)
    after = read_manifest(config.cache.dir)
    assert after["tokens"] >= 2000 and after["shards"][: len(before["shards"])] == before["shards"]
    other = tiny_run_config(tiny_lm_dir, tmp_path, data={"context_size": 16})
    with pytest.raises(CacheError, match="context_size"):
        build_cache(other, tiny_lm, progress=False)


def test_unknown_hookpoint_is_named(tiny_lm, tiny_lm_dir, tmp_path):
    config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"hookpoints": ["blocks.1.hook_resid_pots"]})
    with pytest.raises(ConfigError, match=r"unknown hookpoint\(s\) \['blocks.1.hook_resid_pots'\]"):
        build_cache(config, tiny_lm, progress=False)


def _row_counts(rows: torch.Tensor) -> Counter:
    """Rows as a multiset (identical contexts, e.g. licence headers, give identical rows)."""
    return Counter(tuple(r.tolist()) for r in rows)


# --- reader ---------------------------------------------------------------------------------------


def test_reader_serves_every_row_once_shuffled_and_deterministically(multi_hook_cache):
    _, cache_dir = multi_hook_cache
    everything = load_activations(cache_dir, "blocks.1.hook_resid_post")
    reader = ActivationReader(
        cache_dir, "blocks.1.hook_resid_post", batch_size=100, window_shards=2, num_workers=2
    )
    batches = list(reader.batches())
    assert len(batches) == len(reader) == len(everything) // 100
    served = torch.cat(batches)
    assert not torch.equal(served[:100], everything[:100])  # shuffled
    assert not _row_counts(served) - _row_counts(everything)  # every cached row at most once
    again = ActivationReader(cache_dir, "blocks.1.hook_resid_post", batch_size=100, window_shards=2)
    assert all(torch.equal(a, b) for a, b in zip(batches, again.batches()))


def test_reader_resumes_at_any_batch_and_runs_epochs(multi_hook_cache):
    _, cache_dir = multi_hook_cache
    reader = ActivationReader(cache_dir, "blocks.1.hook_resid_post", batch_size=64, window_shards=3, epochs=2)
    batches = list(reader.batches())
    assert len(batches) == len(reader) == 2 * reader.batches_per_epoch
    for start in (1, 7, reader.batches_per_epoch - 1, reader.batches_per_epoch + 2):
        assert all(torch.equal(a, b) for a, b in zip(batches[start:], reader.batches(start), strict=True))
    assert not torch.equal(batches[0], batches[reader.batches_per_epoch])  # epochs are shuffled anew


def test_reader_ranks_split_the_data(multi_hook_cache):
    _, cache_dir = multi_hook_cache
    ranks = [
        ActivationReader(cache_dir, "blocks.1.hook_resid_post", batch_size=50, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) > 0
    served = [_row_counts(torch.cat(list(reader.batches()))) for reader in ranks]
    assert not (served[0] + served[1]) - _row_counts(load_activations(cache_dir, "blocks.1.hook_resid_post"))
    with pytest.raises(ValueError, match="rank"):
        ActivationReader(cache_dir, batch_size=50, rank=2, world_size=2)


def test_reader_per_head_layouts(multi_hook_cache):
    _, cache_dir = multi_hook_cache
    concatenated = ActivationReader(cache_dir, "blocks.0.attn.hook_z", batch_size=32)
    one_head = ActivationReader(cache_dir, "blocks.0.attn.hook_z", batch_size=32, head_index=3)
    assert concatenated.d_in == 32 and next(concatenated.batches()).shape == (32, 32)
    assert one_head.d_in == 8
    torch.testing.assert_close(one_head.read_shard(0), concatenated.read_shard(0)[:, 24:32])
    with pytest.raises(CacheError, match=r"no hookpoint 'blocks\.5\.hook_z'"):
        ActivationReader(cache_dir, "blocks.5.hook_z")
    with pytest.raises(CacheError, match="no full batch"):
        ActivationReader(cache_dir, batch_size=10**7)


def test_sae_train_reads_a_cache_directory(multi_hook_cache, tmp_path):
    """sae.train(cache_dir, ...) streams the hookpoint its SAEConfig names, as DESIGN.md promises."""
    import sae

    _, cache_dir = multi_hook_cache
    cfg = sae.SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hookpoint="blocks.1.hook_resid_post")
    model = sae.train(
        str(cache_dir), sae.TrainConfig(batch_size=256, out_dir=str(tmp_path), log_every=2), cfg
    )
    metrics = json.loads((tmp_path / "blocks.1.hook_resid_post_topk_k4_64" / "metrics.json").read_text())
    assert metrics["tokens"] >= 2048 and metrics["fvu"] < 1.0
    assert model.cfg.hookpoint == "blocks.1.hook_resid_post"


def test_a_model_in_another_dtype_than_the_config_is_refused(tiny_lm, tiny_lm_dir, tmp_path):
    config = tiny_run_config(tiny_lm_dir, tmp_path, model={"dtype": "bfloat16"})  # tiny_lm is float32
    with pytest.raises(CacheError, match=r"build_cache is torch\.float32, but model\.dtype is 'bfloat16'"):
        build_cache(config, tiny_lm, progress=False)
    assert not (tmp_path / "cache").exists()


def test_caching_hook_result_leaves_the_model_as_it_came(tiny_lm, tiny_lm_dir, tmp_path):
    # Per-head results change the attention's arithmetic, so a model left with them on would cache
    # other bits afterwards (found as a resume test that failed only after this module ran).
    config = tiny_run_config(tiny_lm_dir, tmp_path, cache={"hookpoints": ["blocks.0.attn.hook_result"]})
    tokens = torch.tensor(list(islice(token_contexts(config.data, tiny_lm.tokenizer), 4)))
    before = capture(tiny_lm, tokens, ["blocks.1.hook_resid_post"], stop_at_layer=None)
    build_cache(config, tiny_lm, progress=False)
    assert not tiny_lm.cfg.use_attn_result
    after = capture(tiny_lm, tokens, ["blocks.1.hook_resid_post"], stop_at_layer=None)
    assert torch.equal(before["blocks.1.hook_resid_post"], after["blocks.1.hook_resid_post"])
