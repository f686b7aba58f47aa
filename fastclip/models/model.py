"""The CLIP model: an image tower, the text tower, a learned temperature (``logit_scale``) and optional bias.

State-dict keys equal open_clip's ``CLIP`` class (and OpenAI's release): ``visual.*`` for the image tower; the text
tower's parts sit at the top level (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``); then ``logit_scale`` and, when configured, ``logit_bias``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, is_dataclass
from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastclip.models.configs import TIMM_VITS, TextCfg, VisionCfg, _cfg
from fastclip.models.modified_resnet import ModifiedResNet
from fastclip.models.timm_vit import TimmVisionTower
from fastclip.models.transformer import (Attention, CrossAttention, LayerNorm, QuickGELU, TextTransformer,
                                         VisionTransformer, encode_text_tokens)

PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")
_TIMM_KWARGS = {"img_size": "image_size", "patch_size": "patch_size", "embed_dim": "width", "depth": "depth",
                "num_heads": "heads", "mlp_ratio": "mlp_ratio", "act_layer": "act"}


def _layers(cfg, quick_gelu: bool):
    """(act_layer, norm_layer) as open_clip's tower builders make them from quick_gelu, act_kwargs, norm_kwargs."""
    act_layer = QuickGELU if quick_gelu else nn.GELU
    if cfg.act_kwargs is not None:
        act_layer = partial(act_layer, **cfg.act_kwargs)
    norm_layer = partial(LayerNorm, **cfg.norm_kwargs) if cfg.norm_kwargs else LayerNorm
    return act_layer, norm_layer


def timm_trunk_args(cfg: VisionCfg) -> dict:
    """The :class:`~fastclip.models.timm_vit.SiglipViT` arguments of ``cfg.timm_model_name`` (timm's definition),
    with ``cfg.timm_kwargs`` (timm.create_model's keyword names) applied."""
    patch_size, width, depth, heads, mlp_ratio, act, image_size = TIMM_VITS[cfg.timm_model_name]
    args = dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth, heads=heads,
                mlp_ratio=mlp_ratio, act=act)
    for k, v in (cfg.timm_kwargs or {}).items():
        if k not in _TIMM_KWARGS:
            raise ValueError(f"vision_cfg: timm_kwargs key {k!r} is not supported (supported: {sorted(_TIMM_KWARGS)})")
        args[_TIMM_KWARGS[k]] = v
    return args


def build_vision_tower(embed_dim: int, vision_cfg: Union[VisionCfg, dict], quick_gelu: bool = False,
                       attn_impl: str = "fastclip") -> nn.Module:
    """The image tower of an open_clip vision config: SigLIP's timm ViT (``timm_model_name``), OpenAI's
    ``ModifiedResNet`` (4-tuple ``layers``) or a ``VisionTransformer``."""
    cfg = _cfg(VisionCfg, vision_cfg)
    if cfg.timm_model_name:  # timm's towers use nn.GELU whatever quick_gelu says, as in open_clip
        return TimmVisionTower(timm_trunk_args(cfg), embed_dim, cfg.image_size, cfg.timm_proj, cfg.timm_proj_bias,
                               cfg.timm_drop, cfg.patch_dropout, attn_impl, cfg.output_tokens)
    if isinstance(cfg.layers, (tuple, list)):
        return ModifiedResNet(layers=cfg.layers, output_dim=embed_dim, heads=cfg.width * 32 // cfg.head_width,
                              image_size=cfg.image_size, width=cfg.width, attn_impl=attn_impl,
                              output_tokens=cfg.output_tokens)
    act_layer, norm_layer = _layers(cfg, quick_gelu)
    return VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                             layers=cfg.layers, heads=cfg.width // cfg.head_width, mlp_ratio=cfg.mlp_ratio,
                             output_dim=embed_dim, act_layer=act_layer, attn_impl=attn_impl,
                             output_tokens=cfg.output_tokens, ls_init_value=cfg.ls_init_value,
                             attentional_pool=cfg.attentional_pool, attn_pooler_queries=cfg.attn_pooler_queries,
                             attn_pooler_heads=cfg.attn_pooler_heads, patch_dropout=cfg.patch_dropout,
                             no_ln_pre=cfg.no_ln_pre, pos_embed_type=cfg.pos_embed_type, pool_type=cfg.pool_type,
                             final_ln_after_pool=cfg.final_ln_after_pool, norm_layer=norm_layer)


def build_text_tower(embed_dim: int, text_cfg: Union[TextCfg, dict], quick_gelu: bool = False,
                     attn_impl: str = "fastclip", text_pad_mask: bool = False) -> TextTransformer:
    """The text tower of an open_clip text config."""
    cfg = _cfg(TextCfg, text_cfg)
    act_layer, norm_layer = _layers(cfg, quick_gelu)
    return TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                           heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=embed_dim,
                           act_layer=act_layer, attn_impl=attn_impl, output_tokens=cfg.output_tokens,
                           text_pad_mask=text_pad_mask, ls_init_value=cfg.ls_init_value, embed_cls=cfg.embed_cls,
                           no_causal_mask=cfg.no_causal_mask, pad_id=cfg.pad_id, eos_id=cfg.eos_id,
                           pool_type=cfg.pool_type, proj_type=cfg.proj_type, proj_bias=cfg.proj_bias,
                           norm_layer=norm_layer)


