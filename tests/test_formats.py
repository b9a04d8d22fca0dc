"""Loading released formats: sparsify against sparsify.SparseCoder live; Gemma Scope and OpenAI against
their published reference forwards; detection, metadata, export round trips and bad input."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sae
from sae.formats import FormatError, detect_format
from sae.sites import check_width

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sparsify import SparseCoder, SparseCoderConfig

D_IN, D_SAE, K = 16, 64, 4
TOLERANCE = 1e-5  # fp32 relative error


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp_min(1e-30)).item()


def random_inputs(seed: int = 0, n: int = 32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
    return module


# --- sparsify, live --------------------------------------------------------------------------------


def sparsify_dense(coder: SparseCoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's own encode as a dense [n, d_sae] tensor, and its forward's reconstruction."""
    acts, indices, _ = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents, dtype=acts.dtype).scatter(-1, indices, acts)
    return dense, coder(x).sae_out


@pytest.mark.parametrize("activation,skip", [("topk", False), ("groupmax", False), ("topk", True)])
def test_sparsify_matches_sparse_coder(tmp_path, activation, skip):
    cfg = SparseCoderConfig(activation=activation, num_latents=D_SAE, k=K, skip_connection=skip)
    coder = randomized(SparseCoder(D_IN, cfg), seed=1)
    coder.save_to_disk(tmp_path / "run" / "layers.10")
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"model": "EleutherAI/pythia-70m", "hookpoints": ["layers.10"]})
    )

    folder = tmp_path / "run" / "layers.10"
    assert detect_format(folder) == "sparsify"
    model = sae.load(str(folder))
    assert model.cfg.architecture == activation and model.cfg.skip_connection == skip
    assert (
        model.cfg.hookpoint == "blocks.10.hook_resid_post" and model.cfg.model_name == "EleutherAI/pythia-70m"
    )
    # SAELens's sparsify loader transposed W_dec and dropped the b_dec subtraction: ours keeps both as stored
    assert torch.equal(model.W_dec, coder.W_dec) and model.cfg.apply_b_dec_to_input

    x = random_inputs(2)
    with torch.no_grad():
        dense, recon = sparsify_dense(coder, x)
        assert torch.equal(model.encode(x) > 0, dense > 0)
        assert rel_err(model.encode(x), dense) < TOLERANCE
        assert rel_err(model(x), recon) < TOLERANCE
        if not skip:
            assert rel_err(model.decode(dense), recon) < TOLERANCE


def test_sparsify_dtype_comes_from_the_file(tmp_path):
    """sparsify #116: a bf16 file must load as bf16 and compute like sparsify's bf16 coder."""
    coder = randomized(
        SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K), dtype=torch.bfloat16), seed=3
    )
    coder.save_to_disk(tmp_path / "layers.2")
    model = sae.load(str(tmp_path / "layers.2"))
    assert model.cfg.dtype == "bfloat16" and model.W_enc.dtype == torch.bfloat16
    assert torch.equal(model.W_enc, coder.encoder.weight) and torch.equal(
        model.b_dec, coder.b_dec
    )  # bit for bit
    x = random_inputs(4).to(torch.bfloat16)
    assert model.encode(x).dtype == torch.bfloat16 and model(x).dtype == torch.bfloat16
    # bf16 roundings differ between a fused and an unfused bias (near-ties flip): compare the same weights
    # in fp32
    model, coder = model.float(), coder.float()
    with torch.no_grad():
        dense, recon = sparsify_dense(coder, x.float())
        assert (
            rel_err(model.encode(x.float()), dense) < TOLERANCE
            and rel_err(model(x.float()), recon) < TOLERANCE
        )


@pytest.mark.parametrize(
    "module,hook",
    [
        ("layers.10", "blocks.10.hook_resid_post"),
        ("layers.3.mlp", "blocks.3.hook_mlp_out"),
        ("gpt_neox.layers.3.attention", "blocks.3.hook_attn_out"),
    ],
)
def test_sparsify_hookpoints_map_to_transformer_lens(module, hook):
    from sae.formats.sparsify import map_hookpoint

    assert map_hookpoint(module) == hook


