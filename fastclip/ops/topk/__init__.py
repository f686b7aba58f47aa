"""Top-k similarity search: registry rows, the ``fastclip::topk_similarity`` custom op, its autograd, and the
public function.

The gallery is streamed in tiles and each query keeps a running top-k, so memory beyond the inputs is O(Q * k)
(plus one score tile for the ``torch`` backend); the (Q, G) similarity matrix is never formed. A gallery on the
host with queries on a GPU is moved to the device chunk by chunk, so it may be larger than the GPU's memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastclip._checks import _fmt, amp_cast, autocast_dtype, check_float_tensor, refuse_forward_ad
from fastclip.dispatch import Lazy, Support, no_bf16_in_interpreter, register, select, supports, triton_unavailable
from fastclip.ops.contrastive.pytorch import acc_dtype
from fastclip.ops.topk.pytorch import merge_topk
from fastclip.ops.topk.reference import topk_similarity_ref

__all__ = ["topk_similarity"]

OP = "topk_similarity"
_HERE = __name__

register(Support(OP, "reference", impl=topk_similarity_ref))
register(Support(OP, "torch", impl=Lazy(f"{_HERE}.pytorch", "topk_similarity")))
# the Triton kernel keeps each query's running top-k in registers: beyond k = 128 its 64-row tiles spill (and
# 16-row tiles would leave the tensor cores' warp-group MMA), so "auto" takes the torch backend there
TRITON_MAX_K = 128
register(Support(OP, "triton", impl=Lazy(f"{_HERE}.triton", "topk_similarity"),
                 dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), unavailable=triton_unavailable,
                 extra_checks=(no_bf16_in_interpreter,), max_sizes={"k": TRITON_MAX_K}))

# rows of a host gallery moved to the GPU at a time: about 1 GiB
_HOST_CHUNK_BYTES = 1 << 30


def _chunked(queries: Tensor, gallery: Tensor, k: int, impl, chunk: int) -> Tuple[Tensor, Tensor]:
    """``impl`` over gallery chunks of ``chunk`` rows (moved to the queries' device and dtype), merged in index
    order."""
    vals = queries.new_empty((queries.shape[0], 0), dtype=acc_dtype(queries.dtype))
    idx = queries.new_empty((queries.shape[0], 0), dtype=torch.int64)
    for g0 in range(0, gallery.shape[0], chunk):
        part = gallery[g0:g0 + chunk].to(queries.device, queries.dtype)  # (chunk, D)
        v, i = impl(queries, part, min(k, part.shape[0]))
        # v, i are sorted by (value, index), so in index order within equal values: merge_topk's contract
        vals, idx = merge_topk(vals, idx, v, i + g0, k)
    return vals, idx


@torch.library.custom_op("fastclip::topk_similarity", mutates_args=())
def _topk_op(queries: Tensor, gallery: Tensor, k: int, backend: str, gallery_chunk: int) -> Tuple[Tensor, Tensor]:
    impl = supports(OP)[backend].impl
    if gallery_chunk <= 0 and gallery.device == queries.device and gallery.dtype == queries.dtype:
        return impl(queries, gallery, k)
    return _chunked(queries, gallery, k, impl, gallery_chunk if gallery_chunk > 0 else gallery.shape[0])


@_topk_op.register_fake
def _(queries, gallery, k, backend, gallery_chunk):
    q = queries.shape[0]
    return queries.new_empty((q, k), dtype=acc_dtype(queries.dtype)), queries.new_empty((q, k), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    queries, gallery, *_ = inputs
    ctx.save_for_backward(queries, gallery, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_values, _grad_indices):
    """values[i, j] = queries[i] . gallery[idx[i, j]], so dq_i = sum_j gv_ij g_idx_ij and dg_n = sum gv_ij q_i."""
    queries, gallery, idx = ctx.saved_tensors
    d = queries.shape[1]
    gv = grad_values.to(acc_dtype(queries.dtype))
    picked = gallery[idx.reshape(-1).to(gallery.device)].to(queries.device, gv.dtype).view(*idx.shape, d)  # (Q,k,D)
    d_q = torch.einsum("qk,qkd->qd", gv, picked).to(queries.dtype) if ctx.needs_input_grad[0] else None
    d_g = None
    if ctx.needs_input_grad[1]:
        contrib = (gv[:, :, None] * queries.to(gv.dtype)[:, None, :]).reshape(-1, d)  # (Q * k, D)
        d_g = torch.zeros((gallery.shape[0], d), dtype=gv.dtype, device=queries.device)
        d_g = d_g.index_add_(0, idx.reshape(-1), contrib).to(gallery.device, gallery.dtype)
    return d_q, d_g, None, None, None


torch.library.register_autograd("fastclip::topk_similarity", _backward, setup_context=_setup_context)


def _check(queries, gallery, k, gallery_chunk) -> None:
    check_float_tensor("queries", queries, 2, "queries, dim")
    check_float_tensor("gallery", gallery, 2, "gallery size, dim")
    if queries.dtype != gallery.dtype:
        raise TypeError(f"queries and gallery have different dtypes: queries {_fmt(queries)}; gallery {_fmt(gallery)}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries and gallery have different feature dims: queries {_fmt(queries)}; "
                         f"gallery {_fmt(gallery)}")
    if gallery.device != queries.device and gallery.device.type != "cpu":
        raise ValueError(f"gallery must be on the queries' device or on the CPU (streamed to the queries' device), "
                         f"got queries {_fmt(queries)}; gallery {_fmt(gallery)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be an integer in [1, gallery size = {gallery.shape[0]}], got {k!r}")
    if gallery_chunk is not None and (isinstance(gallery_chunk, bool) or not isinstance(gallery_chunk, int)
                                      or gallery_chunk < 1):
        raise ValueError(f"gallery_chunk must be a positive integer or None, got {gallery_chunk!r}")


def _gallery_chunk(queries: Tensor, gallery: Tensor, gallery_chunk: Optional[int]) -> int:
    """The op's ``gallery_chunk``: the rows a backend sees at once, 0 for the whole gallery. A gallery on another
    device than the queries (the host) goes ``_HOST_CHUNK_BYTES`` of rows at a time (at least one row) unless
    ``gallery_chunk`` says otherwise."""
    if gallery_chunk is not None:
        return gallery_chunk
    if gallery.device == queries.device:
        return 0
    return max(1, _HOST_CHUNK_BYTES // (gallery.shape[1] * gallery.element_size()))


def topk_similarity(queries: Tensor, gallery: Tensor, k: int, *, backend: str = "auto",
                    gallery_chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The k gallery rows with the largest inner product with each query, without the (Q, G) score matrix.

    Args:
        queries: (Q, D) float16/bfloat16/float32/float64.
        gallery: (G, D), same dtype and D; on the queries' device, or on the CPU with the queries on a GPU, in
            which case it is moved to the GPU ``gallery_chunk`` rows at a time (default: about 1 GiB), so it may be
            larger than the GPU's memory. A ``torch.from_numpy`` view of a memory-mapped array works.
        k: 1 <= k <= G (the ``triton`` backend takes k <= 128; ``auto`` picks ``torch`` above).
        backend: "auto", "reference", "torch" or "triton" (see ``python -m fastclip.info``).
        gallery_chunk: rows per chunk of the gallery (also on one device: bounds what a backend sees at once).

    Returns:
        (values, indices), each (Q, k): values in fp32 (fp64 for fp64 inputs), the scores the ranking used, sorted
        in descending order; indices int64 into the gallery.

    Autocast: under ``torch.autocast`` the inputs are cast to its dtype first, as for ``queries @ gallery.T``.

    Order: scores s_ij = queries_i . gallery_j accumulated in fp32 (fp64 for fp64 inputs), ranked in descending
    order with NaN above every number (as torch.topk and torch.sort rank them: a NaN query gives NaN scores and
    the indices 0..k-1; a gallery row containing NaN comes first for every query); equal scores (-0 and +0
    included, NaNs included) are ranked by the lower gallery index, so the result is deterministic and equals
    the first k columns of a stable descending sort of the full matrix.

    Memory beyond the inputs: O(Q * k) ("triton"), plus one score tile of about 4M elements and a converted
    gallery tile ("torch"); "reference" materializes (Q, G).

    Gradient: the values are differentiable with respect to queries and gallery (the indices are not); the
    backward gathers the chosen gallery rows, O(Q * k * D).

    Equivalent PyTorch::

        scores = queries.float() @ gallery.float().T
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        values, indices = values[:, :k], indices[:, :k]
    """
    _check(queries, gallery, k, gallery_chunk)
    # under autocast the scores come from the autocast dtype, as autocast runs ``queries @ gallery.T``; a host
    # gallery is cast chunk by chunk on its way to the device
    amp = autocast_dtype(queries.device)
    queries = amp_cast(queries, amp)
    if gallery.device == queries.device:
        gallery = amp_cast(gallery, amp)
    row = select(OP, backend, device=queries.device, dtype=queries.dtype, dim=queries.shape[1], sizes={"k": k})
    chunk = _gallery_chunk(queries, gallery, gallery_chunk)
    with torch.autocast(queries.device.type, enabled=False):  # the backends' GEMMs run in the inputs' dtype
        if row.backend == "reference" and not chunk:  # plain PyTorch: autograd differentiates the naive maths
            return row.impl(queries, gallery, k)
        refuse_forward_ad(OP, row.backend, queries=queries, gallery=gallery)
        return torch.ops.fastclip.topk_similarity(queries, gallery, k, row.backend, chunk)
