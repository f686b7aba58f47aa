"""Which of "cuda" and "triton" ``auto`` runs, from benchmark results committed in the repository.

Both backends run the same ops on the same GPUs; neither is assumed faster. ``fastclip/data/backend_choice.json``
lists, per op, GPU architecture, dtype and dimension bucket, the backend that measured faster (forward+backward
median) and the CSV rows that showed it; ``benchmarks/choose_backends.py`` writes it from benchmarks/results/*.csv.
Where the table has no entry, auto keeps "triton" (the kernels with the longer record); "cuda" is chosen only on
evidence.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "backend_choice.json")


def _read() -> list:
    try:
        with open(TABLE) as f:
            return json.load(f).get("entries", [])
    except FileNotFoundError:
        return []


# read once at import: select() runs inside torch.compile's trace, where file I/O would break the graph
_CACHE = {"entries": _read()}


def table() -> list:
    return _CACHE["entries"]


def device_arch(device) -> str:
    """'sm_90' for a CUDA device (cached per index), '' otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return ""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CACHE:
        major, minor = torch.cuda.get_device_capability(idx)
        _CACHE[idx] = f"sm_{major}{minor}"
    return _CACHE[idx]


def preferred(op: str, device, dtype: torch.dtype, dim: int) -> Optional[str]:
    """The measured-faster backend for these inputs, or None when nothing was measured."""
    arch = device_arch(device)
    name = str(dtype).replace("torch.", "")
    best = None
    for e in table():
        if e["op"] == op and e["arch"] == arch and e["dtype"] == name and dim <= e["dim_max"]:
            if best is None or e["dim_max"] < best["dim_max"]:
                best = e
    return best["backend"] if best else None