def _config(embed_dim, vision_cfg, text_cfg, quick_gelu, init_logit_bias, custom_text) -> dict:
    """The open_clip config a model was built from (``model.config``), in open_clip's JSON schema."""
    cfg = {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if init_logit_bias is not None:
        cfg["init_logit_bias"] = init_logit_bias
    if custom_text:
        cfg["custom_text"] = True
    return copy.deepcopy({k: (asdict(v) if is_dataclass(v) else v) for k, v in cfg.items()})


class CLIP(nn.Module):
    """CLIP with open_clip's constructor arguments, methods and outputs.

    Args:
        embed_dim: E, the joint embedding width.
        vision_cfg, text_cfg: dicts (or :class:`VisionCfg`/:class:`TextCfg`) with open_clip's fields.
        quick_gelu: OpenAI's QuickGELU instead of ``nn.GELU`` (OpenAI checkpoints need it).
        init_logit_scale: initial log temperature, log(1/0.07).
        init_logit_bias: if not None, adds a learned ``logit_bias`` (SigLIP) initialized to this value.
        nonscalar_logit_scale: ``logit_scale``/``logit_bias`` of shape (1,) instead of () (open_clip's option).
        attn_impl: "fastclip" (``fastclip.flash_attention``) or "sdpa" (``F.scaled_dot_product_attention``).
        output_dict: ``forward`` returns a dict instead of a tuple, as open_clip's.
        text_pad_mask: also mask text keys past end-of-text (pooled features unchanged, see
            :func:`fastclip.models.transformer.encode_text_tokens`).

    The text tower's parts sit on the model itself (open_clip's ``CLIP`` keys); :class:`CustomTextCLIP` keeps
    them under ``text.`` (open_clip's ``CustomTextCLIP``, the layout of configs with ``"custom_text": true``).
    ``model.config`` is the open_clip config the model was built from.
    """

    custom_text = False

    def __init__(self, embed_dim: int, vision_cfg: Union[VisionCfg, dict], text_cfg: Union[TextCfg, dict],
                 quick_gelu: bool = False, init_logit_scale: float = math.log(1 / 0.07),
                 init_logit_bias: Optional[float] = None, *, nonscalar_logit_scale: bool = False,
                 attn_impl: str = "fastclip", output_dict: bool = False, text_pad_mask: bool = False):
        super().__init__()
        vision_cfg, text_cfg = _cfg(VisionCfg, vision_cfg), _cfg(TextCfg, text_cfg)  # refuse before building
        self.config = _config(embed_dim, vision_cfg, text_cfg, quick_gelu, init_logit_bias, self.custom_text)
        self.output_dict = output_dict
        self.visual = build_vision_tower(embed_dim, vision_cfg, quick_gelu, attn_impl)
        text = build_text_tower(embed_dim, text_cfg, quick_gelu, attn_impl, text_pad_mask)
        self.context_length, self.vocab_size = text.context_length, text.vocab_size
        if self.custom_text:
            self.text = text
        else:
            if text.cls_emb is not None:
                raise ValueError("text_cfg: embed_cls needs the text tower under text.* (\"custom_text\": true), "
                                 "as in open_clip, whose CLIP class drops cls_emb")
            # the text tower's parts live on the model itself: these are open_clip's (and OpenAI's) state-dict keys
            self.transformer = text.transformer
            self.token_embedding = text.token_embedding
            self.positional_embedding = text.positional_embedding
            self.ln_final = text.ln_final
            self.text_projection = text.text_projection
            for name in ("text_pad_mask", "no_causal_mask", "pool_type", "pad_id", "eos_id", "cls_emb"):
                setattr(self, name, getattr(text, name))
        lshape = [1] if nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.ones(lshape) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones(lshape) * init_logit_bias) if init_logit_bias is not None else None

    def _text_tower(self):
        return self.text if self.custom_text else self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (both towers; a no-op for the ResNet, as open_clip's)."""
        self.visual.set_grad_checkpointing(enable)
        self._text_tower().transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        no_wd = {"text." + n for n in self.text.no_weight_decay()} if self.custom_text else {"positional_embedding"}
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
        pooled, tokens = encode_text_tokens(self._text_tower(), text)
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
        if isinstance(m, (Attention, CrossAttention)):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
                if hasattr(m, name):
                    getattr(m, name).data = getattr(m, name).data.to(dtype)
        if isinstance(m, (CLIP, TextTransformer)) and isinstance(getattr(m, "text_projection", None), nn.Parameter):
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


class CustomTextCLIP(CLIP):
    """open_clip's ``CustomTextCLIP`` layout: the text tower is the module ``text`` (keys ``text.*``)."""

    custom_text = True


def build_model_from_config(config: dict, **kwargs) -> CLIP:
    """A model from an open_clip config dict, as open_clip's ``create_model``: :class:`CustomTextCLIP` when the
    config says ``"custom_text": true``, else :class:`CLIP`; ``kwargs`` go to the constructor."""
    cfg = copy.deepcopy(config)
    unknown = set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_bias", "custom_text",
                          "init_logit_scale", "nonscalar_logit_scale"}
    if unknown:
        raise ValueError(f"config keys {sorted(unknown)} are not built by fastclip (CoCa's multimodal_cfg is not)")
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    return cls(**cfg, **kwargs)


__all__ = ["CLIP", "CustomTextCLIP", "build_model_from_config", "build_vision_tower", "build_text_tower",
           "timm_trunk_args", "convert_weights_to_lp", "set_precision", "PRECISIONS"]
