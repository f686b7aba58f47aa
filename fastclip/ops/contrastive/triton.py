"""Fused, memory-linear CLIP contrastive loss in Triton.

Notation: A = image features, B = text features, both (N, D); s = logit_scale (already exp'd), b = logit_bias;
S = s * A @ B.T + b is (N, N) and is never written to memory, only formed tile by tile in registers.

    r_i = logsumexp_j S_ij      c_j = logsumexp_i S_ij
    loss = (1 - eps) mean_i (-log P_ii - log Q_ii) / 2 + eps (sum_i (r_i + c_i) / (2N) - mean_ij S_ij)
    dL/dS_ij = g / (2N) (P_ij + Q_ij - 2 (1 - eps) [i == j] - 2 eps / N)             (eps: label smoothing)
    P_ij = exp(S_ij - r_i)      Q_ij = exp(S_ij - c_j)

Numerics where the model is confident (P_ii -> 1 at scale 100, late in training): r_i - S_ii and P_ii - 1 are
differences of nearly equal numbers, which fp32 (let alone fp16/bf16) rounds away. So
- each log-sum-exp is kept as (max m, log-sum ls) with ls = log1p(rest), rest = sum_j exp(S_ij - m) - 1 counting
  the max as exactly 1 (never formed as 1 + rest, which would round a confident row's rest to nothing);
- S_ii has one definition, <A_i, B_i> by one torch op that forward and backward both call, substituted into the
  tiles (a recomputed GEMM may round differently on another tile shape: 1e-5 at |S| = 100 would swamp 1 - P_ii);
- -log P_ii = (m_i - S_ii) + ls_i: exactly ls_i where the diagonal is the max;
- the backward forms each tile of dL/dS whole in fp32, targets included, before rounding it for the second GEMM:
  P_ii - 1 = expm1(S_ii - r_i) on the diagonal (Kahan's expm1), -2 eps / N everywhere.
Statistics are saved in base 2 (the kernels use exp2 with log2(e) folded into the scale): (2, N) = (m, ls).

Kernels
- ``_contrastive_fwd_kernel``: a G_r x G_c grid. Program (r, c) takes row blocks r*R ... (r+1)*R - 1 in turn and,
  for each, the column blocks c*C ... (c+1)*C - 1 (one GEMM pass in all). It keeps the row statistics of its column
  range in registers and merges each tile's column statistics into its own slot of a (2, G_r, N) buffer; no
  location is written by two programs, so there are no locks and no atomics, and every merge happens in a fixed
  order: loss and statistics are bitwise identical run to run. The (column block, K step) loop is one flat loop,
  so the loads stay pipelined across column blocks. A few O(N) torch ops merge the G_c row partials and
  the G_r column partials (in a fixed order too). Memory: 2 (G_r + G_c) N + N fp32 (G = 16: 65 N floats, 17 MB at
  N = 65,536).
- ``_contrastive_bwd_kernel``: program (i, k) owns BLOCK_M rows of A and the k-th BLOCK_D slice of D and sweeps
  every column block: S tile (GEMM 1), dL/dS tile in fp32, acc += G @ B_j[:, slice] (GEMM 2). Where D fits one
  slice (BLOCK_K = BLOCK_D), A's rows stay resident and each B tile is loaded once for both GEMMs. Launched twice,
  for dI (A=I, B=T) and for dT (A=T, B=I, with r and c swapped): no atomics, deterministic. The dI launch also
  reduces d(logit_scale) = sum_ij dL/dS_ij <A_i, B_j> from the fp32 tiles (not from the gradient, whose GEMM takes
  dL/dS rounded to the input dtype: where the model is confident its P + Q - 2 nearly cancels). FLOPs: forward 2 N^2 D, backward 8 N^2 D (plus one GEMM 1 per
  extra D slice).

Tiles: one table per kernel (``FWD_CONFIGS``, ``BWD_CONFIGS``), which the launchers read after the tuned table
``fastclip/data/triton_configs.json`` (see ``fastclip/ops/tuned.py``); a normal run never autotunes.
Accumulation is fp32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastclip.dispatch import triton_interpret
from fastclip.ops.contrastive.pytorch import diag_dots, loss_from_base2_stats, merge_partials
from fastclip.ops.tuned import by_arch, tuned_config

# constexpr: compiled kernels may read only constexpr globals (the interpreter does not enforce this)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# |dL/dS| <= 2, so 2^14 dL/dS stays below fp16's 65504, and entries down to 2^-38 keep their bits in GEMM 2's fp16
# operand instead of flushing below fp16's 2^-24 (a confident row's whole dL/dS can be ~1e-9); exact in every dtype
DS_UP = tl.constexpr(16384.0)


@triton.jit
def _logits_tile(A, B, rows, cols, mask_m, mask_n, D, stride_am, stride_ak, stride_bn, stride_bk,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """A[rows] @ B[cols].T, (BLOCK_M, BLOCK_N) in fp32, reducing over D in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(B + cols[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _expm1_2(t):
    """2^t - 1, exact to rounding for small |t| (Kahan: (u - 1) t / log2(u) with u = 2^t, the errors cancel)."""
    u = tl.exp2(t)
    one = u == 1.0
    kahan = (u - 1.0) * t / tl.log2(tl.where(one | (t <= -1.0), 2.0, u))
    return tl.where(one, t * LN2, tl.where(t > -1.0, kahan, u - 1.0))


@triton.jit
def _rest_stats(s, AXIS: tl.constexpr):
    """(max, rest) of a base-2 tile along AXIS: rest = sum 2^(s - max) - 1, each maximum counting exactly 1.
    A line of -inf only (outside the matrix) gives (-inf, -1), the empty partial."""
    m = tl.max(s, axis=AXIS)
    m_b = tl.expand_dims(m, AXIS)
    top = s == m_b
    e = tl.where(top, 0.0, tl.exp2(s - tl.where(m_b == float("-inf"), 0.0, m_b)))
    rest = tl.sum(e, axis=AXIS) + (tl.sum(top.to(tl.float32), axis=AXIS) - 1.0)
    return m, tl.where(m == float("-inf"), -1.0, rest)


@triton.jit
def _merge(m1, r1, m2, r2):
    """Merge two (max, rest) partials (base 2) without forming 1 + rest of the one that holds the max."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.where(m1 >= m2, r1 + (1.0 + r2) * tl.exp2(m2 - m_safe), r2 + (1.0 + r1) * tl.exp2(m1 - m_safe))


@triton.jit
def _with_diagonal(s, DIAG, offs_m, offs_n, mask_m, scale2, bias2):
    """The tile with its diagonal replaced by S_ii from DIAG: forward and backward then see the very same S_ii
    (a recomputed GEMM may round differently), so P_ii - 1 = expm1(S_ii - r_i) is exact where the diagonal is the
    row's max, whatever the tile shapes."""
    s_ii = tl.load(DIAG + offs_m, mask=mask_m, other=0.0) * scale2 + bias2
    return tl.where(offs_m[:, None] == offs_n[None, :], s_ii[:, None], s)


@triton.jit
def _contrastive_fwd_kernel(
    A, B, SCALE, BIAS,                     # features (N, D); 0-d scale and bias
    ROW_PART,                              # (2, G_c, N) fp32 out: (max, rest) of row i over column range c
    COL_PART,                              # (2, G_r, N) fp32 in/out (filled with (-inf, -1)): column j, row range r
    DIAG,                                  # (N,) fp32: <A_i, B_i> (``diag_dots``), S_ii's one definition
    N, D, rb_per, cb_per, G_R, G_C,        # row / column blocks per program; grid (G_R, G_C)
    stride_am, stride_ak, stride_bn, stride_bk,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Row and column (max, rest) partials of S (base 2) over this program's row blocks x column blocks."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rb1 = tl.minimum(pid_r * rb_per + rb_per, tl.cdiv(N, BLOCK_M))
    cb0 = pid_c * cb_per
    cb1 = tl.minimum(cb0 + cb_per, tl.cdiv(N, BLOCK_N))
    scale2 = tl.load(SCALE).to(tl.float32) * LOG2E
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * LOG2E
    else:
        bias2 = 0.0
    for rb in range(pid_r * rb_per, rb1):
        row0 = rb * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        rows = offs_m.to(tl.int64)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        r_i = tl.full((BLOCK_M,), -1.0, dtype=tl.float32)
        tl.debug_barrier()  # the previous row block's column partials are visible to every thread
        # one flat loop over (column block, K step): the loads stay pipelined across column blocks (a nested K
        # loop would drain the pipeline at the end of every column block)
        n_k = tl.cdiv(D, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in tl.range(0, (cb1 - cb0) * n_k):
            cb = cb0 + it // n_k
            offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            offs_k = (it % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            b = tl.load(B + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            if it % n_k == n_k - 1:
                # the tile of logits is complete: its statistics
                s = tl.where(mask_m[:, None] & mask_n[None, :], acc * scale2 + bias2, float("-inf"))
                if (cb * BLOCK_N < row0 + BLOCK_M) & (cb * BLOCK_N + BLOCK_N > row0):
                    s = _with_diagonal(s, DIAG, offs_m, offs_n, mask_m, scale2, bias2)
                m_t, r_t = _rest_stats(s, 1)
                m_i, r_i = _merge(m_i, r_i, m_t, r_t)
                # this program's own column partial: read, merge, write (no other program touches it)
                col = COL_PART + pid_r * N + offs_n
                m_c, r_c = _rest_stats(s, 0)
                m_c, r_c = _merge(tl.load(col, mask=mask_n, other=float("-inf")),
                                  tl.load(col + G_R * N, mask=mask_n, other=-1.0), m_c, r_c)
                tl.store(col, m_c, mask=mask_n)
                tl.store(col + G_R * N, r_c, mask=mask_n)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row = ROW_PART + pid_c * N + offs_m
        tl.store(row, m_i, mask=mask_m)
        tl.store(row + G_C * N, r_i, mask=mask_m)


@triton.jit
def _contrastive_bwd_kernel(
    A, B, SCALE, BIAS, GRAD,               # features (N, D); 0-d scale, bias, upstream gradient
    STATS_A, STATS_B,                      # (2, N) fp32 (max, log2-sum), base 2: of A's rows of S and of B's
    DIAG,                                  # (N,) fp32: <A_i, B_i>, as the forward used it
    DA, DSCALE_PART,                       # (N, D) out in A's dtype; (cdiv(N, BLOCK_M),) fp32 out
    N, D, label_smoothing,
    stride_am, stride_ak, stride_bn, stride_bk, stride_dam, stride_dak,
    HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_DSCALE: tl.constexpr, ONE_SLICE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, INPUT_PRECISION: tl.constexpr, TARGETS: tl.constexpr = True,
):
    """dA_i[slice] = g s / (2N) sum_j G_ij B_j[slice], G = P + Q - 2 (1 - eps) I - 2 eps / N, for BLOCK_M rows
    (TARGETS=False: G = P + Q - 2 eps / N, a block of the distributed ring with no positive pair)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    row0 = pid * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * LOG2E
    else:
        bias2 = 0.0
    scale2 = scale * LOG2E
    m_a = tl.load(STATS_A + offs_m, mask=mask_m, other=0.0)
    ls_a = tl.load(STATS_A + N + offs_m, mask=mask_m, other=0.0)
    # ONE_SLICE (the launcher's check: BLOCK_K == BLOCK_D >= D): all of D in one slice, A stays resident
    ONE_TILE: tl.constexpr = ONE_SLICE
    a = tl.load(A + rows[:, None] * stride_am + offs_d[None, :] * stride_ak, mask=mask_md, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # COMPUTE_DSCALE: sum_j G_ij <A_i, B_j> from G in fp32, as sum_j G_ij (S_ij - b) / s off the diagonal (no
    # second tile of logits kept) plus G_ii <A_i, B_i> with <A_i, B_i> from DIAG
    gs_off = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j G_ij S_ij, j != i
    g_off = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j G_ij, j != i (HAS_BIAS)
    g_dot_ii = tl.zeros((BLOCK_M,), dtype=tl.float32)  # G_ii <A_i, B_i>
    for jb in tl.range(0, tl.cdiv(N, BLOCK_N), num_stages=NUM_STAGES):
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        b = tl.load(B + cols[:, None] * stride_bn + offs_d[None, :] * stride_bk,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D), for both GEMMs
        if ONE_TILE:
            s = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
        else:
            s = _logits_tile(A, B, rows, cols, mask_m, mask_n, D, stride_am, stride_ak, stride_bn, stride_bk,
                             BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        s = s * scale2 + bias2
        on_diagonal = (jb * BLOCK_N < row0 + BLOCK_M) & (jb * BLOCK_N + BLOCK_N > row0)
        if on_diagonal:
            s = _with_diagonal(s, DIAG, offs_m, offs_n, mask_m, scale2, bias2)
        m_b = tl.load(STATS_B + offs_n, mask=mask_n, other=0.0)
        ls_b = tl.load(STATS_B + N + offs_n, mask=mask_n, other=0.0)
        t_a = (s - m_a[:, None]) - ls_a[:, None]  # log2 P
        t_b = (s - m_b[None, :]) - ls_b[None, :]  # log2 Q
        g = tl.exp2(t_a) + tl.exp2(t_b)
        if HAS_SMOOTHING:
            g = g - 2.0 * label_smoothing / N
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        if COMPUTE_DSCALE:
            off = offs_m[:, None] != offs_n[None, :]
            gs_off += tl.sum(tl.where(off, g * s, 0.0), axis=1)
            if HAS_BIAS:
                g_off += tl.sum(tl.where(off, g, 0.0), axis=1)
        if on_diagonal:
            on_ii = (offs_m[:, None] == offs_n[None, :]) & mask_m[:, None]
            if TARGETS:
                # the targets: (P_ii - 1) + (Q_ii - 1) + 2 eps, in fp32 before any rounding
                g_ii = _expm1_2(t_a) + _expm1_2(t_b) + 2.0 * label_smoothing
                if HAS_SMOOTHING:
                    g_ii = g_ii - 2.0 * label_smoothing / N
                g = tl.where(on_ii, g_ii, g)
            if COMPUTE_DSCALE:
                g_dot_ii += tl.sum(tl.where(on_ii, g, 0.0), axis=1) * tl.load(DIAG + offs_m, mask=mask_m, other=0.0)
        acc = tl.dot((g * DS_UP).to(b.dtype), b, acc, input_precision=INPUT_PRECISION)  # 2^14 G: see DS_UP

    coef = tl.load(GRAD).to(tl.float32) / (2.0 * N)
    if COMPUTE_DSCALE:
        # d(logit_scale) = coef * sum_ij G_ij <A_i, B_j>, this row block's share (every D slice has the whole S). At
        # scale 0 this divides by 0: the launcher replaces it then.
        if pid_d == 0:
            dscale = (gs_off - bias2 * g_off) / scale2 + g_dot_ii
            tl.store(DSCALE_PART + pid, coef * tl.sum(dscale, axis=0))
    da = acc * (coef * scale / DS_UP)
    tl.store(DA + rows[:, None] * stride_dam + offs_d[None, :] * stride_dak, da.to(DA.dtype.element_ty),
             mask=mask_md)


# ---------------------------------------------------------------------------------------------------------------
# Tiles. One table per kernel; ``tuned_config`` prefers a measured entry of fastclip/data/triton_configs.json.

# Forward, by input dtype class: (BLOCK_M, BLOCK_N) logit tiles reduced over D in BLOCK_K steps; SPLIT = the
# largest G_r and G_c (the grid is at most SPLIT x SPLIT programs, the partial buffers 2 SPLIT N floats each).
# An entry {arch: config} differs by architecture (``by_arch``): fp32 with 3 stages spills on sm_80 (16 B), and 64
# columns spill in SigLIP's loss-only sweep (``logits_tiles``), so sm_80 takes 2 stages.
FWD_CONFIGS = {
    "16bit": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, SPLIT=16),
    "fp32": {90: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3, SPLIT=16),
             80: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2, SPLIT=16)},
}

# Backward, by the padded feature dim: rows (largest padded D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K, num_warps,
# NUM_STAGES), for 16-bit inputs. BLOCK_M = 64 so both GEMMs can lower to warp-group MMA on sm_90; BLOCK_K == BLOCK_D
# (D in one slice, B loaded once for both GEMMs) up to D = 256; beyond, the (BLOCK_M, D) accumulator is split over D
# slices of 256 (grid axis 1), GEMM 1 recomputed per slice. A row {arch: row} differs by architecture
# (``by_arch``): at D = 128, 4 warps spill on sm_80 (8-16 B), 8 do not.
BWD_CONFIGS = (
    (64, 64, 64, 64, 64, 4, 3),
    {90: (128, 64, 64, 128, 128, 4, 3), 80: (128, 64, 64, 128, 128, 8, 3)},
    (256, 64, 64, 256, 256, 8, 2),
    (2048, 64, 64, 256, 64, 8, 2),
)
# fp32 inputs run IEEE dots on the FMA units: every operand fragment lives in registers, so the column tiles are
# narrower, each row compiled without local memory for sm_90 and sm_80 (tests/triton_static.py). Beyond D = 256 the
# slice that fits differs by architecture.
BWD_CONFIGS_FP32 = (
    (64, 64, 16, 64, 64, 4, 3),
    (128, 64, 16, 128, 128, 8, 3),
    (256, 64, 16, 256, 256, 8, 2),
    {90: (2048, 64, 32, 256, 64, 8, 2), 80: (2048, 64, 16, 128, 64, 8, 2)},
)

# the interpreter (tests): small tiles, several blocks, masked edges, both backward paths at test sizes
_INTERPRET_FWD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, SPLIT=3)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def fwd_config(n: int, d: int, dtype: torch.dtype) -> dict:
    if triton_interpret():
        return dict(_INTERPRET_FWD, BLOCK_N=16 if n <= 64 else 32)
    return tuned_config("contrastive_fwd", n, d, dtype) or dict(by_arch(FWD_CONFIGS[_dtype_class(dtype)]))


def bwd_config(n: int, d: int, dtype: torch.dtype) -> dict:
    block_d = _pow2(d)
    if triton_interpret():
        slice_d = min(block_d, 32)
        return dict(BLOCK_M=16, BLOCK_N=16 if n <= 64 else 32, BLOCK_K=slice_d if slice_d == block_d else 16,
                    BLOCK_D=slice_d, num_warps=4, NUM_STAGES=1)
    tuned = tuned_config("contrastive_bwd", n, d, dtype)
    if tuned:
        return tuned
    table = BWD_CONFIGS_FP32 if dtype == torch.float32 else BWD_CONFIGS
    _, block_m, block_n, slice_d, block_k, warps, stages = next(t for t in map(by_arch, table) if block_d <= t[0])
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=slice_d, num_warps=warps,
                NUM_STAGES=stages)


def one_slice(cfg: dict, d: int) -> bool:
    """Whether a backward/gradient tile config holds all of D in one slice (BLOCK_K == BLOCK_D >= D): then A's rows
    stay resident and each B tile serves both GEMMs. Decided here, from D, never assumed from the tile sizes alone
    (a loss-only or tuned config may have BLOCK_K == BLOCK_D < D)."""
    return cfg["BLOCK_K"] == cfg["BLOCK_D"] and cfg["BLOCK_D"] >= d


def logits_tiles(d: int, dtype: torch.dtype) -> dict:
    """GPU tiles for a loss-only sweep of (BLOCK_M, BLOCK_N) logit tiles (SigLIP's no-gradient pass)."""
    cfg = dict(by_arch(FWD_CONFIGS[_dtype_class(dtype)]))
    del cfg["SPLIT"]
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], _pow2(d))
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, grid.


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch.get_float32_matmul_precision(), as torch's own matmul: "highest" (the default) is IEEE
    # fp32; "high" and "medium" (also set by torch.backends.cuda.matmul.allow_tf32 = True) allow TF32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _scalar(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # a 0-d tensor on the features' device; a dummy when absent (the kernel never reads it then)
    if t is None:
        return like.new_zeros((), dtype=torch.float32)
    return t.reshape(())


def _split(blocks: int, most: int) -> Tuple[int, int]:
    """(blocks per program, programs): at most ``most`` programs, none of them empty."""
    per = triton.cdiv(blocks, min(blocks, most))
    return per, triton.cdiv(blocks, per)


def contrastive_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    label_smoothing: float, chunk_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss fp32 0-d, row_stats, col_stats): stats (2, N) fp32 = (max, log2 of sum of exp2), base 2.

    Deterministic: no atomics, every reduction in a fixed order. ``chunk_size`` is unused (tiles are fixed).
    """
    n, d = image.shape
    dev = image.device
    cfg = fwd_config(n, d, image.dtype)
    split = cfg.pop("SPLIT")
    rb_per, g_r = _split(triton.cdiv(n, cfg["BLOCK_M"]), split)
    cb_per, g_c = _split(triton.cdiv(n, cfg["BLOCK_N"]), split)
    row_part = torch.empty(2, g_c, n, dtype=torch.float32, device=dev)
    col_part = torch.empty(2, g_r, n, dtype=torch.float32, device=dev)
    col_part[0].fill_(float("-inf"))
    col_part[1].fill_(-1.0)
    dots = diag_dots(image, text)
    scale_t = _scalar(scale, image)
    bias_t = _scalar(bias, image)
    _contrastive_fwd_kernel[(g_r, g_c)](
        image, text, scale_t, bias_t, row_part, col_part, dots, n, d, rb_per, cb_per, g_r, g_c,
        image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(image.dtype), **cfg)
    row_stats = _stats(*merge_partials(row_part[0], row_part[1], exp=torch.exp2))
    col_stats = _stats(*merge_partials(col_part[0], col_part[1], exp=torch.exp2))
    # S_ii in base 2, by the kernels' formula
    diag = dots * (scale_t.float() * LOG2E.value) + (bias_t.float() * LOG2E.value if bias is not None else 0.0)
    loss = loss_from_base2_stats(row_stats, col_stats, diag, image, text, scale_t, None if bias is None else bias_t,
                                 label_smoothing)
    return loss, row_stats, col_stats


def _stats(m: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    # (max, rest) -> (max, log2(1 + rest)), (2, N); log1p keeps a confident row's tiny rest
    return torch.stack([m, torch.log1p(rest) * LOG2E.value])


def _bwd_one_side(grad, a, b, dots, scale_t, bias_t, has_bias, stats_a, stats_b, label_smoothing, compute_dscale,
                  targets=True):
    n, d = a.shape
    cfg = bwd_config(n, d, a.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]))
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    part = torch.empty(grid[0] if compute_dscale else 1, dtype=torch.float32, device=a.device)
    _contrastive_bwd_kernel[grid](
        a, b, scale_t, bias_t, grad, stats_a, stats_b, dots, da, part,
        n, d, float(label_smoothing),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), da.stride(0), da.stride(1),
        HAS_BIAS=has_bias, HAS_SMOOTHING=bool(label_smoothing), COMPUTE_DSCALE=compute_dscale,
        ONE_SLICE=one_slice(cfg, d), INPUT_PRECISION=_input_precision(a.dtype), TARGETS=targets, **cfg)
    return da, (part.sum() if compute_dscale else None)


def contrastive_bwd(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], row_stats: torch.Tensor, col_stats: torch.Tensor,
                    label_smoothing: float, chunk_size: Optional[int] = None, *, targets: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_image, d_text, d_scale) in the dtypes and shapes of the inputs (``targets=False``: without the
    targets, a block of the distributed ring with no positive pair)."""
    scale_t = _scalar(scale, image)
    bias_t = _scalar(bias, image)
    grad_t = grad.reshape(()).to(torch.float32)
    dots = diag_dots(image, text)
    d_image, d_scale = _bwd_one_side(grad_t, image, text, dots, scale_t, bias_t, bias is not None, row_stats, col_stats,
                                     label_smoothing, compute_dscale=True, targets=targets)
    d_text, _ = _bwd_one_side(grad_t, text, image, dots, scale_t, bias_t, bias is not None, col_stats, row_stats,
                              label_smoothing, compute_dscale=False, targets=targets)
    # The kernel recovers <A_i, B_j> as (S_ij - b) / s, which scale 0 cannot: there P = Q = 1/N, G = 2 (1 - eps)
    # (1/N - I) and sum_ij G_ij <A_i, B_j> = 2 (1 - eps) (<sum_i A_i, sum_j B_j> / N - sum_i <A_i, B_i>); without
    # the targets G = 2 (1 - eps) / N and the sum is 2 (1 - eps) <sum_i A_i, sum_j B_j> / N.
    n = image.shape[0]
    all_pairs = image.float().sum(0) @ text.float().sum(0) / n
    at_zero = (grad_t / n) * (1.0 - label_smoothing) * (all_pairs - dots.sum() if targets else all_pairs)
    d_scale = torch.where(scale_t.float() == 0, at_zero, d_scale)
    return d_image, d_text, d_scale.reshape(scale.shape).to(scale.dtype)
