"""The ``cuda`` backend: thin wrappers over ``torch.ops.fastclip.*_cuda`` from the compiled extension.

The extension is optional. It is ``fastclip._C`` when fastclip was installed with ``FASTCLIP_BUILD_CUDA=1``, or the
library ``python -m fastclip.build`` compiled into ``~/.cache/fastclip/torch-<version>/`` (``FASTCLIP_CUDA_EXT``
names another file). Importing fastclip never fails without it: the backend then reports "not built" with the
command that builds it, or "built but no GPU".

The kernels (csrc/) take fp16/bf16 on sm_80 or newer. The contrastive kernels return base-2 row/column statistics
and fp32 gradient sums; the O(N * D) remainder of the loss (the diagonal, label smoothing, the output scaling and
d(logit_scale)) is done here with PyTorch ops.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

BUILD_HINT = ("build it with: FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e . "
              "(or python -m fastclip.build on a machine with nvcc)")
_STATE = {}  # cached outcome of loading the extension (not lru_cache: torch.compile traces through callers)
_LN2 = math.log(2.0)
_ROW_CHUNK = 1 << 16  # rows per chunk of the O(N * D) fp32 work, so it never holds a full fp32 copy of a feature


def _jit_library() -> Optional[str]:
    path = os.environ.get("FASTCLIP_CUDA_EXT")
    if path:
        return path
    try:
        from fastclip.build import default_out_dir

        cand = os.path.join(default_out_dir(), "_C.so")
    except Exception:  # noqa: BLE001
        return None
    return cand if os.path.exists(cand) else None


def _load() -> Optional[str]:
    """Load the extension once; None on success, else why it is not there."""
    if "err" in _STATE:
        return _STATE["err"]
    err = None
    try:
        import fastclip._C  # noqa: F401
    except ImportError as e:
        lib = _jit_library()
        if lib is None:
            err = f"the CUDA extension fastclip._C is not built ({e}); {BUILD_HINT}"
        else:
            try:
                torch.ops.load_library(lib)
            except (OSError, RuntimeError) as e2:
                err = f"the CUDA extension at {lib} does not load ({e2}); rebuild it: {BUILD_HINT}"
    if err is None:
        _register_fakes()
    _STATE["err"] = err
    return err


def built() -> bool:
    return _load() is None


def unavailable_reason() -> Optional[str]:
    """Why the cuda backend cannot run here (not built; built but no GPU; GPU too old), or None."""
    err = _load()
    if err:
        return err
    if not torch.cuda.is_available():
        return "the CUDA extension is built but there is no CUDA GPU"
    return None


def _register_fakes() -> None:  # once: _load() caches its outcome
    @torch.library.register_fake("fastclip::contrastive_stats_cuda")
    def _(image, text, scale):
        n = image.shape[0]
        return image.new_empty((2, n), dtype=torch.float32), image.new_empty((2, n), dtype=torch.float32)

    @torch.library.register_fake("fastclip::contrastive_grad_cuda")
    def _(a, b, scale, a_stats, b_stats, diag_coef, uniform_coef):
        return a.new_empty(a.shape, dtype=torch.float32)

    @torch.library.register_fake("fastclip::flash_attn_fwd_cuda")
    def _(q, k, v, key_padding_mask, causal, softmax_scale):
        b, s_q, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)

    @torch.library.register_fake("fastclip::flash_attn_bwd_cuda")
    def _(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------------------------------------------
# Contrastive loss: the backend's (fwd, bwd) pair, with the signatures of fastclip.functional's custom ops.


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_k a[i, k] * b[i, k] (or b[k] for a vector b) in fp32, chunked over rows."""
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], _ROW_CHUNK):
        bb = b[s:s + _ROW_CHUNK].float() if b.dim() == 2 else b
        out[s:s + _ROW_CHUNK] = (a[s:s + _ROW_CHUNK].float() * bb).sum(1)
    return out


def _colmean(a: Tensor) -> Tensor:
    acc = torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    for s in range(0, a.shape[0], _ROW_CHUNK):
        acc += a[s:s + _ROW_CHUNK].float().sum(0)
    return acc / a.shape[0]


def contrastive_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], label_smoothing: float,
                    chunk_size: Optional[int]):
    # The bias shifts every logit and so each log-sum-exp and each target logit alike: it cancels.
    scale32 = scale.reshape(1).float()
    row, col = torch.ops.fastclip.contrastive_stats_cuda(image, text, scale32)
    lse_row = (row[0] + row[1]) * _LN2
    lse_col = (col[0] + col[1]) * _LN2
    diag = scale32 * _rowdot(image, text)
    eps = label_smoothing
    loss_row = lse_row - (1.0 - eps) * diag
    loss_col = lse_col - (1.0 - eps) * diag
    if eps:
        loss_row = loss_row - eps * scale32 * _rowdot(image, _colmean(text))
        loss_col = loss_col - eps * scale32 * _rowdot(text, _colmean(image))
    loss = 0.5 * (loss_row.mean() + loss_col.mean())
    return loss, row, col


def contrastive_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor],
                    row_stats: Tensor, col_stats: Tensor, label_smoothing: float, chunk_size: Optional[int]):
    n = image.shape[0]
    scale32 = scale.reshape(1).float()
    diag_coef, uniform_coef = 2.0 * (1.0 - label_smoothing), 2.0 * label_smoothing / n
    g_image = torch.ops.fastclip.contrastive_grad_cuda(image, text, scale32, row_stats, col_stats, diag_coef,
                                                       uniform_coef)
    g_text = torch.ops.fastclip.contrastive_grad_cuda(text, image, scale32, col_stats, row_stats, diag_coef,
                                                      uniform_coef)
    # dL/ds_ij = ds_ij / 2n, s = scale * I T^T: dI = scale/2n * g_image, dT = scale/2n * g_text and
    # d(scale) = 1/2n * sum_i <I_i, g_image_i>.
    g = grad.float().reshape(1) / (2 * n)
    d_scale = (g * _rowdot(image, g_image).sum()).reshape(scale.shape).to(scale.dtype)
    coef = g * scale32
    return (g_image.mul_(coef).to(image.dtype), g_text.mul_(coef).to(text.dtype), d_scale)


# ---------------------------------------------------------------------------------------------------------------
# Flash attention


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                  softmax_scale: float):
    return torch.ops.fastclip.flash_attn_fwd_cuda(q, k, v, key_padding_mask, causal, softmax_scale)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float):
    return torch.ops.fastclip.flash_attn_bwd_cuda(dout.contiguous(), q, k, v, out, lse, key_padding_mask, causal,
                                                  softmax_scale)


_load()  # at import: torch.compile may trace the first dispatch, where importing a library would break the graph
