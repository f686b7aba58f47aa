"""Backends declare what they support, as data; ``select`` picks one and explains every refusal.

Each op lives in its own package, ``fastclip/ops/<op>/``: ``__init__.py`` registers one row per backend, holds the
custom ops and autograd and the public function; ``reference.py``, ``pytorch.py``, ``triton.py``, ``cuda.py`` are
the backends (an op that lacks a backend simply has no module for it).

Each op (``"contrastive_loss"``, ``"siglip_loss"``, ``"flash_attention"``, ...) has one :class:`Support` row per
backend that implements it. A row says which devices and dtypes the backend takes, the largest feature/head
dimension and other sizes (top-k's k), and a function that reports why the backend cannot run at all on this
machine (extension not built, no GPU). ``select(op, backend, device=..., dtype=..., dim=...)`` walks the rows in
priority order for ``"auto"`` and raises :class:`BackendError` listing each backend and its reasons when nothing
fits; an explicitly requested backend is never silently replaced.

Adding an op or a backend is adding a row with :func:`register`. ``auto``'s choice between ``cuda`` and ``triton``
comes from benchmark results committed with the package (:func:`preferred`).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from fastclip.ops import _extension  # loads the extension now, if built (never while compile traces)

BACKENDS = ("reference", "torch", "triton", "cuda")
# "auto" tries these in order; reference is the last resort (it materializes N x N). cuda is taken only where a
# committed benchmark measured it faster than triton (``preferred``).
AUTO_ORDER = ("cuda", "triton", "torch", "reference")

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendError(RuntimeError):
    """A requested backend cannot run these inputs (or, for "auto", none can). The message says why."""


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORT = {}  # cached outcome of importing triton (a dict, not lru_cache: torch.compile traces this)


def _triton_import_error() -> Optional[str]:
    if "err" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORT["err"] = None
        except Exception as e:  # ImportError, or a broken install
            _TRITON_IMPORT["err"] = f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    return _TRITON_IMPORT["err"]


def triton_unavailable() -> Optional[str]:
    """Why Triton kernels cannot run at all here, or None."""
    err = _triton_import_error()
    if err:
        return err
    if not triton_interpret() and not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, slowly)"
    return None


# Why the compiled extension cannot run, or None.
cuda_ext_unavailable = _extension.unavailable_reason


def no_bf16_in_interpreter(dev: str, dtype: torch.dtype, dim: int) -> List[str]:
    """Triton's interpreter (the CPU) has no bfloat16 arithmetic."""
    return ["bfloat16 does not run in the Triton interpreter (CPU)"] if dev == "cpu" and dtype == torch.bfloat16 \
        else []


def cuda_kernel_reasons(dev: str, dtype: torch.dtype, dim: int) -> List[str]:
    """Per-input refusals of the CUDA kernels beyond their Support rows' devices, dtypes and dims."""
    reasons = []
    if dim % 8:
        reasons.append(f"dim {dim} is not a multiple of 8 (the kernels load 16-byte rows)")
    if dev == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            reasons.append(f"the GPU is sm_{major}{minor}; the kernels need sm_80 or newer (bf16 mma.sync, cp.async)")
    return reasons


# why a backend cannot run at all on this machine (None: it can)
_BACKEND_UNAVAILABLE = {"triton": triton_unavailable, "cuda": cuda_ext_unavailable}


class Lazy:
    """A backend function imported on first call, so that e.g. triton is imported only when a triton kernel runs."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


@dataclass(frozen=True)
class Support:
    """What one backend supports for one op."""

    op: str
    backend: str
    impl: Callable  # the function that runs the op; its signature is the op's
    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: frozenset = _FLOATS
    max_dim: Optional[int] = None
    min_dim: int = 1
    dim_name: str = "feature dim"
    unavailable: Callable[[], Optional[str]] = lambda: None
    # extra per-input checks: f(device_type, dtype, dim) -> list of reasons
    extra_checks: Sequence[Callable] = field(default_factory=tuple)
    # the largest value of other sizes of the inputs, by name: {"k": 128} refuses select(..., sizes={"k": 200})
    max_sizes: Mapping[str, int] = field(default_factory=dict)

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, dim: int,
                              sizes: Optional[Mapping[str, int]] = None) -> List[str]:
        reasons = []
        why = self.unavailable()
        if why:
            reasons.append(why)
        dev = torch.device(device).type
        if dev not in self.devices:
            reasons.append(f"{dev} tensors are not supported (devices: {', '.join(sorted(self.devices))})")
        if dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} is not supported (dtypes: {names})")
        if self.max_dim is not None and dim > self.max_dim:
            reasons.append(f"{self.dim_name} {dim} > {self.max_dim}")
        if dim < self.min_dim:
            reasons.append(f"{self.dim_name} {dim} < {self.min_dim}")
        for name, limit in self.max_sizes.items():
            if sizes is not None and sizes.get(name, 0) > limit:
                reasons.append(f"{name} {sizes[name]} > {limit} (the largest {name} this backend takes)")
        for check in self.extra_checks:
            reasons.extend(check(dev, dtype, dim))
        return reasons


_REGISTRY: Dict[str, Dict[str, Support]] = {}


def register(support: Support) -> Support:
    if support.backend not in BACKENDS:
        raise ValueError(f"unknown backend {support.backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(support.op, {})[support.backend] = support
    return support


def supports(op: str) -> Dict[str, Support]:
    """The rows of ``op`` (registered when its package, ``fastclip.ops.<op>``, is imported: ``import fastclip``
    imports every op)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def ops() -> List[str]:
    return sorted(_REGISTRY)


