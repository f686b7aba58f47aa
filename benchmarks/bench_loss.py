"""Contrastive-loss benchmark: ``python benchmarks/bench_loss.py --help`` (same as ``fastclip bench loss``)."""
import sys

from fastclip.bench.loss import main

if __name__ == "__main__":
    sys.exit(main())
