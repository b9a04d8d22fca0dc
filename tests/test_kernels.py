"""The sparse kernels agree with the dense reference, forward and backward."""

import pytest
import torch

from sae import kernels
from sae.activations import JumpReLU
from sae.kernels import (
    RaggedCode,
    dense_decode,
    dense_encode_above,
    dense_ragged_decode,
    dense_topk_encode,
    encode_above,
    encoder_rows_per_chunk,
    ragged_decode,
    sparse_decode,
    top_k,
    topk_encode,
)

TOKENS, D_IN, D_SAE, K = 96, 24, 160, 6


def run(encode, decode, relu: bool, with_aux: bool, dtype=torch.float32):
    """Encode, decode (plus an AuxK-style second decode) and backprop a loss; return outputs and grads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, D_IN, generator=g, dtype=dtype).requires_grad_()
    W_enc = torch.randn(D_SAE, D_IN, generator=g, dtype=dtype).requires_grad_()
    b_enc = torch.randn(D_SAE, generator=g, dtype=dtype).requires_grad_()
    W_dec = torch.randn(D_SAE, D_IN, generator=g, dtype=dtype).requires_grad_()
    b_dec = torch.randn(D_IN, generator=g, dtype=dtype).requires_grad_()
    aux_latents = torch.tensor([1, 5, 9, 40, 41, 150, 151]) if with_aux else None
    code, aux = encode(x, W_enc, b_enc, K, pre_bias=b_dec, relu=relu, aux_latents=aux_latents, k_aux=4)
    x_hat = decode(code.values, code.indices, W_dec) + b_dec
    loss = (x - x_hat).pow(2).sum()
    if with_aux:
        loss = loss + (decode(aux.values, aux.indices, W_dec) - x).pow(2).sum() / 3
    loss.backward()
    return [x_hat.detach(), code.values.detach(), x.grad, W_enc.grad, b_enc.grad, W_dec.grad, b_dec.grad]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_aux", [True, False])
def test_sparse_kernels_match_dense_reference(relu, with_aux):
    sparse = run(topk_encode, sparse_decode, relu, with_aux)
    dense = run(dense_topk_encode, dense_decode, relu, with_aux)
    names = ["x_hat", "values", "dx", "dW_enc", "db_enc", "dW_dec", "db_dec"]
    for name, s, d in zip(names, sparse, dense):
        assert rel_err(s, d) < 1e-5, name


def test_gradients_are_sparse_where_they_should_be():
    """dW_enc has non-zero rows only for latents that were selected somewhere in the batch."""
    x = torch.randn(8, D_IN)
    W_enc = torch.randn(D_SAE, D_IN, requires_grad=True)
    code, _ = topk_encode(x, W_enc, torch.zeros(D_SAE), K)
    code.values.sum().backward()
    touched = torch.zeros(D_SAE, dtype=torch.bool)
    touched[code.indices[code.values > 0]] = True
    assert torch.equal(W_enc.grad.abs().sum(1) > 0, touched)


def test_bf16_encoder_selects_nearly_the_same_latents():
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(256, 64, generator=g), torch.randn(512, 64, generator=g)
    fp32, _ = topk_encode(x, W, torch.zeros(512), 16)
    bf16, _ = topk_encode(x, W, torch.zeros(512), 16, compute_dtype=torch.bfloat16)
    assert bf16.values.dtype == torch.float32
    same = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fp32.indices, bf16.indices)])
    assert same.float().mean() / 16 > 0.95


def test_fewer_aux_candidates_than_k_aux():
    x = torch.randn(4, D_IN)
    _, aux = topk_encode(
        x, torch.randn(D_SAE, D_IN), torch.zeros(D_SAE), K, aux_latents=torch.tensor([3, 4]), k_aux=10
    )
    assert aux.indices.shape == (4, 2) and set(aux.indices.flatten().tolist()) <= {3, 4}
    _, none = topk_encode(
        x,
        torch.randn(D_SAE, D_IN),
        torch.zeros(D_SAE),
        K,
        aux_latents=torch.tensor([], dtype=torch.long),
        k_aux=10,
    )
    assert none is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, k", [(8192, 32), (4096, 7), (4096, 64), (100, 5)])
def test_top_k_selects_exactly_the_k_largest(d, k, dtype):
    g = torch.Generator().manual_seed(d + k)
    pre = torch.randn(64, d, generator=g).to(dtype)
    pre[:4] = pre[:4].round()  # rows full of ties
    pre[4] = -pre[4].abs()  # all negative
    pre[5, : k + 3] = 50.0  # the largest entries all in few groups
    values, indices = top_k(pre, k)
    expected = pre.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, expected)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


def test_encoder_chunks_agree_with_dense_reference():
    """Wide enough that the batch spans several pre-activation chunks and top_k's grouped path runs."""
    d_sae, d_in, k = 1 << 16, 8, 4
    tokens = 2 * encoder_rows_per_chunk(d_sae, torch.device("cpu")) + 5
    g = torch.Generator().manual_seed(3)
    x, W, b = (
        torch.randn(tokens, d_in, generator=g),
        torch.randn(d_sae, d_in, generator=g),
        torch.randn(d_sae, generator=g),
    )
    aux = torch.arange(0, d_sae, 3)
    sparse, sparse_aux = topk_encode(x, W, b, k, aux_latents=aux, k_aux=6)
    dense, dense_aux = dense_topk_encode(x, W, b, k, aux_latents=aux, k_aux=6)
    for got, want in [(sparse, dense), (sparse_aux, dense_aux)]:
        order_got, order_want = got.indices.sort(-1), want.indices.sort(-1)
        assert torch.equal(order_got.values, order_want.values)
        assert torch.allclose(
            got.values.gather(1, order_got.indices), want.values.gather(1, order_want.indices)
        )


