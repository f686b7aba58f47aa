"""Thin wrappers over ``torch.ops.fastclip.*`` from the compiled extension ``fastclip._C``.

The extension is optional: importing fastclip never fails without it, and the ``cuda`` backend then reports
"not built" with the command that builds it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

BUILD_HINT = "build it with: FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e ."


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import fastclip._C  # noqa: F401
    except ImportError as e:
        return f"the CUDA extension fastclip._C is not built ({e}); {BUILD_HINT}"
    return None


def unavailable_reason() -> Optional[str]:
    """Why the cuda backend cannot run here (not built, or built but no GPU), or None."""
    err = _import_error()
    if err:
        return err
    if not torch.cuda.is_available():
        return "the CUDA extension is built but there is no CUDA GPU"
    return None
