"""Model-in-the-loop evaluation on a tiny model, with SAEs whose answers are known."""

import json
from itertools import islice

import pytest
import torch
from tiny_lm import tiny_run_config

from sae import SAEConfig, SparseAutoencoder
from sae.data import context_batches, token_contexts
from sae.evals import evaluate, format_report

D_MODEL = 32


def _sae(hookpoint: str, d_in: int, kind: str, **cfg) -> SparseAutoencoder:
    """`exact`: W = [I; -I] so x_hat = relu(x) - relu(-x) = x. `zero`: x_hat = 0."""
    config = SAEConfig(architecture="topk", d_in=d_in, d_sae=2 * d_in, k=2 * d_in, hookpoint=hookpoint, **cfg)
    W = torch.cat([torch.eye(d_in), -torch.eye(d_in)]) if kind == "exact" else torch.zeros(2 * d_in, d_in)
    zeros = torch.zeros
    return SparseAutoencoder.from_tensors(
        config, {"W_enc": W, "W_dec": W, "b_enc": zeros(2 * d_in), "b_dec": zeros(d_in)}
    )


@pytest.fixture(scope="module")
def batches(tiny_lm, tiny_lm_dir, tmp_path_factory):
    config = tiny_run_config(tiny_lm_dir, tmp_path_factory.mktemp("evals"))
    contexts = islice(token_contexts(config.data, tiny_lm.tokenizer), 12)
    return list(context_batches(contexts, batch_contexts=4))


def test_exact_reconstruction_changes_nothing(tiny_lm, batches, tmp_path):
    result = evaluate(
        tiny_lm, _sae("blocks.0.hook_resid_post", D_MODEL, "exact"), batches, out_dir=tmp_path, progress=False
    )
    assert result.tokens == 12 * 31
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_clean, abs=1e-5)
    assert result.ce_loss_zero_ablation > result.ce_loss_clean
    assert result.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert result.kl_clean_spliced == pytest.approx(0.0, abs=1e-6) and result.fvu == pytest.approx(
        0.0, abs=1e-6
    )
    assert (
        result.l0 == pytest.approx(D_MODEL, abs=0.5)
        and result.dead_fraction == 0
        and result.dense_fraction > 0.9
    )
    # orthogonal decoder rows: AFA is the norm written, exactly
    assert result.afa_ratio == pytest.approx(1.0, abs=1e-5) and result.afa_error == pytest.approx(0, abs=1e-5)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["ce_loss_clean"] == result.ce_loss_clean
    assert (tmp_path / "feature_density.png").read_bytes()[:4] == b"\x89PNG"
    assert "CE loss recovered" in format_report(result)


def test_zero_reconstruction_equals_zero_ablation(tiny_lm, batches):
    result = evaluate(tiny_lm, _sae("blocks.0.hook_resid_post", D_MODEL, "zero"), batches, progress=False)
    assert result.ce_loss_spliced == pytest.approx(result.ce_loss_zero_ablation, abs=1e-6)
    assert result.ce_loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert (
        result.kl_clean_spliced > 0 and result.fvu >= 1.0 and result.l0 == 0 and result.dead_fraction == 1.0
    )


def test_clean_ce_matches_the_models_own_loss(tiny_lm, batches):
    result = evaluate(
        tiny_lm,
        _sae("blocks.0.hook_resid_post", D_MODEL, "exact"),
        batches,
        exclude_bos=False,
        progress=False,
    )
    with torch.inference_mode():
        losses = [tiny_lm(b, return_type="loss").item() for b in batches]
    assert result.ce_loss_clean == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.tokens == 12 * 32


def test_per_head_sae_splices_concatenated_heads(tiny_lm, batches):
    sae = _sae("blocks.1.attn.hook_z", D_MODEL, "exact", hook_layout="heads")  # 4 heads x 8 = 32
    assert evaluate(tiny_lm, sae, batches, progress=False).kl_clean_spliced == pytest.approx(0.0, abs=1e-6)
    zero = evaluate(
        tiny_lm,
        _sae("blocks.1.attn.hook_z", 8, "zero", hook_layout="heads", hook_head_index=2),
        batches,
        progress=False,
    )
    assert 0 < zero.kl_clean_spliced and zero.ce_loss_spliced == pytest.approx(
        zero.ce_loss_zero_ablation, abs=1e-6
    )


def test_unknown_hookpoint(tiny_lm, batches):
    with pytest.raises(ValueError, match=r"blocks\.9\.hook_resid_post"):
        evaluate(tiny_lm, _sae("blocks.9.hook_resid_post", D_MODEL, "exact"), batches, progress=False)


def test_transcoder_is_spliced_at_its_output_site(tiny_lm, batches):
    """blocks.0.hook_resid_post equals blocks.1.hook_resid_pre, so an identity transcoder from the
    second to the first changes nothing: the eval reads the input site and writes the output site."""
    exact = _sae(
        "blocks.1.hook_resid_pre",
        D_MODEL,
        "exact",
        transcoder=True,
        output_hookpoint="blocks.0.hook_resid_post",
    )
    result = evaluate(tiny_lm, exact, batches, progress=False)
    assert result.kl_clean_spliced == pytest.approx(0.0, abs=1e-6) and result.fvu == pytest.approx(
        0, abs=1e-6
    )
    # a zero transcoder of the MLP is the MLP zero-ablated
    zero = _sae(
        "blocks.0.mlp.hook_in", D_MODEL, "zero", transcoder=True, output_hookpoint="blocks.0.mlp.hook_out"
    )
    mlp = evaluate(tiny_lm, zero, batches, progress=False)
    assert mlp.ce_loss_spliced == pytest.approx(mlp.ce_loss_zero_ablation, abs=1e-6)
    assert mlp.kl_clean_spliced > 0 and mlp.fvu >= 1.0  # a random model: CE barely moves
    no_output = _sae("blocks.0.mlp.hook_in", D_MODEL, "zero", transcoder=True)
    with pytest.raises(ValueError, match="names no output_hookpoint"):
        evaluate(tiny_lm, no_output, batches, progress=False)


def test_afa_departs_from_the_norm_written_when_rows_are_not_orthogonal():
    """Two latents of 1 on the same unit row write a norm of 2; AFA says √2. A skip transcoder's target
    is what remains after its skip path and b_dec."""
    from sae.evals import approximate_feature_activation, decoder_target

    cfg = SAEConfig(architecture="topk", d_in=2, d_sae=2, k=2, transcoder=True, skip_connection=True)
    e1 = torch.tensor([1.0, 0.0])
    model = SparseAutoencoder.from_tensors(
        cfg,
        {
            "W_enc": torch.eye(2),
            "b_enc": torch.zeros(2),
            "W_dec": torch.stack([e1, e1]),
            "b_dec": torch.tensor([0.5, 0.0]),
            "W_skip": torch.eye(2),
        },
    )
    f = torch.tensor([[1.0, 1.0]])
    x = torch.tensor([[3.0, 4.0]])
    y = model.decode(f) + x  # written 2 e1, plus b_dec, plus the skip path
    assert approximate_feature_activation(model, f).item() == pytest.approx(2**0.5)
    assert decoder_target(model, x, y).norm(dim=-1).item() == pytest.approx(2.0)
