"""fastclip: fast, memory-lean CLIP and SigLIP training.

    import fastclip
    loss_fn = fastclip.ContrastiveLoss()            # drop-in for open_clip.ClipLoss
    loss = loss_fn(image_features, text_features, logit_scale)
    siglip = fastclip.SigLIPLoss()                  # drop-in for open_clip.SigLipLoss

``python -m fastclip.info`` lists every backend and why it is or is not available here.
"""
from fastclip.functional import contrastive_loss, flash_attention, siglip_loss  # first: it loads every op
from fastclip import nn  # noqa: F401,I001  (fastclip.nn.MultiheadAttention)
from fastclip.losses import ContrastiveLoss, SigLIPLoss
from fastclip.ops.registry import BackendError

__version__ = "0.1.0"
__all__ = ["ContrastiveLoss", "SigLIPLoss", "contrastive_loss", "siglip_loss", "flash_attention", "BackendError",
           "__version__"]
