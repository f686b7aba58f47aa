"""Attention through ``F.scaled_dot_product_attention``: the "torch" backend (the CPU default, any device).

fastclip's inputs are (B, S, H, D); SDPA's are (B, H, S, D), so it gets transposed views (no copies). Masks are
converted to SDPA's convention (a boolean ``attn_mask`` where True means "attend"). With no padding mask and
S_q = S_k, causal attention is passed as ``is_causal=True`` so that SDPA may still choose its flash backend;
otherwise SDPA gets a (B, 1, S_q, S_k) mask (causal: top-left, query i sees keys j <= i, stated explicitly so
that no SDPA kernel's own alignment for S_q != S_k matters) and picks the efficient, cuDNN or math backend.

A query that sees no key (every key padded, or padded up to its causal horizon) must get zeros and zero gradients.
SDPA's backends do not agree on such rows, so they are unmasked before SDPA (a finite softmax and gradient) and
their output is zeroed after.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def sdpa_mask(key_padding_mask: torch.Tensor, causal: bool, s_q: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(attn_mask (B, 1, S_q, S_k) bool, True = attend; empty (B, 1, S_q, 1) bool, True = the query sees no key).

    Rows in ``empty`` are all True in ``attn_mask``, so SDPA computes a finite (unused) softmax for them.
    """
    s_k = key_padding_mask.shape[1]
    attend = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S_k)
    if causal:
        tril = torch.ones(s_q, s_k, dtype=torch.bool, device=key_padding_mask.device).tril()
        attend = attend & tril  # (B, 1, S_q, S_k)
    else:
        attend = attend.expand(-1, -1, s_q, -1)
    empty = ~attend.any(-1, keepdim=True)
    return attend | empty, empty


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   key_padding_mask: Optional[torch.Tensor], softmax_scale: float) -> torch.Tensor:
    """Attention of (B, S, H, D) inputs by SDPA; returns (B, S_q, H, D) (a transposed view of SDPA's output)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) views
    # SDPA's CPU flash kernel returns zeros, not NaN, for a query holding NaN: keep NaN in, NaN out
    nan_rows = qt.isnan().any(-1, keepdim=True)  # (B, H, S_q, 1)
    s_q, s_k = q.shape[1], k.shape[1]
    if key_padding_mask is None and (not causal or s_q == s_k):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale)
        return out.masked_fill(nan_rows, float("nan")).transpose(1, 2)
    if key_padding_mask is None:  # causal with S_q != S_k: an explicit top-left mask, whichever SDPA kernel runs
        key_padding_mask = torch.zeros(k.shape[0], s_k, dtype=torch.bool, device=k.device)
    attn_mask, empty = sdpa_mask(key_padding_mask, causal, s_q)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=softmax_scale)  # (B, H, S_q, D)
    # a query that sees no key ignores every score, its own NaN included (as the kernels do)
    out = out.masked_fill(nan_rows, float("nan")).masked_fill(empty, 0.0)
    return out.transpose(1, 2)
