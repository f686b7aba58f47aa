"""Transformer towers of CLIP: attention, pre-LN residual blocks, the vision transformer and the text transformer.

Parameter names and shapes equal open_clip's (``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1``, ...), so state dicts
load strictly in both directions. The maths equals open_clip's too; what differs is how it is run:

- attention goes through ``fastclip.flash_attention`` (``attn_impl="fastclip"``, the default) or PyTorch's
  ``F.scaled_dot_product_attention`` (``attn_impl="sdpa"``), fed strided views of one packed QKV projection;
- the text tower is causal through the kernel's ``causal=True`` flag instead of an additive (S, S) mask;
- every module is plain tensor code without data-dependent Python branches, so the towers compile with
  ``torch.compile(fullgraph=True)`` and the compiler fuses LayerNorm, bias + activation and residual adds.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ATTN_IMPLS = ("fastclip", "sdpa")


def _check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    return attn_impl


def _flash_attention():
    """``fastclip.functional.flash_attention``, looked up at call time (so that tests can wrap it)."""
    import fastclip.functional as functional

    return functional.flash_attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input's dtype, as OpenAI's CLIP does under fp16/bf16.

    For fp32 inputs this is ``F.layer_norm``; for fp16/bf16 inputs with fp32 weights (``precision="fp16"``) the
    input is upcast, normalized with the fp32 weights, and the result cast back; with low-precision weights
    (``pure_fp16``/``pure_bf16``) it normalizes in that dtype (PyTorch accumulates in fp32 internally).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation x * sigmoid(1.702 x), used by the OpenAI checkpoints."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (and so open_clip's state-dict keys).

    x: (B, S, C) -> (B, S, C). The packed projection ``x @ in_proj_weight.T + in_proj_bias`` is computed once, viewed
    as (B, S, 3, H, D), and q, k, v are handed to the kernel as strided (B, S, H, D) views without copies.

    Equivalent PyTorch::

        nn.MultiheadAttention(C, H, batch_first=True)(x, x, x, need_weights=False,
                                                      attn_mask=causal (S, S) mask or None,
                                                      key_padding_mask=key_padding_mask)[0]
    """

    def __init__(self, dim: int, heads: int, attn_impl: str = "fastclip"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_impl = _check_attn_impl(attn_impl)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's initialization
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, S, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, S, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (B, S, H, D), strided views into qkv
        if self.attn_impl == "fastclip":
            out = _flash_attention()(q, k, v, causal=causal, key_padding_mask=key_padding_mask)  # (B, S, H, D)
        else:
            out = _sdpa(q, k, v, causal, key_padding_mask)
        return self.out_proj(out.reshape(B, S, C))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Optional[Tensor]) -> Tensor:
    """PyTorch's attention on (B, S, H, D) views; returns (B, S, H, D)."""
    mask = None
    if key_padding_mask is not None:
        S_q, S_k = q.shape[1], k.shape[1]
        mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S_k), True = attend
        if causal:
            mask = mask & torch.ones(S_q, S_k, dtype=torch.bool, device=q.device).tril()
        causal = False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal)  # (B, H, S, D)
    return out.transpose(1, 2)  # (B, S, H, D)


class MLP(nn.Module):
    """c_fc -> activation -> c_proj; the keys equal open_clip's ``nn.Sequential(c_fc, gelu, c_proj)``."""

    def __init__(self, width: int, mlp_width: int, act_layer=nn.GELU):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.gelu = act_layer()
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)). x: (B, S, C) -> (B, S, C)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU,
                 attn_impl: str = "fastclip"):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads, attn_impl)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act_layer)

    def forward(self, x: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal, key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``layers`` residual blocks (``resblocks``), batch first. x: (B, S, C) -> (B, S, C)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU,
                 attn_impl: str = "fastclip"):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer, attn_impl) for _ in range(layers)])

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def forward(self, x: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # recompute each block's activations in backward: memory O(layers * B * S * C) instead of ~10x that
                x = checkpoint(block, x, causal, key_padding_mask, use_reentrant=False)
            else:
                x = block(x, causal, key_padding_mask)
        return x


def _to_2tuple(x) -> Tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


class VisionTransformer(nn.Module):
    """ViT image tower, open_clip's ``VisionTransformer`` with pool_type "tok".

    image (B, 3, H, W) -> conv1 (patchify, no bias) -> (B, N, C) with N = (H/p)(W/p) -> prepend the class embedding
    -> + positional_embedding (N+1, C) -> ln_pre -> transformer -> ln_post -> class token (B, C) @ proj (C, E)
    -> (B, E). With ``output_tokens`` it returns ((B, E), patch tokens after ln_post (B, N, C)).
    """

    def __init__(self, image_size: Union[int, Tuple[int, int]], patch_size: int, width: int, layers: int,
                 heads: int, mlp_ratio: float = 4.0, output_dim: int = 512, act_layer=nn.GELU,
                 attn_impl: str = "fastclip", output_tokens: bool = False):
        super().__init__()
        self.image_size = _to_2tuple(image_size)
        self.patch_size = _to_2tuple(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        self.output_tokens = output_tokens
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1,
                                                                     width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer, attn_impl)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        return {"positional_embedding", "class_embedding"}

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(pooled (B, E), patch tokens (B, N, C))."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, C, gh, gw)
        B, C = x.shape[0], x.shape[1]
        x = x.reshape(B, C, -1).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).view(1, 1, C).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N + 1, C)
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.ln_post(x)
        pooled, tokens = x[:, 0], x[:, 1:]
        return pooled @ self.proj, tokens

    def forward(self, x: Tensor):
        pooled, tokens = self.forward_features(x)
        return (pooled, tokens) if self.output_tokens else pooled


