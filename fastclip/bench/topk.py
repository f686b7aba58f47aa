"""``fastclip bench topk``: exact top-k inner-product search, fastclip against FAISS and a materialized torch.topk.

Providers, for Q queries against a gallery of G rows of dimension D, k results per query:
    fastclip     ``fastclip.topk_similarity`` (auto backend: the streaming PyTorch path on the CPU, Triton on a GPU)
    faiss        FAISS ``IndexFlatIP.search`` (faiss-cpu; ``GpuIndexFlatIP`` on a GPU when faiss has GPU support),
                 the index built outside the timing
    torch.topk   ``torch.topk(queries @ gallery.T, k)``: the (Q, G) matrix materialized
Per case: the time of one search (p20/p50/p80 ms over a few calls after one untimed call that also measures the
peak memory the search adds beyond its inputs), and TFLOP/s on 2 Q G D. Rows go to ``benchmarks/results/topk.csv``;
``python benchmarks/plot.py benchmarks/results/topk.csv --x G --mode search`` draws them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from fastclip.bench.common import Row, append_csv, environment, format_table, is_oom, peak_memory_mb, quantiles, \
    time_fn

DEFAULT_CSV = os.path.join("benchmarks", "results", "topk.csv")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _faiss(gallery: torch.Tensor) -> Optional[Callable]:
    try:
        import faiss
    except ImportError:
        return None
    if gallery.dtype != torch.float32:
        return None  # IndexFlatIP is fp32
    d = gallery.shape[1]
    if gallery.is_cuda:
        if not hasattr(faiss, "StandardGpuResources"):
            return None
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(gallery.cpu().numpy())

    def search(q, k):
        return index.search(q.cpu().numpy(), k)

    return search


def providers(gallery: torch.Tensor) -> Dict[str, Optional[Callable]]:
    import fastclip

    return {"fastclip": lambda q, k: fastclip.topk_similarity(q, gallery, k),
            "faiss": _faiss(gallery),
            "torch.topk": lambda q, k: torch.topk(q @ gallery.T, k, dim=1)}


def run(args) -> List[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    print(f"# topk_similarity on {env['device']} | torch {env['torch']} | {env['git_sha']}", file=sys.stderr)
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for g_size in args.g:
            gallery = F.normalize(torch.randn(g_size, args.d, device=device), dim=-1).to(dtype)
            table = providers(gallery)
            for q_size in args.q:
                queries = F.normalize(torch.randn(q_size, args.d, device=device), dim=-1).to(dtype)
                for name in args.provider or list(table):
                    fn = table.get(name)
                    base = dict(op="topk_similarity", provider=name, mode="search", dtype=dtype_name,
                                shape=f"Q={q_size},G={g_size},D={args.d},k={args.k}", **env)
                    if fn is None:
                        rows.append(Row(**base, note="unavailable here"))
                        continue
                    try:
                        fn(queries[:1], args.k)  # first-call set-up (imports, dispatch) outside the measurement
                        peak = peak_memory_mb(lambda: fn(queries, args.k), device)  # also the warm-up call
                        ms = time_fn(lambda: fn(queries, args.k), device, warmup=0, rep=args.rep)
                    except Exception as e:  # noqa: BLE001
                        if not is_oom(e):
                            raise
                        rows.append(Row(**base, note="OOM"))
                        continue
                    p20, p50, p80 = quantiles(ms)
                    rows.append(Row(**base, ms_p20=p20, ms_p50=p50, ms_p80=p80, peak_mem_mb=peak,
                                    tflops=2.0 * q_size * g_size * args.d / (p50 * 1e-3) / 1e12,
                                    note=args.note or ""))
                    print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            del gallery, table
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip bench topk", description=__doc__.splitlines()[0])
    p.add_argument("--q", type=int, nargs="+", default=[4096], help="numbers of queries")
    p.add_argument("--g", type=int, nargs="+", default=[16384, 65536, 262144], help="gallery sizes")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--provider", nargs="+", choices=["fastclip", "faiss", "torch.topk"])
    p.add_argument("--device")
    p.add_argument("--rep", type=int, default=3, help="timed calls per case (after one untimed call)")
    p.add_argument("--csv", default=DEFAULT_CSV)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--note", help="free text stored with the rows (e.g. the machine's load)")
    args = p.parse_args(argv)
    rows = run(args)
    print(format_table(rows))
    if not args.no_csv:
        append_csv(args.csv, rows)
        print(f"# appended {len(rows)} rows to {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
