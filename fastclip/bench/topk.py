"""``fastclip bench topk``: exact top-k inner-product search, fastclip against FAISS and a materialized torch.topk.

Providers, for Q queries against a gallery of G rows of dimension D, k results per query:
    fastclip     ``fastclip.topk_similarity`` (auto backend: the streaming PyTorch path on the CPU, Triton on a GPU)
    faiss        FAISS ``IndexFlatIP.search`` (faiss-cpu; ``GpuIndexFlatIP`` on a GPU when faiss has GPU support),
                 the index built outside the timing
    torch.topk   ``torch.topk(queries @ gallery.T, k)``: the (Q, G) matrix materialized
Per case, one untimed call of each provider (set-up, and the peak memory the search adds beyond its inputs), then
``--rep`` rounds that call every provider once in turn, so a machine whose load changes affects them alike;
p20/p50/p80 ms over the rounds and TFLOP/s on 2 Q G D. On the CPU, torch and FAISS run with the same number of
threads (``--threads``), and each row's note records it with the load average before and after the case. Rows go
to ``./fastclip-results/topk.csv`` (``--save``: ``benchmarks/results/topk.csv``); ``python benchmarks/plot.py
benchmarks/results/topk.csv --x G --mode search`` draws them.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from fastclip.bench.common import CsvWriter, Row, add_output_arguments, bench_parser, csv_path, environment, \
    format_table, is_oom, peak_memory_mb, quantiles, time_fn

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


def set_threads(n: int) -> None:
    """``n`` threads for torch's and FAISS's OpenMP pools alike."""
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def _case(table, names, queries, k, device, rep):
    """{provider: (ms list, peak MB) or a note}: one untimed call each, then ``rep`` interleaved rounds."""
    out, live = {}, []
    for name in names:
        fn = table.get(name)
        if fn is None:
            out[name] = "unavailable here"
            continue
        try:
            fn(queries[:1], k)  # first-call set-up (imports, dispatch) outside the measurement
            out[name] = ([], peak_memory_mb(lambda: fn(queries, k), device))  # also the warm-up call
            live.append(name)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            out[name] = "OOM"
    for _ in range(rep):
        for name in live:
            out[name][0].extend(time_fn(lambda: table[name](queries, k), device, warmup=0, rep=1))
    return out


def run(args) -> List[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_threads(args.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    env = environment(device)
    print(f"# topk_similarity on {env['device']} | torch {env['torch']} | {env['git_sha']} | {threads} threads",
          file=sys.stderr)
    rows = []
    with CsvWriter(csv_path(args, "topk.csv")) as sink:
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            for g_size in args.g:
                gallery = F.normalize(torch.randn(g_size, args.d, device=device), dim=-1).to(dtype)
                table = providers(gallery)
                for q_size in args.q:
                    queries = F.normalize(torch.randn(q_size, args.d, device=device), dim=-1).to(dtype)
                    load_before = _load()
                    results = _case(table, args.provider or list(table), queries, args.k, device, args.rep)
                    note = f"{threads} threads, load avg {load_before} -> {_load()}, {args.rep} interleaved rounds"
                    note = f"{note}; {args.note}" if args.note else note
                    for name, res in results.items():
                        base = dict(op="topk_similarity", provider=name, mode="search", dtype=dtype_name,
                                    shape=f"Q={q_size},G={g_size},D={args.d},k={args.k}", **env)
                        if isinstance(res, str):
                            rows.append(Row(**base, note=res))
                        else:
                            p20, p50, p80 = quantiles(res[0])
                            rows.append(Row(**base, ms_p20=p20, ms_p50=p50, ms_p80=p80, peak_mem_mb=res[1],
                                            tflops=2.0 * q_size * g_size * args.d / (p50 * 1e-3) / 1e12, note=note))
                            sink.write(rows[-1])
                        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                    if all(n in results and not isinstance(results[n], str) for n in ("fastclip", "faiss")):
                        ratio = quantiles(results["fastclip"][0])[1] / quantiles(results["faiss"][0])[1]
                        print(f"# Q={q_size} G={g_size}: fastclip / faiss median time = {ratio:.3f}", file=sys.stderr)
                del gallery, table
    print(format_table(rows))
    if sink.path:
        print(f"\n{sink.count} rows appended to {sink.path}")
    return rows


def main(argv=None) -> int:
    p = bench_parser("topk", __doc__)
    p.add_argument("--q", type=int, nargs="+", default=[4096], help="numbers of queries")
    p.add_argument("--g", type=int, nargs="+", default=[16384, 65536, 262144], help="gallery sizes")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--provider", nargs="+", choices=["fastclip", "faiss", "torch.topk"])
    p.add_argument("--device")
    p.add_argument("--rep", type=int, default=3, help="interleaved rounds per case (after one untimed call)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and FAISS alike (default: torch's)")
    p.add_argument("--note", help="free text stored with the rows")
    add_output_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
