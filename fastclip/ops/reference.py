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
