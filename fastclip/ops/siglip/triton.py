"""Fused, memory-linear SigLIP sigmoid loss in Triton.

Notation: A = image features (N, D), B = text features (M, D); s = logit_scale (exp'd), b = logit_bias;
X = A @ B.T and S = s X + b are (N, M) and are only ever formed tile by tile in registers.
z_ij = +1 where i == j (the positive pairs; none with ``negative_only``), -1 elsewhere.

    loss     = sum_ij softplus(-z_ij S_ij) / N
    dL/dS_ij = g / N (sigmoid(S_ij) - [z_ij = +1])
    dA = s dL/dS @ B      dB = s dL/dS^T @ A      ds = sum_ij dL/dS_ij X_ij      db = sum_ij dL/dS_ij

The loss is elementwise in S: no row or column statistic is needed before the gradient, so one sweep can form the
loss and the gradient together, and dL/dS is linear in g, so the gradient can be made in the forward for g = 1
and scaled in the backward.

Kernel: ``_siglip_kernel``, one program per BLOCK_M rows of A, walks every column block of B once: the tile of X
(GEMM 1), the loss, and, with COMPUTE_GRAD, G = sigmoid(S) - [z = +1] and acc += G @ B_j (GEMM 2) in registers,
with ds and db reduced per program. A positive's G = -sigmoid(-S) is formed as such, in fp32 (never as
sigmoid(S) - 1, which cancels where the pair is confident). Program (i, k) owns the k-th BLOCK_D slice of D where D
does not fit one (GEMM 1 recomputed per slice); where it does, A stays resident and each B tile serves both
GEMMs. Tiles: ``GRAD_CONFIGS``, after the tuned table (``fastclip/ops/tuned.py``). It runs twice:
- forward: A = I, B = T: loss, dI (for g = 1; saved for the backward), ds, db. Without a gradient: loss only.
- backward: A = T, B = I ("the transposed launch"; S^T has the same diagonal, so the same kernel applies): dT for
  the actual g. No atomics anywhere, deterministic.
FLOPs: 2 N M D (loss only), 8 N M D with gradients (the transposed launch recomputes X^T; the 6 N M D single-pass
alternative needs N M D / BLOCK_M fp32 atomic adds for dT and a (BLOCK_N, D) tile of them per step, which does not
fit the registers at CLIP's D of 512-1152). Benchmarks count 6 N^2 D, the design's minimum.

Memory beyond inputs and gradients: the unit dI, N x D in the input dtype, held from forward to backward, and
O(N / BLOCK_M) fp32 partial sums. No N x M or chunk x M buffer. Accumulation is fp32 whatever the input dtype;
exponentials are exp2 with log2(e) folded into the scale.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastclip.dispatch import triton_interpret
from fastclip.ops.contrastive.triton import (LN2, LOG2E, _input_precision, _logits_tile, _pow2, _scalar,
                                             logits_tiles, one_slice)
from fastclip.ops.tuned import tuned_config


@triton.jit
def _siglip_kernel(
    A, B, SCALE, BIAS, GRAD,               # features (M_A, D) and (N_B, D); 0-d scale, bias, upstream gradient
    PARTS,                                 # (3, cdiv(M_A, BLOCK_M)) fp32 out: per-program loss, sum G X, sum G
    DA,                                    # (M_A, D) out in A's dtype: g s / N_img sum_j G_ij B_j
    M_A, N_B, D, inv_n,                    # inv_n = 1 / (number of images)
    stride_am, stride_ak, stride_bn, stride_bk, stride_dam, stride_dak,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, COMPUTE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ONE_SLICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Rows [pid * BLOCK_M, ...) of A against all of B: sum of softplus(-z S), and G @ B[:, slice] with sum G X,
    sum G (program (i, k) owns the k-th BLOCK_D slice of D; the sums are written by slice 0 only)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M_A
    rows = offs_m.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS).to(tl.float32)
    else:
        bias = 0.0
    # ONE_SLICE (the launcher's check: BLOCK_K == BLOCK_D >= D): all of D in one slice, A stays resident and each
    # B tile is loaded once for both GEMMs
    ONE_TILE: tl.constexpr = ONE_SLICE
    if ONE_TILE:
        a = tl.load(A + rows[:, None] * stride_am + offs_d[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    loss_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gx_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    g_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for jb in tl.range(0, tl.cdiv(N_B, BLOCK_N), num_stages=NUM_STAGES):
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_B
        cols = offs_n.to(tl.int64)
        if ONE_TILE:
            b = tl.load(B + cols[:, None] * stride_bn + offs_d[None, :] * stride_bk,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            x = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
        else:
            x = _logits_tile(A, B, rows, cols, mask_m, mask_n, D, stride_am, stride_ak, stride_bn, stride_bk,
                             BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        s = x * scale + bias
        valid = mask_m[:, None] & mask_n[None, :]
        if POSITIVES:
            pos = offs_m[:, None] == offs_n[None, :]
        else:
            pos = offs_m[:, None] < 0  # all False
        # one exponential serves the loss and the sigmoid: e = exp(-|S|) <= 1 never overflows
        e = tl.exp2(-tl.abs(s) * LOG2E)
        if COMPUTE_LOSS:
            # softplus(-z S) = max(-z S, 0) + log1p(e); log1p as log(u) * e / (u - 1), exact where 1 + e rounds to 1
            u = 1.0 + e
            exact = u == 1.0
            log1p_e = tl.where(exact, e, tl.log2(u) * LN2 * e / tl.where(exact, 1.0, u - 1.0))
            zs = tl.where(pos, -s, s)
            loss_i += tl.sum(tl.where(valid, tl.maximum(zs, 0.0) + log1p_e, 0.0), axis=1)
        if COMPUTE_GRAD:
            # -- G = sigmoid(S) - [positive] from e, in fp32 and without cancellation: a positive's
            #    sigmoid(S) - 1 = -sigmoid(-S), tiny where the pair is confident, is formed as such
            big = s >= 0
            g = tl.where(pos, -tl.where(big, e, 1.0), tl.where(big, 1.0, e)) / (1.0 + e)
            g = tl.where(valid, g, 0.0)
            gx_i += tl.sum(g * x, axis=1)
            g_i += tl.sum(g, axis=1)
            # -- acc += G @ B_j[:, slice]
            if not ONE_TILE:
                b = tl.load(B + cols[:, None] * stride_bn + offs_d[None, :] * stride_bk,
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = tl.dot(g.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)

    n_prog = tl.num_programs(0)
    if pid_d == 0:
        if COMPUTE_LOSS:
            tl.store(PARTS + pid, tl.sum(loss_i, axis=0))
        if COMPUTE_GRAD:
            tl.store(PARTS + n_prog + pid, tl.sum(gx_i, axis=0))
            tl.store(PARTS + 2 * n_prog + pid, tl.sum(g_i, axis=0))
    if COMPUTE_GRAD:
        coef = tl.load(GRAD).to(tl.float32) * scale * inv_n
        tl.store(DA + rows[:, None] * stride_dam + offs_d[None, :] * stride_dak, (acc * coef).to(DA.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers: shapes, allocation, grid, block sizes.


# Tiles with gradients, by the padded feature dim: rows (largest padded D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K,
# num_warps, NUM_STAGES) for 16-bit inputs, and for fp32 (FMA dots, fragments in registers: narrower column
# tiles, each row compiled without local memory for sm_90 and sm_80 by tests/triton_static.py). As the contrastive
# backward's (BWD_CONFIGS there): BLOCK_M = 64 for warp-group MMA on sm_90, D in one slice (B loaded once for both
# GEMMs) up to 256, D slices of 256 beyond. Without gradients the sweep is the contrastive forward's logit tiles
# (``logits_tiles``).
GRAD_CONFIGS = (
    (64, 64, 64, 64, 64, 4, 3),
    (128, 64, 64, 128, 128, 4, 3),
    (256, 64, 32, 256, 256, 8, 2),
    (2048, 64, 64, 256, 64, 8, 2),
)
GRAD_CONFIGS_FP32 = (
    (64, 64, 16, 64, 64, 4, 3),
    (128, 64, 16, 128, 128, 8, 3),
    (256, 64, 16, 256, 256, 8, 2),
    (2048, 64, 16, 256, 64, 8, 2),
)


def config(m: int, d: int, dtype: torch.dtype, compute_grad: bool) -> dict:
    """Tiles for ``m`` columns (B's rows) and feature dim ``d``: tuned table, else the static one."""
    block_d = _pow2(d)
    if triton_interpret():
        # small tiles: several blocks, masked edges, both paths (one slice / D slices) at test sizes
        slice_d = min(block_d, 32)
        return dict(BLOCK_M=16, BLOCK_N=16 if m <= 64 else 32, BLOCK_K=slice_d if slice_d == block_d else 16,
                    BLOCK_D=slice_d if compute_grad else 16, num_warps=4, NUM_STAGES=1)
    if not compute_grad:
        cfg = logits_tiles(d, dtype)
        return dict(cfg, BLOCK_D=16, NUM_STAGES=cfg.pop("num_stages"))
    tuned = tuned_config("siglip_grad", m, d, dtype)
    if tuned:
        return tuned
    table = GRAD_CONFIGS_FP32 if dtype == torch.float32 else GRAD_CONFIGS
    _, block_m, block_n, slice_d, block_k, warps, stages = next(t for t in table if block_d <= t[0])
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=slice_d, num_warps=warps,
                NUM_STAGES=stages)


