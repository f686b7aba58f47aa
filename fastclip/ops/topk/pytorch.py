"""Streaming top-k similarity in PyTorch, any device (the CPU default).

Each block of ``block_q`` queries sweeps the gallery in tiles of ``block_g`` rows: the (block_q, block_g) score
tile is one GEMM in fp32 (fp64 for fp64 inputs) written into a preallocated buffer, and its winners are merged into
the block's running top-k. Memory beyond the inputs: the (Q, k) result, one score tile and, for 16-bit inputs, one
gallery tile in the accumulation dtype; the (Q, G) matrix never exists.

The selection costs little next to the GEMM: once a row's running top-k is full, the row skips every tile whose best
score does not beat its k-th (most tiles, late in the sweep), and a wide tile's row is cut to the k chunks of
``CHUNK`` columns with the largest maxima before its top-k (see :func:`tile_topk`).

Exact order (values descending, NaN first as in torch.topk, ties by the lower index) at the cost of a top-k, not a
sort, per tile: ``torch.topk`` picks k + 1 candidates, and a row whose k-th and (k + 1)-th scores are equal (a tie
at the cut, where topk's choice is unspecified) is redone with a stable sort of that row. Merging keeps the order:
see :func:`merge_topk`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastclip.ops.contrastive.pytorch import acc_dtype

DEFAULT_BLOCK_Q = 1024
DEFAULT_BLOCK_G = 4096
CHUNK = 32  # columns per chunk of tile_topk's first pass


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # equal in the ranking's sense: equal values, or both NaN
    return (a == b) | (a.isnan() & b.isnan())


def chunk_max(scores: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """The maxima (R, n / CHUNK) of each row's chunks of ``CHUNK`` columns (NaN for a chunk holding one), or None
    for a tile too narrow for :func:`tile_topk` to gain from them."""
    n = scores.shape[1]
    if n < 2 * k * CHUNK or n % CHUNK:
        return None
    return scores.unflatten(1, (n // CHUNK, CHUNK)).amax(dim=2)


def tile_topk(scores: torch.Tensor, k: int, rows: Optional[torch.Tensor] = None,
              chunk_maxima: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact top-min(k, n) of each row of ``scores`` (R, n) (of the rows ``rows`` only when given), as (values,
    indices) in ascending index order.

    With the :func:`chunk_max` of the tile, a row is first cut to the k chunks with the largest maxima (equal
    maxima: the lower chunk first), which hold its top k: an entry of any other chunk is outranked by the maxima of
    k chunks, each larger, or equal with a lower index. The top-k then runs on k * CHUNK columns instead of n.
    """
    if chunk_maxima is None:
        return _exact_topk(scores if rows is None else scores.index_select(0, rows), k)
    if rows is not None:
        chunk_maxima = chunk_maxima.index_select(0, rows)
    _, chunks = _exact_topk(chunk_maxima, k)  # (R', k), ascending
    cols = (chunks[:, :, None] * CHUNK + torch.arange(CHUNK, device=scores.device)).flatten(1)  # (R', k * CHUNK)
    if rows is None:
        picked = scores.gather(1, cols)
    else:
        picked = scores.take(rows[:, None] * scores.shape[1] + cols)  # scores[rows[:, None], cols]
    vals, j = _exact_topk(picked, k)  # cols ascending, so ties keep the lower index
    return vals, cols.gather(1, j)


