"""The inference module: every architecture's encode/decode/codes, and exact save -> load."""

import json

import pytest
import torch

import sae
from sae.model import param_shapes
from sae.typed_config import ConfigError

D_IN, D_SAE = 16, 64


def make(architecture: str, **kw) -> sae.SparseAutoencoder:
    defaults = {"topk": {"k": 4}, "codebook": {"k": 3}, "groupmax": {"k": 8}}
    cfg = sae.SAEConfig(
        architecture=architecture, d_in=D_IN, d_sae=D_SAE, **(defaults.get(architecture, {}) | kw)
    )
    model = sae.SparseAutoencoder.from_config(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial values for every tensor, thresholds included
        for name, p in model.named_parameters():
            if name not in ("W_enc", "W_dec"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
    return model


ARCHS = ["topk", "relu", "codebook", "jumprelu", "groupmax", "gated"]


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_sparsity(arch):
    model = make(arch)
    x = torch.randn(5, 7, D_IN)
    f = model.encode(x)
    assert f.shape == (5, 7, D_SAE) and model.decode(f).shape == x.shape and model(x).shape == x.shape
    if model.cfg.k is not None:
        assert ((f != 0).sum(-1) <= model.cfg.k).all()
    assert (f >= 0).all()


@pytest.mark.parametrize("arch", ["topk", "codebook", "groupmax"])
def test_sparse_forward_equals_dense_decode(arch):
    model = make(arch)
    x = torch.randn(9, D_IN)
    torch.testing.assert_close(model(x), model.decode(model.encode(x)), rtol=1e-5, atol=1e-5)


def test_topk_encode_is_relu_of_top_k_preactivations():
    model = make("topk")
    x = torch.randn(11, D_IN)
    pre = (x - model.b_dec) @ model.W_enc.T + model.b_enc
    values, indices = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    torch.testing.assert_close(model.encode(x), expected)


def test_codebook_codes_are_binary_and_cosine_choice():
    model = make("codebook", similarity="cosine")
    x = torch.randn(6, D_IN)
    f = model.encode(x)
    assert set(f.unique().tolist()) <= {0.0, 1.0} and ((f > 0).sum(-1) == 3).all()
    sims = (
        torch.nn.functional.normalize(x - model.b_dec, dim=-1)
        @ torch.nn.functional.normalize(model.W_enc, dim=-1).T
    )
    expected = (sims + model.b_enc).topk(3, dim=-1).indices
    assert torch.equal(model.codes(x).sort(-1).values, expected.sort(-1).values)


def test_codes_mark_missing_with_minus_one():
    model = make("relu")
    with torch.no_grad():
        model.b_enc.fill_(-1e3)  # nothing fires
    assert (model.codes(torch.randn(3, D_IN), k=5) == -1).all()
    with pytest.raises(ValueError, match="pass codes"):
        model.codes(torch.randn(3, D_IN))


def test_codes_are_ordered_by_activation():
    model = make("topk")
    x = torch.randn(4, D_IN)
    codes, f = model.codes(x), model.encode(x)
    picked = f.gather(-1, codes.clamp_min(0))
    assert (picked[:, :-1] >= picked[:, 1:]).all()


def test_layernorm_input_and_skip_connection():
    model = make("topk", input_norm="layernorm", skip_connection=True)
    x = torch.randn(5, D_IN) * 30 + 7
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    x_n = (x - mean) / (std + 1e-5)
    pre = (x_n - model.b_dec) @ model.W_enc.T + model.b_enc
    values, indices = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    expected = (f @ model.W_dec + model.b_dec) * (std + 1e-5) + mean + x @ model.W_skip.T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch, tmp_path):
    model = make(arch, hookpoint="blocks.3.hook_resid_post", model_name="tiny")
    model.save(tmp_path / "m")
    loaded = sae.load(str(tmp_path / "m"))
    assert loaded.cfg == model.cfg
    for name, p in model.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    x = torch.randn(4, D_IN)
    assert torch.equal(model(x), loaded(x))


def test_bf16_storage_round_trip(tmp_path):
    model = make("topk", dtype="bfloat16")
    model.save(tmp_path / "m")
    loaded = sae.load(str(tmp_path / "m"))
    assert loaded.W_enc.dtype == torch.bfloat16
    x = torch.randn(3, D_IN)
    assert model(x).dtype == torch.float32 and torch.equal(model(x), loaded(x))


def test_unknown_architecture_is_a_clear_error(tmp_path):
    make("topk").save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m/cfg.json").read_text())
    cfg["architecture"] = "transcoder9000"
    (tmp_path / "m/cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="architecture: 'transcoder9000' is not one of 'topk'"):
        sae.load(str(tmp_path / "m"))


def test_unknown_cfg_key_is_a_clear_error(tmp_path):
    make("topk").save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m/cfg.json").read_text())
    cfg["kk"] = 3
    (tmp_path / "m/cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unknown key 'kk'; valid keys: architecture, d_in"):
        sae.load(str(tmp_path / "m"))


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    make("topk").save(tmp_path / "m")
    tensors = load_file(tmp_path / "m/sae.safetensors")
    tensors["W_dec"] = tensors["W_dec"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "m/sae.safetensors")
    with pytest.raises(ValueError, match=r"W_dec has shape \(64, 15\), expected \(64, 16\)"):
        sae.load(str(tmp_path / "m"))


def test_nan_weights_and_truncated_files_are_refused(tmp_path):
    model = make("relu")
    with torch.no_grad():
        model.b_enc[3] = float("nan")
    model.save(tmp_path / "nan")
    with pytest.raises(ValueError, match="b_enc contains NaN"):
        sae.load(str(tmp_path / "nan"))
    make("relu").save(tmp_path / "cut")
    weights = tmp_path / "cut/sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"sae\.safetensors: not a readable safetensors file"):
        sae.load(str(tmp_path / "cut"))
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        sae.load(str(tmp_path / "nowhere"))


def test_input_width_is_checked():
    with pytest.raises(ValueError, match=r"expects inputs \[..., 16\], got \(2, 15\)"):
        make("topk").encode(torch.randn(2, 15))


def test_config_validation():
    with pytest.raises(ConfigError, match="needs k"):
        sae.SAEConfig(architecture="topk", d_in=4, d_sae=8)
    with pytest.raises(ConfigError, match="divisible"):
        sae.SAEConfig(architecture="groupmax", d_in=4, d_sae=10, k=3)
    assert set(param_shapes(sae.SAEConfig(architecture="gated", d_in=4, d_sae=8))) >= {"b_mag", "r_mag"}


def _edit_cfg(folder, edit) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(edit(cfg)))


@pytest.mark.parametrize("text", ["[]", "null", "3", '"topk"', b"\xff\xfe{".decode("latin-1")])
def test_a_cfg_json_that_is_no_table_is_named(tmp_path, text):
    make("topk").save(tmp_path / "m")
    (tmp_path / "m/cfg.json").write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError, match=r"m/cfg\.json: (expected a JSON object|not valid JSON)"):
        sae.load(str(tmp_path / "m"))


