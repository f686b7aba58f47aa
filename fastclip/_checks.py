"""Input checks shared by every op, run once at the public boundary.

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, value or device) with a message
naming the argument and its shape, dtype and device.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def check_feature_pair(image_features, text_features) -> None:
    """Both (N, D) floating tensors on one device with one dtype and one N; ValueError/TypeError naming the
    argument."""
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
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features and text_features have different batch sizes (each image pairs with "
                         f"the text of the same index): image_features {_fmt(image_features)}; "
                         f"text_features {_fmt(text_features)}")


def as_scalar(x: Union[Tensor, float, None], name: str, like: Tensor, *, required: bool) -> Optional[Tensor]:
    """A one-element tensor argument (logit_scale, logit_bias) as given, or a Python number as a 0-d tensor."""
    if x is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):  # Python and NumPy numbers
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


def check_label_smoothing(label_smoothing: float) -> float:
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return ls


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` (rows per chunk of the torch backends) is None or a positive integer."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")


# ---------------------------------------------------------------------------------------------------------------
# Autocast at the boundary.
#
# Under torch.autocast, open_clip's `logit_scale * image @ text.T` and attention's SDPA run their GEMMs in the
# autocast dtype whatever the inputs' dtype (F.normalize returns fp32 under autocast, so AMP training hands the
# loss fp32 features). fastclip's ops do the same: the public function casts its floating inputs to the autocast
# dtype (a differentiable cast: fp32 leaves get fp32 gradients) and the backends run with autocast off, so every
# GEMM inside a backend sees one dtype. fp64 is never cast (autocast leaves fp64 alone too).

_AMP_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs GEMMs in on ``device``'s type, or None when autocast is off there."""
    dev = torch.device(device).type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def amp_loss_dtype(dtype: torch.dtype, amp: Optional[torch.dtype], *, fp32_under_autocast: bool) -> torch.dtype:
    """The dtype of the loss open_clip's code returns for features of ``dtype`` under autocast dtype ``amp`` (None:
    autocast off, the features' dtype). ``fp32_under_autocast``: CLIP's loss, whose F.cross_entropy autocast runs
    in fp32 (fp64 left alone); otherwise SigLIP's, whose autocast-dtype logits meet labels in the features' dtype:
    the two promoted."""
    if amp is None or dtype not in _AMP_ELIGIBLE:
        return dtype
    return torch.float32 if fp32_under_autocast else torch.promote_types(dtype, amp)


def amp_cast(t: Optional[Tensor], amp: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` in the autocast dtype ``amp`` (None: unchanged), as autocast casts a GEMM's inputs."""
    if t is None or amp is None or t.dtype not in _AMP_ELIGIBLE or t.dtype == amp:
        return t
    return t.to(amp)


def refuse_forward_ad(op: str, backend: str, **tensors: Optional[Tensor]) -> None:
    """Refuse forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) on a fused backend: PyTorch's
    custom ops have no forward-mode rule, so the tangent would be dropped without an error (a zero or missing
    derivative). ``tensors``: the op's inputs by argument name; the one carrying a tangent is named."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if isinstance(t, Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) does not run through backend "
                f"{backend!r}, which would drop the tangent that {name} carries; use backend='reference' (plain "
                f"PyTorch, O(N^2) memory) for it")
