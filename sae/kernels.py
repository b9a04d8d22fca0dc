"""Sparse kernels for k-sparse codes: where TopK and codebook SAEs skip the dense work.

A k-sparse code is a pair `values, indices: [tokens, k]` over `d_sae` latents. Only the encoder matmul
`x @ W_enc^T` (O(d_in * d_sae) per token) has to be dense. Everything after it touches k rows per token:

| step                              | dense cost          | here (per token)                                  |
|-----------------------------------|---------------------|---------------------------------------------------|
| decode `f @ W_dec`                | d_sae * d_in        | `embedding_bag` over the k active rows: k * d_in   |
| dL/dvalues = dL/dx_hat @ W_dec^T  | d_sae * d_in        | `sampled_addmm` at the k active entries: k * d_in  |
| dL/dW_dec = f^T @ dL/dx_hat       | d_sae * d_in        | CSR (latent-major) @ dense: k * d_in               |
| dL/dW_enc = (dL/dpre)^T @ x       | d_sae * d_in        | CSR (latent-major) @ dense: k * d_in               |
| dL/db_dec (through the encoder)   | d_sae * d_in        | -(dL/db_enc) @ W_enc, once per batch               |

The sparse ops used here exist on CPU and CUDA alike, so the same code runs on both.
`dense_topk_encode` and `dense_decode` are the plain-PyTorch references the tests compare against.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


# The CSR ops used here are stable in practice; torch flags the whole CSR API as beta on every call.
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)


class SparseCode(NamedTuple):
    values: Tensor  # [tokens, k] activations (0 where a selected latent's ReLU clipped it)
    indices: Tensor  # [tokens, k] latent ids, int64


def latent_major(indices: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """The code as a CSR matrix [d_sae, tokens] (one row per latent), ready for `csr @ dense`.

    Transposing a token-major code needs one sort of tokens * k indices; a stable sort keeps
    the result, and so every gradient, deterministic.
    """
    tokens, k = indices.shape
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    token_ids = torch.arange(tokens, device=indices.device).repeat_interleave(k)[order]
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=d_sae).cumsum(0)
    return torch.sparse_csr_tensor(crow, token_ids, values.flatten()[order], (d_sae, tokens), check_invariants=False)


def sampled_row_dots(left: Tensor, right: Tensor, indices: Tensor) -> Tensor:
    """out[n, j] = left[n] . right[indices[n, j]]: [tokens, d] x [d_sae, d] x [tokens, k] -> [tokens, k]."""
    tokens, k = indices.shape
    crow = torch.arange(0, tokens * k + 1, k, device=indices.device)
    pattern = torch.sparse_csr_tensor(
        crow, indices.flatten(), torch.zeros(tokens * k, dtype=left.dtype, device=left.device),
        (tokens, right.shape[0]), check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values().view(tokens, k)


class SparseDecode(torch.autograd.Function):
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]]: the decoder restricted to the active rows."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = sampled_row_dots(grad_out, W_dec, indices)
        if ctx.needs_input_grad[2]:
            grad_W_dec = latent_major(indices, values, W_dec.shape[0]) @ grad_out
        return grad_values, None, grad_W_dec


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """[tokens, k], [tokens, k], [d_sae, d_in] -> [tokens, d_in], with a sparse backward."""
    return SparseDecode.apply(values, indices, W_dec)


class TopKEncode(torch.autograd.Function):
    """The k largest pre-activations per token, and optionally an auxiliary top-k over a subset.

    pre = (x - pre_bias) @ W_enc^T + b_enc runs densely in `compute_dtype` (bf16 is ~4x faster than
    fp32 on CPU and GPU); selection happens there too; the selected values come back in the dtype of
    `x`. The auxiliary selection (AuxK's dead latents) reuses the same pre-activations.

    Backward: dL/dpre is non-zero only at the k (+ k_aux) selected entries per token, so
    dW_enc = S^T @ (x - pre_bias) is a CSR product and db_enc a scatter-add; dpre_bias is then
    -db_enc @ W_enc, one vector-matrix product; dx (rarely needed: x is data) an `embedding_bag`.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # [tokens, d_in]
        pre_bias: Tensor | None,  # [d_in], subtracted from x (an SAE's b_dec)
        W_enc: Tensor,  # [d_sae, d_in]
        b_enc: Tensor,  # [d_sae]
        k: int,
        relu: bool,
        compute_dtype: torch.dtype,
        aux_latents: Tensor | None,  # [n_aux] int64: latents eligible for the auxiliary top-k
        k_aux: int,
    ):
        x_c = x if pre_bias is None else x - pre_bias
        pre = F.linear(x_c.to(compute_dtype), W_enc.to(compute_dtype), b_enc.to(compute_dtype))
        values, indices = pre.topk(k, dim=-1, sorted=False)
        selected = [(values, indices)]
        if aux_latents is not None and k_aux > 0:
            aux_values, aux_pos = pre.index_select(1, aux_latents).topk(k_aux, dim=-1, sorted=False)
            selected.append((aux_values, aux_latents[aux_pos]))
        outputs = []
        for vals, idx in selected:
            vals = vals.to(x.dtype)
            outputs += [vals.relu() if relu else vals, idx]
        all_indices = torch.cat(outputs[1::2], dim=1)
        # Where ReLU clipped a value its gradient is zero; remember which entries pass gradient.
        passes = torch.cat([v > 0 for v in outputs[0::2]], dim=1) if relu else None
        ctx.save_for_backward(x_c, W_enc, all_indices, passes)
        for out in outputs[1::2]:
            ctx.mark_non_differentiable(out)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x_c, W_enc, indices, passes = ctx.saved_tensors
        grad_pre = torch.cat([g if g is not None else torch.zeros_like(indices, dtype=x_c.dtype)
                              for g in grads[0::2]], dim=1)  # [tokens, k (+ k_aux)]
        if passes is not None:
            grad_pre = grad_pre * passes
        needs_x, needs_pre_bias, needs_W, needs_b = ctx.needs_input_grad[:4]
        grad_x = grad_pre_bias = grad_W = grad_b = None
        if needs_x:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=grad_pre, mode="sum")
        if needs_W:
            grad_W = latent_major(indices, grad_pre, W_enc.shape[0]) @ x_c
        if needs_b or needs_pre_bias:
            grad_b = torch.zeros(W_enc.shape[0], dtype=grad_pre.dtype, device=grad_pre.device)
            grad_b.index_add_(0, indices.flatten(), grad_pre.flatten())
            if needs_pre_bias:
                grad_pre_bias = -(grad_b @ W_enc)
        return grad_x, grad_pre_bias, grad_W, grad_b, None, None, None, None, None


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    pre_bias: Tensor | None = None,
    relu: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    aux_latents: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[SparseCode, SparseCode | None]:
    """Top-k code of `x - pre_bias` (and the auxiliary top-k_aux over `aux_latents`), sparse backward."""
    k_aux = min(k_aux, 0 if aux_latents is None else len(aux_latents))
    outs = TopKEncode.apply(x, pre_bias, W_enc, b_enc, k, relu, compute_dtype, aux_latents if k_aux else None, k_aux)
    aux = SparseCode(outs[2], outs[3]) if k_aux else None
    return SparseCode(outs[0], outs[1]), aux


# --- dense references (tests; `TrainConfig.sparse_kernels = False`) --------------------------------


def dense_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    pre_bias: Tensor | None = None,
    relu: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    aux_latents: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[SparseCode, SparseCode | None]:
    """Same contract as `topk_encode`, through ordinary autograd over the dense pre-activations."""
    x = x if pre_bias is None else x - pre_bias
    pre = F.linear(x.to(compute_dtype), W_enc.to(compute_dtype), b_enc.to(compute_dtype)).to(x.dtype)
    values, indices = pre.topk(k, dim=-1, sorted=False)
    code = SparseCode(values.relu() if relu else values, indices)
    k_aux = min(k_aux, 0 if aux_latents is None else len(aux_latents))
    if not k_aux:
        return code, None
    aux_values, aux_pos = pre[:, aux_latents].topk(k_aux, dim=-1, sorted=False)
    return code, SparseCode(aux_values.relu() if relu else aux_values, aux_latents[aux_pos])


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Scatter the code into a dense [tokens, d_sae] matrix and multiply: the O(d_sae) reference."""
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    return dense.scatter_add(1, indices, values) @ W_dec
