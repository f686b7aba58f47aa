"""``nn.Module`` losses with open_clip's signatures. They hold arguments and call ``fastclip.functional``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastclip import functional as F


class ContrastiveLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss``: same arguments, same values and gradients, memory linear in N.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns a 0-d
    tensor, or ``{"contrastive_loss": loss}`` with ``output_dict=True``. ``logit_scale`` arrives exponentiated.

    Keyword-only extras: ``backend`` ("auto", "reference", "torch", "triton", "cuda"), ``chunk_size`` (rows per
    chunk on the "torch" backend) and ``label_smoothing`` (``F.cross_entropy``'s meaning, both directions).
    ``cache_labels`` is accepted for compatibility; fastclip never builds a label tensor.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, *, backend: str = "auto", chunk_size: Optional[int] = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.chunk_size = chunk_size
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size > 1:
            raise NotImplementedError("ContrastiveLoss with world_size > 1 is not implemented yet; "
                                      "use open_clip's ClipLoss for distributed training for now")
        loss = F.contrastive_loss(image_features, text_features, logit_scale, logit_bias,
                                  label_smoothing=self.label_smoothing, backend=self.backend,
                                  chunk_size=self.chunk_size)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}, label_smoothing={self.label_smoothing}")
