"""Streaming top-k similarity in PyTorch, any device (the CPU default).

The gallery is swept in tiles of ``block_g`` rows; for each tile and each chunk of ``block_q`` queries the (block_q,
block_g) score tile is formed in fp32 (fp64 for fp64 inputs) into one reused buffer, and merged into a running
(Q, k) top-k: the first tile through its top-k, later ones only where a column block's maximum beats the running
k-th score (see :func:`_merge_entrants`). Memory beyond the inputs: the (Q, k) result, one score tile and one tile
of the gallery in the accumulation dtype; the (Q, G) matrix never exists.

Exact order (values descending, NaN first as in torch.topk, ties by the lower index) at the cost of a top-k, not a
sort, per tile: ``torch.topk`` picks k + 1 candidates, and a row whose k-th and (k + 1)-th scores are equal (a tie
at the cut, where topk's choice is unspecified) is redone with a stable sort of that row. Merging keeps the order:
see :func:`merge_topk`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastclip.ops.contrastive.pytorch import acc_dtype

DEFAULT_TILE_ELEMENTS = 1 << 22  # scores per tile: 16 MB in fp32
DEFAULT_BLOCK_Q = 2048
ENTRANT_BLOCK = 128  # columns per block whose maximum decides whether it is searched for entrants


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # equal in the ranking's sense: equal values, or both NaN
    return (a == b) | (a.isnan() & b.isnan())


def tile_topk(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact top-min(k, n) of each row of ``scores`` (R, n), as (values, indices) in ascending index order."""
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


def topk_similarity(queries: torch.Tensor, gallery: torch.Tensor, k: int, block_q: Optional[int] = None,
                    block_g: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values (Q, k) in the accumulation dtype, indices (Q, k) int64) of the k largest ``queries @ gallery.T``.

    The first gallery tile fills each query's running top-k; every later tile goes through
    :func:`_merge_entrants`, which searches only the column blocks whose maximum beats a row's running k-th score.
    """
    nq, ng = queries.shape[0], gallery.shape[0]
    dt = acc_dtype(queries.dtype)
    block_q = min(nq, block_q or DEFAULT_BLOCK_Q)
    block_g = block_g or max(k + 1, DEFAULT_TILE_ELEMENTS // block_q)
    vals = queries.new_empty((nq, k), dtype=dt)
    idx = queries.new_empty((nq, k), dtype=torch.int64)
    # one score buffer for every tile: the GEMM writes into it (no fresh 16 MB allocation, and page faults, per tile)
    buf = queries.new_empty((block_q * min(block_g, ng),), dtype=dt)
    for g0 in range(0, ng, block_g):
        g_tile = gallery[g0:g0 + block_g].to(dt).T  # (D, bg)
        for q0 in range(0, nq, block_q):
            q_chunk = queries[q0:q0 + block_q].to(dt)  # (bq, D)
            scores = buf[:q_chunk.shape[0] * g_tile.shape[1]].view(q_chunk.shape[0], g_tile.shape[1])
            torch.mm(q_chunk, g_tile, out=scores)  # (bq, bg)
            run_v, run_i = vals[q0:q0 + block_q], idx[q0:q0 + block_q]  # views: updated in place
            if g0 == 0:  # the first tile holds at least k columns (block_g > k, G >= k): it fills the running top-k
                v, i = tile_topk(scores, k)
                run_v[:], run_i[:] = merge_topk(run_v[:, :0], run_i[:, :0], v, i, k)
                continue
            _merge_entrants(run_v, run_i, scores, g0, k)
    return vals, idx


def _merge_entrants(run_v: torch.Tensor, run_i: torch.Tensor, scores: torch.Tensor, g0: int, k: int) -> None:
    """Merge into a full running top-k (R, k), in place, the scores of a later tile (R, n) (gallery rows g0...)
    that can enter it: those above the row's running k-th score, or NaN (which ranks above every number). An equal
    score cannot enter: the running entry has the lower index.

    The maxima of blocks of ``ENTRANT_BLOCK`` columns (one cheap reduction) find the blocks holding an entrant;
    only those are compared, and their entrants are gathered into a (rows, most entrants) block padded with -inf
    at an index past every real one (a pad ranks below all, and never enters: the running top-k is full) and
    merged. A tile with many entrants per row (early in a search) takes the tile's top-k instead.
    """
    n_rows, n = scores.shape
    width = ENTRANT_BLOCK if n % ENTRANT_BLOCK == 0 else n
    blocks = scores.view(n_rows, n // width, width)
    thr = run_v[:, k - 1]
    block_max = blocks.amax(dim=2)  # (R, n / width); NaN if the block holds one
    nan_blocks = block_max.isnan()
    r_b, b_b = ((block_max > thr[:, None]) | nan_blocks).nonzero(as_tuple=True)  # row-major
    if r_b.numel() == 0:
        return
    sub = blocks[r_b, b_b]  # (blocks, width)
    hit = sub > thr[r_b, None]
    if nan_blocks.any():
        hit |= sub.isnan()
    a_of, c_of = hit.nonzero(as_tuple=True)  # ascending (row, column) order
    rows, row_of = r_b[a_of].unique_consecutive(return_inverse=True)
    col_of = b_b[a_of] * width + c_of
    count = torch.bincount(row_of, minlength=rows.numel())  # (r,) >= 1
    most = int(count.max())
    if most > max(2 * k, n // 16):
        v, i = tile_topk(scores[rows], k)
    else:
        slot = torch.arange(row_of.numel(), device=sub.device) - (count.cumsum(0) - count)[row_of]
        v = sub.new_full((rows.numel(), most), float("-inf"))
        i = torch.full((rows.numel(), most), torch.iinfo(torch.int64).max - g0, dtype=torch.int64,
                       device=sub.device)
        v[row_of, slot] = sub[a_of, c_of]
        i[row_of, slot] = col_of
    run_v[rows], run_i[rows] = merge_topk(run_v[rows], run_i[rows], v, i + g0, k)
