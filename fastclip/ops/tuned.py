"""Measured Triton tiles: the committed table ``fastclip/data/triton_configs.json``.

``benchmarks/tune_triton.py`` writes it on a GPU (a small config space per op, timed with a reset of every
accumulated buffer between trials); launchers read it through :func:`tuned_config` and fall back to their kernel's
static table where it has no entry. A normal run never autotunes.

An entry: {"op": "contrastive_bwd", "arch": "sm_90", "dtype": "bfloat16", "d": 512, "n": 65536, "config": {...}}:
``d`` is the feature dim padded to a power of two (at least 16), ``n`` the batch bucket (:func:`n_bucket`), and
``config`` the launch's block sizes, warps and stages, exactly as the kernel's static table spells them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "triton_configs.json")
N_BUCKETS = (4096, 16384, 65536, 262144)  # a batch uses the smallest bucket >= N (the largest beyond)

Key = Tuple[str, str, str, int, int]


def n_bucket(n: int) -> int:
    return next((b for b in N_BUCKETS if n <= b), N_BUCKETS[-1])


def d_bucket(d: int) -> int:
    return max(16, 1 << (int(d) - 1).bit_length())


def entry_key(op: str, arch: str, dtype: torch.dtype, d: int, n: int) -> Key:
    return op, arch, str(dtype).replace("torch.", ""), d_bucket(d), n_bucket(n)


def load_table(path: str = TABLE) -> Dict[Key, dict]:
    with open(path) as f:
        entries = json.load(f)["entries"]
    return {(e["op"], e["arch"], e["dtype"], int(e["d"]), int(e["n"])): dict(e["config"]) for e in entries}


@functools.lru_cache(maxsize=None)
def _table() -> Dict[Key, dict]:
    return load_table()


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def gpu_arch() -> int:
    """The current GPU's compute capability as 90, 80, ...; 90 without a GPU (no launch then: the default tables)."""
    try:
        major, minor = torch.cuda.get_device_capability()
    except (AssertionError, RuntimeError):  # no GPU, or torch without CUDA
        return 90
    return 10 * major + minor


def by_arch(entry):
    """A static table's entry; for one that differs by architecture ({90: ..., 80: ...}), the current GPU's: the
    sm_90 entry on sm_90 and newer, the sm_80 one below."""
    if not isinstance(entry, dict) or set(entry) != {90, 80}:
        return entry
    return entry[90] if gpu_arch() >= 90 else entry[80]


_FORCED: Dict[str, dict] = {}


@contextlib.contextmanager
def forced(op: str, config: dict) -> Iterator[None]:
    """Launches of ``op`` use ``config`` inside the block (the tuner's trials; not for training code)."""
    _FORCED[op] = dict(config)
    try:
        yield
    finally:
        del _FORCED[op]


def tuned_config(op: str, n: int, d: int, dtype: torch.dtype) -> Optional[dict]:
    """The measured config for this launch on the current CUDA device, or None (use the static table)."""
    if op in _FORCED:
        return dict(_FORCED[op])
    if not torch.cuda.is_available():
        return None
    cfg = _table().get(entry_key(op, _arch(torch.cuda.current_device()), dtype, d, n))
    return dict(cfg) if cfg is not None else None
