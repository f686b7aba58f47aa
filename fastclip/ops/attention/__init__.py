"""Flash attention for both CLIP towers: input checks, backend rows, custom ops, autograd, ``flash_attention``.

Backends (op ``"flash_attention"``, dimension ``head_dim``):
- ``reference``: the definition in upcast math (``reference.attention_ref``); autograd differentiates it.
- ``pytorch`` (backend name ``"torch"``): ``F.scaled_dot_product_attention`` with the equivalent mask (the CPU
  default); SDPA's own autograd.
- ``triton``: the fused kernels of ``triton.py``, as the custom ops
  ``fastclip::flash_attention_fwd`` / ``fastclip::flash_attention_bwd`` (fake implementations for torch.compile),
  with the backward registered through ``torch.library.register_autograd``.
- ``cuda``: the compiled extension's kernels (``csrc/attention/``), through the same custom ops.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastclip._checks import _fmt, amp_cast, autocast_dtype, check_float_tensor, refuse_forward_ad
from fastclip.dispatch import Lazy, Support, cuda_ext_unavailable, cuda_kernel_reasons, no_bf16_in_interpreter, \
    register, select, supports, triton_unavailable
from fastclip.ops.attention import reference
from fastclip.ops.attention.pytorch import attention_sdpa

__all__ = ["flash_attention"]

OP = "flash_attention"
_HERE = __name__


# ---------------------------------------------------------------------------------------------------------------
# Input checks (once, at the boundary)


def check_attention_inputs(q, k, v, key_padding_mask) -> None:
    """q (B, S_q, H, D), k and v (B, S_k, H, D): floating, one dtype, one device; mask (B, S_k) bool."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, 4, "batch, seq, heads, head_dim")
    shapes = f"q {_fmt(q)}; k {_fmt(k)}; v {_fmt(v)}"
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype: {shapes}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device: {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (batch, seq_k, heads, head_dim): {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q must match k and v in batch, heads and head_dim (dims 0, 2, 3): {shapes}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding key to ignore), got {_fmt(m)}")
        if tuple(m.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_padding_mask must be (batch, seq_k) = {(k.shape[0], k.shape[1])}, "
                             f"got {_fmt(m)}; k {_fmt(k)}")
        if m.device != k.device:
            raise ValueError(f"key_padding_mask is on {m.device} but k is on {k.device}")


def _softmax_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a number or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


# ---------------------------------------------------------------------------------------------------------------
# Backends


register(Support(OP, "reference", impl=reference.attention_ref, dim_name="head_dim"))
# pure torch: imported eagerly (torch.compile would see a lazy import as a graph break; only triton is deferred)
register(Support(OP, "torch", impl=attention_sdpa, dim_name="head_dim"))
register(Support(OP, "triton",
                 impl=(Lazy(f"{_HERE}.triton", "attention_fwd"), Lazy(f"{_HERE}.triton", "attention_bwd")),
                 dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_dim=128,
                 dim_name="head_dim", unavailable=triton_unavailable, extra_checks=(no_bf16_in_interpreter,)))
register(Support(OP, "cuda",
                 impl=(Lazy(f"{_HERE}.cuda", "attention_fwd"), Lazy(f"{_HERE}.cuda", "attention_bwd")),
                 devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}), min_dim=32,
                 max_dim=128, dim_name="head_dim", unavailable=cuda_ext_unavailable,
                 extra_checks=(cuda_kernel_reasons,)))


def _impl(backend: str, which: int):
    return supports(OP)[backend].impl[which]


@torch.library.custom_op("fastclip::flash_attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                      softmax_scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    with torch.autocast(q.device.type, enabled=False):  # the inputs are already in the dtype to compute in
        out, lse = _impl(backend, 0)(q, k, v, key_padding_mask, causal, softmax_scale)
    return out, lse


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, causal, softmax_scale, backend):
    b, s_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)


@torch.library.custom_op("fastclip::flash_attention_bwd", mutates_args=())
def _attention_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(q.device.type, enabled=False):
        dq, dk, dv = _impl(backend, 1)(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale)
    return dq, dk, dv


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastclip.flash_attention_bwd(dout, q, k, v, out, lse, key_padding_mask, ctx.causal,
                                                        ctx.softmax_scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("fastclip::flash_attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    key_padding_mask: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                    backend: str = "auto") -> Tensor:
    """Multi-head scaled dot-product attention, fused, for CLIP's vision (non-causal) and text (causal) towers.

    Args:
        q: (B, S_q, H, D); k, v: (B, S_k, H, D). float16/bfloat16/float32 (float64 on "torch"/"reference"), one
            device, any strides: the q, k, v views of a packed (B, S, 3, H, D) projection are used as they are.
        causal: query i attends to keys j <= i (top-left aligned, as SDPA's ``is_causal``).
        key_padding_mask: optional (B, S_k) bool, True marks a padding key to ignore (nn.MultiheadAttention's
            convention).
        softmax_scale: default 1 / sqrt(D).
        backend: "auto", "reference", "torch", "triton" or "cuda" (see ``python -m fastclip.info``). An explicit
            backend that cannot run these inputs raises ``BackendError`` saying why.

    Returns:
        (B, S_q, H, D) in q's dtype; under ``torch.autocast`` q, k, v are cast to the autocast dtype and the result
        is in that dtype, as SDPA's. A query that sees no key (all its keys padded) gets zeros and zero gradients.

    Maths: for each (b, h), S = softmax_scale * Q K^T (S_q, S_k) with masked entries at -inf, P = softmax(S) by rows,
    O = P V. Accumulation is fp32 (fp64 for fp64). Memory: "triton" never forms S; it keeps the (B, H, S_q) fp32
    log-sum-exp for the backward, which recomputes P tile by tile. "reference" materializes (B, H, S_q, S_k).

    Equivalent PyTorch::

        attend = ~key_padding_mask[:, None, None, :]                 # (B, 1, 1, S_k), True = attend
        if causal:
            attend = attend & torch.ones(S_q, S_k, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attend, scale=softmax_scale).transpose(1, 2)
        out = out.masked_fill(~attend.any(-1)[..., None].transpose(1, 2), 0)   # rows that see no key: zeros
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    causal = bool(causal)
    # under autocast, attention runs in the autocast dtype and returns it, as SDPA does there
    amp = autocast_dtype(q.device)
    q, k, v = amp_cast(q, amp), amp_cast(k, amp), amp_cast(v, amp)
    row = select(OP, backend, device=q.device, dtype=q.dtype, dim=q.shape[-1])
    if row.backend in ("reference", "torch"):  # plain PyTorch: autograd differentiates it
        with torch.autocast(q.device.type, enabled=False):
            return row.impl(q, k, v, causal, key_padding_mask, scale)
    refuse_forward_ad(OP, row.backend, q=q, k=k, v=v)
    out, _ = torch.ops.fastclip.flash_attention_fwd(q, k, v, key_padding_mask, causal, scale, row.backend)
    return out
