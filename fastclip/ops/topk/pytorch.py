"""Streaming top-k similarity in PyTorch, any device (the CPU default).

The gallery is swept in tiles of ``block_g`` rows; for each tile and each chunk of ``block_q`` queries the (block_q,
block_g) score tile is formed in fp32 (fp64 for fp64 inputs), reduced to its k best, and merged into a running
(Q, k) top-k. Memory beyond the inputs: the (Q, k) result, one score tile and one tile of the gallery in the
accumulation dtype; the (Q, G) matrix never exists.

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
DEFAULT_BLOCK_Q = 1024


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
    """(values (Q, k) in the accumulation dtype, indices (Q, k) int64) of the k largest ``queries @ gallery.T``."""
    nq, ng = queries.shape[0], gallery.shape[0]
    dt = acc_dtype(queries.dtype)
    block_q = min(nq, block_q or DEFAULT_BLOCK_Q)
    block_g = block_g or max(k + 1, DEFAULT_TILE_ELEMENTS // block_q)
    vals = queries.new_empty((nq, 0), dtype=dt)
    idx = queries.new_empty((nq, 0), dtype=torch.int64)
    for g0 in range(0, ng, block_g):
        g_tile = gallery[g0:g0 + block_g].to(dt)  # (bg, D)
        new_vals, new_idx = [], []
        for q0 in range(0, nq, block_q):
            scores = queries[q0:q0 + block_q].to(dt) @ g_tile.T  # (bq, bg)
            v, i = tile_topk(scores, k)
            v, i = merge_topk(vals[q0:q0 + block_q], idx[q0:q0 + block_q], v, i + g0, k)
            new_vals.append(v)
            new_idx.append(i)
        vals, idx = torch.cat(new_vals), torch.cat(new_idx)
    return vals, idx
