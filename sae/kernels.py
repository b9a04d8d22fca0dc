"""Sparse kernels for k-sparse codes: where TopK and codebook SAEs skip the dense work.

A k-sparse code is a pair `values, indices: [tokens, k]` over `d_sae` latents. Only the encoder matmul
`x @ W_enc^T` (O(d_in * d_sae) per token) has to be dense. Everything after it touches k rows per token:

| step                             | dense cost   | here (per token)                                  |
|----------------------------------|--------------|---------------------------------------------------|
| decode `f @ W_dec`               | d_sae * d_in | `embedding_bag` over the k active rows: k * d_in  |
| dL/dvalues = dL/dx_hat @ W_dec^T | d_sae * d_in | `sampled_addmm` at the k active entries: k * d_in |
| dL/dW_dec = f^T @ dL/dx_hat      | d_sae * d_in | CSR (latent-major) @ dense: k * d_in              |
| dL/dW_enc = (dL/dpre)^T @ x      | d_sae * d_in | CSR (latent-major) @ dense: k * d_in              |
| dL/db_dec (through the encoder)  | d_sae * d_in | -(dL/db_enc) @ W_enc, once per batch              |

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

    Transposing a token-major code needs one sort of its tokens * k latent ids; a stable sort keeps
    the result, and so every gradient, deterministic. Sorting them as int32 is ~3x faster on CPU.
    """
    tokens, k = indices.shape
    flat = indices.flatten()
    narrow = max(d_sae, flat.numel()) < 2**31
    index_dtype = torch.int32 if narrow else torch.int64
    order = flat.to(index_dtype).sort(stable=True).indices
    token_ids = order.div(k, rounding_mode="floor").to(index_dtype)
    crow = torch.zeros(d_sae + 1, dtype=index_dtype, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=d_sae).cumsum(0)
    return torch.sparse_csr_tensor(
        crow, token_ids, values.flatten()[order], (d_sae, tokens), check_invariants=False
    )


def sampled_row_dots(left: Tensor, right: Tensor, indices: Tensor) -> Tensor:
    """out[n, j] = left[n] . right[indices[n, j]]: [tokens, d] x [d_sae, d] x [tokens, k] -> [tokens, k]."""
    tokens, k = indices.shape
    crow = torch.arange(0, tokens * k + 1, k, device=indices.device)
    pattern = torch.sparse_csr_tensor(
        crow,
        indices.flatten(),
        torch.zeros(tokens * k, dtype=left.dtype, device=left.device),
        (tokens, right.shape[0]),
        check_invariants=False,
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


def top_k(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of pre: [rows, d] -> (values, indices): [rows, k], unsorted.

    Exact, and cheaper than `pre.topk` on wide rows: split each row into G = d / S interleaved groups
    (entry j is in group j mod G), keep the k groups with the largest maxima, and select among their
    k * S entries. Those k groups hold k entries at least as large as the k-th largest group maximum,
    so every entry of the row's top k lies in them. The group maxima are one vectorised pass; only
    k * S of the d entries reach the (scalar) selection. Ties may be broken differently from `topk`.
    """
    rows, d = pre.shape
    S = _GROUP_SIZE
    if d % S or d // S < max(4 * k, 256):  # measured: on narrower rows plain topk is as fast or faster
        return pre.topk(k, dim=-1, sorted=False)
    G = d // S
    grouped = pre.view(rows, S, G)  # grouped[r, s, g] = pre[r, s * G + g]
    groups = grouped.amax(dim=1).topk(k, dim=-1, sorted=False).indices  # [rows, k]
    candidates = grouped.gather(2, groups[:, None, :].expand(rows, S, k))  # [rows, S, k]
    values, position = candidates.view(rows, S * k).topk(k, dim=-1, sorted=False)
    slot, group = position.div(k, rounding_mode="floor"), position.remainder(k)
    return values, slot * G + groups.gather(1, group)


_GROUP_SIZE = 16  # measured on CPU, d_sae 8192, k 32: 4 to 16 best, 64 slower than plain topk;
# the selection takes 0.8x the time of `topk` at d_sae 8192 and 0.5x at d_sae 65536


def encoder_rows_per_chunk(d_sae: int, device: torch.device) -> int:
    """How many tokens' pre-activations to hold at once in the encoder.

    On CPU a ~8 MB chunk stays in cache between the matmul that writes it and the selection that
    reads it, and one reused buffer avoids faulting in a fresh [tokens, d_sae] block every step;
    on CUDA one chunk of the whole batch is fastest.
    """
    return 1 << 62 if device.type == "cuda" else max(1, (1 << 22) // d_sae)


class TopKEncode(torch.autograd.Function):
    """The k largest pre-activations per token, and optionally an auxiliary top-k over a subset.

    pre = (x - pre_bias) @ W_enc^T + b_enc runs densely in `compute_dtype` (bf16 is ~4x faster than
    fp32 on CPU and GPU), a chunk of tokens at a time, and is never stored whole: selection happens
    on each chunk; the selected values come back in the dtype of `x`. The auxiliary selection
    (AuxK's dead latents) reuses the same pre-activations.

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
        tokens, d_sae = len(x), W_enc.shape[0]
        x_low, W_low_t, b_low = x_c.to(compute_dtype), W_enc.to(compute_dtype).T, b_enc.to(compute_dtype)
        widths = [k] + ([k_aux] if aux_latents is not None and k_aux > 0 else [])
        values = [torch.empty(tokens, w, dtype=compute_dtype, device=x.device) for w in widths]
        indices = [torch.empty(tokens, w, dtype=torch.int64, device=x.device) for w in widths]
        step = min(tokens, encoder_rows_per_chunk(d_sae, x.device))
        pre_chunk = torch.empty(step, d_sae, dtype=compute_dtype, device=x.device)
        for start in range(0, tokens, step):
            rows = slice(start, min(start + step, tokens))
            pre = torch.addmm(b_low, x_low[rows], W_low_t, out=pre_chunk[: rows.stop - start])
            values[0][rows], indices[0][rows] = top_k(pre, k)
            if len(widths) > 1:
                values[1][rows], aux_pos = top_k(pre.index_select(1, aux_latents), k_aux)
                indices[1][rows] = aux_latents[aux_pos]
        outputs = []
        for vals, idx in zip(values, indices):
            vals = vals.to(x.dtype)
            outputs += [vals.relu() if relu else vals, idx]
        all_indices = torch.cat(indices, dim=1) if len(indices) > 1 else indices[0]
        # Where ReLU clipped a value its gradient is zero; remember which entries pass gradient.
        passes = torch.cat([v > 0 for v in outputs[0::2]], dim=1) if relu else None
        ctx.save_for_backward(x_c, W_enc, all_indices, passes)
        for out in outputs[1::2]:
            ctx.mark_non_differentiable(out)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x_c, W_enc, indices, passes = ctx.saved_tensors
        grad_pre = torch.cat(
            [g if g is not None else torch.zeros_like(indices, dtype=x_c.dtype) for g in grads[0::2]], dim=1
        )  # [tokens, k (+ k_aux)]
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
    outs = TopKEncode.apply(
        x, pre_bias, W_enc, b_enc, k, relu, compute_dtype, aux_latents if k_aux else None, k_aux
    )
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
