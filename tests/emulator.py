"""Builds fastclip's CUDA kernel sources for the CPU emulator (csrc/common/emulate.h) and loads them with ctypes.

The very .cu files the extension compiles with nvcc are compiled here by g++ with -DFASTCLIP_EMULATE, together with
an ``extern "C"`` shim from csrc/emulate/, into one shared library cached under the build directory by a hash of
every source it includes. Tests call the launchers through the shim on numpy arrays.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CACHE = Path(os.environ.get("FASTCLIP_EMU_CACHE", Path(tempfile.gettempdir()) / "fastclip-emu"))


def compiler_missing() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    return None


def _digest(sources) -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):  # every header a source may include
        if path.suffix in (".h", ".cuh", ".cu", ".cpp") and path.is_file():
            h.update(str(path.relative_to(CSRC)).encode())
            h.update(path.read_bytes())
    h.update(" ".join(map(str, sources)).encode())
    return h.hexdigest()[:16]


def build(name: str, sources) -> ctypes.CDLL:
    """Compile ``sources`` (paths relative to csrc/) into lib<name>.so with the emulator and load it."""
    sources = [CSRC / s for s in sources]
    out = CACHE / f"lib{name}-{_digest(sources)}.so"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-g0", "-fPIC", "-shared", "-pthread", "-DFASTCLIP_EMULATE",
               "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-x", "c++", *map(str, sources), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.replace(tmp, out)
    return ctypes.CDLL(str(out))


def ptr(a: np.ndarray | None) -> ctypes.c_void_p:
    """A pointer to a numpy array's data (None -> NULL)."""
    return ctypes.c_void_p(0 if a is None else a.ctypes.data)


def aligned_empty(shape, dtype, align: int = 128) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary (cp.async wants 16)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def to_bits(x, kind: str) -> np.ndarray:
    """float array -> uint16 storage of fp16 ('fp16') or bf16 ('bf16'), rounded to nearest even; 128-aligned."""
    import torch

    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    t = t.to(torch.float16 if kind == "fp16" else torch.bfloat16)
    out = aligned_empty(tuple(t.shape), np.uint16)
    out[...] = t.view(torch.int16).numpy().view(np.uint16)
    return out


def from_bits(bits: np.ndarray, kind: str) -> np.ndarray:
    """uint16 storage of fp16/bf16 -> float64."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16))
    return t.view(torch.float16 if kind == "fp16" else torch.bfloat16).double().numpy()
