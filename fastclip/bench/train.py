"""``fastclip bench train``: a full training step (forward, loss, backward, AdamW) of fastclip's trainer against
open_clip_train's, at growing global batch sizes B and the same model, weights and data.

Providers (each a step on one process, random images and captions already in memory, fp32 on the CPU, bf16 autocast
on a GPU):

- ``fastclip``: ``fastclip.train.gradcache.backward_step`` with ``--micro-batch M``: towers M samples at a time, the
  memory-linear loss on the whole batch (gradient caching).
- ``fastclip-full``: the same without gradient caching (the towers on all B samples at once).
- ``open_clip-accum``: open_clip_train's ``train_one_epoch`` with ``--batch-size M --accum-freq B/M`` (features
  cached without gradients, then per micro-batch a forward with gradients and ``ClipLoss`` over all B: the B x B
  logits are formed B/M times).
- ``open_clip``: ``train_one_epoch`` at ``--batch-size B`` (no accumulation).

Reported per (provider, B): ms per step (p20/p50/p80), samples/s = B / p50, and the peak memory one step adds beyond
the weights and optimizer state. The max batch of a provider is the largest B whose step ran and fitted in
``--memory-budget-mb`` (a GPU's memory when not given; on the CPU the budget is a stand-in for a device's memory).
Each row is appended to ``train.csv`` (long format; ``./fastclip-results/`` unless ``--out``, ``--csv`` or ``--save``
says otherwise) as it is measured, and the rows are drawn to ``train.png`` beside it. CPU timings say nothing about
GPU speed.
"""
from __future__ import annotations

import math
import sys
from argparse import Namespace
from typing import Callable, List

import torch

from fastclip.bench.common import CsvWriter, Row, add_output_arguments, bench_parser, csv_path, environment, \
    format_table, is_oom, peak_memory_mb, quantiles, time_fn
PROVIDERS = ("fastclip", "fastclip-full", "open_clip-accum", "open_clip")


def _inputs(batch: int, image_size: int, context_length: int, device) -> tuple:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    import fastclip

    words = ["red", "green", "blue", "small", "large", "circle", "square", "photo", "of", "a"]
    idx = torch.randint(len(words), (batch, 6), generator=g).tolist()
    texts = fastclip.tokenize([" ".join(words[i] for i in row) for row in idx], context_length=context_length)
    return images.to(device), texts.to(device)


def _open_clip_model(name: str, device):
    import open_clip

    from fastclip.train.models import TINY_MODELS

    if name in TINY_MODELS:
        return open_clip.model.CLIP(**TINY_MODELS[name], output_dict=True).to(device)
    return open_clip.create_model(name, output_dict=True, device=device)


def fastclip_step(name: str, batch: int, micro_batch, device, precision: str) -> Callable[[], None]:
    import fastclip
    from fastclip.train.gradcache import backward_step
    from fastclip.train.loop import param_groups
    from fastclip.train.models import build_model

    model = build_model(name).to(device)
    size = model.visual.image_size
    images, texts = _inputs(batch, size[0] if isinstance(size, (tuple, list)) else size, model.context_length, device)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    loss_fn = fastclip.ContrastiveLoss()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        opt.zero_grad(set_to_none=True)
        backward_step(model, loss_fn, images, texts, micro_batch=micro_batch, autocast=autocast)
        opt.step()

    return step


