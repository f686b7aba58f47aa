"""Transformer towers of CLIP: attention, pre-LN residual blocks, the vision transformer and the text transformer.

Parameter names and shapes equal open_clip's (``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1``, ...), so state dicts
load strictly in both directions. The maths equals open_clip's too; what differs is how it is run:

- attention goes through ``fastclip.flash_attention`` (``attn_impl="fastclip"``, the default) or PyTorch's
  ``F.scaled_dot_product_attention`` (``attn_impl="sdpa"``), fed strided views of one packed QKV projection;
- the text tower is causal (unless ``no_causal_mask``) through the kernel's ``causal=True`` flag instead of an
  additive (S, S) mask, and CoCa's padding mask (``embed_cls``) is a key-padding mask;
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


def attend(q: Tensor, k: Tensor, v: Tensor, attn_impl: str, causal: bool = False,
           key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T / sqrt(D) [+ masks]) v on (B, S_q, H, D) / (B, S_k, H, D) views -> (B, S_q, H, D), through
    ``fastclip.flash_attention`` (``attn_impl="fastclip"``) or PyTorch's SDPA (``"sdpa"``)."""
    if attn_impl == "fastclip":
        return _flash_attention()(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    return _sdpa(q, k, v, causal, key_padding_mask)


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
        out = attend(q, k, v, self.attn_impl, causal, key_padding_mask)  # (B, S, H, D)
        return self.out_proj(out.reshape(B, S, C))


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, S_q, C) over a context (B, S_k, kdim), with the parameters of
    ``nn.MultiheadAttention(C, H, kdim=kdim, vdim=kdim, batch_first=True)``: ``in_proj_weight`` (3C, C) when
    kdim == C, else ``q_proj_weight`` (C, C), ``k_proj_weight`` and ``v_proj_weight`` (C, kdim); ``in_proj_bias``
    (3C,); ``out_proj``. Returns (B, S_q, C)."""

    def __init__(self, dim: int, heads: int, kdim: int, attn_impl: str = "fastclip"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.attn_impl = heads, dim // heads, _check_attn_impl(attn_impl)
        self.packed = kdim == dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, kdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's initialization (out_proj.weight keeps nn.Linear's)
        for w in [self.in_proj_weight] if self.packed else [self.q_proj_weight, self.k_proj_weight,
                                                             self.v_proj_weight]:
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q_x: Tensor, kv_x: Tensor) -> Tensor:
        C = self.heads * self.head_dim
        if self.packed:
            w_q, w_k, w_v = self.in_proj_weight.split(C)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.split(C)
        q = F.linear(q_x, w_q, b_q).unflatten(-1, (self.heads, self.head_dim))  # (B, S_q, H, D)
        k = F.linear(kv_x, w_k, b_k).unflatten(-1, (self.heads, self.head_dim))  # (B, S_k, H, D)
        v = F.linear(kv_x, w_v, b_v).unflatten(-1, (self.heads, self.head_dim))
        out = attend(q, k, v, self.attn_impl)  # (B, S_q, H, D)
        return self.out_proj(out.flatten(2))


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


class LayerScale(nn.Module):
    """x * gamma, gamma (C,) initialized to ``init_values`` (open_clip's and timm's ``LayerScale``)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def patch_dropout(x: Tensor, prob: float, num_prefix_tokens: int, lowest: bool = False) -> Tensor:
    """Keep a random max(1, int(N * (1 - prob))) of the N patch tokens of each image (PatchDropout,
    arXiv:2212.00794); the first ``num_prefix_tokens`` (a class token) are always kept, in front.
    x: (B, prefix + N, C) -> (B, prefix + kept, C).

    The kept tokens are those with the largest of N standard normal draws (open_clip's ``PatchDropout``), or with
    ``lowest`` the smallest, in ascending order (timm's), so that with one seed on the CPU each draws the same
    tokens as its original."""
    prefix, x = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    B, N = x.shape[0], x.shape[1]
    keep = max(1, int(N * (1.0 - prob)))
    rand = torch.randn(B, N, device=x.device)
    idx = rand.argsort(dim=-1)[:, :keep] if lowest else rand.topk(keep, dim=-1).indices  # (B, keep)
    x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, keep, C)
    return torch.cat([prefix, x], dim=1)


