"""Memory-linear PyTorch path of SigLIP's sigmoid loss, any device (the CPU default).

Notation: A = image features (N, D), B = text features (M, D), s = logit_scale (exp'd), b = logit_bias,
X = A @ B.T, S = s X + b; z_ij = +1 where i == j (unless ``negative_only``), -1 elsewhere.

    loss     = sum_ij softplus(-z_ij S_ij) / N                      (= -sum log sigmoid(z S) / N)
    dL/dS_ij = g / N * (sigmoid(S_ij) - [z_ij = +1])                 (g: upstream gradient of the 0-d loss)
    dA = s dL/dS @ B      dB = s dL/dS^T @ A      ds = sum dL/dS * X      db = sum dL/dS

The loss is elementwise in the logits, so no statistic over a whole row or column is needed before the gradient
can be formed: the forward pass, when a gradient is wanted, makes the gradients for g = 1 in the same sweep over
row chunks (3 GEMMs per chunk, 6 N M D FLOPs in all, nothing recomputed), and the backward only multiplies them
by g. Peak memory is O((N + M) D) for the inputs and unit gradients plus O(chunk * M) for a few chunk x M tiles;
the N x M logits never exist. Accumulation is in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastclip.ops.contrastive.pytorch import DEFAULT_TILE_ELEMENTS, acc_dtype


def _softplus_(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) in place, stable for any x and exact in the tails: max(x, 0) + log1p(exp(-|x|)).

    (``F.softplus`` returns x itself above its threshold of 20, which is 2e-9 off: visible in fp64 tests.)
    """
    t = torch.exp(-x.abs())
    return x.clamp_(min=0).add_(t.log1p_())


def siglip_fwd(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
               negative_only: bool, compute_grad: bool, chunk_size: Optional[int] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(loss, dA, dB, ds, db): the loss (0-d, accumulation dtype) and, when ``compute_grad``, its gradients for an
    upstream gradient of 1 (dA, dB in the accumulation dtype; None otherwise)."""
    n, m = image.shape[0], text.shape[0]
    dt = acc_dtype(image.dtype)
    a, b = image.to(dt), text.to(dt)
    s_val = scale.to(dt).reshape(())
    b_val = bias.to(dt).reshape(()) if bias is not None else None
    chunk = max(1, min(n, int(chunk_size) if chunk_size else DEFAULT_TILE_ELEMENTS // max(m, 1)))
    loss = torch.zeros((), dtype=dt, device=image.device)
    ds = torch.zeros((), dtype=dt, device=image.device)
    db = torch.zeros((), dtype=dt, device=image.device)
    da = torch.empty_like(a) if compute_grad else None
    dbt = torch.zeros_like(b) if compute_grad else None
    for i0 in range(0, n, chunk):
        a_c = a[i0:i0 + chunk]
        x = a_c @ b.T  # (C, M) raw dot products
        s = torch.mul(x, s_val)
        if b_val is not None:
            s.add_(b_val)
        if compute_grad:
            g = torch.sigmoid(s)  # (C, M): N dL/dS for the negatives
        if not negative_only:
            # positives sit at (r, i0 + r), the chunk's diagonal at offset i0: their loss is softplus(-S_ii)
            pos = _softplus_(-s.diagonal(i0))
            if compute_grad:
                # sigmoid(S_ii) - 1 = -sigmoid(-S_ii): no cancellation where the pair is confident
                g.diagonal(i0).copy_(torch.sigmoid(-s.diagonal(i0)).neg_())
        sp = _softplus_(s)  # in place: softplus(S), each negative's loss
        if not negative_only:
            sp.diagonal(i0).copy_(pos)
        chunk_loss = sp.sum()
        loss += chunk_loss
        del sp, s
        if compute_grad:
            da[i0:i0 + chunk] = g @ b
            dbt.addmm_(g.T, a_c)
            ds += (g * x).sum()
            db += g.sum()
            del g
        del x
    inv_n = 1.0 / n
    loss = loss * inv_n
    if compute_grad:
        # dA = s / N * G @ B (and likewise dB); ds, db are sums of dL/dS
        da.mul_(s_val * inv_n)
        dbt.mul_(s_val * inv_n)
        ds = ds * inv_n
        db = db * inv_n
    return loss, da, dbt, ds, db


def siglip_bwd_text(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], negative_only: bool, chunk_size: Optional[int] = None
                    ) -> torch.Tensor:
    """dB for the upstream gradient ``grad`` (the forward always makes dB here, so this is only for symmetry)."""
    _, _, dbt, _, _ = siglip_fwd(image, text, scale, bias, negative_only, True, chunk_size)
    return (dbt * grad.to(dbt.dtype)).to(text.dtype)