def eot_key_padding_mask(text: Tensor) -> Tensor:
    """(B, S) bool, True at positions after each row's end-of-text token (the argmax of the ids, as open_clip)."""
    eot = text.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(text.shape[1], device=text.device) > eot  # (B, S)


def encode_text_tokens(tower, text: Tensor) -> Tuple[Tensor, Tensor]:
    """The text tower's maths on any module holding its parts (``TextTransformer`` or ``CLIP``).

    text (B, S) int64 ids -> token_embedding + positional_embedding[:S] -> causal transformer -> ln_final ->
    the row at each sequence's end-of-text token (argmax of the ids) @ text_projection -> (B, E).
    Returns (pooled (B, E), tokens after ln_final (B, S, C)).
    """
    cast_dtype = tower.transformer.get_cast_dtype()
    S = text.shape[1]
    x = tower.token_embedding(text).to(cast_dtype)  # (B, S, C)
    x = x + tower.positional_embedding[:S].to(cast_dtype)
    # keys after end-of-text change no pooled feature (the causal mask already hides them from it); masking them
    # lets a kernel skip their tiles, but changes the tokens past end-of-text that output_tokens returns
    key_padding_mask = eot_key_padding_mask(text) if tower.text_pad_mask else None
    x = tower.transformer(x, causal=True, key_padding_mask=key_padding_mask)
    x = tower.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # (B, C)
    if tower.text_projection is not None:
        pooled = pooled @ tower.text_projection
    return pooled, x


class TextTransformer(nn.Module):
    """The text tower: open_clip's ``TextTransformer`` with causal attention and argmax (end-of-text) pooling.

    text (B, S) int64 ids, S <= context_length -> (B, E); with ``output_tokens``, ((B, E), (B, S, C)).
    ``text_pad_mask=True`` also masks keys past end-of-text (see :func:`encode_text_tokens`).
    """

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, output_dim: Optional[int] = 512, act_layer=nn.GELU,
                 attn_impl: str = "fastclip", output_tokens: bool = False, text_pad_mask: bool = False):
        super().__init__()
        self.context_length, self.vocab_size, self.output_dim = context_length, vocab_size, output_dim
        self.output_tokens = output_tokens
        self.text_pad_mask = text_pad_mask
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer, attn_impl)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim)) if output_dim else None
        init_text_parameters(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        return {"positional_embedding"}

    def forward(self, text: Tensor):
        pooled, tokens = encode_text_tokens(self, text)
        return (pooled, tokens) if self.output_tokens else pooled


def init_text_parameters(tower) -> None:
    """open_clip's (and OpenAI's) initialization of the text tower's parameters."""
    nn.init.normal_(tower.token_embedding.weight, std=0.02)
    nn.init.normal_(tower.positional_embedding, std=0.01)
    width, layers = tower.transformer.width, tower.transformer.layers
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in tower.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    if tower.text_projection is not None:
        nn.init.normal_(tower.text_projection, std=width ** -0.5)


__all__ = ["Attention", "LayerNorm", "QuickGELU", "ResidualAttentionBlock", "Transformer", "VisionTransformer",
           "TextTransformer", "encode_text_tokens", "eot_key_padding_mask", "ATTN_IMPLS"]
