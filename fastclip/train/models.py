"""The models ``fastclip train`` builds: any ``fastclip.list_models()`` name, plus the tiny configs below.

The tiny configs (open_clip's config format) are for CPU demos and tests, with a short-context text tower (3.2M of
their parameters are the token embedding of CLIP's 49,408-token vocabulary). They are built with
:class:`fastclip.models.CLIP`, the class every named model uses.

- ``tiny``: a 32 x 32 ViT with 4 x 4 patches, about 3.4M parameters.
- ``tiny-rn``: OpenAI's ModifiedResNet at 32 x 32 (one bottleneck block per stage, width 16, attention pooling),
  about 4.6M parameters. On the synthetic shapes it learns the shape as well as the colour within a few hundred
  steps, where ``tiny`` learns the colour only: a convolution sees an edge or a corner the same way wherever the
  shape lies, which a ViT trained from scratch has to learn position by position. (Width 8 learned the shapes
  83-89% right in 300 steps of 128, width 16 in 400 steps 72-99.9% over seven seeds, 94-99.9% at five of them.)
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import torch

TINY_MODELS: Dict[str, dict] = {
    "tiny": {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
             "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
    "tiny-rn": {"embed_dim": 64,
                "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
                "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
}
# SigLIP's initialization (Zhai et al. 2023): t' = log 10, b = -10
SIGLIP_INIT = (math.log(10.0), -10.0)


def available_models() -> List[str]:
    import fastclip

    return list(TINY_MODELS) + fastclip.list_models()


def build_model(name: str, *, pretrained: Optional[str] = None, siglip: bool = False, attn_impl: str = "fastclip"):
    """A ``fastclip.models.CLIP`` for training: the named config, randomly initialized (CLIP's t' = log(1/0.07),
    or SigLIP's t' = log 10, b = -10 with ``siglip``), then loaded from the checkpoint file ``pretrained``."""
    import fastclip
    from fastclip.models import CLIP, load_checkpoint

    init_scale, init_bias = SIGLIP_INIT if siglip else (math.log(1 / 0.07), None)
    if name in TINY_MODELS:
        model = CLIP(**copy.deepcopy(TINY_MODELS[name]), init_logit_scale=init_scale, init_logit_bias=init_bias,
                     attn_impl=attn_impl)
        if pretrained is not None:
            load_checkpoint(model, pretrained)
        return model
    if name not in fastclip.list_models():
        raise ValueError(f"--model {name!r} is unknown; available: {', '.join(available_models())}")
    model = fastclip.create_model(name, pretrained, init_logit_bias=init_bias, attn_impl=attn_impl)
    if pretrained is None:
        with torch.no_grad():
            model.logit_scale.fill_(init_scale)
    return model


__all__ = ["TINY_MODELS", "SIGLIP_INIT", "available_models", "build_model"]
