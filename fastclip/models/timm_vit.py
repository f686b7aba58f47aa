"""SigLIP's vision tower without timm: timm's ``VisionTransformer`` as open_clip wraps it (``TimmModel``).

open_clip names SigLIP's image towers by a timm model (``vit_base_patch16_siglip_224``, ...) and wraps it as
``visual.trunk`` (the timm model) and ``visual.head`` (open_clip's projection, empty for SigLIP). This module
builds the same network from :data:`fastclip.models.configs.TIMM_VITS`, with timm's parameter names, so that
open_clip's SigLIP and SigLIP 2 checkpoints load strictly in both directions; attention runs on
``fastclip.flash_attention``.

image (B, 3, H, W) -> patch_embed.proj (conv p x p, stride p, with bias) -> (B, N, C) + pos_embed (1, N, C) (no
class token) -> patch dropout (training) -> blocks (pre-LN: x + attn(norm1(x)), x + mlp(norm2(x)), LayerNorm eps
1e-6, GELU or GELU-tanh) -> norm -> attn_pool ("map": a learned latent query attends over the N tokens, then
proj, then + mlp(norm(.))) -> (B, C) -> head (identity, or Linear(C, E)).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastclip.models.transformer import _check_attn_impl, _to_2tuple, attend, patch_dropout

_ACTS = {"gelu": partial(nn.GELU), "gelu_tanh": partial(nn.GELU, approximate="tanh")}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, N, C)


class TimmAttention(nn.Module):
    """timm's ``Attention``: ``qkv`` Linear(C, 3C), ``proj`` Linear(C, C). x: (B, S, C) -> (B, S, C)."""

    def __init__(self, dim: int, heads: int, attn_impl: str):
        super().__init__()
        self.heads, self.head_dim, self.attn_impl = heads, dim // heads, attn_impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)  # (B, S, H, D) views
        return self.proj(attend(q, k, v, self.attn_impl).reshape(B, S, C))


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act_layer):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, act_layer, norm_layer, attn_impl: str):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TimmAttention(dim, heads, attn_impl)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolLatent(nn.Module):
    """timm's "map" head: a learned ``latent`` (1, 1, C) query, ``q`` Linear(C, C), ``kv`` Linear(C, 2C) over
    the tokens, multi-head attention, ``proj``, then x + mlp(norm(x)). x: (B, N, C) -> (B, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, act_layer, norm_layer, attn_impl: str):
        super().__init__()
        self.heads, self.head_dim, self.attn_impl = heads, dim // heads, attn_impl
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5, a=-2 * dim ** -0.5, b=2 * dim ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q = self.q(self.latent).view(1, 1, self.heads, self.head_dim).expand(B, 1, -1, -1)  # (B, 1, H, D)
        k, v = self.kv(x).view(B, N, 2, self.heads, self.head_dim).unbind(2)  # (B, N, H, D) views
        x = self.proj(attend(q, k, v, self.attn_impl).reshape(B, 1, C))  # (B, 1, C)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class SiglipViT(nn.Module):
    """The timm trunk (module and parameter names as timm's ``VisionTransformer(class_token=False,
    global_pool="map")``). x (B, 3, H, W) -> (B, C), or (B, E) with ``num_classes=E``."""

    def __init__(self, image_size, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 act: str, num_classes: int = 0, patch_drop_rate: float = 0.0, attn_impl: str = "fastclip"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.image_size, self.patch_size = _to_2tuple(image_size), _to_2tuple(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.patch_drop_rate = patch_drop_rate
        self.grad_checkpointing = False
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        act_layer = _ACTS[act]
        _check_attn_impl(attn_impl)
        self.patch_embed = PatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid_size[0] * self.grid_size[1], width) * .02)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, act_layer, norm_layer, attn_impl)
                                      for _ in range(depth)])
        self.norm = norm_layer(width)
        self.attn_pool = AttentionPoolLatent(width, heads, mlp_ratio, act_layer, norm_layer, attn_impl)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> tokens after the final norm (B, N, C)."""
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype)) + self.pos_embed.to(x.dtype)
        if self.training and self.patch_drop_rate > 0:
            x = patch_dropout(x, self.patch_drop_rate, 0, lowest=True)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn_pool(self.forward_features(x)))


class TimmVisionTower(nn.Module):
    """open_clip's ``TimmModel`` around :class:`SiglipViT`: ``trunk`` then ``head`` (empty for ``timm_proj``
    "none"; ``drop`` + ``proj`` Linear(C, E) for "linear"; a null ``timm_proj`` puts Linear(C, E) in the trunk's
    own ``head``, as timm's ``num_classes``). image (B, 3, H, W) -> (B, E); with ``output_tokens``, also the
    trunk's tokens after its final norm (B, N, C)."""

    def __init__(self, trunk: dict, embed_dim: int, image_size, proj: Optional[str] = "none",
                 proj_bias: bool = False, drop: float = 0.0, patch_dropout: float = 0.0,
                 attn_impl: str = "fastclip", output_tokens: bool = False):
        super().__init__()
        self.image_size = _to_2tuple(image_size)
        self.output_tokens = output_tokens
        num_classes = embed_dim if not proj else 0  # timm_proj null/"" -> the trunk's head is the projection
        self.trunk = SiglipViT(**trunk, num_classes=num_classes, patch_drop_rate=patch_dropout, attn_impl=attn_impl)
        head = OrderedDict()
        if proj == "linear":
            head["drop"] = nn.Dropout(drop)
            head["proj"] = nn.Linear(trunk["width"], embed_dim, bias=proj_bias)
        self.head = nn.Sequential(head)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        tokens = self.trunk.forward_features(x)
        return self.head(self.trunk.head(self.trunk.attn_pool(tokens))), tokens

    def forward(self, x: Tensor):
        pooled, tokens = self.forward_features(x)
        return (pooled, tokens) if self.output_tokens else pooled


__all__ = ["SiglipViT", "TimmVisionTower", "AttentionPoolLatent"]
