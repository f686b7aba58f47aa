"""Distributed losses: fastclip's modes and ring against open_clip's, time and per-rank memory. Run with torchrun.

    torchrun --nproc_per_node 8 benchmarks/bench_distributed.py                     # GPUs: weak + strong scaling
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --batch 256   # CPU smoke (gloo)
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py -- --device cpu --n 256    # the same
    python benchmarks/bench_distributed.py                                          # one GPU: the ring's step

Weak scaling keeps N_local (``--n``/``--batch``) fixed per rank; strong scaling keeps the global batch (``--n``)
fixed and gives each rank N / W. Each case times one
forward+backward on every rank (p20/p50/p80 of the slowest rank) and the extra peak memory of one step on every rank
(the largest is reported). Providers: open_clip ``SigLipLoss`` (bidir, shift, reduce, gather), ``ClipLoss``
(local_loss=False/True with gather_with_grad=True), and fastclip's ``SigLIPLoss``/``ContrastiveLoss`` in the same
modes plus ``ring``. Rank 0 appends rows to ./fastclip-results/distributed.csv (``--out``, ``--csv``, ``--save``).

With a single process on a GPU there is no one to talk to; the script then measures what bounds the ring's step:
one block's fused forward+gradient kernel (N_local x N_local), a device copy of one text block (a lower bound for its
transfer), and both at once on two streams; overlap = (kernel + copy - together) / copy (1: fully hidden).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastclip.bench.common import (Row, add_output_arguments, append_csv, csv_path, environment,  # noqa: E402
                                   format_table, is_oom, peak_memory_mb, quantiles, time_fn)
from fastclip.bench.loss import DTYPES, make_features  # noqa: E402



def providers(loss: str, rank: int, world: int) -> Dict[str, Callable]:
    import fastclip

    out: Dict[str, Callable] = {}
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        ClipLoss = SigLipLoss = None
    if loss == "siglip":
        for m in ("bidir", "shift", "reduce", "gather"):
            if SigLipLoss is not None:
                out[f"open_clip:{m}"] = SigLipLoss(rank=rank, world_size=world, dist_impl=m)
            out[f"fastclip:{m}"] = fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl=m)
        out["fastclip:ring"] = fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring")
    else:
        for local in (False, True):
            tag = "local" if local else "global"
            if ClipLoss is not None:
                out[f"open_clip:{tag}"] = ClipLoss(local, True, rank=rank, world_size=world)
            out[f"fastclip:{tag}"] = fastclip.ContrastiveLoss(local, True, rank=rank, world_size=world)
        out["fastclip:ring"] = fastclip.ContrastiveLoss(gather_with_grad=True, rank=rank, world_size=world,
                                                        dist_impl="ring")
    return out


def flops(loss: str, n_global: int, d: int) -> float:
    return (6.0 if loss == "siglip" else 8.0) * n_global * n_global * d


def bench_distributed(args, device, rank, world, env) -> List[Row]:
    rows: List[Row] = []
    for loss in args.loss:
        for scaling in args.scaling:
            for dtype_name in args.dtype:
                for d in args.d:
                    for n in args.n:
                        n_local = n if scaling == "weak" else max(1, n // world)
                        n_global = n_local * world
                        torch.manual_seed(1000 + rank)
                        img, txt, scale, bias = make_features(n_local, d, DTYPES[dtype_name], device)
                        for name, fn in providers(loss, rank, world).items():
                            def step():
                                for t in (img, txt, scale, bias):
                                    t.grad = None
                                fn(img, txt, scale, bias).backward()

                            shape = f"N_local={n_local},N={n_global},D={d},W={world}"
                            base = dict(op=f"{loss}_dist", provider=name, mode="full", shape=shape,
                                        dtype=dtype_name, note=scaling, **env)
                            try:
                                peak = peak_memory_mb(step, device)
                                ms = time_fn(step, device, warmup=2, rep=args.rep)
                                failed = torch.zeros(1, device=device if dist.get_backend() == "nccl" else "cpu")
                            except Exception as e:  # noqa: BLE001
                                if not is_oom(e):
                                    raise
                                failed = torch.ones(1, device=device if dist.get_backend() == "nccl" else "cpu")
                                peak, ms = float("nan"), [float("nan")]
                            # the slowest rank sets the pace; the largest memory the limit
                            dev = failed.device
                            stats = torch.tensor([quantiles(ms)[0], quantiles(ms)[1], quantiles(ms)[2], peak,
                                                  failed.item()], dtype=torch.float64, device=dev)
                            every = [torch.empty_like(stats) for _ in range(world)]
                            dist.all_gather(every, stats)
                            every = torch.stack(every)
                            if every[:, 4].max() > 0:
                                row = Row(note=f"{scaling}; OOM on some rank", **{k: v for k, v in base.items()
                                                                                  if k != "note"})
                            else:
                                p20, p50, p80 = (every[:, i].max().item() for i in range(3))
                                row = Row(ms_p20=p20, ms_p50=p50, ms_p80=p80, peak_mem_mb=every[:, 3].max().item(),
                                          tflops=flops(loss, n_global, d) / (p50 * 1e-3) / 1e12, **base)
                            rows.append(row)
                            if rank == 0:
                                print(format_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
    return rows


def bench_ring_step(args, device, env) -> List[Row]:
    """One GPU: a ring step's kernel, a block copy, and both together on two streams."""
    from fastclip.distributed import _siglip_block_impls

    rows = []
    side = torch.cuda.Stream(device)
    for dtype_name in args.dtype:
        for d in args.d:
            for n in args.n:
                img, txt, scale, bias = make_features(n, d, DTYPES[dtype_name], device, requires_grad=False)
                fwd, bwd_text, chunk = _siglip_block_impls(img, "auto", None)
                buf = torch.empty_like(txt)

                def kernel():
                    _, _, dt_k, _, _ = fwd(img, txt, scale, bias, True, True, chunk)
                    if dt_k is None:
                        bwd_text(torch.ones((), device=device), img, txt, scale, bias, True, chunk)

                def copy():
                    buf.copy_(txt)

                def both():
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        buf.copy_(txt)
                    kernel()
                    torch.cuda.current_stream(device).wait_stream(side)

                res = {}
                for name, fn in (("kernel", kernel), ("copy", copy), ("kernel+copy", both)):
                    res[name] = quantiles(time_fn(fn, device, rep=args.rep))
                overlap = (res["kernel"][1] + res["copy"][1] - res["kernel+copy"][1]) / max(res["copy"][1], 1e-9)
                for name, (p20, p50, p80) in res.items():
                    rows.append(Row(op="siglip_ring_step", provider=f"fastclip:{name}", mode="full",
                                    shape=f"N_local={n},D={d}", dtype=dtype_name, ms_p20=p20, ms_p50=p50,
                                    ms_p80=p80, tflops=(6.0 * n * n * d / (p50 * 1e-3) / 1e12
                                                        if name != "copy" else float("nan")),
                                    note=f"overlap={overlap:.2f}" if name == "kernel+copy" else "", **env))
                    print(format_table([rows[-1]]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    # --batch: torchrun's own parser (Python 3.11 argparse) takes "--n" after the script for an abbreviation of its
    # options and stops; write "--batch 256", or put the script's options after "--"
    p.add_argument("--n", "--batch", dest="n", type=int, nargs="+",
                   help="per-rank batch (weak) or global batch (strong)")
    p.add_argument("--d", type=int, nargs="+", default=None)
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--loss", nargs="+", choices=["siglip", "clip"], default=["siglip", "clip"])
    p.add_argument("--scaling", nargs="+", choices=["weak", "strong"], default=["weak", "strong"])
    p.add_argument("--rep", type=int, default=None)
    add_output_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.n = args.n or ([4096, 16384, 65536] if gpu else [256])
    args.d = args.d or ([768] if gpu else [64])
    args.dtype = args.dtype or (["bf16"] if gpu else ["fp32"])
    args.rep = args.rep or (20 if gpu else 3)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank = int(os.environ["RANK"])
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if gpu else "gloo")
    else:
        rank = 0
    env = environment(device)
    if rank == 0:
        print(f"# distributed losses, {world} rank(s) on {env['device']} | torch {env['torch']} | "
              f"{env['git_sha']}", file=sys.stderr)
    if world > 1:
        rows = bench_distributed(args, device, rank, world, env)
    elif gpu:
        rows = bench_ring_step(args, device, env)
    else:
        print("one CPU process: nothing to measure; run under torchrun --nproc_per_node 2 (gloo)", file=sys.stderr)
        rows = []
    if rank == 0 and rows:
        print(format_table(rows))
        path = csv_path(args, "distributed.csv")
        if path:
            append_csv(path, rows)
            print(f"\n{len(rows)} rows appended to {path}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
