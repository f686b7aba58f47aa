"""``nn.Module`` layers over fastclip's ops. They hold parameters and arguments and call ``fastclip.flash_attention``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastclip.ops.attention import flash_attention

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` (self- or cross-attention, kdim = vdim = embed_dim) on
    ``fastclip.flash_attention``.

    Parameters and state-dict keys are torch's (``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,),
    ``out_proj.weight``, ``out_proj.bias``), so open_clip / OpenAI CLIP weights load strictly both ways.

    Self-attention runs one packed projection x W^T + b (B, S, 3E), whose q, k, v are strided (B, S, H, D) views
    of its (B, S, 3, H, D) reshape: the kernel reads them in place, no transposes or copies. The kernel writes
    (B, S, H, D) contiguous, which is (B, S, E) for out_proj as it is. With ``batch_first=False`` inputs
    (S, B, E) are handled the same way through permuted views.

    ``forward(query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, None)`` like torch's with
    ``need_weights=False``. Masks: ``key_padding_mask`` (B, S) bool, True = padding; causal attention through
    ``is_causal=True`` (an ``attn_mask`` is then taken as the causal mask's stand-in, as torch documents the
    hint, and is not read). Other ``attn_mask``s, attention weights and attention dropout are not supported and
    raise rather than silently computing something else. ``key``/``value`` default to ``query``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if dropout:
            raise NotImplementedError("attention dropout is not supported by fastclip's attention (CLIP uses 0)")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first, self.backend = dropout, batch_first, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialization
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, S, E) or (S, B, E) -> a (B, S, H, D) view."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, H, D) or (S, B, H, D)
        return x if self.batch_first else x.transpose(0, 1)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, None]:
        if need_weights:
            raise NotImplementedError("need_weights=True: fused attention never forms the attention weights")
        if attn_mask is not None and not is_causal:
            raise NotImplementedError("attn_mask is only supported as the causal mask, with is_causal=True; "
                                      "use key_padding_mask for padding")
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be 3-D with last dim embed_dim={self.embed_dim}, "
                             f"got shape {tuple(query.shape)}")
        key = query if key is None else key
        value = key if value is None else value
        e = self.embed_dim
        if query is key and key is value:
            # one GEMM; q, k, v are strided views of its (..., 3, H, D) reshape
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3E) or (S, B, 3E)
            qkv = qkv.unflatten(-1, (3, e))
            q, k, v = (self._heads(t) for t in qkv.unbind(-2))
        else:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
            b_q, b_k, b_v = self.in_proj_bias.split(e) if self.in_proj_bias is not None else (None, None, None)
            q = self._heads(F.linear(query, w_q, b_q))
            k = self._heads(F.linear(key, w_k, b_k))
            v = self._heads(F.linear(value, w_v, b_v))
        out = flash_attention(q, k, v, causal=is_causal, key_padding_mask=key_padding_mask,
                              backend=self.backend)  # (B, S, H, D)
        out = out.flatten(2)  # (B, S, E): a view when the backend returns (B, S, H, D) contiguous
        if not self.batch_first:
            out = out.transpose(0, 1)  # (S, B, E)
        return self.out_proj(out), None
