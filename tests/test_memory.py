"""Memory is linear in the batch size: the N x N logits never exist.

CPU: forward+backward at N=32768, D=128, fp32 must add under 1 GB of peak memory beyond its inputs (open_clip's
ClipLoss materializes two 32768^2 fp32 logit matrices and their softmax/gradients: about 17 GB). Measured in a
fresh subprocess through the resident high-water mark (VmHWM), reset just before the call.
"""
import json
import os
import subprocess
import sys

import pytest

from fastclip.bench.common import cpu_peak_supported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys, torch
import fastclip
from fastclip.bench.common import peak_memory_mb
n, d = int(sys.argv[1]), int(sys.argv[2])
img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
scale = torch.tensor(100.0, requires_grad=True)
out = {}
def step():
    loss = fastclip.contrastive_loss(img, txt, scale, backend="torch")
    loss.backward()
    out["loss"] = loss.item()
out["peak_mb"] = peak_memory_mb(step, torch.device("cpu"))
out["grad_finite"] = bool(torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all())
print(json.dumps(out))
"""


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs to measure peak memory")
def test_cpu_memory_linear_at_32k():
    n, d = 32768, 128
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(d)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # The inputs' gradients (2 x 16 MB) are part of what a step must allocate; the budget is for everything.
    logits_gb = 2 * n * n * 4 / 1e9
    print(f"N={n} D={d}: peak +{out['peak_mb']:.0f} MB (two fp32 logit matrices alone would be {logits_gb:.1f} GB)")
    assert out["grad_finite"]
    assert 0 < out["peak_mb"] < 1024, f"peak memory {out['peak_mb']:.0f} MB >= 1 GB"
