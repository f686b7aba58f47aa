"""Memory-linear PyTorch path for any device (the CPU default).

Works on row chunks of the logits, ``chunk`` x N at a time, so peak memory is O(N * D + chunk * N); the N x N
matrix never exists. The maths is that of the Triton kernels (see ``fastclip/ops/contrastive/triton.py``):

    S = s * A @ B.T + b                                 (never stored whole)
    r_i = logsumexp_j S_ij,  c_j = logsumexp_i S_ij      (row and column log-sum-exp, each kept as a max m
                                                          and a log-sum ls; backward forms (S - m) - ls,
                                                          exact to rounding where m + ls would round at |S|)
    loss = (1 - eps) mean_i (-log P_ii - log Q_ii) / 2 + eps (sum_i (r_i + c_i) / (2N) - mean_ij S_ij)
    dL/dS_ij = g / (2N) * (P_ij + Q_ij - 2 (1 - eps) [i == j] - 2 eps / N),
        P_ij = exp(S_ij - r_i), Q_ij = exp(S_ij - c_j)

Confident rows (P_ii -> 1, late in training at scale 100) are where naive fp32 maths fails: lse_i - S_ii and
P_ii - 1 are differences of nearly equal numbers. So the log-sum is log1p of the "rest" (the sum of exp(S - m)
minus the max's own 1, never formed as 1 + rest), -log P_ii = (m_i - S_ii) + ls_i (exactly ls_i where the diagonal
is the max), and the backward forms P_ii - 1 = expm1(S_ii - r_i) in the tile, before any GEMM or rounding.

Forward makes one pass (row lse per chunk, column lse merged online); backward one pass that recomputes each
chunk and forms dA and dB (3 GEMMs per chunk). Accumulation is in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# Elements of one chunk x N tile. 2**22 fp32 = 16 MB, a handful of which are live at once.
DEFAULT_TILE_ELEMENTS = 1 << 22
LN2 = math.log(2.0)


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


def merge_partials(m: torch.Tensor, rest: torch.Tensor, exp=torch.exp):
    """Merge G log-sum-exp partials along dim 0, each (max m, rest r) with sum_k exp(x_k - m) = 1 + r over its part.

    Keeping r = (sum - 1) rather than the sum keeps a confident row exact: when one logit dominates, r ~ 1 - p is
    tiny and 1 + r would round it away. The merge never forms 1 + r of the part holding the max (the first such
    part, so the result does not depend on anything but the inputs). An empty part is (-inf, -1). ``exp``: the
    base's exponential (``torch.exp2`` for base-2 partials). Returns (max, rest), each shape m.shape[1:].
    """
    top = m.argmax(dim=0, keepdim=True)
    m_max = m.gather(0, top)
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    first = torch.arange(m.shape[0], device=m.device).view(-1, *([1] * (m.dim() - 1))) == top
    terms = torch.where(first, rest, (1 + rest) * exp(m - m_safe))
    return m_max.squeeze(0), terms.sum(dim=0)


def diag_dots(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """<A_i, B_i> in fp32, (N,): S_ii's one definition in the fused backends (Triton, CUDA), which forward and
    backward both compute by this same torch call (bitwise the same) and substitute into their tiles."""
    return torch.cat([torch.linalg.vecdot(a[i:i + rows].float(), b[i:i + rows].float())
                      for i in range(0, a.shape[0], rows)])


def loss_from_base2_stats(row_stats: torch.Tensor, col_stats: torch.Tensor, diag: torch.Tensor, image: torch.Tensor,
                          text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                          label_smoothing: float) -> torch.Tensor:
    """The loss (fp32, 0-d) from the fused kernels' base-2 statistics, (2, N) = (max m, log2(1 + rest)), and the
    base-2 diagonal logits ``diag`` they substituted into their tiles:

        -log2 P_ii = (m_i - diag_i) + ls_i    (exactly ls_i where the diagonal is the row's max)
        loss = (1 - eps) ln2 mean_i (-log2 P_ii - log2 Q_ii) / 2 + eps (ln2 sum_i (r_i + c_i) / (2N) - mean_ij S_ij)
    """
    n = image.shape[0]
    nll = (row_stats[0] - diag) + row_stats[1] + (col_stats[0] - diag) + col_stats[1]  # (N,)
    loss = (1.0 - label_smoothing) * LN2 / 2 * nll.mean()
    if label_smoothing:
        # the mean of all logits only matters with label smoothing: O(N D)
        mean_all = scale.float() * (image.mean(0, dtype=torch.float32) @ text.mean(0, dtype=torch.float32))
        if bias is not None:
            mean_all = mean_all + bias.float()
        loss = loss + label_smoothing * ((row_stats.sum() + col_stats.sum()) * LN2 / (2 * n) - mean_all)
    return loss.reshape(())


def rest_stats(s: torch.Tensor, dim: int):
    """(max, rest) of ``s`` along ``dim``: rest = sum exp(s - max) - 1, the maxima counted as exactly 1 each."""
    m = s.amax(dim=dim, keepdim=True)
    top = s == m
    rest = torch.exp(s - m).masked_fill_(top, 0.0).sum(dim=dim) + (top.sum(dim=dim) - 1)
    return m.squeeze(dim), rest


def contrastive_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    label_smoothing: float, chunk_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, row_stats, col_stats); loss is 0-d in the accumulation dtype, stats (2, N) = (max, log-sum).

    The loss is formed from -log p_ii = (m_i - S_ii) + log-sum_i, exact to rounding even where p_ii -> 1 (a plain
    lse_i - S_ii would cancel to nothing at |S| = 100).
    """
    n, dt, a, b, s_val, b_val, chunk = _prepare(image, text, scale, bias, chunk_size)
    row_stats = torch.empty(2, n, dtype=dt, device=image.device)
    diag = torch.empty(n, dtype=dt, device=image.device)
    col_max = torch.full((n,), float("-inf"), dtype=dt, device=image.device)
    col_rest = torch.full((n,), -1.0, dtype=dt, device=image.device)
    for i0 in range(0, n, chunk):
        s = _logits(a[i0:i0 + chunk], b, s_val, b_val)  # (C, N)
        diag[i0:i0 + s.shape[0]] = s.diagonal(i0)
        m, rest = rest_stats(s, dim=1)
        row_stats[0, i0:i0 + chunk] = m
        row_stats[1, i0:i0 + chunk] = torch.log1p(rest)
        m_c, rest_c = rest_stats(s, dim=0)
        col_max, col_rest = merge_partials(torch.stack([col_max, m_c]), torch.stack([col_rest, rest_c]))
        del s
    col_stats = torch.stack([col_max, torch.log1p(col_rest)])
    # -log p_ii and -log q_ii: (m - S_ii) is exactly 0 where the diagonal is the max
    nll = (row_stats[0] - diag) + row_stats[1] + (col_max - diag) + col_stats[1]  # (N,)
    loss = (1 - label_smoothing) * nll.mean() / 2
    if label_smoothing:
        mean_all = s_val * (a.mean(dim=0) @ b.mean(dim=0)) + (b_val if b_val is not None else 0.0)
        loss = loss + label_smoothing * ((row_stats.sum() + col_stats.sum()) / (2 * n) - mean_all)
    return loss, row_stats, col_stats


def _rowdot(a, b, chunk):
    # sum(a * b, dim=1) without an N x D temporary
    return torch.cat([(a[i:i + chunk] * b[i:i + chunk]).sum(dim=1) for i in range(0, a.shape[0], chunk)])


def contrastive_bwd(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], row_stats: torch.Tensor, col_stats: torch.Tensor,
                    label_smoothing: float, chunk_size: Optional[int] = None, *, targets: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d_image, d_text, d_scale) for the upstream gradient ``grad`` of the 0-d loss.

    Each chunk's G = 2N dL/dS / g is formed whole, targets included, before its GEMMs: on the diagonal
    P_ii - 1 = expm1(S_ii - lse_i), so a confident row's small gradient is never the difference of two large
    accumulated terms. ``targets=False`` leaves the targets out, G = P + Q: a block of the distributed ring whose
    pairs are all negatives (the statistics then come from the whole row and column).
    """
    n, dt, a, b, s_val, b_val, chunk = _prepare(image, text, scale, bias, chunk_size)
    m_r, ls_r = row_stats.to(dt)
    m_c, ls_c = col_stats.to(dt)
    eps = label_smoothing
    acc_a = torch.empty_like(a)  # sum_j G_ij B_j
    acc_b = torch.zeros_like(b)  # sum_i G_ij A_i
    for i0 in range(0, n, chunk):
        s = _logits(a[i0:i0 + chunk], b, s_val, b_val)  # (C, N)
        rows = slice(i0, i0 + s.shape[0])
        s_ii = s.diagonal(i0).clone()
        g = (s - m_r[rows, None]).sub_(ls_r[rows, None]).exp_()
        g += s.sub_(m_c[None, :]).sub_(ls_c[None, :]).exp_()
        # the targets: -2 (1 - eps) on the diagonal, -2 eps / N everywhere
        if targets:
            g.diagonal(i0).copy_(torch.expm1((s_ii - m_r[rows]) - ls_r[rows])
                                 + torch.expm1((s_ii - m_c[rows]) - ls_c[rows]) + 2 * eps)
        if eps:
            g -= 2 * eps / n
        acc_a[rows] = g @ b
        acc_b.addmm_(g.T, a[rows])
        del s, g
    coef = grad.to(dt) / (2 * n)
    d_scale = coef * (a * acc_a).sum()
    d_image = (coef * s_val) * acc_a
    d_text = (coef * s_val) * acc_b
    return d_image.to(image.dtype), d_text.to(text.dtype), d_scale.reshape(scale.shape).to(scale.dtype)
