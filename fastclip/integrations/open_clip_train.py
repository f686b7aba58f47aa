"""open_clip's own training program with fastclip's losses and attention.

    python -m fastclip.integrations.open_clip_train <open_clip_train arguments> \\
        [--fastclip-loss-impl ring] [--fastclip-backend auto] [--fastclip-chunk-size N] [--no-fastclip-attention]

runs ``python -m open_clip_train.main`` with the same arguments, under ``fastclip.integrations.open_clip.patch``:
``ClipLoss`` / ``SigLipLoss`` are fastclip's and every ``nn.MultiheadAttention`` of the model is fastclip's. Launch
it as open_clip_train (``torchrun --nproc_per_node 8 -m fastclip.integrations.open_clip_train ...``).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

from fastclip.integrations.open_clip import patch

LOSS_IMPLS = ("ring", "bidir", "shift", "reduce", "gather")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastclip.integrations.open_clip_train", add_help=False,
                                description="open_clip_train with fastclip's losses and attention. Every argument "
                                            "not listed here goes to open_clip_train.")
    p.add_argument("--fastclip-loss-impl", choices=LOSS_IMPLS, default=None,
                   help="the losses' exchange across processes ('ring': both losses, per-rank memory linear in the "
                        "local batch; SigLIP also 'bidir', 'shift', 'reduce', 'gather'); default: open_clip's "
                        "(--loss-dist-impl for SigLIP)")
    p.add_argument("--fastclip-backend", default="auto", choices=("auto", "torch", "triton", "cuda", "reference"),
                   help="fastclip's backend for the losses and the attention (default: auto)")
    p.add_argument("--fastclip-chunk-size", type=int, default=None, help="rows per chunk on the 'torch' backend")
    p.add_argument("--fastclip-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="replace the model's nn.MultiheadAttention layers by fastclip's (default: yes)")
    return p


def split_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """fastclip's options, and the arguments left for open_clip_train."""
    return parser().parse_known_args(list(argv))


def main(argv: Optional[Sequence[str]] = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        parser().print_help()
        print("\nopen_clip_train's arguments:\n")
    opts, rest = split_args(argv)
    import open_clip_train.main as train

    with patch(attention=opts.fastclip_attention, backend=opts.fastclip_backend, dist_impl=opts.fastclip_loss_impl,
               chunk_size=opts.fastclip_chunk_size):
        return train.main(rest)


if __name__ == "__main__":
    main()