@pytest.mark.parametrize(
    "module,hooks",
    [
        ("layers.3.mlp", ("blocks.3.mlp.hook_in", "blocks.3.mlp.hook_out")),
        ("layers.10", ("blocks.10.hook_resid_pre", "blocks.10.hook_resid_post")),
    ],
)
def test_sparsify_transcoder_modules_map_to_input_and_output_hooks(module, hooks):
    from sae.formats.sparsify import map_transcoder_hookpoints

    assert map_transcoder_hookpoints(module) == hooks


def test_sparsify_export_loads_in_sparsify(tmp_path):
    cfg = sae.SAEConfig(
        architecture="topk",
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        skip_connection=True,
        model_name="gpt2",
        hookpoint="blocks.4.hook_resid_post",
    )
    model = randomized(sae.SparseAutoencoder(cfg), seed=5)
    sae.export(model, tmp_path / "exported", "sparsify")
    coder = SparseCoder.load_from_disk(tmp_path / "exported")
    x = random_inputs(6)
    with torch.no_grad():
        dense, recon = sparsify_dense(coder, x)
        assert rel_err(model.encode(x), dense) < TOLERANCE and rel_err(model(x), recon) < TOLERANCE
    again = sae.load(str(tmp_path / "exported"))  # ours -> sparsify -> ours
    for name, p in model.named_parameters():
        assert torch.equal(p, getattr(again, name)), name
    assert (again.cfg.model_name, again.cfg.hookpoint, again.cfg.source_format) == (
        "gpt2",
        cfg.hookpoint,
        "sparsify",
    )


def test_skip_transcoder_exports_to_sparsify_and_back(tmp_path):
    cfg = sae.SAEConfig(
        architecture="topk",
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        transcoder=True,
        skip_connection=True,
        model_name="gpt2",
        hookpoint="blocks.4.mlp.hook_in",
        output_hookpoint="blocks.4.mlp.hook_out",
    )
    model = randomized(sae.SparseAutoencoder(cfg), seed=6)
    sae.export(model, tmp_path / "layers.4.mlp", "sparsify")
    coder = SparseCoder.load_from_disk(tmp_path / "layers.4.mlp")
    assert coder.cfg.transcode and coder.cfg.skip_connection
    x = random_inputs(6)
    with torch.no_grad():
        dense, recon = sparsify_dense(coder, x)
        assert rel_err(model.encode(x), dense) < TOLERANCE and rel_err(model(x), recon) < TOLERANCE
    again = sae.load(str(tmp_path / "layers.4.mlp"))
    for name, p in model.named_parameters():
        assert torch.equal(p, getattr(again, name)), name
    assert (again.cfg.transcoder, again.cfg.hookpoint, again.cfg.output_hookpoint) == (
        True,
        cfg.hookpoint,
        cfg.output_hookpoint,
    )


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "codebook"])
def test_exports_refuse_what_the_format_cannot_compute(tmp_path, architecture):
    cfg = sae.SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K)
    with pytest.raises(ValueError, match=f"cannot export to sparsify exactly: architecture '{architecture}'"):
        sae.export(sae.SparseAutoencoder(cfg), tmp_path / "x", "sparsify")
    if architecture == "codebook":
        with pytest.raises(ValueError, match="cannot export to SAELens exactly"):
            sae.export(sae.SparseAutoencoder(cfg), tmp_path / "y", "saelens")
    with pytest.raises(ValueError, match="export formats: saelens, sparsify"):
        sae.export(sae.SparseAutoencoder(cfg), tmp_path / "z", "gemma_scope")


# --- Gemma Scope: the release's reference JumpReLU ------------------------------------------------


def gemma_scope_reference(
    params: dict[str, np.ndarray], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of the Gemma Scope tutorial's JumpReLUSAE (no b_dec subtraction, raw threshold)."""
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    pre_acts = x @ p["W_enc"] + p["b_enc"]
    mask = pre_acts > p["threshold"]
    acts = mask * torch.nn.functional.relu(pre_acts)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def write_gemma_scope(root: Path, d_sae: int = 1024, seed: int = 7) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(0, 0.3, (D_IN, d_sae)).astype(np.float32),
        "W_dec": rng.normal(0, 0.3, (d_sae, D_IN)).astype(np.float32),
        "b_enc": rng.normal(0, 0.3, d_sae).astype(np.float32),
        "b_dec": rng.normal(0, 0.3, D_IN).astype(np.float32),
        "threshold": np.abs(rng.normal(0, 0.5, d_sae)).astype(np.float32),
    }
    path = root / "gemma-scope-2b-pt-res" / "layer_12" / "width_1k" / "average_l0_37" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **params)
    return path, params


