"""Streaming top-k similarity in PyTorch, any device (the CPU default).

Each block of ``block_q`` queries sweeps the gallery in tiles of ``block_g`` rows, as FAISS's flat index does
(``exhaustive_inner_product_blas``: a GEMM per (query block, gallery block), then a threshold test per score). The
(block_q, block_g) score tile is formed by one GEMM in fp32 (fp64 for fp64 inputs) into a reused buffer, and merged
into the block's running (block_q, k) top-k. Once a query holds k results, its k-th score t is a threshold: a tile
whose scores are all <= t cannot change it (an equal score comes from a higher index and loses the tie), so only
the rows whose tile maximum beats t are reduced and merged. The test is one row-max per tile; for scores drawn in
random order, a tile at gallery position n holds a new top-k entry for a fraction of about 1 - exp(-k * block_g /
n) of the queries, so after the first few tiles almost every row is skipped. Memory beyond the inputs: the (Q, k)
result, one score tile and one gallery tile in the accumulation dtype; the (Q, G) matrix never exists.

Exact order (values descending, NaN first as in torch.topk, ties by the lower index) at the cost of a top-k, not a
sort, per reduced tile: ``torch.topk`` picks k + 1 candidates, and a row whose k-th and (k + 1)-th scores are equal
(a tie at the cut, where topk's choice is unspecified) is redone with a stable sort of that row. Merging keeps the
order: see :func:`merge_topk`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastclip.ops.contrastive.pytorch import acc_dtype

# FAISS's blocks (distance_compute_blas_query_bs, _database_bs): a (4096, 1024) fp32 tile is 16 MB
DEFAULT_BLOCK_Q = 4096
DEFAULT_BLOCK_G = 1024
# fewer queries get wider tiles (up to this many scores), so a small query batch is not a loop of tiny GEMMs
DEFAULT_TILE_ELEMENTS = 1 << 22


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


def may_change(scores: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``scores`` (R, n), of higher gallery indices than a running top-k whose k-th values
    are ``kth`` (R,), that can enter it: a row maximum above the k-th value, or NaN (ranked above every number)
    where the k-th value is not NaN. Equal scores lose the tie to the running entries' lower indices."""
    top = scores.amax(dim=1)  # (R,), NaN where the row holds a NaN
    return ((top > kth) | (top.isnan() & ~kth.isnan())).nonzero().squeeze(1)


def _sweep(queries: torch.Tensor, gallery: torch.Tensor, k: int, block_g: int,
           buf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sorted top-k of ``queries`` (R, D), already in the accumulation dtype, over the gallery's tiles; ``buf``
    holds at least R * block_g scores."""
    nq = queries.shape[0]
    vals = queries.new_empty((nq, 0))
    idx = queries.new_empty((nq, 0), dtype=torch.int64)
    for g0 in range(0, gallery.shape[0], block_g):
        tile = gallery[g0:g0 + block_g].to(queries.dtype)  # (bg, D)
        scores = torch.mm(queries, tile.T, out=buf[:nq * tile.shape[0]].view(nq, tile.shape[0]))  # (R, bg)
        if vals.shape[1] < k:  # no threshold yet: every row takes the tile
            v, i = tile_topk(scores, k)
            vals, idx = merge_topk(vals, idx, v, i + g0, k)
            continue
        rows = may_change(scores, vals[:, k - 1])
        if rows.numel() == 0:
            continue
        v, i = tile_topk(scores if rows.numel() == nq else scores.index_select(0, rows), k)
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
    block_g = min(ng, block_g or max(k + 1, DEFAULT_BLOCK_G, DEFAULT_TILE_ELEMENTS // block_q))
    buf = queries.new_empty(block_q * block_g, dtype=dt)  # the score tile, reused by every GEMM
    out = [_sweep(queries[q0:q0 + block_q].to(dt), gallery, k, block_g, buf) for q0 in range(0, nq, block_q)]
    return torch.cat([v for v, _ in out]), torch.cat([i for _, i in out])