def select(op: str, backend: str = "auto", *, device, dtype, dim: int, sizes: Optional[Mapping[str, int]] = None,
           among: Optional[Tuple[str, ...]] = None, caller: str = "") -> Support:
    """The backend that runs ``op`` on these inputs.

    ``sizes``: the op's other sizes that some rows limit (``Support.max_sizes``), e.g. ``{"k": k}`` for top-k.
    ``among``: the backends a caller can run (default: all), ``caller`` its name for the errors; e.g. the
    distributed ring, which merges block statistics only in the log bases it knows.
    ``backend="auto"`` honours ``FASTCLIP_BACKEND`` and otherwise takes the first backend in ``AUTO_ORDER`` (and in
    ``among``) that supports the inputs. An explicit backend, or ``FASTCLIP_BACKEND``'s, that cannot run or is not
    in ``among`` raises :class:`BackendError` with its reasons.
    """
    table = supports(op)
    if backend is None:
        backend = "auto"
    source, via = f"backend={backend!r}", ""
    if backend == "auto":
        env = os.environ.get("FASTCLIP_BACKEND", "").strip()
        if env and env != "auto":
            backend, source, via = env, f"FASTCLIP_BACKEND={env!r} (environment variable)", " (FASTCLIP_BACKEND)"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"{source} is not one of {('auto',) + BACKENDS}")
        if backend not in table:
            why = _BACKEND_UNAVAILABLE.get(backend, lambda: None)()
            raise BackendError(f"{op}: backend {backend!r}{via} has no implementation of this op in this version "
                               f"(implemented by: {', '.join(table)})" + (f"; besides, {why}" if why else ""))
        if among is not None and backend not in among:
            raise BackendError(f"{op}: backend {backend!r}{via} is not run by {caller or 'this caller'} (it runs "
                               f"{', '.join(among)})")
        row = table[backend]
        reasons = row.not_supported_reasons(device, dtype, dim, sizes)
        if reasons:
            raise BackendError(f"{op}: backend {backend!r}{via} cannot run these inputs "
                               f"(device={device}, dtype={dtype}, {row.dim_name}={dim}): " + "; ".join(reasons))
        return row
    refusals = []
    for name in AUTO_ORDER:
        row = table.get(name)
        if row is None:
            continue
        if among is not None and name not in among:
            refusals.append(f"  {name}: not run by {caller or 'this caller'}")
            continue
        if name == "cuda" and not row.unavailable():
            if preferred(op, device, dtype, dim) != "cuda":
                refusals.append("  cuda: skipped by auto: no committed benchmark shows it faster than triton for "
                                "these inputs (fastclip/data/backend_choice.json)")
                continue
        reasons = row.not_supported_reasons(device, dtype, dim, sizes)
        if not reasons:
            # On the CPU the interpreter is a correctness tool, never a speed choice.
            if name == "triton" and torch.device(device).type == "cpu":
                refusals.append("  triton: skipped by auto on the CPU (the interpreter is for testing)")
                continue
            return row
        refusals.append(f"  {name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can run these inputs (device={device}, dtype={dtype}, dim={dim}):\n"
                       + "\n".join(refusals))


# ---------------------------------------------------------------------------------------------------------------
# auto's measured choice between "cuda" and "triton".
#
# Both backends run the same ops on the same GPUs; neither is assumed faster. fastclip/data/backend_choice.json
# lists, per op, GPU architecture, dtype and dimension bucket, the backend that measured faster (forward+backward
# median) and the CSV rows that showed it; benchmarks/choose_backends.py writes it from result CSVs. Where the table
# has no entry, auto keeps "triton" (the kernels with the longer record); "cuda" is chosen only on evidence.

CHOICE_TABLE = os.path.join(os.path.dirname(__file__), "data", "backend_choice.json")


def _read() -> list:
    try:
        with open(CHOICE_TABLE) as f:
            return json.load(f).get("entries", [])
    except FileNotFoundError:
        return []


# read once at import: select() runs inside torch.compile's trace, where file I/O would break the graph
_CACHE = {"entries": _read()}


def choice_table() -> list:
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
    for e in choice_table():
        if e["op"] == op and e["arch"] == arch and e["dtype"] == name and dim <= e["dim_max"]:
            if best is None or e["dim_max"] < best["dim_max"]:
                best = e
    return best["backend"] if best else None
