"""Fused flash attention in Triton, forward and backward, sized for CLIP's short sequences (50 to ~1000 tokens).

Notation, per (batch b, head h): Q is (S_q, D), K and V are (S_k, D), c = softmax_scale.

    S = c Q K^T                              (S_q, S_k), only ever a (BLOCK_M, BLOCK_N) tile in registers
    valid_ij = [key j not padded] and (not causal or j <= i)       (causal is top-left aligned, as SDPA's)
    P_ij = exp(S_ij - lse_i) on valid entries, 0 elsewhere;  lse_i = log sum_{valid j} exp(S_ij)
    O = P V                                  rows with no valid key: O_i = 0, lse_i = -inf

Backward (dO given):  dV = P^T dO,  dP = dO V^T,  delta_i = sum_d dO_id O_id,  dS = P * (dP - delta),
dQ = c dS K,  dK = c dS^T Q.  Rows with no valid key have P = 0, so their dQ is 0 and they add nothing to dK, dV.

Kernels
- ``_attn_fwd_kernel``: grid (cdiv(S_q, BLOCK_M), B * H). One program keeps a block of queries in registers and
  walks the key blocks (only those at or before the diagonal when causal) with the online softmax (m_i, l_i, acc).
  Writes O (B, S_q, H, D) and lse (B, H, S_q) fp32. Inputs may have any strides (views of a packed QKV projection).
- ``_attn_bwd_kernel``: grid (B * H,). One program owns a whole (batch, head): a prologue computes delta for every
  query, then the outer loop walks key blocks holding dK_j, dV_j in registers while the inner loop walks query
  blocks, recomputing P from lse. dQ is accumulated in an fp32 (B, S_q, H, D) buffer that only this program touches,
  so there are no atomics and the result is deterministic. 5 GEMMs per tile (the minimum; FA2's split dK/dV + dQ
  passes need 7). At CLIP's training batch sizes B * H is in the thousands, plenty of programs for every SM.
  For long sequences with small B * H (not CLIP's case) the FA2 layout (a program per key block, a separate dQ
  pass) would parallelize better; see ``_bwd_config``.

Memory beyond inputs and outputs: lse (B, H, S_q) fp32 saved for the backward; the backward adds delta (B, H, S_q)
fp32 and, for 16-bit inputs, the (B, S_q, H, D) fp32 dQ accumulator. Accumulation is fp32 whatever the input
dtype; exponentials are exp2 with log2(e) folded into the softmax scale.

Base offsets of a (batch, head) are int64; offsets within one are int32 (the launchers check they fit), which keeps
the 2-D pointer tiles from costing twice the registers.

Block sizes are heuristics (``_fwd_config``, ``_bwd_config``) for head dims up to 128 (padded to a power of two
and masked), checked to compile for sm_90 without register spills (ptxas -v) but not yet timed on a GPU: they are
the first thing to tune there (``fastclip bench attention``). Under the interpreter, small blocks exercise
several blocks and every masked edge.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastclip.dispatch import triton_interpret
from fastclip.ops.contrastive.triton import LN2, LOG2E, _input_precision, _pow2

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
def _attn_fwd_kernel(
    Q, K, V, MASK,                          # (B, S_q, H, D), (B, S_k, H, D) x2, any strides; (B, S_k) uint8
    O, LSE,                                 # (B, S_q, H, D) out in Q's dtype; (B, H, S_q) fp32 out, natural log
    S_Q, S_K, H, D, qk_scale,               # qk_scale = softmax_scale * log2(e)
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_mb, stride_mn,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """O and lse for queries [pid_m * BLOCK_M, ...) of one (batch, head)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < S_Q
    mask_d = offs_d < D
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # causal (top-left): query i sees keys j <= i, so this block needs no key past its last query
    hi = S_K
    if CAUSAL:
        hi = tl.minimum(S_K, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = _valid_keys(MASK, off_b, offs_n, S_K, stride_mb, stride_mn, HAS_MASK)
        k = tl.load(K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=(offs_n < S_K)[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
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
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=(offs_n < S_K)[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    # -- epilogue: a query that saw no key has l_i = 0 and acc = 0: output 0, lse = -inf
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * LN2_C  # m_i = -inf where l_i = 0: lse = -inf
    tl.store(LSE + off_bh.to(tl.int64) * S_Q + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, MASK, O, DO, LSE,              # as the forward's, plus O and dO (B, S_q, H, D) any strides
    DQ_ACC, DQ, DK, DV, DELTA,              # dQ accumulator (B, S_q, H, D) fp32; dQ/dK/dV outs; delta (B, H, S_q)
    S_Q, S_K, H, D, sm_scale, qk_scale,
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
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DQ_IS_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dQ, dK, dV of one whole (batch, head): one program, no atomics."""
    off_bh = tl.program_id(0)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ_ACC += off_b * stride_ab + off_h * stride_ah
    DQ += off_b * stride_dqb + off_h * stride_dqh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += off_bh.to(tl.int64) * S_Q
    DELTA += off_bh.to(tl.int64) * S_Q
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    # -- prologue: delta_i = <dO_i, O_i> for every query of this (batch, head)
    for start_m in range(0, S_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_md = (offs_m < S_Q)[:, None] & mask_d[None, :]
        o = tl.load(O + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, mask=mask_md, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
        tl.store(DELTA + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=offs_m < S_Q)
    tl.debug_barrier()  # delta is written and read by different threads of this program

    for start_n in range(0, S_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < S_K
        valid_n = _valid_keys(MASK, off_b, offs_n, S_K, stride_mb, stride_mn, HAS_MASK)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        # causal: queries before this key block see none of it. Key block 0 is seen by every query, so the first
        # outer iteration writes every row of DQ_ACC and later ones may read-modify-write it.
        lo = 0
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M
        for start_m in range(lo, S_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < S_Q
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
            do = tl.load(DO + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=mask_md,
                         other=0.0)
            lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * LOG2E_C
            delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)

            # -- recompute P (the where comes after exp2: an empty row has lse = -inf and would give NaN)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            valid = mask_m[:, None] & valid_n[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)

            # -- dV += P^T dO;  dS = P (dP - delta);  dK += c dS^T Q;  dQ += c dS K
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            ds = (p * (dp - delta[:, None]) * sm_scale).to(q.dtype)
            dk = tl.dot(tl.trans(ds), q, dk, input_precision=INPUT_PRECISION)
            dq = tl.dot(ds, k, input_precision=INPUT_PRECISION)
            dq_ptrs = DQ_ACC + offs_m[:, None] * stride_as + offs_d[None, :]
            if start_n > 0:
                dq += tl.load(dq_ptrs, mask=mask_md, other=0.0)
            tl.store(dq_ptrs, dq, mask=mask_md)
        # the next key block reads the dQ rows this one wrote, possibly from other threads
        tl.debug_barrier()
        tl.store(DK + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(DV + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_nd)

    if not DQ_IS_ACC:
        # -- epilogue: the fp32 accumulator to dQ's dtype
        for start_m in range(0, S_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_md = (offs_m < S_Q)[:, None] & mask_d[None, :]
            dq = tl.load(DQ_ACC + offs_m[:, None] * stride_as + offs_d[None, :], mask=mask_md, other=0.0)
            tl.store(DQ + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=mask_md)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, grid, block sizes.


def _fwd_config(s_q: int, s_k: int, d: int, dtype: torch.dtype) -> dict:
    block_d = _pow2(d)
    if triton_interpret():
        # small, unequal tiles: several blocks per sequence, masked edges, causal blocks straddling the diagonal
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    # Checked with ptxas for sm_90 (no spills; registers, not shared memory, are the limit). 64-row query tiles keep
    # short sequences (50, 77) from wasting most of a 128-row tile; 128 rows only for long ones. fp32 (IEEE, FMA
    # dots) needs smaller tiles or more warps to stay out of local memory.
    if dtype == torch.float32:
        cfg = (64, 32, 8, 1) if block_d <= 64 else (32, 32, 8, 2)
    elif block_d <= 64:
        cfg = (128, 64, 8, 3) if s_q >= 512 else (64, 64, 4, 2)
    else:
        cfg = (64, 32, 4, 2)
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg), BLOCK_D=block_d)


def _bwd_config(s_q: int, s_k: int, d: int, dtype: torch.dtype) -> dict:
    block_d = _pow2(d)
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    # Registers hold dK, dV (2 x BLOCK_N x BLOCK_D fp32), K, V and the (BLOCK_M, BLOCK_N) P/dP/dS tiles, so the
    # inner query tile stays small; checked with ptxas for sm_90 (no spills). Candidates to time on a GPU:
    # (64, 64, 8 warps) for head_dim <= 64 (255 registers, one program per SM), (32, 32) for 128.
    if dtype == torch.float32:
        cfg = (16, 32, 4, 1) if block_d <= 64 else (16, 32, 8, 1)
    else:
        cfg = (32, 64, 4, 2) if block_d <= 64 else (32, 64, 8, 1)
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg), BLOCK_D=block_d)


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
    grid = (triton.cdiv(s_q, cfg["BLOCK_M"]), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, mask, out, lse,
        s_q, s_k, h, d, softmax_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        CAUSAL=causal, HAS_MASK=key_padding_mask is not None, INPUT_PRECISION=_input_precision(q.dtype), **cfg)
    return out, lse


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, softmax_scale: float
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), each contiguous (B, S, H, D) in the inputs' dtype."""
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    dq = torch.empty((b, s_q, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, s_k, h, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, s_k, h, d), dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    _check_offsets(q, k, v, out, dout)
    cfg = _bwd_config(s_q, s_k, d, q.dtype)
    dq_is_acc = q.dtype == torch.float32
    dq_acc = dq if dq_is_acc else torch.empty((b, s_q, h, d), dtype=torch.float32, device=q.device)
    delta = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else delta  # dummy when unused
    mask_strides = (mask.stride(0), mask.stride(1)) if key_padding_mask is not None else (0, 0)
    _attn_bwd_kernel[(b * h,)](
        q, k, v, mask, out, dout, lse.contiguous(),
        dq_acc, dq, dk, dv, delta,
        s_q, s_k, h, d, softmax_scale, softmax_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *mask_strides,
        *dq_acc.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        CAUSAL=causal, HAS_MASK=key_padding_mask is not None, DQ_IS_ACC=dq_is_acc,
        INPUT_PRECISION=_input_precision(q.dtype), **cfg)
    return dq, dk, dv
