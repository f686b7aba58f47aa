"""Shared benchmark utilities: timing, peak memory, environment, long-format CSV and a console table.

Timing on CUDA uses CUDA events around each call, with the L2 cache flushed before every call (a 256 MB write),
warm-up first, and reports p20/p50/p80 in milliseconds. On the CPU it uses ``time.perf_counter``; CPU timings say
nothing about GPU speed and are labelled with the CPU's name.

Peak memory is what the measured call adds on top of what was allocated before it: ``torch.cuda`` peak statistics
on CUDA; on Linux CPUs the process's resident high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``.

Results: each row is appended to a long-format CSV and flushed the moment it is measured (:class:`CsvWriter`), so a
run cut short keeps every finished measurement. The CSV goes to ``./fastclip-results/<bench>.csv`` unless the
command says otherwise (``--out DIR``, ``--csv FILE``); ``--save`` appends to the CSVs committed in a fastclip
checkout's ``benchmarks/results/`` instead.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional

import torch

CSV_FIELDS = ("op", "provider", "mode", "shape", "dtype", "ms_p20", "ms_p50", "ms_p80", "peak_mem_mb", "tflops",
              "device", "torch", "triton", "git_sha", "date", "note")


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    ms_p20: float = float("nan")
    ms_p50: float = float("nan")
    ms_p80: float = float("nan")
    peak_mem_mb: float = float("nan")
    tflops: float = float("nan")
    device: str = ""
    torch: str = ""
    triton: str = ""
    git_sha: str = ""
    date: str = ""
    note: str = ""


def quantiles(ms: List[float]):
    """(p20, p50, p80) of a list of times."""
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return q[1], statistics.median(ms), q[7]


_L2_FLUSH = {}


def _flush_l2(device: torch.device) -> None:
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, rep: int = 20,
            max_seconds: float = 30.0) -> List[float]:
    """Milliseconds of ``rep`` calls of ``fn`` (fewer if they exceed ``max_seconds``), after ``warmup`` calls."""
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        t_end = time.perf_counter() + max_seconds
        for _ in range(rep):
            _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            if time.perf_counter() > t_end:
                break
        return times
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + max_seconds
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end:
            break
    return times


def _vm_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC = None


def _release_free_memory() -> None:
    """Make freed CPU memory leave the process so the next high-water mark counts only new allocations.

    glibc keeps freed heap pages resident and raises its mmap threshold as large blocks are freed, after which a
    later allocation reuses resident pages and the high-water mark under-counts it. A fixed 64 KB threshold sends
    every large block to mmap (returned on free), and malloc_trim returns the rest.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_kb("VmHWM") is not None


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Extra peak memory (MB) of one call of ``fn`` beyond what was resident/allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not cpu_peak_supported():
        return float("nan")
    _release_free_memory()
    base = _vm_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return max(0, _vm_kb("VmHWM") - base) / 1024


def git_sha() -> str:
    if os.environ.get("FASTCLIP_GIT_SHA"):
        return os.environ["FASTCLIP_GIT_SHA"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":  # the architecture too: auto's cuda/triton choice is keyed on it
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "none"
    return dict(device=device_name(device), torch=torch.__version__, triton=triton_version, git_sha=git_sha(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


class CsvWriter:
    """Appends :class:`Row` s to a long-format CSV one at a time, each written and flushed as it is measured.

    ``path=None`` writes nothing. The file and its folder are created at the first row; the header is written when
    the file is new or empty. Use as a context manager.
    """

    def __init__(self, path: Optional[str]):
        self.path, self.count, self._file, self._writer = path, 0, None, None

    def write(self, row: Row) -> None:
        if self.path is None:
            return
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
            if new:
                self._writer.writeheader()
        self._writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})
        self._file.flush()
        os.fsync(self._file.fileno())
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "CsvWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_csv(path: str, rows: Iterable[Row]) -> None:
    with CsvWriter(path) as w:
        for r in rows:
            w.write(r)


DEFAULT_OUT = "fastclip-results"


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where results go")
    g.add_argument("--out", metavar="DIR", help=f"folder for the CSV (default: ./{DEFAULT_OUT}/)")
    g.add_argument("--csv", metavar="FILE", help="the CSV file to append to, instead of --out ('none': no file)")
    g.add_argument("--save", action="store_true",
                   help="append to the CSV committed in this fastclip checkout (benchmarks/results/), to commit it")


def checkout_results_dir() -> str:
    """``benchmarks/results/`` of the fastclip checkout this package runs from; SystemExit when it is not one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "benchmarks", "results")
    if not os.path.isdir(path):
        raise SystemExit(f"--save appends to benchmarks/results/ of a fastclip checkout, and fastclip here ({root}) "
                         f"is not one; use --out DIR")
    return path


def csv_path(args: argparse.Namespace, name: str) -> Optional[str]:
    """The CSV a benchmark appends to, from :func:`add_output_arguments`' options; None for ``--csv none``."""
    if args.save and (args.out or args.csv):
        raise SystemExit("--save writes to the checkout's benchmarks/results/: give it without --out or --csv")
    if args.csv:
        return None if args.csv == "none" else args.csv
    if args.save:
        return os.path.join(checkout_results_dir(), name)
    return os.path.join(args.out or DEFAULT_OUT, name)


def plain(doc: str) -> str:
    """A docstring as help text: reST literals and roles (````x````, ``:func:`x```) as plain text."""
    doc = re.sub(r":\w+:`([^`]*)`", r"\1", doc)
    return re.sub(r"``([^`]*)``", r"\1", doc).strip()


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``fastclip bench <name>``: its own usage line, and its module docstring as description."""
    return argparse.ArgumentParser(prog=f"fastclip bench {name}", description=plain(doc),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: List[Row], columns=("provider", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80",
                                          "peak_mem_mb", "tflops", "note")) -> str:
    def cell(r, c):
        v = getattr(r, c)
        if isinstance(v, float):
            return "-" if v != v else (f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}")
        return str(v)

    table = [list(columns)] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower() or isinstance(
        e, MemoryError)