def test_gemma_scope_matches_reference_and_reads_the_path(tmp_path):
    path, params = write_gemma_scope(tmp_path)
    for ref in (path, path.parent):  # the file or its folder
        assert detect_format(ref) == "gemma_scope"
        model = sae.load(str(ref))
        cfg = model.cfg
        assert (cfg.architecture, cfg.apply_b_dec_to_input, cfg.d_sae, cfg.k) == ("jumprelu", False, 1024, 37)
        assert (cfg.model_name, cfg.hookpoint) == ("gemma-2-2b", "blocks.12.hook_resid_post")
        x = random_inputs(8)
        acts, recon = gemma_scope_reference(params, x)
        with torch.no_grad():
            assert torch.equal(model.encode(x) > 0, acts > 0)
            assert rel_err(model.encode(x), acts) < TOLERANCE and rel_err(model(x), recon) < TOLERANCE


def test_gemma_scope_width_in_path_must_match(tmp_path):
    path, _ = write_gemma_scope(tmp_path, d_sae=512)
    with pytest.raises(FormatError, match=r"params\.npz: the path says width 1024 but W_enc has 512 latents"):
        sae.load(str(path))


# --- OpenAI sparse_autoencoder: their Autoencoder's forward -------------------------------------------


def openai_state_dict(activation: str, seed: int = 9) -> dict:
    """What `Autoencoder.state_dict()` holds (model.py in openai/sparse_autoencoder)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "pre_bias": torch.randn(D_IN, generator=g) * 0.3,
        "latent_bias": torch.randn(D_SAE, generator=g) * 0.3,
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "activation": activation,
    }
    state["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"} if activation == "TopK" else {}
    return state


def openai_reference(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoencoder.forward: LN (TopK files only), act(W (x - pre_bias) + latent_bias), decode, un-LN."""
    normalize = state["activation"] == "TopK"
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = torch.nn.functional.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    if normalize:
        top = torch.topk(pre, k=K, dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    else:
        latents = pre.relu()
    recons = torch.nn.functional.linear(latents, state["decoder.weight"]) + state["pre_bias"]
    if normalize:
        recons = recons * std + mu
    return latents, recons


@pytest.mark.parametrize(
    "activation,location,hook",
    [
        ("TopK", "resid_post_mlp_v5_32k", "blocks.6.hook_resid_post"),
        ("ReLU", "resid_delta_attn", "blocks.6.hook_attn_out"),
    ],
)
def test_openai_matches_their_forward(tmp_path, activation, location, hook):
    state = openai_state_dict(activation)
    path = tmp_path / location / "autoencoders" / "6.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert detect_format(path) == "openai"
    model = sae.load(str(path))
    assert model.cfg.architecture == ("topk" if activation == "TopK" else "relu")
    assert model.cfg.input_norm == (
        "layernorm" if activation == "TopK" else "none"
    )  # old TopK files are not ReLU
    assert (model.cfg.hookpoint, model.cfg.model_name) == (hook, "gpt2-small")
    x = random_inputs(10) * 5  # an un-normalised residual stream
    latents, recons = openai_reference(state, x)
    with torch.no_grad():
        assert torch.equal(model.encode(x) > 0, latents > 0)
        assert rel_err(model.encode(x), latents) < TOLERANCE
        assert rel_err(model(x), recons) < TOLERANCE
        assert rel_err(model.decode(latents, model.input_stats(x)), recons) < TOLERANCE


def test_openai_pickled_code_is_never_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "executed",))

    state = openai_state_dict("ReLU") | {"activation": Payload()}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(
        FormatError, match=r"evil\.pt: not a torch state dict loadable with weights_only=True"
    ):
        sae.load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "executed").exists()


# --- SAELens: pre-6.0 scaling factor (SAELens 6 cannot load these itself; spec: decode(f * s)) -------


