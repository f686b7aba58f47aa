"""Loading the compiled extension that the ``cuda`` backends (``fastclip/ops/<op>/cuda.py``) call, and the fake
implementations of its ops (``torch.ops.fastclip.*_cuda``) for torch.compile.

The extension is optional. It is ``fastclip._C`` when fastclip was installed with ``FASTCLIP_BUILD_CUDA=1``, or the
library ``python -m fastclip.build`` compiled into ``~/.cache/fastclip/torch-<version>/`` (``FASTCLIP_CUDA_EXT``
names another file). Importing fastclip never fails without it: the backend then reports "not built" with the
command that builds it, or "built but no GPU".

The kernels (csrc/<op>/) take fp16/bf16 on sm_80 or newer.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BUILD_HINT = ("build it with: FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e . "
              "(or python -m fastclip.build on a machine with nvcc)")
_STATE = {}  # cached outcome of loading the extension (not lru_cache: torch.compile traces through callers)


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
    def _(image, text, scale, diag):
        n = image.shape[0]
        return image.new_empty((2, n), dtype=torch.float32), image.new_empty((2, n), dtype=torch.float32)

    @torch.library.register_fake("fastclip::contrastive_grad_cuda")
    def _(a, b, scale, diag, a_stats, b_stats, diag_coef, uniform_coef, with_ds_dot=True):
        return a.new_empty(a.shape, dtype=torch.float32), \
            a.new_empty((a.shape[0] if with_ds_dot else 0,), dtype=torch.float32)

    @torch.library.register_fake("fastclip::flash_attn_fwd_cuda")
    def _(q, k, v, key_padding_mask, causal, softmax_scale):
        b, s_q, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)

    @torch.library.register_fake("fastclip::flash_attn_bwd_cuda")
    def _(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_load()  # at import: torch.compile may trace the first dispatch, where importing a library would break the graph
