"""fastclip: fast, memory-lean CLIP and SigLIP training.

    import fastclip
    loss_fn = fastclip.ContrastiveLoss()            # drop-in for open_clip.ClipLoss
    loss = loss_fn(image_features, text_features, logit_scale)
    siglip = fastclip.SigLIPLoss()                  # drop-in for open_clip.SigLipLoss

    model = fastclip.create_model("ViT-B-32-quickgelu", pretrained="ViT-B-32.pt")   # CLIP towers, from files
    tokens = fastclip.tokenize(["a photo of a cat"])          # equals open_clip.tokenize
    preprocess = fastclip.image_transform(224)                # equals open_clip's preprocessing

``python -m fastclip.info`` lists every backend and why it is or is not available here.
"""
from fastclip.functional import contrastive_loss, flash_attention, siglip_loss, topk_similarity
from fastclip import nn  # noqa: F401,I001  (fastclip.nn.MultiheadAttention)
from fastclip.losses import ContrastiveLoss, SigLIPLoss
from fastclip.dispatch import BackendError

__version__ = "0.1.0"
__all__ = ["ContrastiveLoss", "SigLIPLoss", "contrastive_loss", "siglip_loss", "flash_attention", "topk_similarity",
           "BackendError",
           "__version__", "create_model", "create_model_from_state_dict", "list_models", "tokenize",
           "get_tokenizer", "image_transform", "from_open_clip", "to_open_clip"]

# Imported on first use: the models, the tokenizer (ftfy, regex, a 1.3 MB merges file) and PIL are not needed by
# users of the losses alone.
_LAZY = {"create_model": "fastclip.models", "create_model_from_state_dict": "fastclip.models",
         "list_models": "fastclip.models", "tokenize": "fastclip.tokenizer", "get_tokenizer": "fastclip.tokenizer",
         "image_transform": "fastclip.transforms", "from_open_clip": "fastclip.models",
         "to_open_clip": "fastclip.models"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")