def test_saelens_pre6_scaling_factor_is_folded_into_the_decoder(tmp_path):
    g = torch.Generator().manual_seed(11)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
        "scaling_factor": torch.rand(D_SAE, generator=g) + 0.5,
    }
    save_file(w, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "d_in": D_IN,
                "d_sae": D_SAE,
                "dtype": "float32",
                "hook_point": "blocks.1.hook_resid_pre",
                "model_name": "gpt2",
                "activation_fn_str": "relu",
                "finetuning_scaling_factor": True,
                "normalize_activations": False,
            }
        )
    )
    model = sae.load(str(tmp_path))
    x = random_inputs(12)
    f = (
        (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    ).relu()  # sae_lens 3-5: encode, then (f * s) W_dec + b_dec
    recon = (f * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        assert rel_err(model.encode(x), f) < TOLERANCE and rel_err(model(x), recon) < TOLERANCE
    assert model.cfg.hookpoint == "blocks.1.hook_resid_pre"


def test_saelens_per_token_rescaling_is_refused_by_name(tmp_path):
    cfg = sae.SAEConfig(architecture="relu", d_in=D_IN, d_sae=D_SAE)
    sae.export(sae.SparseAutoencoder(cfg), tmp_path, "saelens")
    data = json.loads((tmp_path / "cfg.json").read_text()) | {
        "normalize_activations": "constant_norm_rescale"
    }
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"cfg\.json: normalize_activations 'constant_norm_rescale'"):
        sae.load(str(tmp_path))


# --- detection and bad input ---------------------------------------------------------------------------


def test_our_format_still_loads_and_round_trips(tmp_path):
    cfg = sae.SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K)
    model = randomized(sae.SparseAutoencoder(cfg), seed=13)
    model.save(tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "sae"
    again = sae.load(str(tmp_path / "ours"))
    assert all(torch.equal(p, getattr(again, n)) for n, p in model.named_parameters())


def test_unknown_format_lists_what_is_recognised_and_what_was_found(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FormatError) as error:
        sae.load(str(tmp_path))
    message = str(error.value)
    assert "notes.txt" in message and "weights.bin" in message
    for name in ("saelens", "sparsify", "gemma_scope", "openai", "dictionary_learning"):
        assert name in message


def test_a_name_never_decides_the_format(tmp_path):
    """A SAELens folder named like a sparsify hookpoint is still SAELens; a .pt that is an npz is Gemma
    Scope."""
    cfg = sae.SAEConfig(architecture="relu", d_in=D_IN, d_sae=D_SAE)
    sae.export(sae.SparseAutoencoder(cfg), tmp_path / "layers.3" / "gemma-scope", "saelens")
    assert detect_format(tmp_path / "layers.3" / "gemma-scope") == "saelens"
    path, _ = write_gemma_scope(tmp_path / "x")
    disguised = tmp_path / "sae.pt"
    disguised.write_bytes(path.read_bytes())
    assert detect_format(disguised) == "gemma_scope"


def test_sparsify_run_folder_points_at_its_hookpoints(tmp_path):
    for hookpoint in ("layers.1", "layers.2"):
        SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K)).save_to_disk(tmp_path / hookpoint)
    with pytest.raises(
        FormatError, match=r"a sparsify run with 2 hookpoints; load one of them.*layers\.1, layers\.2"
    ):
        sae.load(str(tmp_path))


@pytest.mark.filterwarnings("ignore:sparsify hookpoint")
def test_truncated_corrupt_and_nan_files_name_file_and_tensor(tmp_path):
    coder = randomized(SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K)), seed=1)
    coder.save_to_disk(tmp_path / "cut")
    weights = tmp_path / "cut" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(FormatError, match=r"cut/sae\.safetensors: not a readable safetensors file"):
        sae.load(str(tmp_path / "cut"))

    coder.save_to_disk(tmp_path / "nan")
    tensors = load_file(tmp_path / "nan" / "sae.safetensors")
    tensors["b_dec"][2] = float("nan")
    save_file(tensors, tmp_path / "nan" / "sae.safetensors")
    with pytest.raises(ValueError, match=r"nan/sae\.safetensors: tensor b_dec contains NaN or inf"):
        sae.load(str(tmp_path / "nan"))

    path, _ = write_gemma_scope(tmp_path / "g")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"params\.npz"):
        sae.load(str(path.parent))

    (tmp_path / "bad_cfg").mkdir()
    (tmp_path / "bad_cfg" / "cfg.json").write_text("{not json")
    save_file({"W_enc": torch.zeros(2, 2)}, tmp_path / "bad_cfg" / "sae_weights.safetensors")
    with pytest.raises(FormatError, match=r"bad_cfg/cfg\.json: not valid JSON"):
        sae.load(str(tmp_path / "bad_cfg"))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    state = openai_state_dict("TopK")
    del state["latent_bias"]
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(FormatError, match=r"a\.pt: missing tensor latent_bias"):
        sae.load(str(tmp_path / "a.pt"))
    state = openai_state_dict("TopK")
    state["decoder.weight"] = state["decoder.weight"].T.contiguous()  # stored the wrong way round
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(
        FormatError, match=r"b.pt: tensor decoder.weight has shape \(64, 16\), expected \(16, 64\)"
    ):
        sae.load(str(tmp_path / "b.pt"))


