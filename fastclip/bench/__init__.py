"""Benchmark harness behind ``fastclip bench``: shared utilities in ``common``, one module per benchmark.

Adding a benchmark: a module whose ``main(argv) -> int`` builds its parser with ``common.bench_parser(name,
__doc__)`` and its output options with ``common.add_output_arguments``, and one line in :data:`BENCHES`.
"""
from __future__ import annotations

import sys

from fastclip.cli import dispatch, table_lines

# benchmark -> (module whose main(argv) runs it, one line for `fastclip bench --help`)
BENCHES = {
    "loss": ("fastclip.bench.loss", "the CLIP contrastive loss: fastclip against open_clip (and inf-cl)"),
    "siglip": ("fastclip.bench.siglip", "the SigLIP sigmoid loss: fastclip against open_clip"),
    "attention": ("fastclip.bench.attention", "attention at CLIP's shapes: fastclip against every SDPA backend"),
    "towers": ("fastclip.bench.towers", "a training step of the CLIP towers: fastclip against open_clip"),
    "topk": ("fastclip.bench.topk", "top-k similarity search: fastclip against FAISS and torch.topk"),
    "train": ("fastclip.bench.train", "a training step at growing batch: fastclip train against open_clip_train"),
}


def usage() -> str:
    lines = ["usage: fastclip bench <benchmark> [options]", "", "benchmarks:"] + table_lines(BENCHES)
    lines += ["", "fastclip bench <benchmark> --help describes its options. Results go to ./fastclip-results/ "
              "unless --out DIR or --csv FILE says otherwise."]
    return "\n".join(lines)


def main(argv=None) -> int:
    return dispatch(BENCHES, list(sys.argv[1:] if argv is None else argv), usage, "fastclip bench", "benchmark")
