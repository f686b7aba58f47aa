"""Fused top-k similarity in Triton: one program per block of queries sweeps the whole gallery.

Each program keeps its rows' running top-k in registers (so k <= MAX_K = 128; the dispatcher sends larger k to the
torch backend), as (BLOCK_M, BLOCK_TOP) int32 keys and gallery indices,
and for every (BLOCK_M, BLOCK_N) score tile (one GEMM over D in fp32) moves the tile's winners in: while some row's
best tile score beats its current worst, that best (the lowest column among equal bests) replaces the worst
(the highest index among equal worsts). Early tiles move up to k entries per row, later ones almost none once the
running k-th score is high. Memory beyond the inputs: the (Q, k) output; nothing of size Q x G.

Scores are compared as int32 keys whose signed order is torch.topk's order on fp32: -inf < ... < -0 = +0 < ... <
+inf < NaN. Gallery tiles are visited in index order and a tile's entry must beat the running worst strictly, so
among equal scores the lower index wins. The kernel writes each row's k entries unordered; the launcher sorts them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from fastclip.dispatch import triton_interpret
from fastclip.ops.contrastive.triton import _input_precision, _logits_tile, _pow2
from fastclip.ops.topk import TRITON_MAX_K as MAX_K
from fastclip.ops.topk.pytorch import merge_topk
from fastclip.ops.tuned import by_arch

KEY_MIN = tl.constexpr(-2147483648)  # below every score's key: an empty slot, a masked column
KEY_NAN = tl.constexpr(2147483647)  # every NaN, above +inf's key


@triton.jit
def _score_key(s):
    """fp32 -> int32 with the same order (NaN largest, -0 equal to +0)."""
    s = s + 0.0  # -0 -> +0
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return tl.where(s != s, KEY_NAN, key)


@triton.jit
def _key_score(key):
    """The inverse of ``_score_key`` (NaN keys give a NaN)."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _topk_similarity_kernel(
    Q, G, OUT_V, OUT_I,
    NQ, NG, D, K,
    stride_qm, stride_qk, stride_gn, stride_gk, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TOP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < NQ
    slots = tl.arange(0, BLOCK_TOP)
    # slots past K are padding: they hold the largest key and are never the worst
    top_key = tl.where(slots[None, :] < K, KEY_MIN, KEY_NAN) + tl.zeros((BLOCK_M, BLOCK_TOP), dtype=tl.int32)
    top_idx = -1 - slots[None, :] + tl.zeros((BLOCK_M, BLOCK_TOP), dtype=tl.int32)  # distinct placeholders
    for n0 in range(0, NG, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask_n = cols < NG
        s = _logits_tile(Q, G, rows, cols, mask_m, mask_n, D, stride_qm, stride_qk, stride_gn, stride_gk,
                         BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        key = tl.where(mask_m[:, None] & mask_n[None, :], _score_key(s), KEY_MIN)
        best = tl.max(key, axis=1)
        worst = tl.min(top_key, axis=1)
        n_move = tl.sum((best > worst).to(tl.int32), axis=0)
        # -- move the tile's winners in, one per row per step
        while n_move > 0:
            take = best > worst  # (BLOCK_M,)
            col = tl.min(tl.where(key == best[:, None], cols[None, :], NG), axis=1)  # lowest column of the best
            out = tl.max(tl.where(top_key == worst[:, None], top_idx, -2147483647), axis=1)  # highest worst index
            hit = (top_idx == out[:, None]) & take[:, None]
            top_key = tl.where(hit, best[:, None], top_key)
            top_idx = tl.where(hit, col[:, None], top_idx)
            key = tl.where((cols[None, :] == col[:, None]) & take[:, None], KEY_MIN, key)
            best = tl.max(key, axis=1)
            worst = tl.min(top_key, axis=1)
            n_move = tl.sum((best > worst).to(tl.int32), axis=0)
    mask = mask_m[:, None] & (slots[None, :] < K)
    offs = rows[:, None].to(tl.int64) * stride_om + slots[None, :]
    tl.store(OUT_V + offs, _key_score(top_key), mask=mask)
    tl.store(OUT_I + offs, top_idx, mask=mask)


def _config(nq: int, ng: int, k: int, dtype: torch.dtype) -> dict:
    top = _pow2(k, lo=2)
    if triton_interpret():
        # small tiles: several blocks, masked edges and many merge steps at test sizes
        return dict(BLOCK_M=16, BLOCK_N=16 if ng <= 64 else 32, BLOCK_K=16, BLOCK_TOP=top, num_warps=4,
                    num_stages=1)
    # 64-row tiles, so that the tile GEMM is a wgmma on sm_90 (16-bit inputs); the running top-k takes
    # 2 * BLOCK_M * BLOCK_TOP registers per program, so k > 16 gets 8 warps. fp32 (FMA) takes BLOCK_K = 16 (32
    # spills 8-16 B at some k), and 4 warps on sm_80 up to k = 16 (8 spill 8 B at k = 16). Chosen from the sm_90 and
    # sm_80 compiles of tests/triton_static.py (every k up to MAX_K: 0 spills, 3-stage cp.async); untimed.
    if dtype != torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_TOP=top, num_warps=4 if top <= 16 else 8, num_stages=3)
    warps = by_arch({90: 8, 80: 4 if top <= 16 else 8})
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, BLOCK_TOP=top, num_warps=warps, num_stages=3)


def topk_similarity(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values (Q, k) fp32, indices (Q, k) int64), sorted: values descending, NaN first, ties by lower index."""
    nq, d = queries.shape
    ng = gallery.shape[0]
    if k > MAX_K:
        raise ValueError(f"k = {k}: the Triton top-k kernel takes k <= {MAX_K} (its running top-k lives in "
                         "registers); use the torch backend")
    if ng >= 2**31 - 1:
        raise ValueError(f"gallery has {ng} rows; the Triton kernel indexes up to 2**31 - 2 per call (stream it in "
                         "chunks from the host)")
    cfg = _config(nq, ng, k, queries.dtype)
    vals = torch.empty((nq, k), dtype=torch.float32, device=queries.device)
    idx = torch.empty((nq, k), dtype=torch.int32, device=queries.device)
    _topk_similarity_kernel[(triton.cdiv(nq, cfg["BLOCK_M"]),)](
        queries, gallery, vals, idx, nq, ng, d, k,
        queries.stride(0), queries.stride(1), gallery.stride(0), gallery.stride(1), vals.stride(0),
        INPUT_PRECISION=_input_precision(queries.dtype), **cfg)
    # the kernel leaves each row unordered: order it as the other backends do
    idx, order = idx.long().sort(dim=1)
    return merge_topk(vals[:, :0], idx[:, :0], vals.gather(1, order), idx, k)
