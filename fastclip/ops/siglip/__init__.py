"""SigLIP's sigmoid loss: registry rows, the ``fastclip::siglip_loss_fwd/_bwd`` custom ops and their autograd.

The forward op makes the loss and, when a gradient is wanted, the gradients for an upstream gradient of 1 (the
loss is elementwise in the logits, so one sweep does both; see ``pytorch.py`` and ``triton.py`` beside this
file). The backward op multiplies them by the actual upstream gradient; a backend may
leave the text gradient to the backward (Triton does: its transposed launch makes dT there). The ``reference``
backend bypasses the ops and lets autograd differentiate the naive maths.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastclip._checks import amp_cast, amp_loss_dtype, as_scalar, autocast_dtype, check_chunk_size, check_feature_pair, \
    refuse_forward_ad
from fastclip.dispatch import Lazy, Support, no_bf16_in_interpreter, register, select, supports, triton_unavailable
from fastclip.ops.contrastive.pytorch import acc_dtype
from fastclip.ops.siglip import reference

__all__ = ["siglip_loss"]

OP = "siglip_loss"
_HERE = __name__

register(Support(OP, "reference", impl=reference.siglip_loss_ref))
register(Support(OP, "torch", impl=(Lazy(f"{_HERE}.pytorch", "siglip_fwd"),
                                    Lazy(f"{_HERE}.pytorch", "siglip_bwd_text"))))
register(Support(OP, "triton", impl=(Lazy(f"{_HERE}.triton", "siglip_fwd"), Lazy(f"{_HERE}.triton", "siglip_bwd_text")),
                 dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_dim=2048,
                 unavailable=triton_unavailable, extra_checks=(no_bf16_in_interpreter,)))

# backends whose forward leaves dT to the backward (their forward returns an empty (0, D) placeholder)
_DEFERS_TEXT_GRAD = frozenset({"triton"})


def _impl(backend: str, which: int):
    return supports(OP)[backend].impl[which]


@torch.library.custom_op("fastclip::siglip_loss_fwd", mutates_args=())
def _siglip_fwd_op(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], negative_only: bool,
                   compute_grad: bool, backend: str, chunk_size: int
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(image.device.type, enabled=False):  # the inputs are already in the dtype to compute in
        loss, d_image, d_text, d_scale, d_bias = _impl(backend, 0)(image, text, scale, bias, negative_only,
                                                                   compute_grad, chunk_size if chunk_size > 0 else None)
    d = image.shape[1]
    d_image = d_image.to(image.dtype) if d_image is not None else image.new_empty((0, d))
    d_text = d_text.to(text.dtype) if d_text is not None else text.new_empty((0, d))
    return loss, d_image, d_text, d_scale, d_bias


@_siglip_fwd_op.register_fake
def _(image, text, scale, bias, negative_only, compute_grad, backend, chunk_size):
    dt = acc_dtype(image.dtype)
    d = image.shape[1]
    n_img = image.shape[0] if compute_grad else 0
    n_txt = text.shape[0] if compute_grad and backend not in _DEFERS_TEXT_GRAD else 0
    return (image.new_empty((), dtype=dt), image.new_empty((n_img, d)), text.new_empty((n_txt, d)),
            image.new_empty((), dtype=dt), image.new_empty((), dtype=dt))


@torch.library.custom_op("fastclip::siglip_loss_bwd", mutates_args=())
def _siglip_bwd_op(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], d_image: Tensor,
                   d_text: Tensor, d_scale: Tensor, d_bias: Tensor, negative_only: bool, backend: str,
                   chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    g = grad.reshape(()).to(d_scale.dtype)
    gi = (d_image * g).to(image.dtype)
    if d_text.shape[0] == text.shape[0]:
        gt = (d_text * g).to(text.dtype)
    else:  # deferred by the forward: the backend makes it now, for this g
        with torch.autocast(image.device.type, enabled=False):
            gt = _impl(backend, 1)(grad, image, text, scale, bias, negative_only,
                                   chunk_size if chunk_size > 0 else None).to(text.dtype)
    gs = (d_scale * g).reshape(scale.shape).to(scale.dtype)
    gb = (d_bias * g).reshape(bias.shape).to(bias.dtype) if bias is not None else d_bias.new_zeros((0,))
    return gi, gt, gs, gb


@_siglip_bwd_op.register_fake
def _(grad, image, text, scale, bias, d_image, d_text, d_scale, d_bias, negative_only, backend, chunk_size):
    return (torch.empty_like(image, memory_format=torch.contiguous_format),
            torch.empty_like(text, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(bias) if bias is not None else d_bias.new_empty((0,)))


def _siglip_setup_context(ctx, inputs, output):
    image, text, scale, bias, negative_only, compute_grad, backend, chunk_size = inputs
    _, d_image, d_text, d_scale, d_bias = output
    ctx.save_for_backward(image, text, scale, bias, d_image, d_text, d_scale, d_bias)
    ctx.negative_only, ctx.compute_grad, ctx.backend, ctx.chunk_size = negative_only, compute_grad, backend, chunk_size
    ctx.mark_non_differentiable(d_image, d_text, d_scale, d_bias)


def _siglip_backward(ctx, grad_loss, *_unused):
    if not ctx.compute_grad:
        raise RuntimeError("fastclip::siglip_loss_fwd was called with compute_grad=False, so it kept no gradient; "
                           "call fastclip.siglip_loss (it decides from requires_grad) rather than the op directly")
    image, text, scale, bias, d_image, d_text, d_scale, d_bias = ctx.saved_tensors
    gi, gt, gs, gb = torch.ops.fastclip.siglip_loss_bwd(grad_loss, image, text, scale, bias, d_image, d_text, d_scale,
                                                        d_bias, ctx.negative_only, ctx.backend, ctx.chunk_size)
    return gi, gt, gs, (gb if bias is not None else None), None, None, None, None


torch.library.register_autograd("fastclip::siglip_loss_fwd", _siglip_backward, setup_context=_siglip_setup_context)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def siglip_block(image_features: Tensor, text_features: Tensor, scale: Tensor, bias: Optional[Tensor], *,
                 negative_only: bool, backend: str, chunk_size: Optional[int]) -> Tensor:
    """One block of the sigmoid loss, checked arguments assumed: the building block of the distributed modes.

    With ``negative_only`` every pair is a negative (a block of another rank's texts). Returns the 0-d loss in the
    features' dtype.
    """
    amp = autocast_dtype(image_features.device)
    image, text = amp_cast(image_features, amp), amp_cast(text_features, amp)
    out_dtype = amp_loss_dtype(image_features.dtype, amp, fp32_under_autocast=False)
    row = select(OP, backend, device=image.device, dtype=image.dtype, dim=image.shape[1])
    if row.backend == "reference":  # open_clip's code, autocast included
        return row.impl(image_features, text_features, scale, bias, negative_only=negative_only).to(out_dtype)
    refuse_forward_ad(OP, row.backend, image_features=image, text_features=text, logit_scale=scale, logit_bias=bias)
    loss, *_ = torch.ops.fastclip.siglip_loss_fwd(image, text, scale, bias, bool(negative_only),
                                                  _needs_grad(image, text, scale, bias), row.backend,
                                                  int(chunk_size or 0))
    return loss.to(out_dtype)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                logit_bias: Union[Tensor, float, None], *, backend: str = "auto",
                chunk_size: Optional[int] = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) in memory linear in the batch size.

    Args:
        image_features, text_features: (N, D) float16/bfloat16/float32/float64 on one device; row i of each is a
            positive pair, every other (i, j) a negative. Normalization is the caller's.
        logit_scale: one-element tensor (or number), already exponentiated, as open_clip's model returns it.
        logit_bias: one-element tensor (or number) added to every logit; may be None (no bias).
        backend: "auto", "reference", "torch", "triton" or "cuda" (see ``python -m fastclip.info``).
        chunk_size: rows per chunk for the "torch" backend (default: about 4M logits per chunk).

    Returns:
        0-d tensor in the features' dtype (accumulated in fp32, or fp64 for fp64 inputs). Values and gradients
        (features, logit_scale, logit_bias) equal open_clip's ``SigLipLoss`` on one process. Under
        ``torch.autocast`` the GEMMs run in the autocast dtype, as open_clip's matmul does, and the loss has
        open_clip's dtype there (the features' dtype promoted with the autocast dtype); outside autocast fp32 follows ``torch.get_float32_matmul_precision()``
        (see ``contrastive_loss``).

    Maths: S = s I T^T + b, z_ij = 2 [i == j] - 1, loss = -sum_ij log sigmoid(z_ij S_ij) / N;
    dL/dS_ij = (sigmoid(S_ij) - [i == j]) / N. When a gradient is wanted the forward makes it in the same sweep.

    Memory: O(N * D) plus O(chunk * N) ("torch") or O(N) ("triton"); the (N, N) logits are never materialized
    (except by "reference").

    Equivalent PyTorch::

        logits = logit_scale * image_features @ text_features.T + logit_bias
        labels = 2 * torch.eye(N) - 1
        loss = -F.logsigmoid(labels * logits).sum() / N
    """
    check_feature_pair(image_features, text_features)
    scale = as_scalar(logit_scale, "logit_scale", image_features, required=True)
    bias = as_scalar(logit_bias, "logit_bias", image_features, required=False)
    check_chunk_size(chunk_size)
    return siglip_block(image_features, text_features, scale, bias, negative_only=False, backend=backend,
                        chunk_size=chunk_size)
