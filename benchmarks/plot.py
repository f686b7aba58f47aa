"""Plot a long-format benchmark CSV: time and peak memory against one shape key, one line per provider.

    python benchmarks/plot.py benchmarks/results/loss.csv                 # x = N, one PNG per (dtype, D)
    python benchmarks/plot.py benchmarks/results/attention.csv --x S --mode full

Rows are filtered to one device (default: the device of the newest row) and, per (provider, shape, dtype,
mode), the newest measurement is kept. Figures are written beside the CSV (or to --out).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

from fastclip.bench.common import read_csv


def parse_shape(shape: str) -> dict:
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (kv.split("=", 1) for kv in shape.split(",") if "=" in kv)}


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--x", default="N", help="shape key on the x axis (default N)")
    p.add_argument("--mode", default="full", help="fwd, bwd or full (default full)")
    p.add_argument("--device", help="device name to plot (default: newest row's)")
    p.add_argument("--out", help="output folder (default: beside the CSV)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_csv(args.csv) if r["ms_p50"] not in ("", "nan")]
    if not rows:
        print(f"no measured rows in {args.csv}", file=sys.stderr)
        return 1
    device = args.device or max(rows, key=lambda r: r["date"])["device"]
    rows = [r for r in rows if r["device"] == device and r["mode"] == args.mode]
    newest = {}
    for r in rows:
        key = (r["provider"], r["shape"], r["dtype"], r["mode"])
        if key not in newest or r["date"] > newest[key]["date"]:
            newest[key] = r
    groups = defaultdict(lambda: defaultdict(list))  # (dtype, other shape keys) -> provider -> [(x, row)]
    for r in newest.values():
        shape = parse_shape(r["shape"])
        if args.x not in shape:
            continue
        x = shape.pop(args.x)
        groups[(r["dtype"], tuple(sorted(shape.items())))][r["provider"]].append((x, r))
    out_dir = args.out or os.path.dirname(os.path.abspath(args.csv))
    op = rows[0]["op"] if rows else "op"
    written = []
    for (dtype, rest), providers in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider, pts in sorted(providers.items()):
            pts.sort(key=lambda t: t[0])
            xs = [x for x, _ in pts]
            ax_t.errorbar(xs, [float(r["ms_p50"]) for _, r in pts],
                          yerr=[[float(r["ms_p50"]) - float(r["ms_p20"]) for _, r in pts],
                                [float(r["ms_p80"]) - float(r["ms_p50"]) for _, r in pts]],
                          marker="o", capsize=2, label=provider)
            mem = [(x, float(r["peak_mem_mb"])) for x, r in pts if r["peak_mem_mb"] not in ("", "nan")]
            if mem:
                ax_m.plot([x for x, _ in mem], [max(m, 1e-3) for _, m in mem], marker="o", label=provider)
        title = f"{op} {args.mode}, {dtype}, " + ", ".join(f"{k}={v}" for k, v in rest)
        for ax, ylabel in ((ax_t, "time (ms, p50; bars p20-p80)"), (ax_m, "peak memory added (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(args.x)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{title}\n{device}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{slug(op)}_{slug(device)[:40]}_{dtype}_{slug('_'.join(f'{k}{v}' for k, v in rest))}_{args.mode}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
