"""Fused, memory-linear CLIP contrastive loss in Triton.

Notation: A = image features, B = text features, both (N, D); s = logit_scale (already exp'd), b = logit_bias;
S = s * A @ B.T + b is (N, N) and is never written to memory, only formed tile by tile in registers.

    r_i = logsumexp_j S_ij      c_j = logsumexp_i S_ij
    (each saved as a max and a log-sum, m + log(l): a single fp32 lse near |S| = 100 rounds to 8e-6, and the
    recomputed softmax rows would no longer sum to one; (S - m) - log(l) keeps them exact to rounding)
    loss = sum_i (r_i + c_i) / (2N) - (1 - eps) mean_i S_ii - eps mean_ij S_ij          (eps: label smoothing)
    dL/dS_ij = g / (2N) (P_ij + Q_ij - 2 (1 - eps) [i == j] - 2 eps / N)
    P_ij = exp(S_ij - r_i)      Q_ij = exp(S_ij - c_j)

Kernels
- ``_contrastive_fwd_kernel``: one program per BLOCK_M rows walks every column block once (1 GEMM in all). Row
  log-sum-exp stays in registers (online softmax); each tile's column (max, sum-of-exp) is merged into a global
  (N,) buffer under a per-column-block spin lock, so the column log-sum-exp needs no second pass and no
  (N / BLOCK_M) x N scratch. Programs start at different column blocks, so they seldom wait on the same lock.
- ``_contrastive_bwd_kernel``: one program per BLOCK_M rows of A recomputes the tiles and accumulates
  dA_i = sum_j dL/dS_ij B_j in registers; the one-hot and smoothing terms are rank-one and are applied in the
  epilogue. Launched twice, for dI (A=I, B=T) and for dT (A=T, B=I, with r and c swapped): 2 GEMMs each, no
  atomics, deterministic. The dI launch also reduces d(logit_scale) = sum_i <A_i, dL/dS_i: B>.
  FLOPs: forward 2 N^2 D, backward 8 N^2 D (the design's minimum single-pass backward is 6 N^2 D but needs
  N^2 D / BLOCK_M atomic adds for dB; see docs/design.md, "How performance is counted").

Memory beyond inputs and gradients: O(N) fp32 (lse, column stats, locks, per-program partials).
Accumulation is fp32 whatever the input dtype; exponentials are exp2 with log2(e) folded into the scale.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastclip.dispatch import triton_interpret

# constexpr: compiled kernels may read only constexpr globals (the interpreter does not enforce this)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _contrastive_fwd_kernel(
    A, B, SCALE, BIAS,                     # features (N, D); 0-d scale and bias
    ROW_STATS, DIAG,                       # (2, N) fp32 out: row max and log2-sum (base 2); (N,) fp32 out: S_ii
    COL_MAX, COL_SUM, LOCKS,               # (N,) fp32 running column max / sum of exp2 (base 2); (cdiv(N, BLOCK_N),) int32
    N, D,
    stride_am, stride_ak, stride_bn, stride_bk,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Row log-sum-exp and diagonal for rows [pid * BLOCK_M, ...); column statistics merged into COL_MAX/COL_SUM."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = offs_m.to(tl.int64)
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS).to(tl.float32)
    else:
        bias = 0.0
    # work in base 2: S2 = log2(e) * S
    scale2 = scale * LOG2E
    bias2 = bias * LOG2E

    # -- positive pairs: S_ii = s <A_i, B_i> + b
    dot_ii = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k < D)[None, :]
        a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=mask, other=0.0)
        b = tl.load(B + rows[:, None] * stride_bn + offs_k[None, :] * stride_bk, mask=mask, other=0.0)
        dot_ii += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(DIAG + offs_m, scale * dot_ii + bias, mask=mask_m)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    for step in range(0, num_blocks_n):
        # staggered start: program p visits column blocks p, p+1, ... so concurrent programs hold different locks
        jb = (pid + step) % num_blocks_n
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s = _logits_tile(A, B, rows, offs_n.to(tl.int64), mask_m, mask_n, D, stride_am, stride_ak, stride_bn,
                         stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        s = s * scale2 + bias2
        s = tl.where(mask_m[:, None] & mask_n[None, :], s, float("-inf"))

        # -- update m_i and l_i (row statistics, online)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past N see only -inf
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        m_i = m_new

        # -- this tile's column statistics
        m_c = tl.max(s, axis=0)
        m_c_use = tl.where(m_c == float("-inf"), 0.0, m_c)
        l_c = tl.sum(tl.exp2(s - m_c_use[None, :]), axis=0)

        # -- merge them into the global column statistics, under the column block's lock
        lock = LOCKS + jb
        while tl.atomic_cas(lock, 0, 1) == 1:
            pass
        # .cg: read from L2, never a stale L1 line written before another program's update
        m_old = tl.load(COL_MAX + offs_n, mask=mask_n, other=float("-inf"), cache_modifier=".cg")
        l_old = tl.load(COL_SUM + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
        m_g = tl.maximum(m_old, m_c)
        m_g_use = tl.where(m_g == float("-inf"), 0.0, m_g)
        l_g = l_old * tl.exp2(m_old - m_g_use) + l_c * tl.exp2(m_c_use - m_g_use)
        tl.store(COL_MAX + offs_n, m_g, mask=mask_n)
        tl.store(COL_SUM + offs_n, l_g, mask=mask_n)
        tl.debug_barrier()  # every thread's stores are issued before the lock is released
        tl.atomic_xchg(lock, 0)

    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(ROW_STATS + offs_m, m_use, mask=mask_m)
    tl.store(ROW_STATS + N + offs_m, tl.log2(tl.where(mask_m, l_i, 1.0)), mask=mask_m)


@triton.jit
def _contrastive_bwd_kernel(
    A, B, SCALE, BIAS, GRAD,               # features (N, D); 0-d scale, bias, upstream gradient
    STATS_A, STATS_B,                      # (2, N) fp32 (max, log2-sum), base 2: of A's rows of S and of B's
    SUM_B,                                 # (D,) fp32 sum_j B_j (read only with label smoothing)
    DA, DSCALE_PART,                       # (N, D) out in A's dtype; (cdiv(N, BLOCK_M),) fp32 out
    N, D, label_smoothing,
    stride_am, stride_ak, stride_bn, stride_bk, stride_dam, stride_dak,
    HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dA_i = g s / (2N) (sum_j (P_ij + Q_ij) B_j - 2 (1 - eps) B_i - 2 eps / N sum_j B_j) for BLOCK_M rows."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * LOG2E
    else:
        bias2 = 0.0
    scale2 = scale * LOG2E
    m_a = tl.load(STATS_A + offs_m, mask=mask_m, other=0.0)
    ls_a = tl.load(STATS_A + N + offs_m, mask=mask_m, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    for jb in range(0, num_blocks_n):
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = offs_n.to(tl.int64)
        # -- recompute the tile of logits (base 2) and its softmax weights P + Q
        s = _logits_tile(A, B, rows, cols, mask_m, mask_n, D, stride_am, stride_ak, stride_bn, stride_bk,
                         BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        s = s * scale2 + bias2
        m_b = tl.load(STATS_B + offs_n, mask=mask_n, other=0.0)
        ls_b = tl.load(STATS_B + N + offs_n, mask=mask_n, other=0.0)
        p = tl.exp2((s - m_a[:, None]) - ls_a[:, None]) + tl.exp2((s - m_b[None, :]) - ls_b[None, :])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        # -- acc += (P + Q) @ B_j
        b = tl.load(B + cols[:, None] * stride_bn + offs_d[None, :] * stride_bk,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)

    # -- the targets' terms are rank one: - 2 (1 - eps) B_i - (2 eps / N) sum_j B_j
    mask_md = mask_m[:, None] & mask_d[None, :]
    b_ii = tl.load(B + rows[:, None] * stride_bn + offs_d[None, :] * stride_bk, mask=mask_md, other=0.0)
    acc = acc - (2.0 * (1.0 - label_smoothing)) * b_ii.to(tl.float32)
    if HAS_SMOOTHING:
        sum_b = tl.load(SUM_B + offs_d, mask=mask_d, other=0.0)
        acc = acc - (2.0 * label_smoothing / N) * sum_b[None, :]
    coef = tl.load(GRAD).to(tl.float32) / (2.0 * N)
    if COMPUTE_DSCALE:
        # d(logit_scale) = sum_ij dL/dS_ij <A_i, B_j> = coef * sum_i <A_i, acc_i>
        a = tl.load(A + rows[:, None] * stride_am + offs_d[None, :] * stride_ak, mask=mask_md, other=0.0)
        tl.store(DSCALE_PART + pid, coef * tl.sum(tl.sum(a.to(tl.float32) * acc, axis=1), axis=0))
    da = acc * (coef * scale)
    tl.store(DA + rows[:, None] * stride_dam + offs_d[None, :] * stride_dak, da.to(DA.dtype.element_ty),
             mask=mask_md)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, grid, block sizes.


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch.get_float32_matmul_precision(), as torch's own matmul: "highest" (the default) is IEEE
    # fp32; "high" and "medium" (also set by torch.backends.cuda.matmul.allow_tf32 = True) allow TF32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _fwd_config(n: int, d: int, dtype: torch.dtype) -> dict:
    if triton_interpret():
        # small tiles: exercise several blocks and the masked edges at test sizes
        return dict(BLOCK_M=16, BLOCK_N=16 if n <= 64 else 32, BLOCK_K=16, num_warps=4, num_stages=1)
    return logits_tiles(d, dtype)


def logits_tiles(d: int, dtype: torch.dtype) -> dict:
    """GPU tiles for a kernel that reduces (BLOCK_M, BLOCK_N) logit tiles over D (also SigLIP's loss-only pass).

    64 x 128 at 8 warps: 221 registers, no spills on sm_90 (128 x 128 spills: the row and column reductions keep
    several tiles live). Untimed.
    """
    block_k = 64 if dtype != torch.float32 else 32
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=min(block_k, _pow2(d)), num_warps=8, num_stages=3)


# Backward tiles by BLOCK_D (the padded feature dim): (largest BLOCK_D, BLOCK_M, BLOCK_N for 16-bit inputs,
# num_warps); fp32 inputs halve BLOCK_N. The (BLOCK_M, BLOCK_D) fp32 accumulator lives in registers, so BLOCK_M
# shrinks as D grows. Chosen so that ptxas for sm_90 reports no register spills (a few bytes at D = 512, 832 bytes
# at D = 2048); untimed.
_BWD_TILES = ((128, 64, 32, 4), (256, 64, 32, 8), (512, 32, 64, 8), (1024, 16, 32, 8), (2048, 16, 16, 8))


def _bwd_config(n: int, d: int, dtype: torch.dtype) -> dict:
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=16 if n <= 64 else 32, BLOCK_K=16, BLOCK_D=_pow2(d), num_warps=4,
                    num_stages=1)
    return grad_tiles(d, dtype)


def grad_tiles(d: int, dtype: torch.dtype) -> dict:
    """GPU tiles for a kernel that accumulates a (BLOCK_M, D) gradient in registers (also SigLIP's)."""
    block_d = _pow2(d)
    _, block_m, block_n, warps = next(t for t in _BWD_TILES if block_d <= t[0])
    if dtype == torch.float32:
        block_n = max(16, block_n // 2)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(64, block_d), BLOCK_D=block_d, num_warps=warps,
                num_stages=2)


def _scalar(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # a 0-d tensor on the features' device; a dummy when absent (the kernel never reads it then)
    if t is None:
        return like.new_zeros((), dtype=torch.float32)
    return t.reshape(())


def contrastive_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    label_smoothing: float, chunk_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss fp32 0-d, row_stats, col_stats): stats (2, N) fp32 = (max, log2 of sum of exp2), base 2.

    ``chunk_size`` is unused (tiles are fixed).
    """
    n, d = image.shape
    dev = image.device
    cfg = _fwd_config(n, d, image.dtype)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_stats = torch.empty(2, n, dtype=torch.float32, device=dev)
    diag = torch.empty(n, dtype=torch.float32, device=dev)
    col_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    col_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    locks = torch.zeros(triton.cdiv(n, block_n), dtype=torch.int32, device=dev)
    scale_t = _scalar(scale, image)
    bias_t = _scalar(bias, image)
    _contrastive_fwd_kernel[(triton.cdiv(n, block_m),)](
        image, text, scale_t, bias_t, row_stats, diag, col_max, col_sum, locks,
        n, d, image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(image.dtype), **cfg)
    col_m = torch.where(torch.isinf(col_max), torch.zeros_like(col_max), col_max)
    col_stats = torch.stack([col_m, torch.log2(col_sum)])
    row_lse, col_lse = row_stats.sum(0) * LN2.value, col_stats.sum(0) * LN2.value
    # O(N + D) epilogue: the mean of all logits only matters with label smoothing
    loss = (row_lse.sum() + col_lse.sum()) / (2 * n) - (1.0 - label_smoothing) * diag.mean()
    if label_smoothing:
        mean_all = scale_t.float() * (image.mean(0, dtype=torch.float32) @ text.mean(0, dtype=torch.float32))
        if bias is not None:
            mean_all = mean_all + bias_t.float()
        loss = loss - label_smoothing * mean_all
    return loss, row_stats, col_stats


def _bwd_one_side(grad, a, b, scale_t, bias_t, has_bias, stats_a, stats_b, label_smoothing, compute_dscale):
    n, d = a.shape
    cfg = _bwd_config(n, d, a.dtype)
    grid = triton.cdiv(n, cfg["BLOCK_M"])
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    part = torch.empty(grid if compute_dscale else 1, dtype=torch.float32, device=a.device)
    sum_b = b.sum(0, dtype=torch.float32) if label_smoothing else part  # dummy when unused
    _contrastive_bwd_kernel[(grid,)](
        a, b, scale_t, bias_t, grad, stats_a, stats_b, sum_b, da, part,
        n, d, float(label_smoothing),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), da.stride(0), da.stride(1),
        HAS_BIAS=has_bias, HAS_SMOOTHING=bool(label_smoothing), COMPUTE_DSCALE=compute_dscale,
        INPUT_PRECISION=_input_precision(a.dtype), **cfg)
    return da, (part.sum() if compute_dscale else None)


def contrastive_bwd(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], row_stats: torch.Tensor, col_stats: torch.Tensor,
                    label_smoothing: float, chunk_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_image, d_text, d_scale) in the dtypes and shapes of the inputs."""
    scale_t = _scalar(scale, image)
    bias_t = _scalar(bias, image)
    grad_t = grad.reshape(()).to(torch.float32)
    d_image, d_scale = _bwd_one_side(grad_t, image, text, scale_t, bias_t, bias is not None, row_stats, col_stats,
                                     label_smoothing, compute_dscale=True)
    d_text, _ = _bwd_one_side(grad_t, text, image, scale_t, bias_t, bias is not None, col_stats, row_stats,
                              label_smoothing, compute_dscale=False)
    return d_image, d_text, d_scale.reshape(scale.shape).to(scale.dtype)