def run_ragged(encode, decode, tokens: int = TOKENS, d_sae: int = D_SAE):
    """JumpReLU through a ragged code of the entries above θ - ε/2: outputs and every gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, D_IN, generator=g).requires_grad_()
    W_enc = torch.randn(d_sae, D_IN, generator=g).requires_grad_()
    b_enc = torch.randn(d_sae, generator=g).requires_grad_()
    W_dec = torch.randn(d_sae, D_IN, generator=g).requires_grad_()
    b_dec = torch.randn(D_IN, generator=g).requires_grad_()
    threshold = (torch.rand(d_sae, generator=g) * 8).requires_grad_()
    code = encode(x, W_enc, b_enc, threshold - 0.5, pre_bias=b_dec)
    active = RaggedCode(JumpReLU.apply(code.values, threshold[code.indices], 1.0), code.indices, code.offsets)
    x_hat = decode(active, W_dec) + b_dec
    (x - x_hat).pow(2).sum().backward()
    grads = [x.grad, W_enc.grad, b_enc.grad, W_dec.grad, b_dec.grad, threshold.grad]
    return [x_hat.detach(), code.offsets, *grads]


@pytest.mark.parametrize("dense_above", [2.0, 0.0], ids=["ragged", "dense"])
def test_ragged_kernels_match_dense_reference(dense_above, monkeypatch):
    """Both ways `ragged_decode` and `encode_above` compute: over the entries, and through dense matmuls."""
    monkeypatch.setattr(kernels, "DENSE_ABOVE", dense_above)
    sparse, dense = (
        run_ragged(encode_above, ragged_decode),
        run_ragged(dense_encode_above, dense_ragged_decode),
    )
    assert torch.equal(sparse[1], dense[1]), "the same entries are kept"
    assert 0 < sparse[1][-1] < TOKENS * D_SAE / 2, "the test keeps some entries, not all"
    names = ["x_hat", "offsets", "dx", "dW_enc", "db_enc", "dW_dec", "db_dec", "dthreshold"]
    for name, s, d in zip(names, sparse, dense):
        assert rel_err(s.float(), d.float()) < 1e-5, name


def test_ragged_encoder_spans_chunks_and_tokens_without_entries():
    d_sae = 1 << 14
    tokens = 2 * encoder_rows_per_chunk(d_sae, torch.device("cpu")) + 5
    x, W, b = torch.randn(tokens, 4), torch.randn(d_sae, 4), torch.zeros(d_sae)
    x[7] = 0.0  # no pre-activation above the cutoff
    code = encode_above(x, W, b, torch.full((d_sae,), 3.0))
    want = dense_encode_above(x, W, b, torch.full((d_sae,), 3.0))
    assert code.offsets[8] == code.offsets[7] and torch.equal(code.offsets, want.offsets)
    assert torch.equal(code.indices, want.indices) and torch.allclose(code.values, want.values)
    # against the dense JumpReLU over [tokens, d_sae]: the ragged decode gives the same output
    dense_f = JumpReLU.apply(x @ W.T, torch.full((d_sae,), 3.0), 1.0)
    torch.testing.assert_close(ragged_decode(code, W), dense_f @ W, rtol=1e-5, atol=1e-4)
