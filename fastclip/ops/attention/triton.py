"""Fused flash attention in Triton, forward and backward, sized for CLIP's short sequences (50 to ~1000 tokens).

Notation, per (batch b, head h): Q is (S_q, D), K and V are (S_k, D), c = softmax_scale.

    S = c Q K^T                              (S_q, S_k), only ever a (BLOCK_M, BLOCK_N) tile in registers
    valid_ij = [key j not padded] and (not causal or j <= i)       (causal is top-left aligned, as SDPA's)
    P_ij = exp(S_ij - lse_i) on valid entries, 0 elsewhere;  lse_i = log sum_{valid j} exp(S_ij)
    O = P V                                  rows with no valid key: O_i = 0, lse_i = -inf

Backward (dO given):  dV = P^T dO,  dP = dO V^T,  delta_i = sum_d dO_id O_id,  dS = P * (dP - delta),
dQ = c dS K,  dK = c dS^T Q.  Rows with no valid key have P = 0, so their dQ is 0 and they add nothing to dK, dV.

Kernels
- ``_attn_fwd_kernel``: grid (B * H, cdiv(S_q, BLOCK_M)): B * H on axis 0, which takes up to 2^31 - 1 programs
  (axes 1 and 2 stop at 65,535, which large-batch evaluation exceeds). One program keeps a block of queries in
  registers and walks the key blocks (only those at or before the diagonal when causal) with the online softmax
  (m_i, l_i, acc). Writes O (B, S_q, H, D) and lse (B, H, S_q) fp32. Inputs may have any strides (views of a packed
  QKV projection; k and v need not share a layout).
- ``_attn_bwd_kernel``: grid (B * H,). One program owns a whole (batch, head): a prologue computes delta in fp32 for
  every query, then the outer loop walks key blocks holding dK_j, dV_j in registers while the inner loop walks query
  blocks, recomputing P from lse. Tiles are key-major, (BLOCK_N, BLOCK_M): P^T and dS^T are formed where the dV and
  dK products take them as their register operand, and with BLOCK_M = BLOCK_N = 64 every product lowers to
  warp-group MMA on sm_90. dQ goes to an fp32 (B, S_q, H, D) buffer, zeroed, by fire-and-forget atomic adds (no load
  in the loop). The backward stays deterministic: only this program touches those rows, and an element is always
  added by the same thread in program order (the tile layout is fixed, query blocks start at multiples of BLOCK_M),
  so the order of every sum is fixed. 5 GEMMs per tile (the minimum; FA2's split dK/dV + dQ passes need 7). At
  CLIP's training batch sizes B * H is in the thousands, plenty of programs for every SM; for long sequences with
  small B * H (not CLIP's case) the FA2 layout (a program per key block, a separate dQ pass) would parallelize
  better.

Head dims are padded to 16, 32, 48, 64, 80, 96 or 128 and covered by one or two power-of-two column pieces
(``_head_pieces``: 72 and 80 -> 64 + 16, 88 and 96 -> 64 + 32, 128 -> 64 + 64), so a product over the head dim is
one or two chained dots, and D = 80 costs 80 columns, not 128 (the 16-bit backward on sm_90 runs 88 and 96 as
64 + 64: see ``GPU_TILES``). The head dim is a constexpr (one compile per head dim; the column masks are known to
the compiler).

Memory beyond inputs and outputs: lse (B, H, S_q) fp32 saved for the backward; the backward adds delta (B, H, S_q)
fp32 and, for 16-bit inputs, the (B, S_q, H, D) fp32 dQ accumulator. Accumulation is fp32 whatever the input
dtype; exponentials are exp2 with log2(e) folded into the softmax scale. delta is formed from O as stored (in the
input dtype), as flash-attn (2 and 3) forms it; not as sum_j P_ij dP_ij (two more products per tile, 7 instead of 5)
nor from an fp32 O (an O-sized fp32 tensor kept for the backward). Where attention is nearly one-hot, dS = P (dP -
delta) cancels and dQ, dK inherit O's rounding; measured in fp16 (one key per query at score 8, 12, 16 above the
rest, 1 - p from 1e-2 to 5e-6), their max error is 1.1-1.8x that of the same maths in fp16 PyTorch, which loses as
much to rounding P. Further out (1 - p ~ 1e-9) O rounds to the dominant v_j exactly and only the fp32 summation
order of delta against dP remains, about D 2^-24 |dO| |v| c |k| (1e-6 at unit-size entries, D = 64; PyTorch's
error there is smaller, ~2e-8). tests/test_regimes_attention.py holds these bounds.

Base offsets of a (batch, head) are int64; offsets within one are int32 (the launchers check they fit), which keeps
the 2-D pointer tiles from costing twice the registers. ``ALIGN`` tells the compiler that every base and
batch/seq/head stride is a multiple of 16 bytes when the launcher has checked it (the JIT alone only recognizes
multiples of 16 elements): with head dims 72 or 88 the loads are then vectorized and pipelined.

Block sizes: ``GPU_TILES``, one table for both kernels, by kernel, input precision and padded head dim; every row
compiles for sm_90 without register spills (benchmarks/NOTES.md lists the compiled facts), none is timed on a GPU
yet: they are the first thing to tune there (``fastclip bench attention``). Under the interpreter, small blocks
exercise several blocks and every masked edge.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastclip.dispatch import triton_interpret
from fastclip.ops.contrastive.triton import LN2, LOG2E, _input_precision
from fastclip.ops.tuned import by_arch

# compiled kernels may only read globals that are constexpr (the interpreter does not enforce it)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@triton.jit
def _valid_keys(MASK, off_b, offs_n, S_K, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) bool: key in range and, with a key padding mask, not padding."""
    valid = offs_n < S_K
    if HAS_MASK:
        pad = tl.load(MASK + off_b * stride_mb + offs_n * stride_mn, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit
def _load_rows(PTR, offs_r, mask_r, stride_r, stride_d, D, D_OFF: tl.constexpr, WIDTH: tl.constexpr):
    """(rows, WIDTH) tile of columns [D_OFF, D_OFF + WIDTH); zeros past D and outside mask_r."""
    offs_d = D_OFF + tl.arange(0, WIDTH)
    return tl.load(PTR + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
                   mask=mask_r[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _store_rows(PTR, x, offs_r, mask_r, stride_r, D, D_OFF: tl.constexpr, WIDTH: tl.constexpr):
    """Stores a (rows, WIDTH) tile at columns [D_OFF, D_OFF + WIDTH) of a unit-stride last dim, in PTR's dtype."""
    offs_d = D_OFF + tl.arange(0, WIDTH)
    tl.store(PTR + offs_r[:, None] * stride_r + offs_d[None, :], x.to(PTR.dtype.element_ty),
             mask=mask_r[:, None] & (offs_d < D)[None, :])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK,                          # (B, S_q, H, D), (B, S_k, H, D) x2, any strides; (B, S_k) uint8
    O, LSE,                                 # (B, S_q, H, D) out in Q's dtype, last stride 1; (B, H, S_q) fp32 out
    S_Q, S_K, H, D: tl.constexpr, qk_scale,  # D: the head dim (constexpr: masks known to the compiler)
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh,
    stride_mb, stride_mn,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """O and lse for queries [pid_m * BLOCK_M, ...) of one (batch, head).

    The head dim is covered by two power-of-two column pieces, [0, BLOCK_D0) and [BLOCK_D0, BLOCK_D0 + BLOCK_D1)
    (BLOCK_D1 = 0: one piece), so that D = 80 costs 64 + 16 columns, not 128.
    """
    off_bh = tl.program_id(0)  # B * H on axis 0: axes 1 and 2 are limited to 65,535 programs
    start_m = tl.program_id(1) * BLOCK_M
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += tl.multiple_of(off_b * stride_qb + off_h * stride_qh, ALIGN)
    K += tl.multiple_of(off_b * stride_kb + off_h * stride_kh, ALIGN)
    V += tl.multiple_of(off_b * stride_vb + off_h * stride_vh, ALIGN)
    O += tl.multiple_of(off_b * stride_ob + off_h * stride_oh, ALIGN)
    stride_qs = tl.multiple_of(stride_qs, ALIGN)
    stride_ks = tl.multiple_of(stride_ks, ALIGN)
    stride_vs = tl.multiple_of(stride_vs, ALIGN)
    stride_os = tl.multiple_of(stride_os, ALIGN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < S_Q
    q0 = _load_rows(Q, offs_m, mask_m, stride_qs, stride_qd, D, 0, BLOCK_D0)  # (BLOCK_M, BLOCK_D0)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    if BLOCK_D1 > 0:
        q1 = _load_rows(Q, offs_m, mask_m, stride_qs, stride_qd, D, BLOCK_D0, BLOCK_D1)
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # causal (top-left): query i sees keys j <= i, so this block needs no key past its last query
    hi = S_K
    if CAUSAL:
        hi = tl.minimum(S_K, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < S_K
        valid_n = _valid_keys(MASK, off_b, offs_n, S_K, stride_mb, stride_mn, HAS_MASK)
        k0 = _load_rows(K, offs_n, in_n, stride_ks, stride_kd, D, 0, BLOCK_D0)  # (BLOCK_N, BLOCK_D0)
        s = tl.dot(q0, tl.trans(k0), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_D1 > 0:
            k1 = _load_rows(K, offs_n, in_n, stride_ks, stride_kd, D, BLOCK_D0, BLOCK_D1)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=INPUT_PRECISION)
        s = s * qk_scale  # base-2 logits
        valid = valid_n[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))

        # -- update m_i and l_i (rows that have seen no valid key yet keep m_i = -inf: use 0 as their shift)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        # -- update acc
        v0 = _load_rows(V, offs_n, in_n, stride_vs, stride_vd, D, 0, BLOCK_D0)  # (BLOCK_N, BLOCK_D0)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            v1 = _load_rows(V, offs_n, in_n, stride_vs, stride_vd, D, BLOCK_D0, BLOCK_D1)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    # -- epilogue: a query that saw no key has l_i = 0 and acc = 0: output 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(O, acc0 / l_safe[:, None], offs_m, mask_m, stride_os, D, 0, BLOCK_D0)
    if BLOCK_D1 > 0:
        _store_rows(O, acc1 / l_safe[:, None], offs_m, mask_m, stride_os, D, BLOCK_D0, BLOCK_D1)
    lse = (m_i + tl.log2(l_safe)) * LN2_C  # m_i = -inf where l_i = 0: lse = -inf
    tl.store(LSE + off_bh.to(tl.int64) * S_Q + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, MASK, O, DO, LSE,              # as the forward's, plus O and dO (B, S_q, H, D) any strides
    DQ_ACC, DQ, DK, DV, DELTA,              # dQ accumulator (B, S_q, H, D) fp32, zeroed; dQ/dK/dV outs; delta
    S_Q, S_K, H, D: tl.constexpr, sm_scale, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_mb, stride_mn,
    stride_ab, stride_as, stride_ah,        # DQ_ACC (last stride 1)
    stride_dqb, stride_dqs, stride_dqh,     # DQ, DK, DV (last stride 1)
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DQ_IS_ACC: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dQ, dK, dV of one whole (batch, head): one program; head dim in two pieces as in the forward."""
    off_bh = tl.program_id(0)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += tl.multiple_of(off_b * stride_qb + off_h * stride_qh, ALIGN)
    K += tl.multiple_of(off_b * stride_kb + off_h * stride_kh, ALIGN)
    V += tl.multiple_of(off_b * stride_vb + off_h * stride_vh, ALIGN)
    O += tl.multiple_of(off_b * stride_ob + off_h * stride_oh, ALIGN)
    DO += tl.multiple_of(off_b * stride_dob + off_h * stride_doh, ALIGN)
    DQ_ACC += tl.multiple_of(off_b * stride_ab + off_h * stride_ah, ALIGN)
    DQ += tl.multiple_of(off_b * stride_dqb + off_h * stride_dqh, ALIGN)
    DK += tl.multiple_of(off_b * stride_dkb + off_h * stride_dkh, ALIGN)
    DV += tl.multiple_of(off_b * stride_dvb + off_h * stride_dvh, ALIGN)
    stride_qs = tl.multiple_of(stride_qs, ALIGN)
    stride_ks = tl.multiple_of(stride_ks, ALIGN)
    stride_vs = tl.multiple_of(stride_vs, ALIGN)
    stride_os = tl.multiple_of(stride_os, ALIGN)
    stride_dos = tl.multiple_of(stride_dos, ALIGN)
    stride_as = tl.multiple_of(stride_as, ALIGN)
    stride_dqs = tl.multiple_of(stride_dqs, ALIGN)
    stride_dks = tl.multiple_of(stride_dks, ALIGN)
    stride_dvs = tl.multiple_of(stride_dvs, ALIGN)
    LSE += off_bh.to(tl.int64) * S_Q
    DELTA += off_bh.to(tl.int64) * S_Q

    # -- prologue: delta_i = <dO_i, O_i> in fp32, for every query of this (batch, head)
    for start_m in range(0, S_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < S_Q
        o = _load_rows(O, offs_m, mask_m, stride_os, stride_od, D, 0, BLOCK_D0).to(tl.float32)
        do = _load_rows(DO, offs_m, mask_m, stride_dos, stride_dod, D, 0, BLOCK_D0).to(tl.float32)
        delta = tl.sum(o * do, axis=1)
        if BLOCK_D1 > 0:
            o = _load_rows(O, offs_m, mask_m, stride_os, stride_od, D, BLOCK_D0, BLOCK_D1).to(tl.float32)
            do = _load_rows(DO, offs_m, mask_m, stride_dos, stride_dod, D, BLOCK_D0, BLOCK_D1).to(tl.float32)
            delta += tl.sum(o * do, axis=1)
        tl.store(DELTA + offs_m, delta, mask=mask_m)
    tl.debug_barrier()  # delta is written and read by different threads of this program

    for start_n in range(0, S_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S_K
        valid_n = _valid_keys(MASK, off_b, offs_n, S_K, stride_mb, stride_mn, HAS_MASK)
        k0 = _load_rows(K, offs_n, mask_n, stride_ks, stride_kd, D, 0, BLOCK_D0)  # (BLOCK_N, BLOCK_D0)
        v0 = _load_rows(V, offs_n, mask_n, stride_vs, stride_vd, D, 0, BLOCK_D0)
        dk0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
        dv0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
        if BLOCK_D1 > 0:
            k1 = _load_rows(K, offs_n, mask_n, stride_ks, stride_kd, D, BLOCK_D0, BLOCK_D1)
            v1 = _load_rows(V, offs_n, mask_n, stride_vs, stride_vd, D, BLOCK_D0, BLOCK_D1)
            dk1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
            dv1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
        # causal: queries before this key block see none of it
        lo = 0
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M
        for start_m in range(lo, S_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < S_Q
            q0 = _load_rows(Q, offs_m, mask_m, stride_qs, stride_qd, D, 0, BLOCK_D0)  # (BLOCK_M, BLOCK_D0)
            do0 = _load_rows(DO, offs_m, mask_m, stride_dos, stride_dod, D, 0, BLOCK_D0)
            if BLOCK_D1 > 0:
                q1 = _load_rows(Q, offs_m, mask_m, stride_qs, stride_qd, D, BLOCK_D0, BLOCK_D1)
                do1 = _load_rows(DO, offs_m, mask_m, stride_dos, stride_dod, D, BLOCK_D0, BLOCK_D1)
            lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * LOG2E_C
            delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)

            # -- recompute P^T (the where comes after exp2: an empty row has lse = -inf and would give NaN).
            # Tiles are key-major, (BLOCK_N, BLOCK_M): P^T and dS^T are then the register operand (A) of the dV
            # and dK products, and every product has BLOCK_N or BLOCK_M rows (64 for warp-group MMA on sm_90).
            s_t = tl.dot(k0, tl.trans(q0), input_precision=INPUT_PRECISION)
            if BLOCK_D1 > 0:
                s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=INPUT_PRECISION)
            valid = valid_n[:, None] & mask_m[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            p_t = tl.where(valid, tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)

            # -- dV += P^T dO;  dS^T = P^T (dP^T - delta);  dK += c dS^T Q;  dQ += c dS K
            p_lo = p_t.to(do0.dtype)
            dv0 = tl.dot(p_lo, do0, dv0, input_precision=INPUT_PRECISION)
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=INPUT_PRECISION)
            if BLOCK_D1 > 0:
                dv1 = tl.dot(p_lo, do1, dv1, input_precision=INPUT_PRECISION)
                dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=INPUT_PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :]) * sm_scale).to(q0.dtype)
            # fire-and-forget adds into dQ (no load in the loop). Deterministic: only this program touches these
            # rows, and an element is always added by the same thread (the tile layout is fixed and start_m is a
            # multiple of BLOCK_M), in program order, so the order of the sum is fixed.
            dq_ptrs = DQ_ACC + offs_m[:, None] * stride_as
            offs_d0 = tl.arange(0, BLOCK_D0)
            dk0 = tl.dot(ds_t, q0, dk0, input_precision=INPUT_PRECISION)
            dq0 = tl.dot(tl.trans(ds_t), k0, input_precision=INPUT_PRECISION)
            tl.atomic_add(dq_ptrs + offs_d0[None, :], dq0, mask=mask_m[:, None] & (offs_d0 < D)[None, :],
                          sem="relaxed")
            if BLOCK_D1 > 0:
                offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
                dk1 = tl.dot(ds_t, q1, dk1, input_precision=INPUT_PRECISION)
                dq1 = tl.dot(tl.trans(ds_t), k1, input_precision=INPUT_PRECISION)
                tl.atomic_add(dq_ptrs + offs_d1[None, :], dq1, mask=mask_m[:, None] & (offs_d1 < D)[None, :],
                              sem="relaxed")
        _store_rows(DK, dk0, offs_n, mask_n, stride_dks, D, 0, BLOCK_D0)
        _store_rows(DV, dv0, offs_n, mask_n, stride_dvs, D, 0, BLOCK_D0)
        if BLOCK_D1 > 0:
            _store_rows(DK, dk1, offs_n, mask_n, stride_dks, D, BLOCK_D0, BLOCK_D1)
            _store_rows(DV, dv1, offs_n, mask_n, stride_dvs, D, BLOCK_D0, BLOCK_D1)

    if not DQ_IS_ACC:
        # -- epilogue: the fp32 accumulator to dQ's dtype. The rows were added by other threads of this program, at
        # L2 (atomics): read them past L1 (.cg), which may hold a line another program loaded before.
        tl.debug_barrier()
        for start_m in range(0, S_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < S_Q
            offs_d0 = tl.arange(0, BLOCK_D0)
            dq = tl.load(DQ_ACC + offs_m[:, None] * stride_as + offs_d0[None, :],
                         mask=mask_m[:, None] & (offs_d0 < D)[None, :], other=0.0, cache_modifier=".cg")
            _store_rows(DQ, dq, offs_m, mask_m, stride_dqs, D, 0, BLOCK_D0)
            if BLOCK_D1 > 0:
                offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
                dq = tl.load(DQ_ACC + offs_m[:, None] * stride_as + offs_d1[None, :],
                             mask=mask_m[:, None] & (offs_d1 < D)[None, :], other=0.0, cache_modifier=".cg")
                _store_rows(DQ, dq, offs_m, mask_m, stride_dqs, D, BLOCK_D0, BLOCK_D1)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, grid, block sizes.


def _head_pieces(d: int) -> Tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the head dim padded to 16, 32, 48, 64, 80, 96 or 128, as one power of two or the sum of
    two (64 + 16 = 80, 64 + 32 = 96): tl.arange spans powers of two only. 128 is 64 + 64: so split, the backward
    with 64-row tiles fits the registers on sm_90 (as one 128-wide piece it spills)."""
    for pieces in ((16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (64, 32), (64, 64)):
        if d <= sum(pieces):
            return pieces
    raise ValueError(f"the triton attention kernels take head_dim <= 128, got {d}")


# GPU tiles, one table for both kernels (a static check compiles every row): (kernel, inputs, padded head dim) ->
# (BLOCK_M, BLOCK_N, num_warps, num_stages). "16-bit" is fp16/bf16 (tensor cores; on sm_90 a product lowers to
# warp-group MMA when its tile has 64+ rows); "fp32" runs IEEE fp32 on FMA units unless TF32 is allowed, so its
# tiles are small to stay out of local memory, with 2 stages (cp.async). Each row compiles for sm_90 and sm_80
# without spills (benchmarks/NOTES.md); an entry {90: tiles, 80: tiles} differs by architecture (``by_arch``), where
# sm_80's tiles of sm_90's size spill (8-440 B). An entry that is a head dim instead of tiles pads to it: that row's
# tiles and column pieces.
GPU_TILES = {
    ("fwd", "16-bit", 16): (64, 64, 4, 3),
    ("fwd", "16-bit", 32): (64, 64, 4, 3),
    ("fwd", "16-bit", 48): {90: (64, 64, 4, 3), 80: (64, 32, 4, 3)},
    ("fwd", "16-bit", 64): (64, 64, 4, 3),
    ("fwd", "16-bit", 80): (64, 64, 4, 3),
    ("fwd", "16-bit", 96): {90: (64, 64, 4, 3), 80: (64, 32, 4, 3)},
    ("fwd", "16-bit", 128): {90: (64, 64, 4, 2), 80: (64, 32, 4, 2)},
    ("fwd", "fp32", 16): (64, 32, 8, 2),
    ("fwd", "fp32", 32): (64, 32, 8, 2),
    ("fwd", "fp32", 48): (64, 32, 8, 2),
    ("fwd", "fp32", 64): (64, 32, 8, 2),
    ("fwd", "fp32", 80): (32, 32, 8, 2),
    ("fwd", "fp32", 96): (32, 32, 8, 2),
    ("fwd", "fp32", 128): (32, 32, 8, 2),
    ("bwd", "16-bit", 16): (64, 64, 8, 2),
    ("bwd", "16-bit", 32): (64, 64, 8, 2),
    ("bwd", "16-bit", 48): (64, 64, 8, 2),
    ("bwd", "16-bit", 64): {90: (64, 64, 8, 2), 80: (64, 32, 8, 2)},
    ("bwd", "16-bit", 80): {90: (64, 64, 8, 2), 80: (32, 32, 8, 2)},
    # 96 columns (64 + 32) run as 128 (64 + 64; columns 96-127 masked) on sm_90: the only 64-row tile found where
    # all five products are warp-group MMA, pipelined, without spills (255 registers, 0 bytes). With 96 columns,
    # 64 x 64 spills (255 registers + 16 B at 8 warps and 2 stages, 224 B at 16 warps) or loads unpipelined (1
    # stage); 64 x 32 spills (72-248 B) and keeps its BLOCK_N-row products on mma.sync. The padding costs a third
    # more MMA work in the head dim; 32 x 64 tiles (4 of 5 products on wgmma) did without it: a GPU must time them
    ("bwd", "16-bit", 96): {90: 128, 80: (16, 64, 8, 2)},
    ("bwd", "16-bit", 128): {90: (64, 64, 8, 2), 80: (64, 32, 8, 2)},
    ("bwd", "fp32", 16): (16, 32, 8, 2),
    ("bwd", "fp32", 32): {90: (16, 32, 8, 2), 80: (16, 32, 4, 2)},
    ("bwd", "fp32", 48): {90: (16, 16, 8, 2), 80: (16, 32, 4, 2)},
    ("bwd", "fp32", 64): (16, 32, 4, 2),
    ("bwd", "fp32", 80): (16, 32, 8, 2),
    ("bwd", "fp32", 96): (16, 32, 8, 2),
    ("bwd", "fp32", 128): (16, 16, 8, 2),
}
# Under the interpreter: small, unequal tiles, so that test sizes cover several blocks per sequence, masked edges
# and causal blocks straddling the diagonal.
INTERPRETER_TILES = (16, 32, 4, 1)


def _tiles(kernel: str, d: int, dtype: torch.dtype) -> dict:
    block_d0, block_d1 = _head_pieces(d)
    if triton_interpret():
        tiles = INTERPRETER_TILES
    else:
        inputs = "fp32" if dtype == torch.float32 else "16-bit"
        tiles = by_arch(GPU_TILES[(kernel, inputs, block_d0 + block_d1)])
        if isinstance(tiles, int):  # padded further, to the head dim of another row
            block_d0, block_d1 = _head_pieces(tiles)
            tiles = by_arch(GPU_TILES[(kernel, inputs, tiles)])
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tiles), BLOCK_D0=block_d0,
                BLOCK_D1=block_d1)


# the launchers' configurations (sequence lengths: not used by the table yet, part of the signature a static check
# enumerates)
def _fwd_config(s_q: int, s_k: int, d: int, dtype: torch.dtype) -> dict:
    return _tiles("fwd", d, dtype)


def _bwd_config(s_q: int, s_k: int, d: int, dtype: torch.dtype) -> dict:
    return _tiles("bwd", d, dtype)


def _fwd_grid(b: int, h: int, s_q: int, block_m: int) -> Tuple[int, int]:
    # B * H on axis 0 (up to 2^31 - 1 programs); axis 1 (at most 65,535) holds the query blocks
    return b * h, triton.cdiv(s_q, block_m)


def _bwd_grid(b: int, h: int) -> Tuple[int]:
    return (b * h,)


def _align(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every tensor's address and batch/seq/head strides are multiples of it, else 1.

    The JIT only knows divisibility by 16 elements: a head dim of 72 or 88 puts heads 144 or 176 bytes apart, which
    it would take for unaligned (no vector loads, so no asynchronous copies and no pipelining).
    """
    n = 16 // tensors[0].element_size()
    ok = all(t.data_ptr() % (n * t.element_size()) == 0 and all(st % n == 0 for st in t.stride()[:3])
             for t in tensors)
    return n if ok else 1


def _check_offsets(*tensors: torch.Tensor) -> None:
    # within one (batch, head) the kernels index rows with int32 (fewer registers than int64 pointers): the largest
    # offset, seq * stride_seq + head_dim * stride_dim, must fit
    for t in tensors:
        if t.shape[1] * abs(t.stride(1)) + t.shape[3] * abs(t.stride(3)) >= 2 ** 31:
            raise ValueError(f"the triton attention kernels index within a head with int32: seq {t.shape[1]} x "
                             f"stride {t.stride(1)} is too large (shape {tuple(t.shape)}, strides {t.stride()})")


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  causal: bool, softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, S_q, H, D) contiguous in q's dtype, lse (B, H, S_q) fp32). Inputs: any strides."""
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    out = torch.empty((b, s_q, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    _check_offsets(q, k, v)
    cfg = _fwd_config(s_q, s_k, d, q.dtype)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else lse  # dummy when unused
    mask_strides = (mask.stride(0), mask.stride(1)) if key_padding_mask is not None else (0, 0)
    _attn_fwd_kernel[_fwd_grid(b, h, s_q, cfg["BLOCK_M"])](
        q, k, v, mask, out, lse,
        s_q, s_k, h, d, softmax_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *mask_strides,
        CAUSAL=causal, HAS_MASK=key_padding_mask is not None, ALIGN=_align(q, k, v, out),
        INPUT_PRECISION=_input_precision(q.dtype), **cfg)
    return out, lse


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, softmax_scale: float
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), each contiguous (B, S, H, D) in the inputs' dtype."""
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    dq_is_acc = q.dtype == torch.float32  # the kernel adds dQ up in place: zeros
    dq = (torch.zeros if dq_is_acc else torch.empty)((b, s_q, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, s_k, h, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, s_k, h, d), dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    _check_offsets(q, k, v, out, dout)
    cfg = _bwd_config(s_q, s_k, d, q.dtype)
    dq_acc = dq if dq_is_acc else torch.zeros((b, s_q, h, d), dtype=torch.float32, device=q.device)
    delta = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else delta  # dummy when unused
    mask_strides = (mask.stride(0), mask.stride(1)) if key_padding_mask is not None else (0, 0)
    _attn_bwd_kernel[_bwd_grid(b, h)](
        q, k, v, mask, out, dout, lse.contiguous(),
        dq_acc, dq, dk, dv, delta,
        s_q, s_k, h, d, softmax_scale, softmax_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *mask_strides,
        *dq_acc.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        CAUSAL=causal, HAS_MASK=key_padding_mask is not None, DQ_IS_ACC=dq_is_acc,
        ALIGN=_align(q, k, v, out, dout, dq_acc, dq, dk, dv),
        INPUT_PRECISION=_input_precision(q.dtype), **cfg)
    return dq, dk, dv
