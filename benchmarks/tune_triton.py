"""Autotune the loss kernels' tiles on a GPU and write the committed table fastclip/data/triton_configs.json.

    python benchmarks/tune_triton.py --n 16384 65536 --d 512 768 --dtype bfloat16

For each (op, N bucket, D, dtype) on this GPU's architecture, every config of a small space (the kernel's static
table entry and its neighbours: BLOCK_N, warps, stages; the forward's split) is timed through the op's own
launcher with the config forced (``fastclip.ops.tuned.forced``), so the trial runs exactly what a launch with that
table entry would run. The launchers allocate and reset every accumulated buffer (the forward's column partials)
on each call: trials never see a previous trial's sums. A config that fails to compile or launch (shared memory,
registers) is skipped. The fastest is merged into the table (other entries kept); launches then read it and never
autotune. Timing: triton.testing.do_bench (median, L2 flushed between repetitions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastclip.ops import tuned  # noqa: E402

OPS = ("contrastive_fwd", "contrastive_bwd", "siglip_grad")


def candidates(op: str, n: int, d: int, dtype: torch.dtype) -> List[dict]:
    """The small config space of ``op``: its static config and single-step neighbours of it."""
    from fastclip.ops.contrastive import triton as C
    from fastclip.ops.siglip import triton as S

    fp32 = dtype == torch.float32
    base = {"contrastive_fwd": lambda: tuned.by_arch(C.FWD_CONFIGS[C._dtype_class(dtype)]),
            "contrastive_bwd": lambda: _static_bwd(C.BWD_CONFIGS_FP32 if fp32 else C.BWD_CONFIGS, d),
            "siglip_grad": lambda: _static_bwd(S.GRAD_CONFIGS_FP32 if fp32 else S.GRAD_CONFIGS, d)}[op]()
    out = [dict(base)]
    if op == "contrastive_fwd":
        for k, values in (("BLOCK_N", (64, 128)), ("num_warps", (4, 8)), ("num_stages", (2, 3, 4)),
                          ("SPLIT", (8, 16, 32))):
            out += [dict(base, **{k: v}) for v in values if v != base[k]]
    else:
        for k, values in (("BLOCK_N", (32, 64, 128)), ("num_warps", (4, 8)), ("NUM_STAGES", (1, 2, 3))):
            out += [dict(base, **{k: v}) for v in values if v != base[k]]
    return out


def _static_bwd(table, d: int) -> dict:
    block_d = max(16, 1 << (d - 1).bit_length())
    _, bm, bn, slice_d, bk, warps, stages = next(t for t in map(tuned.by_arch, table) if block_d <= t[0])
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=slice_d, num_warps=warps, NUM_STAGES=stages)


def trial(op: str, n: int, d: int, dtype: torch.dtype, device: str = "cuda") -> Callable[[], object]:
    """A call of ``op``'s launcher on confident-regime-sized random unit features (N, D)."""
    from fastclip.ops.contrastive import triton as C
    from fastclip.ops.siglip import triton as S

    gen = torch.Generator(device=device).manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).to(dtype)
    scale = torch.tensor(100.0, device=device)
    if op == "contrastive_fwd":
        return lambda: C.contrastive_fwd(img, txt, scale, None, 0.0)
    if op == "contrastive_bwd":
        _, row, col = C.contrastive_fwd(img, txt, scale, None, 0.0)
        one = torch.ones((), device=device)
        return lambda: C.contrastive_bwd(one, img, txt, scale, None, row, col, 0.0)
    return lambda: S.siglip_fwd(img, txt, scale, torch.tensor(-10.0, device=device), False, True)


def tune(cases: Iterable[tuple], time_fn: Callable[[str, int, int, torch.dtype, dict], float], arch: str
         ) -> List[dict]:
    """For each (op, n, d, dtype): the fastest candidate by ``time_fn`` (seconds; an exception skips it)."""
    entries = []
    for op, n, d, dtype in cases:
        best, best_t = None, math.inf
        for cfg in candidates(op, n, d, dtype):
            try:
                t = time_fn(op, n, d, dtype, cfg)
            except Exception as e:  # noqa: BLE001 - a config the compiler or the GPU rejects is not a candidate
                print(f"  skip {op} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            print(f"  {op} n={n} d={d} {dtype}: {t * 1e3:.3f} ms {cfg}", file=sys.stderr)
            if t < best_t:
                best, best_t = cfg, t
        if best is not None:
            op_, arch_, dt, d_, n_ = tuned.entry_key(op, arch, dtype, d, n)
            entries.append(dict(op=op_, arch=arch_, dtype=dt, d=d_, n=n_, config=best, ms=round(best_t * 1e3, 4)))
    return entries


def merge_into(path: str, entries: List[dict]) -> None:
    """Write ``entries`` into the table at ``path``, replacing those with the same key and keeping the others."""
    with open(path) as f:
        table = json.load(f)
    key = lambda e: (e["op"], e["arch"], e["dtype"], int(e["d"]), int(e["n"]))  # noqa: E731
    new = {key(e): e for e in entries}
    table["entries"] = sorted([e for e in table["entries"] if key(e) not in new] + list(new.values()), key=key)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


def gpu_time(op: str, n: int, d: int, dtype: torch.dtype, cfg: dict) -> float:
    import triton.testing

    fn = trial(op, n, d, dtype)
    with tuned.forced(op, cfg):
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") / 1e3


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--n", nargs="+", type=int, default=[16384, 65536])
    ap.add_argument("--d", nargs="+", type=int, default=[512, 768])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"])
    ap.add_argument("--out", default=tuned.TABLE)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_triton.py times kernels on a CUDA GPU; there is none here")
    major, minor = torch.cuda.get_device_capability()
    cases = [(op, n, d, getattr(torch, dt)) for op in args.ops for n in args.n for d in args.d for dt in args.dtype]
    entries = tune(cases, gpu_time, f"sm_{major}{minor}")
    merge_into(args.out, entries)
    print(json.dumps(entries, indent=1))


if __name__ == "__main__":
    main()
