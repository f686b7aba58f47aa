"""``fastclip bench attention``: attention at CLIP's shapes, fastclip against every SDPA backend and flash-attn.

Shapes are the towers' (batch, seq, heads) at training batch sizes: ViT-B/32 (S=50), B/16 (197), L/14 (257),
L/14@336 (577) non-causal, and the text tower (S=77) causal, with and without key padding; each at head dims 64
and 80. Providers: ``fastclip-triton`` (the fused kernels), ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``,
``sdpa-math`` (``F.scaled_dot_product_attention`` pinned to one backend with ``torch.nn.attention.sdpa_kernel``;
a backend that refuses the inputs gets an "unsupported" row) and ``flash-attn`` where installed. On the CPU the
default is a tiny smoke run of ``fastclip-torch`` and ``reference`` (interpreter timings would mean nothing).

For each case it times forward, backward and forward+backward (p20/p50/p80 ms) and reports TFLOP/s on
flash-attn's count: forward 4 B S^2 H D (half when causal), backward 2.5x, forward+backward 3.5x that. On a GPU
it also measures once per run the bf16 matmul peak (a large ``torch.matmul``) and the memory bandwidth (a large
copy), and notes each row's roofline, min(peak, FLOPs / minimum bytes x bandwidth). Each row is appended to a
long-format CSV (device and versions included) as soon as it is measured, ./fastclip-results/attention.csv by
default, and the whole table is printed at the end.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastclip.bench.common import CsvWriter, Row, add_output_arguments, bench_parser, csv_path, environment, \
    format_table, is_oom, peak_memory_mb, quantiles, time_fn
from fastclip.bench.loss import DTYPES
from fastclip.ops.attention.pytorch import sdpa_mask

OP = "flash_attention"

# name -> (batch, seq, heads, causal, padded); batches are typical per-GPU training batches
GPU_CASES = {
    "vit-b32": (256, 50, 12, False, False),
    "vit-b16": (128, 197, 12, False, False),
    "vit-l14": (64, 257, 16, False, False),
    "vit-l14-336": (32, 577, 16, False, False),
    "text": (256, 77, 8, True, False),
    "text-pad": (256, 77, 8, True, True),
}
CPU_CASES = {"vit-b32": (2, 50, 2, False, False), "text-pad": (2, 77, 2, True, True)}

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


class Unsupported(Exception):
    """A provider refuses these inputs; the message says why."""


# A provider: f(q, k, v, causal, key_padding_mask, attn_mask) -> (B, S, H, D); attn_mask is SDPA's precomputed
# (B, 1, S, S) bool mask (True = attend) or None. None when the provider is not available here.
def attention_providers(device: torch.device) -> Dict[str, Optional[Callable]]:
    import fastclip

    out: Dict[str, Optional[Callable]] = {}
    on_gpu = device.type == "cuda"
    # Triton on the CPU is the interpreter: a correctness tool whose timings mean nothing.
    out["fastclip-triton"] = ((lambda q, k, v, c, m, am: fastclip.flash_attention(
        q, k, v, causal=c, key_padding_mask=m, backend="triton")) if on_gpu else None)
    from fastclip.ops._extension import unavailable_reason
    from fastclip.dispatch import BackendError

    def cuda(q, k, v, c, m, am):
        try:
            return fastclip.flash_attention(q, k, v, causal=c, key_padding_mask=m, backend="cuda")
        except BackendError as e:  # fp32, or a head dim the kernels do not take
            raise Unsupported(str(e).split(": ", 2)[-1][:120]) from e

    out["fastclip-cuda"] = cuda if on_gpu and unavailable_reason() is None else None
    out["fastclip-torch"] = lambda q, k, v, c, m, am: fastclip.flash_attention(
        q, k, v, causal=c, key_padding_mask=m, backend="torch")
    out["reference"] = lambda q, k, v, c, m, am: fastclip.flash_attention(
        q, k, v, causal=c, key_padding_mask=m, backend="reference")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v, c, m, am):
            with sdpa_kernel(backend):
                try:
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       attn_mask=am, is_causal=c and am is None)
                except RuntimeError as e:
                    if "No available kernel" in str(e):
                        raise Unsupported(str(e).splitlines()[0][:120]) from e
                    raise
            return o.transpose(1, 2)

        return run

    for name, attr in SDPA_BACKENDS.items():
        out[name] = sdpa(getattr(SDPBackend, attr)) if on_gpu or attr == "MATH" else None
    out["flash-attn"] = None
    if on_gpu:
        try:
            from flash_attn import flash_attn_func

            def fa(q, k, v, c, m, am):
                if m is not None:
                    raise Unsupported("key padding needs flash_attn_varlen_func with unpadded inputs")
                return flash_attn_func(q, k, v, causal=c)

            out["flash-attn"] = fa
        except ImportError:
            pass
    return out


def attention_flops(b: int, s: int, h: int, d: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * b * s * s * h * d / (2 if causal else 1)
    return {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode] * fwd


def min_bytes(b: int, s: int, h: int, d: int, elem: int, mode: str) -> float:
    """Bytes any attention must move: read q, k, v, write o (fwd); read q, k, v, o, dO, write dq, dk, dv (bwd)."""
    return {"fwd": 4, "bwd": 8, "full": 12}[mode] * b * s * h * d * elem


def measure_peaks(device: torch.device) -> Tuple[float, float]:
    """(bf16 matmul TFLOP/s, copy bandwidth GB/s), measured once: an 8192^3 matmul and a 1 GiB copy."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = quantiles(time_fn(lambda: a @ b, device, rep=10))[1]
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    src = torch.empty(2 ** 28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = quantiles(time_fn(lambda: dst.copy_(src), device, rep=10))[1]
    gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del a, b, src, dst
    torch.cuda.empty_cache()
    return tflops, gbps


def make_inputs(b, s, h, d, dtype, device, causal, padded):
    q, k, v = [torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    mask = attn_mask = None
    if padded:  # text: each caption keeps its first L tokens, L uniform in [S/4, S]
        lengths = torch.randint(s // 4, s + 1, (b,), device=device)
        mask = torch.arange(s, device=device)[None, :] >= lengths[:, None]  # (B, S), True = padding
        attn_mask, _ = sdpa_mask(mask, causal, s)  # (B, 1, S, S) for SDPA, built once outside the timed region
    return q, k, v, mask, attn_mask


def bench_case(provider: str, fn: Callable, case: str, b: int, s: int, h: int, d: int, causal: bool,
               padded: bool, dtype_name: str, device: torch.device, modes: List[str], env: dict, rep: int,
               peaks: Optional[Tuple[float, float]]) -> List[Row]:
    dtype = DTYPES[dtype_name]
    base = dict(op=OP, provider=provider, shape=f"{case}:B={b},S={s},H={h},D={d}" + (",causal" if causal else "")
                + (",pad" if padded else ""), dtype=dtype_name, **env)
    q, k, v, mask, attn_mask = make_inputs(b, s, h, d, dtype, device, causal, padded)
    leaves = [q, k, v]

    def call():
        return fn(q, k, v, causal, mask, attn_mask)

    try:
        out = call()
    except Unsupported as e:
        return [Row(mode="-", note=f"unsupported: {e}", **base)]
    grad = torch.randn_like(out)

    def full():
        for t in leaves:
            t.grad = None
        call().backward(grad)

    peak = peak_memory_mb(full, device)
    rows = []
    for mode in modes:
        if mode == "fwd":
            with torch.no_grad():
                ms = time_fn(call, device, rep=rep)
        elif mode == "bwd":
            out = call()
            ms = time_fn(lambda: out.backward(grad, retain_graph=True), device, rep=rep)
        else:
            ms = time_fn(full, device, rep=rep)
        p20, p50, p80 = quantiles(ms)
        flops = attention_flops(b, s, h, d, causal, mode)
        note = ""
        if peaks is not None:
            intensity = flops / min_bytes(b, s, h, d, out.element_size(), mode)
            note = f"roofline {min(peaks[0], intensity * peaks[1] / 1e3):.0f} TFLOP/s"
        rows.append(Row(mode=mode, ms_p20=p20, ms_p50=p50, ms_p80=p80,
                        peak_mem_mb=peak if mode == "full" else float("nan"),
                        tflops=flops / (p50 * 1e-3) / 1e12, note=note, **base))
    return rows


def run(args) -> List[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    cases = GPU_CASES if on_gpu else CPU_CASES
    names = args.case or list(cases)
    unknown = [n for n in names if n not in GPU_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(GPU_CASES)}")
    ds = args.d or ([64, 80] if on_gpu else [64])
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    modes = args.mode or (["fwd", "bwd", "full"] if on_gpu else ["full"])
    available = attention_providers(device)
    default = ([p for p in available if p not in ("fastclip-torch", "reference")] if on_gpu
               else ["fastclip-torch", "reference"])
    wanted = args.provider or default
    env = environment(device)
    print(f"# {OP} on {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}",
          file=sys.stderr)
    peaks = None
    if on_gpu and not args.no_roofline:
        peaks = measure_peaks(device)
        print(f"# measured: bf16 matmul {peaks[0]:.0f} TFLOP/s, copy bandwidth {peaks[1]:.0f} GB/s", file=sys.stderr)
    rows: List[Row] = []
    sink = CsvWriter(csv_path(args, "attention.csv"))
    for dtype_name in dtypes:
        for name in names:
            b, s, h, causal, padded = cases.get(name, GPU_CASES[name])
            b = args.batch or b
            for d in ds:
                for prov in wanted:
                    fn = available.get(prov)
                    if fn is None:
                        rows.append(Row(op=OP, provider=prov, mode="-", shape=f"{name}:D={d}", dtype=dtype_name,
                                        note="unavailable here", **env))  # printed, not recorded
                        continue
                    try:
                        new = bench_case(prov, fn, name, b, s, h, d, causal, padded, dtype_name, device, modes,
                                         env, args.rep, peaks)
                    except Exception as e:  # noqa: BLE001
                        if not is_oom(e):
                            raise
                        new = [Row(op=OP, provider=prov, mode="full", shape=f"{name}:D={d}", dtype=dtype_name,
                                   note="OOM", **env)]
                    finally:
                        if on_gpu:
                            torch.cuda.empty_cache()
                    rows.extend(new)
                    for r in new:
                        sink.write(r)
                        print(format_table([r]).splitlines()[-1], file=sys.stderr, flush=True)
    sink.close()
    print(format_table(rows))
    if sink.path:
        print(f"\n{sink.count} rows appended to {sink.path}")
    return rows


def main(argv=None) -> int:
    p = bench_parser("attention", __doc__)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--case", nargs="+", help=f"shapes (default: all): {', '.join(GPU_CASES)}")
    p.add_argument("--batch", type=int, help="override every case's batch size")
    p.add_argument("--d", type=int, nargs="+", help="head dims (default: 64 80 on a GPU)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="input dtypes (default: bf16 on a GPU)")
    p.add_argument("--mode", nargs="+", choices=["fwd", "bwd", "full"], help="what to time")
    p.add_argument("--provider", nargs="+", help="providers (default: all on a GPU, torch/reference on the CPU)")
    p.add_argument("--rep", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring matmul peak and bandwidth")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if args.rep is None:
        args.rep = 30 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else 3
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
