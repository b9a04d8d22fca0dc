"""Transcoders and skip transcoders: their planted ground truth, raw units, files and bad input."""

import json
import os
import signal

import pytest
import torch

import sae
from sae.synthetic import feature_recovery, sparse_transcoder_data
from sae.trainer import CHECKPOINT_DIR, TrainingError, sae_name
from sae.typed_config import ConfigError

D_IN, D_OUT, D_SAE, K = 64, 48, 512, 5


@pytest.fixture(scope="module")
def planted():
    """Pairs (x [620k, 64], y [620k, 48]) sharing ~5 sparse codes, the planted write directions,
    and pairs for a skip transcoder: x plus dense Gaussian noise g, y plus M (x + g) (M [48, 64]). A
    transcoder's codes can absorb M x (as rows read M^T) but not M g: only the skip path can carry it."""
    x, y, _, write = sparse_transcoder_data(620_000, D_IN, D_OUT, n_features=256, active=K, seed=7)
    g = torch.Generator().manual_seed(8)
    skip = torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5
    x_noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    return x, y, x_noisy, y + x_noisy @ skip.T, write, skip


def transcoder_cfg(**kw) -> sae.SAEConfig:
    return sae.SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K, transcoder=True, d_out=D_OUT, **kw)


def fvu(model: sae.SparseAutoencoder, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return ((y - model(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    """A transcoder on (x, y) and, from the other data, a skip transcoder and a plain one; y is scaled by
    100 so that the target's scale has to be folded as well as the input's."""
    x, y, x_noisy, y_skip, *_ = planted
    n = 600_000
    out = tmp_path_factory.mktemp("transcoders")
    train = dict(batch_size=1024, log_every=50)
    (plain,) = sae.Trainer(transcoder_cfg(), sae.TrainConfig(out_dir=str(out / "plain"), **train)).fit(
        (x[:n], 100 * y[:n])
    )
    with_skip, without_skip = sae.Trainer(
        [transcoder_cfg(skip_connection=True), transcoder_cfg()],
        sae.TrainConfig(out_dir=str(out / "skip"), **train),
    ).fit((x_noisy[:n], y_skip[:n]))
    return {"plain": plain, "skip": with_skip, "no_skip": without_skip, "out": out}


def test_transcoder_finds_the_planted_write_directions(planted, trained):
    x, y, _, _, write, _ = planted
    model = trained["plain"]
    assert model.W_dec.shape == (D_SAE, D_OUT) and model.W_enc.shape == (D_SAE, D_IN)
    assert feature_recovery(model.W_dec.detach(), write) > 0.95
    # trained on 100 y: the saved weights predict 100 y from raw x. k = 5 loses the tokens with more than
    # 5 codes (Poisson(5) many): an SAE with k = 5 on x itself reaches FVU 0.166 (measured), this 0.23
    assert fvu(model, x[600_000:], 100 * y[600_000:]) < 0.3
    metrics = json.loads((trained["out"] / "plain" / sae_name(model.cfg) / "metrics.json").read_text())
    assert metrics["target_scale"] == pytest.approx(
        D_OUT**0.5 / (100 * y[:1024].norm(dim=1).mean().item()), rel=0.05
    )


def test_skip_transcoder_carries_the_dense_linear_part(planted, trained):
    """W_skip itself is not identifiable here (the codes span the input, so rows of W_dec can take on
    part of M); what only the skip path can do is carry M g, and without it FVU doubles (measured:
    0.140 against 0.262)."""
    _, _, x_noisy, y_skip, write, _ = planted
    held_x, held_y = x_noisy[600_000:], y_skip[600_000:]
    model = trained["skip"]
    assert model.W_skip.shape == (D_OUT, D_IN) and feature_recovery(model.W_dec.detach(), write) > 0.8  # 0.94
    assert fvu(model, held_x, held_y) < 0.2
    assert fvu(trained["no_skip"], held_x, held_y) > 1.5 * fvu(model, held_x, held_y)


def test_saved_transcoder_loads_with_its_sites(trained, tmp_path):
    model = trained["plain"]
    path = trained["out"] / "plain" / sae_name(model.cfg)
    again = sae.load(str(path))
    assert again.cfg.transcoder and again.cfg.d_out == D_OUT and not again.cfg.apply_b_dec_to_input
    for name, p in model.named_parameters():
        assert torch.equal(p, getattr(again, name)), name


def test_resume_of_a_transcoder_is_exact(planted, tmp_path):
    x, y, *_ = planted
    pairs = (x[: 24 * 512], y[: 24 * 512])
    cfg = transcoder_cfg(skip_connection=True)
    kw = dict(batch_size=512, total_tokens=20 * 512, dead_after_tokens=2048, log_every=5)
    (whole,) = sae.Trainer(cfg, sae.TrainConfig(out_dir=str(tmp_path / "a"), **kw)).fit(pairs)

    class SigintAt(sae.TensorBatches):
        def batches(self, start=0):
            for i, batch in enumerate(super().batches(start), start):
                if i == 9:
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch

    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"):
        sae.Trainer(cfg, sae.TrainConfig(out_dir=str(tmp_path / "b"), **kw)).fit(SigintAt(pairs, 512, seed=0))
    state = json.loads((tmp_path / "b" / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 9 and state["target_scale"] != state["input_scale"]
    (resumed,) = sae.Trainer(cfg, sae.TrainConfig(out_dir=str(tmp_path / "b"), **kw)).fit(pairs)
    for name, p in whole.named_parameters():
        assert torch.equal(p, getattr(resumed, name)), name


def test_bad_pairs_and_configs_are_named(tmp_path):
    trainer = sae.Trainer(transcoder_cfg(), sae.TrainConfig(out_dir=str(tmp_path), total_tokens=4096))
    with pytest.raises(TrainingError, match=r"batch 0 .*transcoders train on \(inputs, targets\) pairs"):
        trainer.fit([torch.randn(512, D_IN)])
    with pytest.raises(TrainingError, match=r"batch 0 .*expected targets \[batch, 48\], got \(512, 64\)"):
        trainer.fit([(torch.randn(512, D_IN), torch.randn(512, D_IN))])
    with pytest.raises(TrainingError, match="512 inputs but 511 targets"):
        trainer.fit([(torch.randn(512, D_IN), torch.randn(511, D_OUT))])
    y = torch.randn(512, D_OUT)
    y[3, 1] = float("nan")
    with pytest.raises(TrainingError, match=r"NaN/inf values in rows \[3\] of the targets"):
        trainer.fit([(torch.randn(512, D_IN), y)])
    with pytest.raises(ConfigError, match=r"d_out .* differs from d_in .* set transcoder"):
        sae.SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K, d_out=D_OUT)
    with pytest.raises(ConfigError, match="output_hookpoint is for transcoders"):
        sae.SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K, output_hookpoint="blocks.0.hook_x")
    with pytest.raises(ConfigError, match="topafa transcoder is undefined"):
        sae.SAEConfig(architecture="topafa", d_in=D_IN, d_sae=D_SAE, k=K, transcoder=True)
    with pytest.raises(ValueError, match="must share d_in, and d_out"):
        sae.Trainer(
            [transcoder_cfg(), sae.SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K)],
            sae.TrainConfig(),
        )
    with pytest.raises(ValueError, match="cannot train a codebook transcoder"):
        codebook = sae.SAEConfig(architecture="codebook", d_in=D_IN, d_sae=D_SAE, k=K, transcoder=True)
        sae.Trainer(codebook, sae.TrainConfig())
