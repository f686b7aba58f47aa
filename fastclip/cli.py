"""The ``fastclip`` command.

    fastclip info                      versions, devices, every backend and why it is (not) available
    fastclip bench loss [options]      the contrastive-loss benchmark (``fastclip bench loss --help``)
    fastclip bench siglip [options]    the SigLIP sigmoid-loss benchmark
    fastclip bench attention [options] the attention benchmark (``fastclip bench attention --help``)
    fastclip bench towers [options]    training steps of the CLIP towers against open_clip
    fastclip bench topk [options]      top-k similarity search against FAISS and torch.topk
    fastclip index | search | classify | moderate | eval   using a model (``fastclip <command> --help``)
"""
from __future__ import annotations

import importlib
import sys

# benchmark name -> module with main(argv)
BENCHES = {"loss": "fastclip.bench.loss", "siglip": "fastclip.bench.siglip", "attention": "fastclip.bench.attention",
           "towers": "fastclip.bench.towers", "topk": "fastclip.bench.topk"}
# command name -> (module, function(argv))
COMMANDS = {"index": ("fastclip.commands.index", "index_main"), "search": ("fastclip.commands.index", "search_main"),
            "classify": ("fastclip.commands.classify", "main"), "moderate": ("fastclip.commands.moderate", "main"),
            "eval": ("fastclip.commands.evaluate", "main")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nbenchmarks: " + ", ".join(sorted(BENCHES)))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from fastclip.info import main as info_main

        return info_main()
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: fastclip bench {{{','.join(sorted(BENCHES))}}} [options]", file=sys.stderr)
            return 2
        return importlib.import_module(BENCHES[rest[0]]).main(rest[1:])
    if cmd in COMMANDS:
        return getattr(importlib.import_module(COMMANDS[cmd][0]), COMMANDS[cmd][1])(rest)
    print(f"fastclip: unknown command {cmd!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