def _launch(a, b, scale_t, bias_t, has_bias, grad_t, n_images, negative_only, compute_loss, compute_grad):
    rows, d = a.shape
    cfg = config(b.shape[0], d, a.dtype, compute_grad)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]) if compute_grad else 1)
    parts = torch.empty((3, grid[0]), dtype=torch.float32, device=a.device)
    da = torch.empty_like(a, memory_format=torch.contiguous_format) if compute_grad else parts  # dummy
    _siglip_kernel[grid](
        a, b, scale_t, bias_t, grad_t, parts, da,
        rows, b.shape[0], d, 1.0 / n_images,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), da.stride(0), da.stride(-1),
        HAS_BIAS=has_bias, POSITIVES=not negative_only, COMPUTE_LOSS=compute_loss, COMPUTE_GRAD=compute_grad,
        ONE_SLICE=one_slice(cfg, d), INPUT_PRECISION=_input_precision(a.dtype), **cfg)
    return parts, (da if compute_grad else None)


def siglip_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
               negative_only: bool, compute_grad: bool, chunk_size: Optional[int] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], None, torch.Tensor, torch.Tensor]:
    """(loss, dI, None, ds, db): fp32 0-d loss and, with ``compute_grad``, dI (image dtype), ds, db (fp32 0-d) for
    an upstream gradient of 1. dT is left to :func:`siglip_bwd_text` (None here). ``chunk_size`` is unused."""
    n = image.shape[0]
    scale_t = _scalar(scale, image)
    bias_t = _scalar(bias, image)
    one = torch.ones((), dtype=torch.float32, device=image.device)
    parts, d_image = _launch(image, text, scale_t, bias_t, bias is not None, one, n, negative_only, True,
                             compute_grad)
    # (3,) -> three separate 0-d tensors (ds and db are garbage without compute_grad)
    loss, ds, db = (t.clone() for t in (parts.sum(dim=1) / n).unbind())
    if not compute_grad:
        return loss, None, None, torch.zeros_like(loss), torch.zeros_like(loss)
    return loss, d_image, None, ds, db


def siglip_bwd_text(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], negative_only: bool, chunk_size: Optional[int] = None
                    ) -> torch.Tensor:
    """dT = g s / N sum_i G_ij I_i, by the transposed launch (A = T, B = I), in the text dtype."""
    scale_t = _scalar(scale, image)
    bias_t = _scalar(bias, image)
    grad_t = grad.reshape(()).to(torch.float32)
    _, d_text = _launch(text, image, scale_t, bias_t, bias is not None, grad_t, image.shape[0], negative_only,
                        False, True)
    return d_text
