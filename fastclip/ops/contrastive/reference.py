"""Naive PyTorch math for the contrastive loss: the specification every fast path is tested against.

It materializes the full N x N logits, exactly as open_clip does, and relies on autograd for gradients. Tests,
benchmarks and the last-resort fallback all import it from here, so they cannot drift apart.
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
