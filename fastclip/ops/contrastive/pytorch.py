"""Memory-linear PyTorch path for any device (the CPU default).

Works on row chunks of the logits, ``chunk`` x N at a time, so peak memory is O(N * D + chunk * N); the N x N
matrix never exists. The maths is that of the Triton kernels (see ``fastclip/ops/contrastive/triton.py``):

    S = s * A @ B.T + b                                 (never stored whole)
    r_i = logsumexp_j S_ij,  c_j = logsumexp_i S_ij      (row and column log-sum-exp, each kept as a max m
                                                          and a log-sum ls; backward forms (S - m) - ls,
                                                          exact to rounding where m + ls would round at |S|)
    loss = sum_i (r_i + c_i) / (2N) - (1 - eps) * mean_i S_ii - eps * mean_ij S_ij
    dL/dS_ij = g / (2N) * (P_ij + Q_ij - 2 (1 - eps) [i == j] - 2 eps / N),
        P_ij = exp(S_ij - r_i), Q_ij = exp(S_ij - c_j)

Forward makes one pass (row lse per chunk, column lse merged online); backward one pass that recomputes each
chunk and forms dA and dB (3 GEMMs per chunk). Accumulation is in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Elements of one chunk x N tile. 2**22 fp32 = 16 MB, a handful of which are live at once.
DEFAULT_TILE_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk(n: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n))
    return max(1, min(n, DEFAULT_TILE_ELEMENTS // max(n, 1)))


def _logits(a_chunk, b, scale, bias):
    s = torch.mm(a_chunk, b.T)  # (C, N)
    s.mul_(scale)
    if bias is not None:
        s.add_(bias)
    return s


def _prepare(image, text, scale, bias, chunk_size):
    """Features, scale and bias in the accumulation dtype, and the chunk size."""
    dt = acc_dtype(image.dtype)
    s_val = scale.to(dt).reshape(())
    b_val = bias.to(dt).reshape(()) if bias is not None else None
    n = image.shape[0]
    return n, dt, image.to(dt), text.to(dt), s_val, b_val, default_chunk(n, chunk_size)


def contrastive_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    label_smoothing: float, chunk_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, row_stats, col_stats); loss is 0-d in the accumulation dtype, stats (2, N) = (max, log-sum)."""
    n, dt, a, b, s_val, b_val, chunk = _prepare(image, text, scale, bias, chunk_size)
    row_stats = torch.empty(2, n, dtype=dt, device=image.device)
    col_max = torch.full((n,), float("-inf"), dtype=dt, device=image.device)
    col_sum = torch.zeros(n, dtype=dt, device=image.device)
    for i0 in range(0, n, chunk):
        s = _logits(a[i0:i0 + chunk], b, s_val, b_val)  # (C, N)
        m = s.amax(dim=1)
        row_stats[0, i0:i0 + chunk] = m
        row_stats[1, i0:i0 + chunk] = torch.exp(s - m[:, None]).sum(dim=1).log_()
        # -- merge this chunk's column statistics into the running (max, sum of exp)
        m_new = torch.maximum(col_max, s.amax(dim=0))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        col_sum = col_sum * torch.exp(col_max - m_safe) + torch.exp(s - m_safe).sum(dim=0)
        col_max = m_new
        del s
    m_safe = torch.where(torch.isinf(col_max), torch.zeros_like(col_max), col_max)
    col_stats = torch.stack([m_safe, torch.log(col_sum)])
    diag = s_val * _rowdot(a, b, chunk)  # S_ii, (N,)
    mean_all = s_val * (a.mean(dim=0) @ b.mean(dim=0))
    if b_val is not None:
        diag = diag + b_val
        mean_all = mean_all + b_val
    loss = (row_stats.sum() + col_stats.sum()) / (2 * n) - (1 - label_smoothing) * diag.mean() - label_smoothing * mean_all
    return loss, row_stats, col_stats


def _rowdot(a, b, chunk):
    # sum(a * b, dim=1) without an N x D temporary
    return torch.cat([(a[i:i + chunk] * b[i:i + chunk]).sum(dim=1) for i in range(0, a.shape[0], chunk)])


def contrastive_bwd(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], row_stats: torch.Tensor, col_stats: torch.Tensor,
                    label_smoothing: float, chunk_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_image, d_text, d_scale) for the upstream gradient ``grad`` of the 0-d loss."""
    n, dt, a, b, s_val, b_val, chunk = _prepare(image, text, scale, bias, chunk_size)
    m_r, ls_r = row_stats.to(dt)
    m_c, ls_c = col_stats.to(dt)
    # acc_a = sum_j (P + Q)_ij B_j ; acc_b = sum_i (P + Q)_ij A_i   (the softmax parts; corrections below)
    acc_a = torch.empty_like(a)
    acc_b = torch.zeros_like(b)
    for i0 in range(0, n, chunk):
        s = _logits(a[i0:i0 + chunk], b, s_val, b_val)  # (C, N)
        g = (s - m_r[i0:i0 + chunk, None]).sub_(ls_r[i0:i0 + chunk, None]).exp_()
        g += s.sub_(m_c[None, :]).sub_(ls_c[None, :]).exp_()
        acc_a[i0:i0 + chunk] = g @ b
        acc_b.addmm_(g.T, a[i0:i0 + chunk])
        del s, g
    acc_a = apply_label_corrections(acc_a, b, label_smoothing)
    acc_b = apply_label_corrections(acc_b, a, label_smoothing)
    coef = grad.to(dt) / (2 * n)
    d_scale = coef * (a * acc_a).sum()
    d_image = (coef * s_val) * acc_a
    d_text = (coef * s_val) * acc_b
    return d_image.to(image.dtype), d_text.to(text.dtype), d_scale.reshape(scale.shape).to(scale.dtype)


def apply_label_corrections(acc: torch.Tensor, other: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """acc_i - 2 (1 - eps) other_i - (2 eps / N) sum_j other_j: the one-hot and smoothing terms of dL/dS @ other."""
    n = other.shape[0]
    acc = acc.sub_(other, alpha=2.0 * (1.0 - label_smoothing))
    if label_smoothing:
        acc = acc.sub_(other.sum(dim=0, keepdim=True), alpha=2.0 * label_smoothing / n)
    return acc
