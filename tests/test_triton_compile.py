"""The Triton kernels compile for real GPU targets (not just the interpreter), within the hardware's limits.

The interpreter runs kernels that a GPU compiler rejects (e.g. a kernel reading a plain Python float global);
this compiles every configuration the contrastive and SigLIP launchers choose for sm_90 (H100) and sm_80 (A100) with
Triton's compiler and bundled ptxas, no GPU needed, and checks shared memory and register spills.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory a block may use
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton build has no bundled ptxas (not Linux x86-64)")
def test_contrastive_kernels_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py"), "90", "80"], capture_output=True,
                         text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 28
    for r in rows:
        print(r)
        assert r["registers"] > 0, r
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"shared memory over the sm_{r['arch']} limit: {r}"
        # chosen to avoid register spills on sm_90 (benchmarks/NOTES.md); D=2048 is allowed a little
        if r["arch"] == 90:
            assert r["spill"] <= (1024 if r["d"] >= 2048 or r["dtype"] == "fp32" else 64), f"spills: {r}"
