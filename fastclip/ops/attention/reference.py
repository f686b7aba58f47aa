"""Attention by its definition: the specification every fast path is tested against (materializes the scores)."""
from __future__ import annotations

from typing import Optional

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                  key_padding_mask: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                  upcast: bool = True) -> torch.Tensor:
    """Scaled dot-product attention by the definition, materializing the (B, H, S_q, S_k) scores.

    q: (B, S_q, H, D), k and v: (B, S_k, H, D); ``key_padding_mask`` (B, S_k) bool, True = padding key (ignored);
    ``causal``: query i sees keys j <= i (top-left aligned, as SDPA's ``is_causal``). A query that sees no key gets
    zeros (and zero gradients). ``upcast``: compute in fp32 (fp64 stays fp64) and cast back; ``upcast=False``
    computes in the inputs' dtype (the "same-dtype PyTorch" of flash-attn's error criterion).
    Returns (B, S_q, H, D) in q's dtype.
    """
    dtype = q.dtype
    if upcast:
        up = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(up), k.to(up), v.to(up)
    s_q, s_k, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bshd,bthd->bhst", q * scale, k)  # (B, H, S_q, S_k)
    valid = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        valid = valid.tril()
    valid = valid[None, None]  # (1, 1, S_q, S_k)
    if key_padding_mask is not None:
        valid = valid & ~key_padding_mask[:, None, None, :]  # (B, 1, S_q, S_k)
    # a query with no valid key: softmax over nothing. Unmask its row (finite softmax and gradient), zero it after.
    empty = ~valid.any(-1, keepdim=True)  # (B or 1, 1, S_q, 1)
    scores = scores.masked_fill(~(valid | empty), float("-inf"))
    p = torch.where(empty, torch.zeros((), dtype=scores.dtype, device=q.device), scores.softmax(-1))
    out = torch.einsum("bhst,bthd->bshd", p, v)  # (B, S_q, H, D)
    return out.to(dtype)
