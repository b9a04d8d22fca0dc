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

A ragged code (`RaggedCode`: the entries of every token back to back, CSR order) serves the rules
that keep a varying number of latents per token (JumpReLU's threshold, batch top-k): `encode_above`
keeps the pre-activations above a per-latent cutoff and `ragged_decode` decodes them, with the same
sparse backward as above at nnz (all tokens' entries) instead of tokens * k; a code with more than
`DENSE_ABOVE` of the tokens * d_sae entries (JumpReLU early on) goes through dense matmuls instead.

The sparse ops used here exist on CPU and CUDA alike, so the same code runs on both.
`dense_topk_encode`, `dense_decode`, `dense_encode_above` and `dense_ragged_decode` are the plain-PyTorch
references the tests compare against.
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


class RaggedCode(NamedTuple):
    """A code with a varying number of entries per token: token n's are [offsets[n], offsets[n + 1])."""

    values: Tensor  # [nnz] activations
    indices: Tensor  # [nnz] latent ids, int64
    offsets: Tensor  # [tokens + 1] int64, offsets[0] = 0 and offsets[-1] = nnz

    @property
    def tokens(self) -> int:
        return len(self.offsets) - 1

    def token_ids(self) -> Tensor:
        """[nnz] the token of each entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.tokens, device=counts.device), counts)

    def to_dense(self, d_sae: int) -> Tensor:
        """[tokens, d_sae], zero where the code has no entry."""
        dense = torch.zeros(self.tokens, d_sae, dtype=self.values.dtype, device=self.values.device)
        return dense.index_put_((self.token_ids(), self.indices), self.values, accumulate=True)

    @classmethod
    def from_mask(cls, code: SparseCode, mask: Tensor) -> RaggedCode:
        """The entries of a [tokens, c] code where mask [tokens, c] holds (gradients reach only those)."""
        offsets = torch.zeros(len(mask) + 1, dtype=torch.int64, device=mask.device)
        offsets[1:] = mask.sum(-1).cumsum(0)
        return cls(code.values[mask], code.indices[mask], offsets)


def latent_major(indices: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """A [tokens, k] code as a CSR matrix [d_sae, tokens] (one row per latent), ready for `csr @ dense`.

    Transposing a token-major code needs one sort of its tokens * k latent ids; a stable sort keeps
    the result, and so every gradient, deterministic. Sorting them as int32 is ~3x faster on CPU.
    """
    tokens, k = indices.shape
    return _by_latent(
        indices.flatten(), values.flatten(), d_sae, tokens, lambda order: order.div(k, rounding_mode="floor")
    )


def ragged_latent_major(code: RaggedCode, d_sae: int) -> Tensor:
    """A ragged code as a CSR matrix [d_sae, tokens], as `latent_major`."""
    token_ids = code.token_ids()
    return _by_latent(code.indices, code.values, d_sae, code.tokens, lambda order: token_ids[order])


def _by_latent(flat: Tensor, values: Tensor, d_sae: int, tokens: int, token_of) -> Tensor:
    """flat [nnz] latent ids, values [nnz], token_of(order) -> the tokens of the entries in that order."""
    narrow = max(d_sae, flat.numel(), tokens) < 2**31
    index_dtype = torch.int32 if narrow else torch.int64
    order = flat.to(index_dtype).sort(stable=True).indices
    crow = torch.zeros(d_sae + 1, dtype=index_dtype, device=flat.device)
    crow[1:] = torch.bincount(flat, minlength=d_sae).cumsum(0)
    return torch.sparse_csr_tensor(
        crow, token_of(order).to(index_dtype), values[order], (d_sae, tokens), check_invariants=False
    )


def sampled_row_dots(left: Tensor, right: Tensor, indices: Tensor, offsets: Tensor | None = None) -> Tensor:
    """out[e] = left[token of e] . right[indices[e]] for every entry e of a code: [tokens, d] x [d_sae, d]
    x indices [tokens, k] -> [tokens, k]; with a ragged code's offsets, indices [nnz] -> [nnz]."""
    tokens = len(left)
    if offsets is None:
        k = indices.shape[1]
        offsets = torch.arange(0, tokens * k + 1, k, device=indices.device)
    pattern = torch.sparse_csr_tensor(
        offsets,
        indices.flatten(),
        torch.zeros(indices.numel(), dtype=left.dtype, device=left.device),
        (tokens, right.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values().view(indices.shape)


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


class RaggedDecode(torch.autograd.Function):
    """x_hat[n] = sum over token n's entries e of values[e] * W_dec[indices[e]], as `SparseDecode`; a code
    denser than `DENSE_ABOVE` goes through dense matmuls instead (same result, see `is_dense`)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, offsets: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, offsets, W_dec)
        code = RaggedCode(values, indices, offsets)
        if is_dense(code, W_dec.shape[0]):
            return code.to_dense(W_dec.shape[0]) @ W_dec
        return F.embedding_bag(
            indices, W_dec, offsets, per_sample_weights=values, mode="sum", include_last_offset=True
        )

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, offsets, W_dec = ctx.saved_tensors
        code, d_sae = RaggedCode(values, indices, offsets), W_dec.shape[0]
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if is_dense(code, d_sae):
            if ctx.needs_input_grad[0]:
                grad_values = (grad_out @ W_dec.T)[code.token_ids(), indices]
            if ctx.needs_input_grad[3]:
                grad_W_dec = code.to_dense(d_sae).T @ grad_out
            return grad_values, None, None, grad_W_dec
        if ctx.needs_input_grad[0]:
            grad_values = sampled_row_dots(grad_out, W_dec, indices, offsets)
        if ctx.needs_input_grad[3]:
            grad_W_dec = ragged_latent_major(code, d_sae) @ grad_out
        return grad_values, None, None, grad_W_dec


DENSE_ABOVE = 1 / 8  # measured (CPU, d_in 640, d_sae 8192, batch 4096, a JumpReLU step): ragged 287 ms at
# L0 32, 1,132 at 768; dense 1,400-1,500 ms up to L0 1,024, where both cost the same; at L0 4,096 ragged
# 9.9 s, dense 3.2 s


def is_dense(code: RaggedCode, d_sae: int) -> bool:
    """Whether a ragged code holds enough entries that dense [tokens, d_sae] matmuls are cheaper."""
    return len(code.values) > DENSE_ABOVE * code.tokens * d_sae


def ragged_decode(code: RaggedCode, W_dec: Tensor) -> Tensor:
    """A ragged code over W_dec [d_sae, d_out] -> [tokens, d_out], with a sparse backward."""
    return RaggedDecode.apply(code.values, code.indices, code.offsets, W_dec)


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
        if needs_W:  # only the entries with a gradient: batch top-k passes none to 3/4 of its candidates
            with_grad = RaggedCode.from_mask(SparseCode(grad_pre, indices), grad_pre != 0)
            grad_W = ragged_latent_major(with_grad, W_enc.shape[0]) @ x_c
        if needs_b or needs_pre_bias:
            grad_b, grad_pre_bias = _bias_grads(indices.flatten(), grad_pre.flatten(), W_enc, needs_pre_bias)
        return grad_x, grad_pre_bias, grad_W, grad_b, None, None, None, None, None


def _bias_grads(latents: Tensor, grad_pre: Tensor, W_enc: Tensor, needs_pre_bias: bool):
    """dL/db_enc [d_sae] from the gradients grad_pre [nnz] at the entries' latents [nnz], and dL/dpre_bias
    [d_in] = -(dL/db_enc) @ W_enc (pre = (x - pre_bias) W_enc^T + b_enc), or None."""
    grad_b = torch.zeros(W_enc.shape[0], dtype=grad_pre.dtype, device=grad_pre.device)
    grad_b.index_add_(0, latents, grad_pre)
    return grad_b, (-(grad_b @ W_enc) if needs_pre_bias else None)


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


class EncodeAbove(torch.autograd.Function):
    """The pre-activations above a per-latent cutoff, as a ragged code (JumpReLU's active and near-threshold
    entries). pre = (x - pre_bias) @ W_enc^T + b_enc runs densely in `compute_dtype` a chunk of tokens at a
    time, as in `TopKEncode`; only the nnz kept entries are stored, and the backward is sparse over them:
    dW_enc = S^T @ (x - pre_bias) with S the latent-major CSR of the gradients, db_enc a scatter-add."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # [tokens, d_in]
        pre_bias: Tensor | None,  # [d_in]
        W_enc: Tensor,  # [d_sae, d_in]
        b_enc: Tensor,  # [d_sae]
        cutoff: Tensor,  # [d_sae]: entries with pre > cutoff are kept
        compute_dtype: torch.dtype,
    ):
        x_c = x if pre_bias is None else x - pre_bias
        tokens, d_sae = len(x), W_enc.shape[0]
        x_low, W_low_t, b_low = x_c.to(compute_dtype), W_enc.to(compute_dtype).T, b_enc.to(compute_dtype)
        step = min(tokens, encoder_rows_per_chunk(d_sae, x.device))
        pre_chunk = torch.empty(step, d_sae, dtype=compute_dtype, device=x.device)
        values, indices, counts = [], [], []
        for start in range(0, tokens, step):
            rows = slice(start, min(start + step, tokens))
            pre = torch.addmm(b_low, x_low[rows], W_low_t, out=pre_chunk[: rows.stop - start])
            kept = pre > cutoff
            values.append(pre[kept].to(x.dtype))
            indices.append(kept.nonzero()[:, 1])
            counts.append(kept.sum(-1))
        offsets = torch.zeros(tokens + 1, dtype=torch.int64, device=x.device)
        offsets[1:] = torch.cat(counts).cumsum(0)
        indices = torch.cat(indices)
        ctx.save_for_backward(x_c, W_enc, indices, offsets)
        ctx.mark_non_differentiable(indices, offsets)
        return torch.cat(values), indices, offsets

    @staticmethod
    def backward(ctx, grad_values: Tensor, *_):
        x_c, W_enc, indices, offsets = ctx.saved_tensors
        grads, d_sae = RaggedCode(grad_values, indices, offsets), W_enc.shape[0]
        needs_x, needs_pre_bias, needs_W, needs_b = ctx.needs_input_grad[:4]
        grad_x = grad_pre_bias = grad_W = grad_b = None
        if is_dense(grads, d_sae):  # as in `RaggedDecode`
            grad_pre = grads.to_dense(d_sae)  # [tokens, d_sae]
            grad_x = grad_pre @ W_enc if needs_x else None
            grad_W = grad_pre.T @ x_c if needs_W else None
        else:
            if needs_x:
                grad_x = F.embedding_bag(
                    indices,
                    W_enc,
                    offsets,
                    per_sample_weights=grad_values,
                    mode="sum",
                    include_last_offset=True,
                )
            if needs_W:
                grad_W = ragged_latent_major(grads, d_sae) @ x_c
        if needs_b or needs_pre_bias:
            grad_b, grad_pre_bias = _bias_grads(indices, grad_values, W_enc, needs_pre_bias)
        return grad_x, grad_pre_bias, grad_W, grad_b, None, None


def encode_above(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    cutoff: Tensor,
    *,
    pre_bias: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> RaggedCode:
    """The entries of (x - pre_bias) @ W_enc^T + b_enc above cutoff [d_sae] (not differentiated), sparse
    backward."""
    return RaggedCode(*EncodeAbove.apply(x, pre_bias, W_enc, b_enc, cutoff.detach(), compute_dtype))


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


def dense_encode_above(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    cutoff: Tensor,
    *,
    pre_bias: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> RaggedCode:
    """Same contract as `encode_above`, through ordinary autograd over the dense pre-activations."""
    x = x if pre_bias is None else x - pre_bias
    pre = F.linear(x.to(compute_dtype), W_enc.to(compute_dtype), b_enc.to(compute_dtype))
    kept = pre > cutoff.detach()
    latents = torch.arange(W_enc.shape[0], device=x.device).expand_as(pre)
    return RaggedCode.from_mask(SparseCode(pre.to(x.dtype), latents), kept)


def dense_ragged_decode(code: RaggedCode, W_dec: Tensor) -> Tensor:
    """Scatter the ragged code into a dense [tokens, d_sae] matrix and multiply."""
    return code.to_dense(W_dec.shape[0]) @ W_dec
