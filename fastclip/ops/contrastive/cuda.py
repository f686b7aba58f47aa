"""The contrastive loss's ``cuda`` backend: the (forward, backward) pair over the compiled extension's kernels.

The kernels (``csrc/contrastive/``) return base-2 row/column statistics (max, log2(1 + rest)), fp32 gradient sums
and per-row fp32 sums sum_j ds_ij <I_i, T_j>; the O(N * D) remainder (the diagonal logits, the loss from the
statistics, label smoothing, the output scaling and d(logit_scale) from those row sums) is done here with PyTorch
ops. The base-2 diagonal logits t_ii are computed once here, by the same torch call in forward and backward, and
handed to both kernels, which substitute them into their tiles: the loss's m_i - t_ii is then exactly 0 where the
diagonal is the row's max, and the backward's softmax on the diagonal is the forward's, whatever the tiling (as in
the Triton backend, ``triton.py``). Loading the extension: ``fastclip/ops/_extension.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastclip.ops.contrastive.pytorch import diag_dots, loss_from_base2_stats

_LOG2E = 1.0 / math.log(2.0)


def _diag2(image: Tensor, text: Tensor, scale32: Tensor) -> Tensor:
    """t_ii = scale log2(e) <I_i, T_i>, (N,) fp32: the diagonal logits both kernels use."""
    return diag_dots(image, text) * (scale32 * _LOG2E)


def contrastive_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], label_smoothing: float,
                    chunk_size: Optional[int]):
    # The bias shifts every logit and so each log-sum-exp and each target logit alike: it cancels.
    scale32 = scale.reshape(1).float()
    diag = _diag2(image, text, scale32)
    row, col = torch.ops.fastclip.contrastive_stats_cuda(image, text, scale32, diag)
    loss = loss_from_base2_stats(row, col, diag, image, text, scale32.reshape(()), None, label_smoothing)
    return loss, row, col


def contrastive_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                    row_stats: Tensor, col_stats: Tensor, label_smoothing: float, chunk_size: Optional[int]):
    n = image.shape[0]
    scale32 = scale.reshape(1).float()
    diag = _diag2(image, text, scale32)
    diag_coef, uniform_coef = 2.0 * (1.0 - label_smoothing), 2.0 * label_smoothing / n
    g_image, ds_dot = torch.ops.fastclip.contrastive_grad_cuda(image, text, scale32, diag, row_stats, col_stats,
                                                               diag_coef, uniform_coef)
    g_text, _ = torch.ops.fastclip.contrastive_grad_cuda(text, image, scale32, diag, col_stats, row_stats, diag_coef,
                                                         uniform_coef, False)  # one ds_dot gives d(scale)
    # dL/ds_ij = ds_ij / 2n, s = scale * I T^T: dI = scale/2n * g_image, dT = scale/2n * g_text and
    # d(scale) = 1/2n * sum_ij ds_ij <I_i, T_j> = 1/2n * sum_i ds_dot_i. Not 1/2n * sum_i <I_i, g_image_i>: the
    # kernel rounds ds to the input dtype before g_image's GEMM, and in a confident row ds = P + Q - 2 nearly
    # cancels, so that sum would carry bf16's 2^-8 of each term (1-3% of d(scale)); ds_dot is summed in fp32 from
    # the unrounded ds.
    g = grad.float().reshape(1) / (2 * n)
    d_scale = (g * ds_dot.sum()).reshape(scale.shape).to(scale.dtype)
    coef = g * scale32
    return (g_image.mul_(coef).to(image.dtype), g_text.mul_(coef).to(text.dtype), d_scale)
