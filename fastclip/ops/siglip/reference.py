"""SigLIP's sigmoid loss by its definition: the specification every fast path is tested against (materializes
the N x M logits, as open_clip does; autograd gives the gradients)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def siglip_loss_ref(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: Optional[torch.Tensor] = None, negative_only: bool = False) -> torch.Tensor:
    """SigLIP's sigmoid loss, as open_clip's ``SigLipLoss._loss`` computes it on one process.

    S = logit_scale * I @ T.T (+ logit_bias), shape (N, M); z_ij = +1 on the diagonal (i == j), -1 elsewhere (-1
    everywhere with ``negative_only``, for blocks of another rank's texts); loss = -sum_ij log sigmoid(z_ij S_ij) / N.
    """
    logits = logit_scale * image_features @ text_features.T  # (N, M)
    if logit_bias is not None:
        logits = logits + logit_bias
    # labels in the features' dtype, as open_clip's: under autocast the logits are bf16/fp16 and the product
    # with fp32 labels promotes the log-sigmoid to fp32
    labels = -torch.ones(logits.shape, dtype=image_features.dtype, device=logits.device)
    if not negative_only:
        labels = labels + 2 * torch.eye(*logits.shape, dtype=image_features.dtype, device=logits.device)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
