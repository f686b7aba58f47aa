"""The CLIP model: an image tower, the text tower, a learned temperature (``logit_scale``) and optional bias.

State-dict keys equal open_clip's ``CLIP`` class (and OpenAI's release): ``visual.*`` for the image tower; the text
tower's parts sit at the top level (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``); then ``logit_scale`` and, when configured, ``logit_bias``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastclip.models.configs import TextCfg, VisionCfg, _cfg
from fastclip.models.modified_resnet import ModifiedResNet
from fastclip.models.transformer import (Attention, QuickGELU, TextTransformer, VisionTransformer,
                                         encode_text_tokens)

PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")


def build_vision_tower(embed_dim: int, vision_cfg: Union[VisionCfg, dict], quick_gelu: bool = False,
                       attn_impl: str = "fastclip") -> nn.Module:
    """A ``VisionTransformer`` (int ``layers``) or a ``ModifiedResNet`` (4-tuple ``layers``) from an open_clip-style
    vision config."""
    cfg = _cfg(VisionCfg, vision_cfg)
    if isinstance(cfg.layers, (tuple, list)):
        return ModifiedResNet(layers=cfg.layers, output_dim=embed_dim, heads=cfg.width * 32 // cfg.head_width,
                              image_size=cfg.image_size, width=cfg.width, attn_impl=attn_impl)
    return VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                             layers=cfg.layers, heads=cfg.width // cfg.head_width, mlp_ratio=cfg.mlp_ratio,
                             output_dim=embed_dim, act_layer=QuickGELU if quick_gelu else nn.GELU,
                             attn_impl=attn_impl)


def build_text_tower(embed_dim: int, text_cfg: Union[TextCfg, dict], quick_gelu: bool = False,
                     attn_impl: str = "fastclip", text_pad_mask: bool = False) -> TextTransformer:
    cfg = _cfg(TextCfg, text_cfg)
    return TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                           heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=embed_dim,
                           act_layer=QuickGELU if quick_gelu else nn.GELU, attn_impl=attn_impl,
                           text_pad_mask=text_pad_mask)


class CLIP(nn.Module):
    """CLIP with open_clip's constructor arguments, methods and outputs.

    Args:
        embed_dim: E, the joint embedding width.
        vision_cfg, text_cfg: dicts (or :class:`VisionCfg`/:class:`TextCfg`) with open_clip's fields.
        quick_gelu: OpenAI's QuickGELU instead of ``nn.GELU`` (OpenAI checkpoints need it).
        init_logit_scale: initial log temperature, log(1/0.07).
        init_logit_bias: if not None, adds a learned ``logit_bias`` (SigLIP) initialized to this value.
        attn_impl: "fastclip" (``fastclip.flash_attention``) or "sdpa" (``F.scaled_dot_product_attention``).
        output_dict: ``forward`` returns a dict instead of a tuple, as open_clip's.
        text_pad_mask: also mask text keys past end-of-text (pooled features unchanged, see
            :func:`fastclip.models.transformer.encode_text_tokens`).
    """

    def __init__(self, embed_dim: int, vision_cfg: Union[VisionCfg, dict], text_cfg: Union[TextCfg, dict],
                 quick_gelu: bool = False, init_logit_scale: float = math.log(1 / 0.07),
                 init_logit_bias: Optional[float] = None, *, attn_impl: str = "fastclip", output_dict: bool = False,
                 text_pad_mask: bool = False):
        super().__init__()
        self.output_dict = output_dict
        self.visual = build_vision_tower(embed_dim, vision_cfg, quick_gelu, attn_impl)
        text = build_text_tower(embed_dim, text_cfg, quick_gelu, attn_impl, text_pad_mask)
        # the text tower's parts live on the model itself: these are open_clip's (and OpenAI's) state-dict keys
        self.transformer = text.transformer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.context_length, self.vocab_size = text.context_length, text.vocab_size
        self.text_pad_mask = text_pad_mask
        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones([]) * init_logit_bias) if init_logit_bias is not None else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (both towers; a no-op for the ResNet, as open_clip's)."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        no_wd = {"positional_embedding"}
        if hasattr(self.visual, "no_weight_decay"):
            no_wd |= {"visual." + n for n in self.visual.no_weight_decay()}
        return no_wd

    def encode_image(self, image: Tensor, normalize: bool = False, *, output_tokens: bool = False):
        """image (B, 3, H, W) -> (B, E); with ``output_tokens``, ((B, E), tokens) where tokens are the ViT's patch
        tokens after ln_post (B, N, width) or the ResNet's last feature map as (B, h*w, 32 * width)."""
        pooled, tokens = self.visual.forward_features(image)
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return (pooled, tokens) if output_tokens else pooled

    def encode_text(self, text: Tensor, normalize: bool = False, *, output_tokens: bool = False):
        """text (B, S) token ids, S <= context_length -> (B, E); with ``output_tokens``, ((B, E), (B, S, width))."""
        pooled, tokens = encode_text_tokens(self, text)
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return (pooled, tokens) if output_tokens else pooled

    def get_logits(self, image: Tensor, text: Tensor):
        """(image_logits (B_i, B_t), text_logits (B_t, B_i)) = logit_scale.exp() * cosine similarities (+ bias)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        image_logits = self.logit_scale.exp() * image_features @ text_features.T
        if self.logit_bias is not None:
            image_logits = image_logits + self.logit_bias
        return image_logits, image_logits.T

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None):
        """(normalized image features (B, E), normalized text features (B, E), logit_scale.exp()[, logit_bias]),
        or a dict with those keys when ``output_dict``; a missing input gives None in its place."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features,
                   "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()


def convert_weights_to_lp(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """OpenAI's mixed precision: linear/conv/attention weights and the projections in ``dtype``; LayerNorm,
    BatchNorm, embeddings and ``logit_scale`` stay fp32 (as open_clip's ``convert_weights_to_lp``)."""

    def _convert(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        if isinstance(m, Attention):
            m.in_proj_weight.data = m.in_proj_weight.data.to(dtype)
            m.in_proj_bias.data = m.in_proj_bias.data.to(dtype)
        if isinstance(m, (CLIP, TextTransformer)) and m.text_projection is not None:
            m.text_projection.data = m.text_projection.data.to(dtype)
        if isinstance(m, VisionTransformer):
            m.proj.data = m.proj.data.to(dtype)

    model.apply(_convert)
    return model


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """"fp32"; "fp16"/"bf16": OpenAI's mixed precision (:func:`convert_weights_to_lp`); "pure_fp16"/"pure_bf16":
    every parameter in that dtype. For training with autocast keep "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model.float()
    if precision in ("fp16", "bf16"):
        convert_weights_to_lp(model, torch.float16 if precision == "fp16" else torch.bfloat16)
    elif precision in ("pure_fp16", "pure_bf16"):
        model.to(torch.float16 if precision == "pure_fp16" else torch.bfloat16)
    return model


__all__ = ["CLIP", "build_vision_tower", "build_text_tower", "convert_weights_to_lp", "set_precision",
           "PRECISIONS"]
