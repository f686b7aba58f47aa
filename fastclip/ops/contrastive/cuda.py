"""The contrastive loss's ``cuda`` backend: the (forward, backward) pair over the compiled extension's kernels.

The kernels (``csrc/contrastive/``) return base-2 row/column statistics and fp32 gradient sums; the O(N * D)
remainder of the loss (the diagonal, label smoothing, the output scaling and d(logit_scale)) is done here with
PyTorch ops. Loading the extension: ``fastclip/ops/_extension.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_LN2 = math.log(2.0)
_ROW_CHUNK = 1 << 16  # rows per chunk of the O(N * D) fp32 work, so it never holds a full fp32 copy of a feature


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_k a[i, k] * b[i, k] (or b[k] for a vector b) in fp32, chunked over rows."""
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], _ROW_CHUNK):
        bb = b[s:s + _ROW_CHUNK].float() if b.dim() == 2 else b
        out[s:s + _ROW_CHUNK] = (a[s:s + _ROW_CHUNK].float() * bb).sum(1)
    return out


def _colmean(a: Tensor) -> Tensor:
    acc = torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], _ROW_CHUNK):
        acc += a[s:s + _ROW_CHUNK].float().sum(0)
    return acc / a.shape[0]


def contrastive_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], label_smoothing: float,
                    chunk_size: Optional[int]):
    # The bias shifts every logit and so each log-sum-exp and each target logit alike: it cancels.
    scale32 = scale.reshape(1).float()
    row, col = torch.ops.fastclip.contrastive_stats_cuda(image, text, scale32)
    lse_row = (row[0] + row[1]) * _LN2
    lse_col = (col[0] + col[1]) * _LN2
    diag = scale32 * _rowdot(image, text)
    eps = label_smoothing
    loss_row = lse_row - (1.0 - eps) * diag
    loss_col = lse_col - (1.0 - eps) * diag
    if eps:
        loss_row = loss_row - eps * scale32 * _rowdot(image, _colmean(text))
        loss_col = loss_col - eps * scale32 * _rowdot(text, _colmean(image))
    loss = 0.5 * (loss_row.mean() + loss_col.mean())
    return loss, row, col


def contrastive_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                    row_stats: Tensor, col_stats: Tensor, label_smoothing: float, chunk_size: Optional[int]):
    n = image.shape[0]
    scale32 = scale.reshape(1).float()
    diag_coef, uniform_coef = 2.0 * (1.0 - label_smoothing), 2.0 * label_smoothing / n
    g_image = torch.ops.fastclip.contrastive_grad_cuda(image, text, scale32, row_stats, col_stats, diag_coef,
                                                       uniform_coef)
    g_text = torch.ops.fastclip.contrastive_grad_cuda(text, image, scale32, col_stats, row_stats, diag_coef,
                                                      uniform_coef)
    # dL/ds_ij = ds_ij / 2n, s = scale * I T^T: dI = scale/2n * g_image, dT = scale/2n * g_text and
    # d(scale) = 1/2n * sum_i <I_i, g_image_i>.
    g = grad.float().reshape(1) / (2 * n)
    d_scale = (g * _rowdot(image, g_image).sum()).reshape(scale.shape).to(scale.dtype)
    coef = g * scale32
    return (g_image.mul_(coef).to(image.dtype), g_text.mul_(coef).to(text.dtype), d_scale)
