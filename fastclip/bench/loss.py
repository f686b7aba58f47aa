"""``fastclip bench loss``: the CLIP contrastive loss, fastclip against open_clip (and inf-cl where installed).

For each provider, batch size N, feature dim D and dtype it times forward, backward and forward+backward
(p20/p50/p80 ms), measures the peak memory one forward+backward adds beyond its inputs, and reports TFLOP/s on
the memory-linear count (8 N^2 D for fwd+bwd, 2 N^2 D forward, 6 N^2 D backward; docs/design.md). Each row is
appended to a long-format CSV as soon as it is measured (./fastclip-results/loss.csv by default) and the whole
table is printed at the end.

Defaults are sized for the device: a short CPU table (N up to 4096, D=512, fp32) or a GPU sweep (N from 1k up
to 1M, D 512/768/1024, bf16 and fp32). A provider that runs out of memory gets an "OOM" row and is not tried at
larger N.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from fastclip.bench.common import CsvWriter, Row, add_output_arguments, bench_parser, csv_path, environment, \
    format_table, is_oom, peak_memory_mb, quantiles, time_fn
from fastclip.dispatch import BackendError
from fastclip.ops._extension import unavailable_reason as cuda_unavailable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


# A provider builds the loss call: f(image, text, scale, bias) -> 0-d loss. None when unavailable.
def contrastive_providers(device: torch.device) -> Dict[str, Optional[Callable]]:
    import fastclip

    out: Dict[str, Optional[Callable]] = {}
    try:
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        out["open_clip"] = lambda i, t, s, b: clip_loss(i, t, s)
    except ImportError:
        out["open_clip"] = None
    out["reference"] = lambda i, t, s, b: fastclip.contrastive_loss(i, t, s, backend="reference")
    out["torch"] = lambda i, t, s, b: fastclip.contrastive_loss(i, t, s, backend="torch")
    # Triton on the CPU is the interpreter: a correctness tool whose timings mean nothing.
    out["triton"] = ((lambda i, t, s, b: fastclip.contrastive_loss(i, t, s, backend="triton"))
                     if device.type == "cuda" else None)
    out["cuda"] = ((lambda i, t, s, b: fastclip.contrastive_loss(i, t, s, backend="cuda"))
                   if device.type == "cuda" and cuda_unavailable() is None else None)
    out["inf-cl"] = None
    if device.type == "cuda":
        try:
            from inf_cl import cal_inf_loss  # the symmetric loss as inf-cl's README builds it

            def inf_cl(i, t, s, b):
                labels = torch.arange(i.shape[0], device=i.device)
                return 0.5 * (cal_inf_loss(i, t, labels, scale=s) + cal_inf_loss(t, i, labels, scale=s)).mean()

            out["inf-cl"] = inf_cl
        except ImportError:
            pass
    return out


def contrastive_flops(n: int, d: int, mode: str) -> float:
    return {"fwd": 2.0, "bwd": 6.0, "full": 8.0}[mode] * n * n * d


def make_features(n: int, d: int, dtype: torch.dtype, device: torch.device, requires_grad: bool = True):
    img = F.normalize(torch.randn(n, d, device=device, dtype=torch.float32), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, d, device=device, dtype=torch.float32), dim=-1).to(dtype)
    scale = torch.tensor(1 / 0.07, device=device, dtype=torch.float32)
    bias = torch.tensor(-10.0, device=device, dtype=torch.float32)
    if requires_grad:
        img.requires_grad_()
        txt.requires_grad_()
        scale.requires_grad_()
        bias.requires_grad_()
    return img, txt, scale, bias


def bench_case(op: str, provider: str, fn: Callable, n: int, d: int, dtype_name: str, device: torch.device,
               modes: List[str], flops: Callable[[int, int, str], float], env: dict, rep: int,
               with_bias: bool = False) -> List[Row]:
    dtype = DTYPES[dtype_name]
    rows = []
    base = dict(op=op, provider=provider, shape=f"N={n},D={d}", dtype=dtype_name, **env)
    img, txt, scale, bias = make_features(n, d, dtype, device)
    b = bias if with_bias else None
    leaves = [img, txt, scale] + ([bias] if with_bias else [])

    def full():
        for t in leaves:
            t.grad = None
        fn(img, txt, scale, b).backward()

    peak = peak_memory_mb(full, device)
    for mode in modes:
        if mode == "fwd":
            with torch.no_grad():
                ms = time_fn(lambda: fn(img, txt, scale, b), device, rep=rep)
        elif mode == "bwd":
            loss = fn(img, txt, scale, b)
            ms = time_fn(lambda: loss.backward(retain_graph=True), device, rep=rep)
            del loss
        else:
            ms = time_fn(full, device, rep=rep)
        p20, p50, p80 = quantiles(ms)
        rows.append(Row(mode=mode, ms_p20=p20, ms_p50=p50, ms_p80=p80,
                        peak_mem_mb=peak if mode == "full" else float("nan"),
                        tflops=flops(n, d, mode) / (p50 * 1e-3) / 1e12, **base))
    return rows


def _measure(op, name, fn, n, d, n_first, dtype_name, device, modes, flops, env, rep, with_bias, dead) -> List[Row]:
    """Rows of one provider at one size; an unavailable, unsupported or out-of-memory provider gets one note row."""
    shape = f"N={n},D={d}"
    if fn is None:
        return ([Row(op=op, provider=name, mode="-", shape=shape, dtype=dtype_name, note="unavailable here", **env)]
                if n == n_first else [])
    if name in dead:
        return []
    try:
        return bench_case(op, name, fn, n, d, dtype_name, device, modes, flops, env, rep, with_bias=with_bias)
    except BackendError as e:  # e.g. the cuda backend and fp32 inputs
        dead.add(name)
        return [Row(op=op, provider=name, mode="-", shape=shape, dtype=dtype_name,
                    note="unsupported: " + str(e).split(": ", 2)[-1][:100], **env)]
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        dead.add(name)
        return [Row(op=op, provider=name, mode="full", shape=shape, dtype=dtype_name, note="OOM", **env)]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def default_sizes(device: torch.device):
    if device.type == "cuda":
        ns = [1024, 4096, 16384, 65536, 262144, 1048576]
        return ns, [512, 768, 1024], ["bf16", "fp32"], ["fwd", "bwd", "full"]
    return [1024, 2048, 4096], [512], ["fp32"], ["full"]


def run(args, op: str = "contrastive_loss", providers_fn=contrastive_providers, flops=contrastive_flops,
        csv_name: str = "loss.csv", with_bias: bool = False) -> List[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ns, ds, dtypes, modes = default_sizes(device)
    ns = args.n or ns
    ds = args.d or ds
    dtypes = args.dtype or dtypes
    modes = args.mode or modes
    available = providers_fn(device)
    wanted = args.provider or [p for p in available if p != "reference" or device.type == "cpu"]
    env = environment(device)
    print(f"# {op} on {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}",
          file=sys.stderr)
    rows: List[Row] = []
    with CsvWriter(csv_path(args, csv_name)) as sink:
        for dtype_name in dtypes:
            if device.type == "cpu" and dtype_name in ("bf16", "fp16"):
                print(f"# note: {dtype_name} on the CPU is slow and unrepresentative", file=sys.stderr)
            for d in ds:
                dead = set()  # providers that ran out of memory at a smaller N
                for n in ns:
                    for prov in wanted:
                        new = _measure(op, prov, available.get(prov), n, d, ns[0], dtype_name, device, modes, flops,
                                       env, args.rep, with_bias, dead)
                        rows.extend(new)
                        for r in new:
                            if r.note != "unavailable here":
                                sink.write(r)
                            print(format_table([r]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows))
    if sink.path:
        print(f"\n{sink.count} rows appended to {sink.path}")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--n", type=int, nargs="+", help="batch sizes")
    p.add_argument("--d", type=int, nargs="+", help="feature dims")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="input dtypes")
    p.add_argument("--mode", nargs="+", choices=["fwd", "bwd", "full"], help="what to time")
    p.add_argument("--provider", nargs="+", help="providers (default: all available)")
    p.add_argument("--rep", type=int, default=None, help="timed repetitions per case")
    add_output_arguments(p)


def main(argv=None, name: str = "loss", doc: str = __doc__, **kw) -> int:
    p = bench_parser(name, doc)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.rep is None:
        args.rep = 20 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else 3
    run(args, **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
