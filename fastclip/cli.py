"""The ``fastclip`` command: ``fastclip <command> [options]``; ``fastclip <command> --help`` describes each.

Adding a command: write a module whose ``main(argv) -> int`` parses its own arguments (``argparse`` with
``prog="fastclip <command>"``), then add one line to :data:`COMMANDS`. A benchmark is one line in
``fastclip.bench.BENCHES`` instead. Modules are imported only when their command runs, so ``fastclip --help``
stays fast.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) runs it, one line for `fastclip --help`)
COMMANDS = {
    "info": ("fastclip.info", "versions, GPU, every backend of every op, what auto picks, the models"),
    "bench": ("fastclip.bench", "benchmarks against open_clip, SDPA and others (fastclip bench --help)"),
    "index": ("fastclip.commands.index", "embed an image folder into a search index (resumable)"),
    "search": ("fastclip.commands.search", "rank an index's images against a text or image query"),
    "classify": ("fastclip.commands.classify", "zero-shot labels with probabilities"),
    "moderate": ("fastclip.commands.moderate", "flag images matching a policy's categories"),
    "eval": ("fastclip.commands.evaluate", "zero-shot top-1/top-5 or retrieval recall@k"),
    "train": ("fastclip.train.cli", "train CLIP or SigLIP: synthetic, webdataset or CSV data (fastclip train --help)"),
}


def usage() -> str:
    import fastclip

    width = max(map(len, COMMANDS))
    lines = ["usage: fastclip [--version] <command> [options]", "",
             f"fastclip {fastclip.__version__}: fast, memory-lean CLIP and SigLIP training.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "fastclip <command> --help describes a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        import fastclip

        print(f"fastclip {fastclip.__version__}")
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        print(f"fastclip: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(entry[0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
