"""Training checkpoints: written atomically, with everything a run needs to continue exactly.

A checkpoint holds the model's state dict under ``"state_dict"`` (open_clip's keys and open_clip_train's layout, so
``fastclip.create_model(name, pretrained=path)``, ``fastclip train --pretrained path`` and open_clip load it), the
optimizer, scheduler and grad scaler, the step, and per rank the data loader's position and every random state
(Python, NumPy, torch's CPU and CUDA generators). It is written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a run killed at any moment leaves either the old checkpoint or the new one,
never a torn file.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


def rng_state() -> dict:
    """Every random state, in types ``torch.load(weights_only=True)`` accepts (NumPy's key array as a list)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename (atomic on POSIX file systems)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: str, state: dict, step: int, *, keep: bool) -> str:
    """Write ``state`` as ``checkpoints/last.pt`` (and, with ``keep``, as ``checkpoints/step_<step>.pt`` too: one
    file on disk under two names). Returns the path of last.pt."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    last = os.path.join(folder, LAST)
    if not keep:
        atomic_save(state, last)
        return last
    kept = os.path.join(folder, f"step_{step:08d}.pt")
    atomic_save(state, kept)
    link = f"{last}.link.{os.getpid()}"
    if os.path.exists(link):
        os.remove(link)
    os.link(kept, link)
    os.replace(link, last)
    return last


def last_checkpoint(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, CHECKPOINT_DIR, LAST)
    return path if os.path.isfile(path) else None


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = ["rng_state", "set_rng_state", "atomic_save", "save", "load", "last_checkpoint"]