def test_check_width_against_the_models_hook():
    cfg = sae.SAEConfig(
        architecture="topk",
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        model_name="gpt2",
        hookpoint="blocks.2.hook_resid_post",
    )
    model = sae.SparseAutoencoder(cfg)
    check_width(D_IN, model)
    with pytest.raises(ValueError, match=r"SAE reads d_in=16 .*blocks\.2\.hook_resid_post has width 768"):
        check_width(768, model)


def test_saelens_expected_average_scaling_is_folded_when_given(tmp_path):
    """`expected_average_only_in`: trained on s * x. SAELens folds s as W_enc * s, W_dec / s, b_dec / s."""
    cfg = sae.SAEConfig(architecture="relu", d_in=D_IN, d_sae=D_SAE)
    raw = randomized(sae.SparseAutoencoder(cfg), seed=14)
    sae.export(raw, tmp_path, "saelens")
    data = json.loads((tmp_path / "cfg.json").read_text()) | {
        "normalize_activations": "expected_average_only_in"
    }
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="no norm_scaling_factor was given; the SAE reads raw activations"):
        unscaled = sae.load(str(tmp_path))
    assert all(torch.equal(p, getattr(unscaled, n)) for n, p in raw.named_parameters())
    s = 3.5
    folded = sae.formats.load_saelens(tmp_path, norm_scaling_factor=s)
    x = random_inputs(15)
    with torch.no_grad():
        assert rel_err(folded.encode(x), raw.encode(x * s)) < TOLERANCE
        assert rel_err(folded(x), raw(x * s) / s) < TOLERANCE


def test_hub_reference_downloads_only_the_subpath(tmp_path, monkeypatch):
    """hf://org/repo/subpath goes through huggingface_hub.snapshot_download (a local copy stands in for the
    hub)."""
    import shutil

    import huggingface_hub

    SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K)).save_to_disk(tmp_path / "hub" / "layers.5")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m"}))
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        local = tmp_path / "cache" / repo_id.replace("/", "--")
        shutil.copytree(tmp_path / "hub", local, dirs_exist_ok=True)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = sae.load("hf://EleutherAI/sae-pythia-160m-32k/layers.5")
    assert calls == [("EleutherAI/sae-pythia-160m-32k", ["layers.5", "layers.5/*", "config.json"])]
    assert (model.cfg.hookpoint, model.cfg.model_name) == (
        "blocks.5.hook_resid_post",
        "EleutherAI/pythia-160m",
    )
    with pytest.raises(ValueError, match="expected hf://org/repo"):
        sae.load("hf://just-a-name")


def test_sparsify_transcoder_reads_without_b_dec_and_says_what_it_predicts(tmp_path):
    coder = randomized(SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, transcode=True)), seed=16)
    coder.save_to_disk(tmp_path / "layers.2.mlp")
    model = sae.load(str(tmp_path / "layers.2.mlp"))
    assert model.cfg.transcoder and not model.cfg.apply_b_dec_to_input
    assert (model.cfg.hookpoint, model.cfg.output_hookpoint) == (
        "blocks.2.mlp.hook_in",
        "blocks.2.mlp.hook_out",
    )
    x = random_inputs(17)
    with torch.no_grad():
        dense, recon = sparsify_dense(coder, x)
        assert rel_err(model.encode(x), dense) < TOLERANCE and rel_err(model(x), recon) < TOLERANCE