class PatchDropout(nn.Module):
    """open_clip's ``PatchDropout`` (no parameters): :func:`patch_dropout` in training, the identity in eval."""

    def __init__(self, prob: float, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob, self.num_prefix_tokens = prob, num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.prob == 0.0:
            return x
        return patch_dropout(x, self.prob, self.num_prefix_tokens)


class MLP(nn.Module):
    """c_fc -> activation -> c_proj; the keys equal open_clip's ``nn.Sequential(c_fc, gelu, c_proj)``."""

    def __init__(self, width: int, mlp_width: int, act_layer=nn.GELU):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.gelu = act_layer()
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


def _layer_scale(width: int, ls_init_value: Optional[float]) -> nn.Module:
    return LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + ls_1(attn(ln_1(x))), then + ls_2(mlp(ln_2(x))); ls_* is a LayerScale when
    ``ls_init_value`` is set, else the identity. x: (B, S, C) -> (B, S, C)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU,
                 attn_impl: str = "fastclip", ls_init_value: Optional[float] = None, norm_layer=LayerNorm):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = Attention(width, heads, attn_impl)
        self.ls_1 = _layer_scale(width, ls_init_value)
        self.ln_2 = norm_layer(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act_layer)
        self.ls_2 = _layer_scale(width, ls_init_value)

    def forward(self, x: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), causal, key_padding_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of ``layers`` residual blocks (``resblocks``), batch first. x: (B, S, C) -> (B, S, C)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU,
                 attn_impl: str = "fastclip", ls_init_value: Optional[float] = None, norm_layer=LayerNorm):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer, attn_impl, ls_init_value, norm_layer)
             for _ in range(layers)])

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


