"""Loading language models as TransformerBridges: local folders, dtypes, weight hashes, offline Gemma."""

import math

import pytest
import torch
from tiny_lm import make_tiny_lm
from transformers import GPT2LMHeadModel

from sae.lm import load_model, toolkit_cache_dir, weights_hash


def test_local_folder_loads_as_bridge_matching_hf(tiny_lm_dir):
    bridge = load_model(str(tiny_lm_dir))
    hf = GPT2LMHeadModel.from_pretrained(tiny_lm_dir, attn_implementation="eager").eval()
    tokens = torch.tensor([[0, 5, 17, 40, 99]])
    with torch.inference_mode():
        torch.testing.assert_close(bridge(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-5)
    assert "blocks.1.hook_resid_post" in bridge.hook_dict


def test_bf16_and_bad_dtype(tiny_lm_dir):
    bridge = load_model(str(tiny_lm_dir), dtype="bfloat16")
    assert next(bridge.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model(str(tiny_lm_dir), dtype="int8")


def test_missing_directory_is_named():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        load_model("/no/such/model")


def test_weights_hash_identifies_weights(tmp_path, tiny_lm_dir):
    assert weights_hash(str(tiny_lm_dir)) == weights_hash(str(tiny_lm_dir))
    other = make_tiny_lm(tmp_path / "other", seed=1)
    assert weights_hash(str(other)) != weights_hash(str(tiny_lm_dir))


def test_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert toolkit_cache_dir() == tmp_path / "sae-toolkit"


@pytest.mark.slow
def test_offline_gemma_loads_and_predicts_prose():
    model = load_model("gemma-3-270m")
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)
    assert weights_hash("gemma-3-270m").startswith("sha256:")
    text = "The cat sat on the mat. It was a sunny day, and the children were playing in the park."
    tokens = model.to_tokens(text)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    with torch.inference_mode():
        loss = model(tokens, return_type="loss").item()
    assert math.exp(loss) < 40  # ordinary prose: perplexity about 9-20 for this model
