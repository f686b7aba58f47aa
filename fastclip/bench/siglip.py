"""``fastclip bench siglip``: SigLIP's sigmoid loss, fastclip against open_clip's ``SigLipLoss``.

The harness is ``fastclip.bench.loss.run``: per provider, N, D and dtype it times forward, backward and
forward+backward (p20/p50/p80 ms), measures the peak memory one forward+backward adds beyond its inputs, and reports
TFLOP/s on the design's count for SigLIP: 6 N^2 D for fwd+bwd (3 GEMMs), 2 N^2 D forward, 4 N^2 D backward.
fastclip makes the gradient in the forward whenever one is needed (the loss is elementwise in the logits), so its
"fwd" row (timed under no_grad) is the loss alone and its "bwd" row is only the transposed launch (Triton) or a
scaling (torch); "full" is the number to compare. Each row is appended to ./fastclip-results/siglip.csv by
default as soon as it is measured.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, Optional

import torch

from fastclip.bench import loss as _loss

def siglip_providers(device: torch.device) -> Dict[str, Optional[Callable]]:
    import fastclip

    out: Dict[str, Optional[Callable]] = {}
    try:
        from open_clip.loss import SigLipLoss

        oc = SigLipLoss()
        out["open_clip"] = lambda i, t, s, b: oc(i, t, s, b)
    except ImportError:
        out["open_clip"] = None
    out["reference"] = lambda i, t, s, b: fastclip.siglip_loss(i, t, s, b, backend="reference")
    out["torch"] = lambda i, t, s, b: fastclip.siglip_loss(i, t, s, b, backend="torch")
    # Triton on the CPU is the interpreter: a correctness tool whose timings mean nothing.
    out["triton"] = ((lambda i, t, s, b: fastclip.siglip_loss(i, t, s, b, backend="triton"))
                     if device.type == "cuda" else None)
    return out


def siglip_flops(n: int, d: int, mode: str) -> float:
    return {"fwd": 2.0, "bwd": 4.0, "full": 6.0}[mode] * n * n * d


def main(argv=None) -> int:
    return _loss.main(argv, name="siglip", doc=__doc__, op="siglip_loss", providers_fn=siglip_providers,
                      flops=siglip_flops, csv_name="siglip.csv", with_bias=True)


if __name__ == "__main__":
    sys.exit(main())
