"""Write fastclip/data/backend_choice.json (auto's choice between the cuda and triton backends) from benchmark CSVs.

For every op, GPU architecture, dtype and feature/head dim where both backends were timed forward+backward
("full" mode) at the same shapes, the entry names the backend with the lower geometric mean of p50 times over
those shapes and keeps the evidence (shapes compared, the ratio, the CSV's devices and commits). Without an entry,
auto runs triton. Run it after a GPU benchmark run and commit both the CSVs and the JSON:

    python benchmarks/choose_backends.py benchmarks/results/loss.csv benchmarks/results/attention.csv
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastclip.bench.common import read_csv  # noqa: E402
from fastclip.dispatch import CHOICE_TABLE as TABLE  # noqa: E402

# (op as in the CSV, cuda provider, triton provider)
PAIRS = {"contrastive_loss": ("cuda", "triton"), "flash_attention": ("fastclip-cuda", "fastclip-triton")}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dim_of(shape: str) -> int:
    return int(re.search(r"\bD=(\d+)", shape).group(1))


def choose(rows) -> list:
    times = collections.defaultdict(dict)  # (op, arch, dtype, dim) -> {(shape, provider): (p50, sha, device)}
    for r in rows:
        if r["op"] not in PAIRS or r["mode"] != "full" or not r.get("ms_p50") or r.get("note"):
            continue
        arch = re.search(r"\((sm_\d+a?)\)", r["device"])
        if not arch or r["dtype"] not in DTYPES:
            continue
        key = (r["op"], arch.group(1), DTYPES[r["dtype"]], dim_of(r["shape"]))
        times[key][(r["shape"], r["provider"])] = (float(r["ms_p50"]), r["git_sha"], r["device"])
    entries = []
    for (op, arch, dtype, dim), t in sorted(times.items()):
        cu, tr = PAIRS[op]
        shapes = sorted({s for s, p in t if (s, cu) in t and (s, tr) in t})
        if not shapes:
            continue
        logs = [math.log(t[(s, tr)][0] / t[(s, cu)][0]) for s in shapes]
        speedup = math.exp(sum(logs) / len(logs))  # > 1: cuda faster
        entries.append(dict(op=op, arch=arch, dtype=dtype, dim_max=dim, backend="cuda" if speedup > 1 else "triton",
                            cuda_speedup=round(speedup, 3), shapes=shapes,
                            evidence=sorted({f"{t[(s, p)][2]} @ {t[(s, p)][1]}" for s in shapes for p in (cu, tr)})))
    return entries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("--out", default=TABLE)
    args = p.parse_args(argv)
    rows = [r for path in args.csv if os.path.exists(path) for r in read_csv(path)]
    entries = choose(rows)
    with open(args.out) as f:
        about = json.load(f).get("about", "")
    with open(args.out, "w") as f:
        json.dump({"about": about, "entries": entries}, f, indent=1)
        f.write("\n")
    for e in entries:
        print(f"{e['op']:<18} {e['arch']} {e['dtype']:<9} dim<={e['dim_max']:<5} -> {e['backend']:<6} "
              f"(cuda {e['cuda_speedup']:.2f}x triton over {len(e['shapes'])} shapes)")
    print(f"{len(entries)} entries written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
