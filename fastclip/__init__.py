"""fastclip: fast, memory-lean CLIP and SigLIP training.

    import fastclip
    loss_fn = fastclip.ContrastiveLoss()            # drop-in for open_clip.ClipLoss
    loss = loss_fn(image_features, text_features, logit_scale)

``python -m fastclip.info`` lists every backend and why it is or is not available here.
"""
from fastclip.functional import contrastive_loss
from fastclip.attention import flash_attention
from fastclip.losses import ContrastiveLoss
from fastclip import nn  # noqa: F401  (fastclip.nn.MultiheadAttention)
from fastclip.ops.registry import BackendError

__version__ = "0.1.0"
__all__ = ["ContrastiveLoss", "contrastive_loss", "flash_attention", "BackendError", "__version__"]
