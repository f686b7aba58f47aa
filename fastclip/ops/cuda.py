"""Thin wrappers over ``torch.ops.fastclip.*`` from the compiled extension ``fastclip._C``.

The extension is optional: importing fastclip never fails without it, and the ``cuda`` backend then reports
"not built" with the command that builds it.
"""
from __future__ import annotations

from typing import Optional

import torch

BUILD_HINT = "build it with: FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e ."
_IMPORT = {}  # cached outcome of importing the extension (not lru_cache: torch.compile traces this)


def _import_error() -> Optional[str]:
    if "err" not in _IMPORT:
        try:
            import fastclip._C  # noqa: F401

            _IMPORT["err"] = None
        except ImportError as e:
            _IMPORT["err"] = f"the CUDA extension fastclip._C is not built ({e}); {BUILD_HINT}"
    return _IMPORT["err"]


def unavailable_reason() -> Optional[str]:
    """Why the cuda backend cannot run here (not built, or built but no GPU), or None."""
    err = _import_error()
    if err:
        return err
    if not torch.cuda.is_available():
        return "the CUDA extension is built but there is no CUDA GPU"
    return None
