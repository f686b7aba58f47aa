"""Functional API: input checks, backend dispatch, and autograd for fastclip's ops.

Each op is a ``torch.library.custom_op`` under the ``fastclip::`` namespace with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through it, and an autograd formula registered beside it. The custom op
takes the backend name as an argument and calls that backend's launcher; the ``reference`` backend bypasses it and
lets autograd differentiate the naive maths.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastclip.ops import reference
from fastclip.ops.registry import Support, cuda_ext_unavailable, cuda_kernel_reasons, register, select, \
    triton_unavailable

__all__ = ["contrastive_loss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Lazy:
    """A function imported on first call, so that e.g. triton is imported only when a triton kernel runs."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Input checks (once, at the boundary)


def _fmt(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def check_float_tensor(name: str, t, ndim: int, layout: str, empty_hint: str = "") -> None:
    """``t`` is a non-empty floating tensor of ``ndim`` dims; TypeError/ValueError naming ``name`` and its shape."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {_fmt(t)}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({layout}), got {_fmt(t)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: {_fmt(t)}{empty_hint}")


def check_feature_pair(image_features, text_features, *, same_batch: bool = True) -> None:
    """Both (N, D) floating tensors on one device with one dtype; ValueError/TypeError naming the argument."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        check_float_tensor(name, t, 2, "batch, dim", "; the loss needs at least one pair and one feature")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features and text_features are on different devices: "
                         f"image_features {_fmt(image_features)}; text_features {_fmt(text_features)}")
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features and text_features have different dtypes: "
                        f"image_features {_fmt(image_features)}; text_features {_fmt(text_features)}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features and text_features have different feature dims: "
                         f"image_features {_fmt(image_features)}; text_features {_fmt(text_features)}")
    if same_batch and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features and text_features have different batch sizes (each image pairs with "
                         f"the text of the same index): image_features {_fmt(image_features)}; "
                         f"text_features {_fmt(text_features)}")


def as_scalar(x: Union[Tensor, float, None], name: str, like: Tensor, *, required: bool) -> Optional[Tensor]:
    """A one-element tensor argument (logit_scale, logit_bias) as given, or a Python number as a 0-d tensor."""
    if x is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float32, device=like.device)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor or a number, got {type(x).__name__}")
    if x.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got {_fmt(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {_fmt(x)}")
    if x.device != like.device:
        if x.device.type == "cpu" and x.dim() == 0:
            return x.to(like.device)  # a CPU 0-d scalar combines with any device, as in torch arithmetic
        raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
    return x


def _check_smoothing(label_smoothing: float) -> float:
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return ls


# ---------------------------------------------------------------------------------------------------------------
# Contrastive (CLIP) loss

register(Support("contrastive_loss", "reference", impl=reference.contrastive_loss_ref))
register(Support("contrastive_loss", "torch",
                 impl=(_Lazy("fastclip.ops.torch_chunked", "contrastive_fwd"),
                       _Lazy("fastclip.ops.torch_chunked", "contrastive_bwd"))))
register(Support("contrastive_loss", "triton",
                 impl=(_Lazy("fastclip.ops.triton.contrastive", "contrastive_fwd"),
                       _Lazy("fastclip.ops.triton.contrastive", "contrastive_bwd")),
                 dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_dim=2048,
                 unavailable=triton_unavailable,
                 extra_checks=(lambda dev, dtype, dim: ["bfloat16 does not run in the Triton interpreter (CPU)"]
                               if dev == "cpu" and dtype == torch.bfloat16 else [],)))
register(Support("contrastive_loss", "cuda",
                 impl=(_Lazy("fastclip.ops.cuda", "contrastive_fwd"), _Lazy("fastclip.ops.cuda", "contrastive_bwd")),
                 devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16}), min_dim=8,
                 max_dim=2048, unavailable=cuda_ext_unavailable,
                 extra_checks=(cuda_kernel_reasons,)))


def _impl(backend: str, which: int):
    from fastclip.ops.registry import supports

    return supports("contrastive_loss")[backend].impl[which]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastclip::contrastive_loss_fwd", mutates_args=())
def _contrastive_fwd_op(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], label_smoothing: float,
                        backend: str, chunk_size: int) -> Tuple[Tensor, Tensor, Tensor]:
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
    d_image, d_text, d_scale = _impl(backend, 1)(grad, image, text, scale, bias, row_stats, col_stats, label_smoothing,
                                                 chunk_size if chunk_size > 0 else None)
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
        0-d tensor in the features' dtype (accumulated in fp32, or fp64 for fp64 inputs).

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
    ls = _check_smoothing(label_smoothing)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    row = select("contrastive_loss", backend, device=image_features.device, dtype=image_features.dtype,
                 dim=image_features.shape[1])
    if row.backend == "reference":
        return row.impl(image_features, text_features, scale, bias, label_smoothing=ls)
    loss, _, _ = torch.ops.fastclip.contrastive_loss_fwd(image_features, text_features, scale, bias, ls,
                                                         row.backend, int(chunk_size or 0))
    return loss.to(image_features.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Ops defined in their own modules, re-exported here (one import line per op).
from fastclip.attention import flash_attention  # noqa: E402,F401
from fastclip.siglip import siglip_loss  # noqa: E402,F401
from fastclip.ops.topk import topk_similarity  # noqa: E402,F401