def open_clip_step(name: str, batch: int, accum_freq: int, device, precision: str) -> Callable[[], None]:
    """One optimizer step of open_clip_train's ``train_one_epoch`` (batch // accum_freq per forward)."""
    import open_clip
    from open_clip_train.data import DataInfo
    from open_clip_train.train import train_one_epoch

    from fastclip.train.loop import param_groups

    model = _open_clip_model(name, device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    micro = batch // accum_freq
    images, texts = _inputs(batch, size, model.context_length, device)
    chunks = [(images[i:i + micro], texts[i:i + micro]) for i in range(0, batch, micro)]

    class Batches(list):  # what train_one_epoch reads from its dataloader
        num_batches = len(chunks)
        num_samples = batch

    data = {"train": DataInfo(Batches(chunks))}
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    args = Namespace(device=str(device), precision="amp_bf16" if precision == "bf16" else "fp32", distill=False,
                     accum_freq=accum_freq, skip_scheduler=True, horovod=False, grad_clip_norm=None, rank=0,
                     local_rank=0, world_size=1, log_every_n_steps=10**9, batch_size=micro, wandb=False,
                     save_logs=False)
    loss = open_clip.ClipLoss()

    def step():
        train_one_epoch(model, data, loss, 0, opt, None, None, None, args)

    return step


def bench_one(provider: str, name: str, batch: int, micro: int, device, precision: str, env: dict, rep: int) -> Row:
    mode = {"fastclip": f"micro={micro}", "fastclip-full": "full", "open_clip-accum": f"accum={batch // micro}",
            "open_clip": "full"}[provider]
    base = dict(op="train_step", provider=provider, mode=mode, shape=f"model={name},B={batch},M={micro}",
                dtype=precision if device.type == "cuda" else "fp32", **env)
    if provider == "fastclip":
        step = fastclip_step(name, batch, micro, device, precision)
    elif provider == "fastclip-full":
        step = fastclip_step(name, batch, None, device, precision)
    else:
        step = open_clip_step(name, batch, batch // micro if provider == "open_clip-accum" else 1, device, precision)
    step()  # optimizer state and allocator warm-up outside the measurements
    peak = peak_memory_mb(step, device)
    p20, p50, p80 = quantiles(time_fn(step, device, warmup=0, rep=rep))
    return Row(ms_p20=p20, ms_p50=p50, ms_p80=p80, peak_mem_mb=peak, note=f"samples/s={batch / (p50 * 1e-3):.4g}",
               **base)


def max_batches(rows: List[Row], budget_mb: float) -> dict:
    """provider -> the largest B that ran within the budget (0 if none)."""
    best = {}
    for r in rows:
        b = int(r.shape.split("B=")[1].split(",")[0])
        ok = r.note != "OOM" and not (r.peak_mem_mb > budget_mb)
        best[r.provider] = max(best.get(r.provider, 0), b if ok else 0)
    return best


def plot(rows: List[Row], path: str, budget_mb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in dict.fromkeys(r.provider for r in rows):
        pts = [(int(r.shape.split("B=")[1].split(",")[0]), r) for r in rows if r.provider == provider and
               r.note != "OOM"]
        if not pts:
            continue
        label = f"{provider} ({pts[0][1].mode.split('=')[0]})" if "=" in pts[0][1].mode else provider
        ax_t.plot([b for b, _ in pts], [b / (r.ms_p50 * 1e-3) for b, r in pts], marker="o", label=label)
        ax_m.plot([b for b, _ in pts], [r.peak_mem_mb for _, r in pts], marker="o", label=label)
    if math.isfinite(budget_mb):
        ax_m.axhline(budget_mb, color="grey", linestyle="--", label="memory budget")
    for ax, title in ((ax_t, "samples/s"), (ax_m, "peak memory of a step (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch B")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0].shape.split(',')[0]}, M = {rows[0].shape.split('M=')[1]} | {rows[0].device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> List[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    name = args.model or ("ViT-B-32" if gpu else "tiny")
    batches = args.batch or ([1024, 4096, 16384, 32768, 65536] if gpu else [64, 128, 256, 512])
    micro = args.micro_batch or (256 if gpu else 32)
    if any(b % micro for b in batches):
        raise ValueError(f"every --batch must be a multiple of --micro-batch {micro}: {batches}")
    providers = args.provider or list(PROVIDERS)
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        providers = [p for p in providers if not p.startswith("open_clip")]
        print("# open_clip_train is not installed: fastclip rows only (pip install 'open-clip-torch[training]')",
              file=sys.stderr)
    budget = args.memory_budget_mb or (torch.cuda.get_device_properties(device).total_memory / 2**20 if gpu
                                       else float("inf"))
    precision = "bf16" if gpu else "fp32"
    env = environment(device)
    print(f"# train step, {name}, M = {micro}, on {env['device']} | torch {env['torch']} | {env['git_sha']}",
          file=sys.stderr)
    rows: List[Row] = []
    path = csv_path(args, "train.csv")
    sink = CsvWriter(path)
    for provider in providers:
        for batch in batches:
            try:
                row = bench_one(provider, name, batch, micro, device, precision, env, args.rep)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                row = Row(op="train_step", provider=provider, mode="", shape=f"model={name},B={batch},M={micro}",
                          dtype=precision, note="OOM", **env)
            finally:
                if gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
            sink.write(row)
            print(format_table([row], columns=("provider", "mode", "shape", "ms_p50", "peak_mem_mb", "note"))
                  .splitlines()[-1], file=sys.stderr, flush=True)
            if row.note == "OOM":
                break  # larger batches will not fit either
    print(format_table(rows, columns=("provider", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "peak_mem_mb",
                                      "note")))
    best = max_batches(rows, budget)
    print(f"\nmax batch within {budget:.0f} MB: " + ", ".join(f"{p} {b}" for p, b in best.items()))
    sink.close()
    if path is not None:
        png = path[:-4] + ".png" if path.endswith(".csv") else path + ".png"
        plot(rows, png, budget)
        print(f"{len(rows)} rows appended to {path}; plot: {png}")
    return rows


def main(argv=None) -> int:
    p = bench_parser("train", __doc__)
    p.add_argument("--model", help="'tiny' or a fastclip.list_models() name (default: tiny on the CPU, ViT-B-32 on "
                                   "a GPU)")
    p.add_argument("--batch", type=int, nargs="+", help="global batch sizes (multiples of --micro-batch)")
    p.add_argument("--micro-batch", type=int, help="M: fastclip's --micro-batch and open_clip's batch per forward")
    p.add_argument("--provider", nargs="+", choices=PROVIDERS)
    p.add_argument("--memory-budget-mb", type=float, help="the memory a step may add (default: the GPU's; none on "
                                                          "the CPU)")
    p.add_argument("--rep", type=int, default=3, help="timed steps per case")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_output_arguments(p)
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
