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

    lines = ["usage: fastclip [--version] <command> [options]", "",
             f"fastclip {fastclip.__version__}: fast, memory-lean CLIP and SigLIP training.", "", "commands:"]
    lines += table_lines(COMMANDS)
    lines += ["", "fastclip <command> --help describes a command's options."]
    return "\n".join(lines)


def table_lines(table: dict) -> list:
    """One aligned help line per entry of a {name: (module, text)} table of subcommands."""
    width = max(map(len, table))
    return [f"  {name:<{width}}  {text}" for name, (_, text) in table.items()]


def dispatch(table: dict, argv: list, usage, prog: str, kind: str) -> int:
    """Run ``argv[0]``'s entry of a {name: (module, text)} table with the rest of ``argv`` (its module imported
    only now); no name or -h/--help prints ``usage()``, an unknown name is an error naming it."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    entry = table.get(argv[0])
    if entry is None:
        print(f"{prog}: unknown {kind} {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(entry[0]).main(argv[1:])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        import fastclip

        print(f"fastclip {fastclip.__version__}")
        return 0
    return dispatch(COMMANDS, argv, usage, "fastclip", "command")


if __name__ == "__main__":
    sys.exit(main())
