"""CLIP's contrastive loss: backend rows, the ``fastclip::contrastive_loss_fwd/_bwd`` custom ops, autograd and
the public ``contrastive_loss``.

Backends (op ``"contrastive_loss"``, dimension: the feature dim), one module each beside this file:
- ``reference``: the definition (materializes N x N); autograd differentiates it.
- ``pytorch`` (backend name ``"torch"``): chunked PyTorch, O(chunk x N) beyond the inputs; any device.
- ``triton``: fused kernels, O(N) beyond the inputs and gradients.
- ``cuda``: the compiled extension's kernels (``csrc/contrastive/``).

The custom ops take the backend name as an argument and call that backend's (forward, backward) pair, so
``torch.compile(fullgraph=True)`` traces through one op whatever the backend; ``reference`` bypasses them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastclip._checks import amp_cast, amp_loss_dtype, as_scalar, autocast_dtype, check_chunk_size, check_feature_pair, \
    check_label_smoothing, refuse_forward_ad
from fastclip.dispatch import Lazy, Support, cuda_ext_unavailable, cuda_kernel_reasons, no_bf16_in_interpreter, \
    register, select, supports, triton_unavailable
from fastclip.ops.contrastive import reference

__all__ = ["contrastive_loss"]

OP = "contrastive_loss"
_HERE = __name__

register(Support(OP, "reference", impl=reference.contrastive_loss_ref))
register(Support(OP, "torch", impl=(Lazy(f"{_HERE}.pytorch", "contrastive_fwd"),
                                    Lazy(f"{_HERE}.pytorch", "contrastive_bwd"))))
register(Support(OP, "triton",
                 impl=(Lazy(f"{_HERE}.triton", "contrastive_fwd"), Lazy(f"{_HERE}.triton", "contrastive_bwd")),
                 dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_dim=2048,
                 unavailable=triton_unavailable, extra_checks=(no_bf16_in_interpreter,)))
register(Support(OP, "cuda",
                 impl=(Lazy(f"{_HERE}.cuda", "contrastive_fwd"), Lazy(f"{_HERE}.cuda", "contrastive_bwd")),
                 devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}), min_dim=8,
                 max_dim=2048, unavailable=cuda_ext_unavailable,
                 extra_checks=(cuda_kernel_reasons,)))


def _impl(backend: str, which: int):
    return supports(OP)[backend].impl[which]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastclip::contrastive_loss_fwd", mutates_args=())
def _contrastive_fwd_op(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], label_smoothing: float,
                        backend: str, chunk_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(image.device.type, enabled=False):  # the inputs are already in the dtype to compute in
        loss, row_stats, col_stats = _impl(backend, 0)(image, text, scale, bias, label_smoothing,
                                                   chunk_size if chunk_size > 0 else None)
    return loss, row_stats, col_stats


@_contrastive_fwd_op.register_fake
def _(image, text, scale, bias, label_smoothing, backend, chunk_size):
    dt = _acc_dtype(image)
    n = image.shape[0]
    # row/col stats: (2, N) = (max, log of the sum of exps), in units the backend chooses (Triton: base 2)
    return image.new_empty((), dtype=dt), image.new_empty((2, n), dtype=dt), image.new_empty((2, n), dtype=dt)


@torch.library.custom_op("fastclip::contrastive_loss_bwd", mutates_args=())
def _contrastive_bwd_op(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                        row_stats: Tensor, col_stats: Tensor, label_smoothing: float, backend: str,
                        chunk_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(image.device.type, enabled=False):
        d_image, d_text, d_scale = _impl(backend, 1)(grad, image, text, scale, bias, row_stats, col_stats,
                                                     label_smoothing, chunk_size if chunk_size > 0 else None)
    return d_image, d_text, d_scale


@_contrastive_bwd_op.register_fake
def _(grad, image, text, scale, bias, row_stats, col_stats, label_smoothing, backend, chunk_size):
    return (torch.empty_like(image, memory_format=torch.contiguous_format),
            torch.empty_like(text, memory_format=torch.contiguous_format), torch.empty_like(scale))


def _contrastive_setup_context(ctx, inputs, output):
    image, text, scale, bias, label_smoothing, backend, chunk_size = inputs
    _, row_stats, col_stats = output
    ctx.save_for_backward(image, text, scale, bias, row_stats, col_stats)
    ctx.label_smoothing, ctx.backend, ctx.chunk_size = label_smoothing, backend, chunk_size
    ctx.mark_non_differentiable(row_stats, col_stats)


def _contrastive_backward(ctx, grad_loss, _grad_row, _grad_col):
    image, text, scale, bias, row_stats, col_stats = ctx.saved_tensors
    d_image, d_text, d_scale = torch.ops.fastclip.contrastive_loss_bwd(
        grad_loss, image, text, scale, bias, row_stats, col_stats, ctx.label_smoothing, ctx.backend, ctx.chunk_size)
    # sum_ij dL/dS_ij = 0 exactly (each softmax row sums to one, as do the targets): the bias has no gradient.
    d_bias = torch.zeros_like(bias) if bias is not None else None
    return d_image, d_text, d_scale, d_bias, None, None, None


torch.library.register_autograd("fastclip::contrastive_loss_fwd", _contrastive_backward,
                                setup_context=_contrastive_setup_context)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                     logit_bias: Union[Tensor, float, None] = None, *, label_smoothing: float = 0.0,
                     backend: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """CLIP's symmetric contrastive (InfoNCE) loss in memory linear in the batch size.

    Args:
        image_features, text_features: (N, D) float16/bfloat16/float32/float64 on one device; row i of each is a
            positive pair. Normalization is the caller's (open_clip normalizes in the model).
        logit_scale: one-element tensor (or number), already exponentiated, as open_clip's model returns it.
        logit_bias: optional one-element tensor added to every logit (it changes no value or gradient of this
            loss, but is accepted and differentiated like open_clip's).
        label_smoothing: as ``F.cross_entropy``'s, applied to both directions.
        backend: "auto", "reference", "torch", "triton" or "cuda" (see ``python -m fastclip.info``).
        chunk_size: rows per chunk for the "torch" backend (default: about 4M logits per chunk).

    Returns:
        0-d tensor in the features' dtype (accumulated in fp32, or fp64 for fp64 inputs); fp32 under autocast.

    Precision: under ``torch.autocast`` (CPU or CUDA) the GEMMs run in the autocast dtype whatever the features'
    dtype, as open_clip's ``logit_scale * image @ text.T`` does, and the loss is fp32 (as ``F.cross_entropy``
    returns under autocast); gradients reach fp32 features in fp32. Outside autocast, fp32 features follow
    ``torch.get_float32_matmul_precision()``: "highest" (torch's default) computes IEEE fp32 products, "high" and
    "medium" allow TF32 on GPUs. Accumulation and the softmax statistics are fp32 in every case.

    Memory: O(N * D) plus O(chunk * N) ("torch") or O(N) ("triton"); the (N, N) logits are never materialized
    (except by "reference").

    Equivalent PyTorch::

        logits = logit_scale * image_features @ text_features.T (+ logit_bias)
        labels = torch.arange(N)
        loss = (F.cross_entropy(logits, labels, label_smoothing=ls)
                + F.cross_entropy(logits.T, labels, label_smoothing=ls)) / 2
    """
    check_feature_pair(image_features, text_features)
    scale = as_scalar(logit_scale, "logit_scale", image_features, required=True)
    bias = as_scalar(logit_bias, "logit_bias", image_features, required=False)
    ls = check_label_smoothing(label_smoothing)
    check_chunk_size(chunk_size)
    amp = autocast_dtype(image_features.device)
    image, text = amp_cast(image_features, amp), amp_cast(text_features, amp)
    out_dtype = amp_loss_dtype(image_features.dtype, amp, fp32_under_autocast=True)
    row = select(OP, backend, device=image.device, dtype=image.dtype, dim=image.shape[1])
    if row.backend == "reference":  # open_clip's code, autocast included
        return row.impl(image_features, text_features, scale, bias, label_smoothing=ls).to(out_dtype)
    refuse_forward_ad(OP, row.backend, image_features=image, text_features=text, logit_scale=scale, logit_bias=bias)
    loss, _, _ = torch.ops.fastclip.contrastive_loss_fwd(image, text, scale, bias, ls, row.backend,
                                                         int(chunk_size or 0))
    return loss.to(out_dtype)
