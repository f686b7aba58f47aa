"""Building the CUDA extension: its sources, flags, CUDA toolkit and cache folder.

``python -m fastclip.build`` (``fastclip/build/__main__.py``) compiles it now, on this machine, JIT with ninja. The
install-time build (``FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e .``, see setup.py) uses the same
sources and flags, from :func:`extension_kwargs`.

The JIT build goes to :func:`default_out_dir`, ``~/.cache/fastclip/torch-<version>/``, which is keyed on the torch
version only: every Python environment on this machine with that torch version and no ``fastclip._C`` of its own
loads that library, so a rebuild from one environment changes what all of them run.

This module must stay importable without torch (setup.py loads it by path before torch is known to exist).
"""
from __future__ import annotations

import glob
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "80;90"


def sources(relative: bool = False) -> list:
    """ops.cpp (torch bindings) and one .cu per op and dtype family; csrc/emulate and csrc/tests are not built."""
    found = [os.path.join(CSRC, "ops.cpp")]
    for op in ("contrastive", "attention"):
        found += sorted(glob.glob(os.path.join(CSRC, op, "*.cu")))
    return [os.path.relpath(p, ROOT) for p in found] if relative else found


def arch_flags(archs: str | None = None) -> list:
    """-gencode flags for FASTCLIP_CUDA_ARCHS ("80;90" -> sm_80 and sm_90 SASS, plus compute_90 PTX)."""
    archs = archs if archs is not None else os.environ.get("FASTCLIP_CUDA_ARCHS", DEFAULT_ARCHS)
    items = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not items:
        raise ValueError(f"FASTCLIP_CUDA_ARCHS={archs!r} names no architecture (expected e.g. '80;90')")
    for a in items:
        if not a.rstrip("a").isdigit() or int(a.rstrip("a")) < 80:
            raise ValueError(f"FASTCLIP_CUDA_ARCHS: {a!r} is not a supported architecture (sm_80 or newer, e.g. 80, "
                             f"86, 89, 90, 90a)")
    flags = []
    for a in items:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = items[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    return flags


def extension_kwargs(relative: bool = False, archs: str | None = None) -> dict:
    return {
        "sources": sources(relative),
        "include_dirs": [CSRC],
        "cxx_flags": ["-O3"],
        "nvcc_flags": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + arch_flags(archs),
    }


def _is_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home(environ=os.environ) -> tuple:
    """(CUDA toolkit folder or None, how it was found or why none was).

    In order: ``$CUDA_HOME`` (or ``$CUDA_PATH``), which must hold ``bin/nvcc`` and ``include/cuda_runtime.h``; the
    toolkit around the ``nvcc`` on ``PATH`` (followed through links); ``/usr/local/cuda``; the newest
    ``/usr/local/cuda-X.Y``. (torch guesses from ``nvcc``'s folder alone, which gives ``/usr/local`` for a wrapper in
    ``/usr/local/bin``.)
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            home = environ[var]
            if _is_toolkit(home):
                return home, f"${var}"
            return None, f"${var}={home} holds no CUDA toolkit (bin/nvcc and include/cuda_runtime.h)"
    candidates = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc:
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on PATH ({nvcc})"))
    candidates.append(("/usr/local/cuda", "the default location"))
    versions = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    candidates += [(p, "the newest versioned toolkit") for p in reversed(versions)]
    for home, how in candidates:
        if _is_toolkit(home):
            return home, how
    return None, "no CUDA toolkit found (looked at nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*)"


def default_out_dir() -> str:
    import torch

    tag = torch.__version__.replace("+", "_")
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "fastclip", f"torch-{tag}")
