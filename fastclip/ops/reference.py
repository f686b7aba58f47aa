"""Naive PyTorch math: the specification every fast path is tested against.

These functions materialize the full N x N logits, exactly as open_clip does, and rely on autograd for
gradients. Tests, benchmarks and the last-resort fallback all import them from here, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def contrastive_loss_ref(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                         logit_bias: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, as open_clip's ``ClipLoss`` computes it on one process.

    S = logit_scale * I @ T.T (+ logit_bias), shape (N, N); loss = (CE(S, arange) + CE(S.T, arange)) / 2.
    ``label_smoothing`` has ``F.cross_entropy``'s meaning.
    """
    logits_per_image = logit_scale * image_features @ text_features.T  # (N, N)
    logits_per_text = logit_scale * text_features @ image_features.T  # (N, N)
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)) / 2


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                  key_padding_mask: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                  upcast: bool = True) -> torch.Tensor:
    """Scaled dot-product attention by the definition, materializing the (B, H, S_q, S_k) scores.

    q: (B, S_q, H, D), k and v: (B, S_k, H, D); ``key_padding_mask`` (B, S_k) bool, True = padding key (ignored);
    ``causal``: query i sees keys j <= i (top-left aligned, as SDPA's ``is_causal``). A query that sees no key gets
    zeros (and zero gradients). ``upcast``: compute in fp32 (fp64 stays fp64) and cast back; ``upcast=False``
    computes in the inputs' dtype (the "same-dtype PyTorch" of flash-attn's error criterion).
    Returns (B, S_q, H, D) in q's dtype.
    """
    dtype = q.dtype
    if upcast:
        up = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(up), k.to(up), v.to(up)
    s_q, s_k, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bshd,bthd->bhst", q * scale, k)  # (B, H, S_q, S_k)
    valid = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        valid = valid.tril()
    valid = valid[None, None]  # (1, 1, S_q, S_k)
    if key_padding_mask is not None:
        valid = valid & ~key_padding_mask[:, None, None, :]  # (B, 1, S_q, S_k)
    # a query with no valid key: softmax over nothing. Unmask its row (finite softmax and gradient), zero it after.
    empty = ~valid.any(-1, keepdim=True)  # (B or 1, 1, S_q, 1)
    scores = scores.masked_fill(~(valid | empty), float("-inf"))
    p = torch.where(empty, torch.zeros((), dtype=scores.dtype, device=q.device), scores.softmax(-1))
    out = torch.einsum("bhst,bthd->bshd", p, v)  # (B, S_q, H, D)
    return out.to(dtype)


def siglip_loss_ref(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: Optional[torch.Tensor] = None, negative_only: bool = False) -> torch.Tensor:
    """SigLIP's sigmoid loss, as open_clip's ``SigLipLoss._loss`` computes it on one process.

    S = logit_scale * I @ T.T (+ logit_bias), shape (N, M); z_ij = +1 on the diagonal (i == j), -1 elsewhere (-1
    everywhere with ``negative_only``, for blocks of another rank's texts); loss = -sum_ij log sigmoid(z_ij S_ij) / N.
    """
    logits = logit_scale * image_features @ text_features.T  # (N, M)
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = labels + 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