def test_out_of_range_cfg_values_name_the_file(tmp_path):
    make("topk").save(tmp_path / "m")
    _edit_cfg(tmp_path / "m", lambda cfg: cfg | {"k": 65})
    with pytest.raises(ConfigError, match=r"m/cfg\.json: .*k"):
        sae.load(str(tmp_path / "m"))


def test_cfg_and_tensors_are_checked_against_their_saved_checksums(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = make("topk")
    model.save(tmp_path / "m")
    _edit_cfg(tmp_path / "m", lambda cfg: cfg | {"architecture": "relu", "k": None})  # same tensors as TopK
    with pytest.raises(sae.FormatError, match=r"m/cfg\.json is not the cfg saved with .*verify=False"):
        sae.load(str(tmp_path / "m"))
    assert sae.load(str(tmp_path / "m"), verify=False).cfg.architecture == "relu"  # edited on purpose

    model.save(tmp_path / "w")
    weights = tmp_path / "w/sae.safetensors"
    tensors = load_file(weights)
    tensors["b_enc"][5] += 1
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, weights, metadata=metadata)  # a changed weight under the old checksums
    with pytest.raises(
        sae.FormatError, match=r"sae\.safetensors: tensor b_enc does not match its saved sha256"
    ):
        sae.load(str(tmp_path / "w"))


def test_tensors_in_another_dtype_than_the_cfg_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    make("topk").save(tmp_path / "m")
    weights = tmp_path / "m/sae.safetensors"
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata=metadata)
    with pytest.raises(sae.FormatError, match=r"tensor \w+ is torch.float16, .*cfg\.json says dtype float32"):
        sae.load(str(tmp_path / "m"), verify=False)


def test_files_saved_before_checksums_load_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make("topk")
    model.save(tmp_path / "m")
    weights = tmp_path / "m/sae.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "sae-toolkit"})
    with pytest.warns(UserWarning, match="saved without checksums"):
        loaded = sae.load(str(tmp_path / "m"))
    assert torch.equal(loaded.W_enc, model.W_enc)