def _exact_topk(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`tile_topk` with one ``torch.topk`` over the whole row."""
    n = scores.shape[1]
    if n <= k:  # the whole tile is selected
        idx = torch.arange(n, device=scores.device).expand(scores.shape[0], n)
        return scores, idx
    vals, idx = scores.topk(k + 1, dim=1, sorted=True)
    tie = _same(vals[:, k - 1], vals[:, k]).nonzero().squeeze(1)  # rows whose cut falls inside a tie
    vals, idx = vals[:, :k], idx[:, :k]
    if tie.numel():
        # a stable sort keeps index order among equal scores, so it takes the lowest indices of the tie
        v_t, i_t = torch.sort(scores[tie], dim=1, descending=True, stable=True)
        vals, idx = vals.clone(), idx.clone()
        vals[tie], idx[tie] = v_t[:, :k], i_t[:, :k]
    idx, order = idx.sort(dim=1)
    return vals.gather(1, order), idx


def merge_topk(run_vals: torch.Tensor, run_idx: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor,
               k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k (sorted: values descending, ties by lower index) with candidates of higher indices
    (in ascending index order); returns the top-k of both, sorted the same way.

    Candidates are appended after the running entries, so the concatenation lists equal values in ascending index
    order, and a stable descending sort by value gives (value descending, index ascending).
    """
    v = torch.cat([run_vals, vals], dim=1)  # (R, k_run + k_new)
    i = torch.cat([run_idx, idx], dim=1)
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    return v[:, :k].contiguous(), i.gather(1, order[:, :k])


def _view(buf: torch.Tensor, shape: Tuple[int, int], offset: int = 0) -> torch.Tensor:
    """A contiguous ``shape`` view of the flat buffer ``buf`` from ``offset`` (no allocation)."""
    return buf[offset:offset + shape[0] * shape[1]].view(shape)


def _rows_to_update(best: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """The rows whose best tile score ``best`` (R,) enters their running top-k, of k-th score ``kth`` (R,): those
    ranking above it. The tile's indices are all higher, so an entry equal to the k-th (NaN included) stays out; a
    NaN beats every number, and the maximum of a row holding a NaN is NaN."""
    return ((best > kth) | (best.isnan() & ~kth.isnan())).nonzero().squeeze(1)


def _sweep(queries: torch.Tensor, gallery: torch.Tensor, k: int, block_g: int,
           buf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-k of ``queries`` (R, D), already in the accumulation dtype, over ``gallery`` swept in tiles; each
    (R, block_g) score tile is written into ``buf``."""
    nq, dt = queries.shape[0], queries.dtype
    vals = queries.new_empty((nq, 0))
    idx = queries.new_empty((nq, 0), dtype=torch.int64)
    for g0 in range(0, gallery.shape[0], block_g):
        g_tile = gallery[g0:g0 + block_g]  # (bg, D)
        if g_tile.dtype != dt:
            g_tile = _view(buf, g_tile.shape, offset=nq * block_g).copy_(g_tile)
        scores = torch.mm(queries, g_tile.T, out=_view(buf, (nq, g_tile.shape[0])))  # (R, bg)
        maxima = chunk_max(scores, k)
        rows = None
        if vals.shape[1] == k:
            # once the running k-th scores are high, most rows have nothing in a tile that enters their top-k
            rows = _rows_to_update((scores if maxima is None else maxima).amax(dim=1), vals[:, -1])
            if not rows.numel():
                continue
            rows = None if rows.numel() == nq else rows
        v, i = tile_topk(scores, k, rows, maxima)
        if rows is None:
            vals, idx = merge_topk(vals, idx, v, i + g0, k)
        else:
            v, i = merge_topk(vals.index_select(0, rows), idx.index_select(0, rows), v, i + g0, k)
            vals.index_copy_(0, rows, v)
            idx.index_copy_(0, rows, i)
    return vals, idx


def topk_similarity(queries: torch.Tensor, gallery: torch.Tensor, k: int, block_q: Optional[int] = None,
                    block_g: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values (Q, k) in the accumulation dtype, indices (Q, k) int64) of the k largest ``queries @ gallery.T``."""
    nq, ng = queries.shape[0], gallery.shape[0]
    dt = acc_dtype(queries.dtype)
    block_q = min(nq, block_q or DEFAULT_BLOCK_Q)
    block_g = min(ng, block_g or max(k + 1, DEFAULT_BLOCK_G))
    # one score tile, and a gallery tile in the accumulation dtype when the inputs are 16-bit
    convert = gallery.dtype != dt
    buf = queries.new_empty(block_q * block_g + (block_g * gallery.shape[1] if convert else 0), dtype=dt)
    vals = queries.new_empty((nq, k), dtype=dt)
    idx = queries.new_empty((nq, k), dtype=torch.int64)
    for q0 in range(0, nq, block_q):
        vals[q0:q0 + block_q], idx[q0:q0 + block_q] = _sweep(queries[q0:q0 + block_q].to(dt), gallery, k, block_g, buf)
    return vals, idx