def sincos_2d_pos_embed(width: int, grid: int) -> Tensor:
    """open_clip's fixed 2-D sin-cos embedding (MAE's), with a zero row for the class token: (grid^2 + 1, width).
    Row 1 + i * grid + j is [sin(j w), cos(j w), sin(i w), cos(i w)] with w_d = 10000^(-d / (width / 4))."""
    if width % 4:
        raise ValueError(f"pos_embed_type='sin_cos_2d' needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))  # (C/4,)
    i, j = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    parts = []
    for pos in (j.reshape(-1), i.reshape(-1)):
        out = pos[:, None] * omega[None]  # (grid^2, C/4)
        parts += [out.sin(), out.cos()]
    emb = torch.cat(parts, dim=1)  # (grid^2, C)
    return torch.cat([torch.zeros(1, width, dtype=emb.dtype), emb]).float()


class AttentionalPooler(nn.Module):
    """open_clip's ``AttentionalPooler``: ``n_queries`` learned queries (LayerNorm ``ln_q``) attend over the
    LayerNorm'd (``ln_k``) tokens. x: (B, N, context_dim) -> (B, n_queries, d_model)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 256,
                 norm_layer=LayerNorm, attn_impl: str = "fastclip"):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = CrossAttention(d_model, n_head, context_dim, attn_impl)
        self.ln_q = norm_layer(d_model)
        self.ln_k = norm_layer(context_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query)
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x)


class VisionTransformer(nn.Module):
    """ViT image tower, open_clip's ``VisionTransformer`` with every option of its config.

    image (B, 3, H, W) -> conv1 (patchify, no bias) -> (B, N, C) with N = (H/p)(W/p) -> prepend the class embedding
    -> + positional_embedding (N+1, C) (learned, or fixed 2-D sin-cos) -> patch dropout (training) -> ln_pre
    (or none: ``no_ln_pre``) -> transformer -> pooling -> @ proj (C, E) -> (B, E). Pooling: ``pool_type`` "tok"
    (class token), "avg" (mean of the patch tokens) or "none" (all tokens), after ln_post, or before it with
    ``final_ln_after_pool``; with ``attentional_pool`` (CoCa's), an :class:`AttentionalPooler` of
    ``attn_pooler_queries`` queries, then ln_post, then the pooling above. With ``output_tokens`` it returns
    ((B, E), tokens).
    """

    def __init__(self, image_size: Union[int, Tuple[int, int]], patch_size: int, width: int, layers: int,
                 heads: int, mlp_ratio: float = 4.0, output_dim: int = 512, act_layer=nn.GELU,
                 attn_impl: str = "fastclip", output_tokens: bool = False, *, ls_init_value: Optional[float] = None,
                 attentional_pool: bool = False, attn_pooler_queries: int = 256, attn_pooler_heads: int = 8,
                 patch_dropout: float = 0.0, no_ln_pre: bool = False, pos_embed_type: str = "learnable",
                 pool_type: str = "tok", final_ln_after_pool: bool = False, norm_layer=LayerNorm):
        super().__init__()
        if pool_type not in ("tok", "avg", "none"):
            raise ValueError(f"pool_type must be 'tok', 'avg' or 'none', got {pool_type!r}")
        if pos_embed_type not in ("learnable", "sin_cos_2d"):
            raise ValueError(f"pos_embed_type must be 'learnable' or 'sin_cos_2d', got {pos_embed_type!r}")
        if attentional_pool is not True and attentional_pool:
            raise ValueError(f"attentional_pool={attentional_pool!r} (open_clip's untested 'parallel'/'cascade' "
                             f"poolers) is not built by fastclip")
        self.image_size = _to_2tuple(image_size)
        self.patch_size = _to_2tuple(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        self.output_tokens = output_tokens
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        n_pos = self.grid_size[0] * self.grid_size[1] + 1
        if pos_embed_type == "learnable":
            self.positional_embedding = nn.Parameter(scale * torch.randn(n_pos, width))
        else:
            if self.grid_size[0] != self.grid_size[1]:
                raise ValueError(f"pos_embed_type='sin_cos_2d' needs a square grid, got {self.grid_size}")
            self.positional_embedding = nn.Parameter(sincos_2d_pos_embed(width, self.grid_size[0]),
                                                     requires_grad=False)
        self.patch_dropout = PatchDropout(patch_dropout) if patch_dropout > 0 else nn.Identity()
        self.ln_pre = nn.Identity() if no_ln_pre else norm_layer(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer, attn_impl, ls_init_value,
                                       norm_layer)
        if attentional_pool:
            # open_clip builds the pooler's LayerNorms without the tower's norm_kwargs (eps 1e-5)
            self.attn_pool = AttentionalPooler(output_dim, width, attn_pooler_heads, attn_pooler_queries,
                                               LayerNorm, attn_impl)
            pool_dim = output_dim
        else:
            self.attn_pool = None
            pool_dim = width
        self.ln_post = norm_layer(pool_dim)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        return {"positional_embedding", "class_embedding"}

    def _global_pool(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        if self.pool_type == "tok":
            return x[:, 0], x[:, 1:]
        return x, x

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(pooled (B, E), tokens)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, C, gh, gw)
        B, C = x.shape[0], x.shape[1]
        x = x.reshape(B, C, -1).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).view(1, 1, C).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N + 1, C)
        x = self.ln_pre(self.patch_dropout(x))
        x = self.transformer(x)
        if self.attn_pool is not None:
            pooled, tokens = self._global_pool(self.ln_post(self.attn_pool(x)))  # pools the (B, Q, E) queries
        elif self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            pooled = self.ln_post(pooled)
        else:
            pooled, tokens = self._global_pool(self.ln_post(x))
        return pooled @ self.proj, tokens

    def forward(self, x: Tensor):
        pooled, tokens = self.forward_features(x)
        return (pooled, tokens) if self.output_tokens else pooled


def eot_key_padding_mask(text: Tensor) -> Tensor:
    """(B, S) bool, True at positions after each row's end-of-text token (the argmax of the ids, as open_clip)."""
    eot = text.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(text.shape[1], device=text.device) > eot  # (B, S)


def text_global_pool(x: Tensor, text: Tensor, pool_type: str, eos_id: int) -> Tensor:
    """open_clip's text pooling of x (B, S, C): "first"/"last" token, "argmax" (the end-of-text token of OpenAI's
    vocabulary, its largest id), "eos" (the first ``eos_id``), "none" (all of x)."""
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":
        return x[rows, text.argmax(dim=-1)]
    if pool_type == "eos":
        return x[rows, (text == eos_id).int().argmax(dim=-1)]
    return x


def encode_text_tokens(tower, text: Tensor) -> Tuple[Tensor, Tensor]:
    """The text tower's maths on any module holding its parts (``TextTransformer`` or ``CLIP``).

    text (B, S) int64 ids -> token_embedding (+ ``cls_emb`` appended, CoCa) + positional_embedding[:S] ->
    transformer (causal unless ``no_causal_mask``) -> ln_final -> pooling (``pool_type``) -> text_projection
    (a matrix, a Linear with ``proj_bias``, or none) -> (B, E). With ``cls_emb`` the keys at padding ids are
    masked (open_clip's additive mask, one position late as open_clip's ``correct_cls_mask=False``), the appended
    token is pooled and ln_final applies to it alone. Returns (pooled (B, E), tokens (B, S, C)).
    """
    cast_dtype = tower.transformer.get_cast_dtype()
    B, S = text.shape
    x = tower.token_embedding(text).to(cast_dtype)  # (B, S, C)
    key_padding_mask = None
    if tower.cls_emb is not None:
        x = torch.cat([x, tower.cls_emb.to(cast_dtype).view(1, 1, -1).expand(B, 1, -1)], dim=1)  # (B, S + 1, C)
        key_padding_mask = torch.cat([text.new_zeros(B, 1, dtype=torch.bool), text == tower.pad_id], dim=1)
    elif tower.text_pad_mask:
        # keys after end-of-text change no pooled feature (the causal mask already hides them from it); masking
        # them lets a kernel skip their tiles, but changes the tokens past end-of-text that output_tokens returns
        key_padding_mask = eot_key_padding_mask(text)
    x = x + tower.positional_embedding[:x.shape[1]].to(cast_dtype)
    x = tower.transformer(x, causal=not tower.no_causal_mask, key_padding_mask=key_padding_mask)
    if tower.cls_emb is not None:
        pooled, tokens = tower.ln_final(x[:, -1]), x[:, :-1]
    else:
        x = tower.ln_final(x)
        pooled, tokens = text_global_pool(x, text, tower.pool_type, tower.eos_id), x
    proj = tower.text_projection
    if isinstance(proj, nn.Linear):
        pooled = proj(pooled)
    elif proj is not None:
        pooled = pooled @ proj
    return pooled, tokens


class TextTransformer(nn.Module):
    """The text tower: open_clip's ``TextTransformer`` with every option of its config (see
    :func:`encode_text_tokens` for the maths).

    text (B, S) int64 ids, S <= context_length -> (B, E); with ``output_tokens``, ((B, E), (B, S, C)).
    ``text_pad_mask=True`` (fastclip's) also masks keys past end-of-text, for causal argmax-pooled towers.
    """

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, output_dim: Optional[int] = 512, act_layer=nn.GELU,
                 attn_impl: str = "fastclip", output_tokens: bool = False, text_pad_mask: bool = False, *,
                 ls_init_value: Optional[float] = None, embed_cls: bool = False, no_causal_mask: bool = False,
                 pad_id: int = 0, eos_id: int = 2, pool_type: str = "argmax", proj_type: str = "linear",
                 proj_bias: bool = False, norm_layer=LayerNorm):
        super().__init__()
        if pool_type not in ("first", "last", "argmax", "eos", "none"):
            raise ValueError(f"pool_type must be 'first', 'last', 'argmax', 'eos' or 'none', got {pool_type!r}")
        if text_pad_mask and (no_causal_mask or pool_type != "argmax" or embed_cls):
            raise ValueError("text_pad_mask=True is exact only for a causal tower pooled at end-of-text "
                             "(no_causal_mask=False, pool_type='argmax', embed_cls=False)")
        self.context_length, self.vocab_size, self.output_dim = context_length, vocab_size, output_dim
        self.output_tokens = output_tokens
        self.text_pad_mask = text_pad_mask
        self.no_causal_mask, self.pool_type, self.pad_id, self.eos_id = no_causal_mask, pool_type, pad_id, eos_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.cls_emb = nn.Parameter(torch.empty(width)) if embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(context_length + int(embed_cls), width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer, attn_impl, ls_init_value,
                                       norm_layer)
        self.ln_final = norm_layer(width)
        if proj_type == "none" or not output_dim:
            self.text_projection = None
        elif proj_bias:
            self.text_projection = nn.Linear(width, output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        init_text_parameters(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        return {"positional_embedding"} | ({"cls_emb"} if self.cls_emb is not None else set())

    def forward(self, text: Tensor):
        pooled, tokens = encode_text_tokens(self, text)
        return (pooled, tokens) if self.output_tokens else pooled


def init_text_parameters(tower) -> None:
    """open_clip's (and OpenAI's) initialization of the text tower's parameters."""
    nn.init.normal_(tower.token_embedding.weight, std=0.02)
    nn.init.normal_(tower.positional_embedding, std=0.01)
    if tower.cls_emb is not None:
        nn.init.normal_(tower.cls_emb, std=0.01)
    width, layers = tower.transformer.width, tower.transformer.layers
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in tower.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    if isinstance(tower.text_projection, nn.Linear):
        nn.init.normal_(tower.text_projection.weight, std=width ** -0.5)
        nn.init.zeros_(tower.text_projection.bias)
    elif tower.text_projection is not None:
        nn.init.normal_(tower.text_projection, std=width ** -0.5)


__all__ = ["Attention", "CrossAttention", "AttentionalPooler", "LayerNorm", "LayerScale", "PatchDropout",
           "QuickGELU", "ResidualAttentionBlock", "Transformer", "VisionTransformer", "TextTransformer",
           "attend", "encode_text_tokens", "eot_key_padding_mask", "patch_dropout", "sincos_2d_pos_embed",
           "text_global_pool", "ATTN_IMPLS"]
