"""Compile the contrastive loss's Triton kernels for a GPU target without a GPU; print one JSON line per config.

Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset before triton is imported).
Uses the launchers' own GPU configurations, Triton's compiler and its bundled ptxas (`ptxas -v` for registers
and spills).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastclip.ops.contrastive import triton as C  # noqa: E402
from fastclip.ops.siglip import triton as SG  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("N", "D", "M_A", "N_B") or name.startswith("stride"):
            sig[name] = "i32"
        elif name in ("label_smoothing", "inv_n"):
            sig[name] = "fp32"
        elif name == "LOCKS":
            sig[name] = "*i32"
        else:
            sig[name] = "*" + TYPES[dtype] if name in ("A", "B", "DA") else "*fp32"
    return sig


def compile_one(kernel, dtype, cfg, arch, sig=None):
    cfg = dict(cfg)
    opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    src = ASTSource(kernel, sig or signature(kernel, dtype, cfg),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in cfg.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    gpu = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)  # sm_90a for Hopper
    res = subprocess.run([PTXAS, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}: {res.stderr[-2000:]}")
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return dict(shared=compiled.metadata.shared, registers=int(regs.group(1)) if regs else -1,
                spill=int(spill.group(1)) if spill else -1)


def main():
    n = 65536
    for arch in (int(a) for a in sys.argv[1:] or ["90"]):
        for dtype in (torch.bfloat16, torch.float32):
            cases = [("fwd", C._contrastive_fwd_kernel, 512,
                      dict(C._fwd_config(n, 512, dtype), HAS_BIAS=True, INPUT_PRECISION="tf32"))]
            for d in (128, 512, 1024, 2048):
                cases.append(("bwd", C._contrastive_bwd_kernel, d,
                              dict(C._bwd_config(n, d, dtype), HAS_BIAS=True, HAS_SMOOTHING=True,
                                   COMPUTE_DSCALE=True, INPUT_PRECISION="tf32")))
            for grad in (False, True):
                cases.append((f"siglip{'_grad' if grad else ''}", SG._siglip_kernel, 512,
                              dict(SG._config(n, 512, dtype, grad), HAS_BIAS=True, POSITIVES=True, COMPUTE_LOSS=True,
                                   COMPUTE_GRAD=grad, INPUT_PRECISION="tf32")))
            for name, kernel, d, cfg in cases:
                out = dict(kernel=name, arch=arch, dtype=TYPES[dtype], d=d,
                           config={k: v for k, v in cfg.items() if k.startswith(("BLOCK", "num"))})
                out.update(compile_one(kernel, dtype, cfg, arch))
                print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
