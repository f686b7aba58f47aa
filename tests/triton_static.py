"""What the GPU will run: every Triton kernel configuration the launchers pick, compiled as a launch compiles it.

No GPU is needed. Triton's driver is replaced by one that reports a chosen GPU target (sm_90, sm_80), and each
kernel's ``run`` is made to compile without launching (``warmup=True``). The launchers themselves
(``contrastive_fwd``, ``siglip_fwd``, ``attention_bwd``...) are then called on CPU example tensors of real shapes,
so each kernel goes through the JIT's own binder: the launcher's constexprs and block configs, stride-1
specialization, divisibility-16 hints on pointers and integers, the JIT's cache key (one compile per distinct
specialization). The cubin is read back with the ``cuobjdump`` Triton ships:

- ``registers``, ``local`` (bytes of local memory per thread: spills or a stack frame), from ``-res-usage``;
- ``shared`` (bytes of shared memory per program), from the compiled kernel's metadata;
- ``hgmma`` / ``hmma`` (warp-group and warp MMA instructions), ``ldgsts`` (cp.async) / ``utmaldg`` (TMA) from SASS;
- ``dots`` (``tt.dot`` in Triton IR) and ``wgmma_dots`` (``warp_group_dot`` in TritonGPU IR).

Every kernel is then checked (:data:`CHECKS`); where one does not meet a check today, :data:`EXPECTED_FAILURES`
says why, in one place. ``tests/test_triton_compile.py`` runs this in a subprocess (``TRITON_INTERPRET`` must be
unset before Triton is imported). By hand::

    python tests/triton_static.py                      # the typical launches, sm_90: one JSON line per kernel
    python tests/triton_static.py --all --arch 90 80   # every configuration over the input domain below
    python tests/triton_static.py --all --arch 90 80 --op topk   # one op's launches only
    python tests/triton_static.py --all --arch 90 80 --notes benchmarks/NOTES.md   # rewrite NOTES.md's table
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

if __name__ == "__main__":  # compiling for a GPU target needs the real JIT, not the interpreter (the tests' default)
    os.environ.pop("TRITON_INTERPRET", None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastclip.ops.attention import triton as ATT  # noqa: E402
from fastclip.ops.contrastive import triton as CON  # noqa: E402
from fastclip.ops.siglip import triton as SIG  # noqa: E402
from fastclip.ops.topk import triton as TOPK  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory one block may use (opt-in maximum)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ----------------------------------------------------------------------------------------------------------------
# Expectations. A (kernel, check) pair listed here fails today for the reason given; the test fails both on any
# other failure and when a listed pair passes for every configuration (then delete its line). None today: every
# configuration passes every check.
EXPECTED_FAILURES = {}


def _is_16bit(r):
    return r["dtype"] in ("bf16", "fp16")


# check name -> (applies to this kernel?, passes?, what it asserts)
CHECKS = {
    "wgmma": (lambda r: r["arch"] == 90 and _is_16bit(r) and r["config"]["BLOCK_M"] >= 64,
              lambda r: r["dots"] > 0 and r["wgmma_dots"] == r["dots"] and r["hgmma"] > 0,
              "sm_90, 16-bit inputs, BLOCK_M >= 64: every tt.dot lowers to warp_group_dot (HGMMA in SASS)"),
    "wgmma_tile": (lambda r: r["arch"] == 90 and _is_16bit(r) and r["dots"] > 0,
                   lambda r: r["config"]["BLOCK_M"] >= 64,
                   "sm_90, 16-bit inputs: tiles of BLOCK_M >= 64, so that the dots can use wgmma"),
    "pipelined": (lambda r: r["dots"] > 0,
                  lambda r: r["num_stages"] >= 2 and r["ldgsts"] + r["utmaldg"] > 0,
                  "the hot loop's loads are pipelined: num_stages >= 2 and cp.async (LDGSTS) or TMA in SASS"),
    "no_spills": (lambda r: True, lambda r: r["local"] == 0, "no local memory (spills or stack frame): 0 bytes"),
    "shared_fits": (lambda r: True, lambda r: r["shared"] <= SHARED_LIMIT[r["arch"]],
                    "shared memory within the architecture's per-block limit (227 KB sm_90, 163 KB sm_80)"),
}


def check_failures(rows):
    """{(kernel, check): [rows that fail it]} over every row the check applies to."""
    out = {}
    for r in rows:
        for name, (applies, passes, _) in CHECKS.items():
            if applies(r) and not passes(r):
                out.setdefault((r["kernel"], name), []).append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Launches. Each case calls a launcher exactly as fastclip's ops do, with CPU tensors of the given shape.

def _feat(n, d, dtype):
    return torch.randn(n, d, dtype=torch.float32).to(DTYPES[dtype])


def launch_contrastive(n, d, dtype, bias=False, smoothing=0.0):
    img, txt = _feat(n, d, dtype), _feat(n, d, dtype)
    scale = torch.tensor(100.0)
    b = torch.tensor(-10.0) if bias else None
    _, row_stats, col_stats = CON.contrastive_fwd(img, txt, scale, b, smoothing)
    CON.contrastive_bwd(torch.tensor(1.0), img, txt, scale, b, row_stats, col_stats, smoothing)


def launch_siglip(n, d, dtype, bias=True, negative_only=False):
    img, txt = _feat(n, d, dtype), _feat(n, d, dtype)
    scale, b = torch.tensor(10.0), (torch.tensor(-10.0) if bias else None)
    SIG.siglip_fwd(img, txt, scale, b, negative_only, compute_grad=False)
    SIG.siglip_fwd(img, txt, scale, b, negative_only, compute_grad=True)
    SIG.siglip_bwd_text(torch.tensor(1.0), img, txt, scale, b, negative_only)


def launch_attention(batch, seq, heads, head_dim, dtype, causal=False, padding=False):
    q, k, v = (torch.randn(batch, seq, heads, head_dim).to(DTYPES[dtype]) for _ in range(3))
    mask = None
    if padding:  # key_padding_mask: True = padding, as torch's
        mask = torch.arange(seq)[None, :] >= torch.randint(1, seq + 1, (batch, 1))
    scale = head_dim ** -0.5
    out, lse = ATT.attention_fwd(q, k, v, mask, causal, scale)
    ATT.attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask, causal, scale)


def launch_topk(nq, ng, d, k, dtype):
    TOPK.topk_similarity(_feat(nq, d, dtype), _feat(ng, d, dtype), k)


# The launches training and evaluation make: CLIP ViT-B/L and text towers, losses at large batch.
TYPICAL = [
    (launch_contrastive, dict(n=65536, d=512, dtype="bf16")),
    (launch_contrastive, dict(n=65536, d=768, dtype="bf16")),
    (launch_siglip, dict(n=16384, d=768, dtype="bf16")),
    (launch_attention, dict(batch=256, seq=197, heads=12, head_dim=64, dtype="bf16")),
    (launch_attention, dict(batch=256, seq=77, heads=8, head_dim=64, dtype="bf16", causal=True, padding=True)),
    (launch_topk, dict(nq=4096, ng=8192, d=512, k=10, dtype="bf16")),  # search: the tiles do not depend on G
]

# Every configuration. The launchers' config functions map (dtype, feature or head dim, sequence length) to block
# configs; :func:`case_configs` asks them which configs a launch picks, so that the exhaustive domain keeps one
# launch per distinct config (fp16 picks bf16's configs, so 16-bit launches are bf16) plus the flag variants.
# test_triton_compile.py checks that every config any supported input reaches is in this domain.
MAX_FEATURE_DIM, MAX_HEAD_DIM = 2048, 128  # the triton backend's limits (its Support rows' max_dim)
MAX_TOPK = 128  # the triton backend's largest k (its Support row's max_sizes); configs depend on k and the dtype


def _freeze(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def case_configs(fn, kw) -> set:
    """{(kernel, config)} that one case's launches pick, from the launchers' own config functions (no compile)."""
    dtype = DTYPES[kw["dtype"]]
    if fn is launch_contrastive:
        fwd = {k: v for k, v in CON.fwd_config(kw["n"], kw["d"], dtype).items() if k != "SPLIT"}  # grid, not tiles
        return {("contrastive_fwd", _freeze(fwd)),
                ("contrastive_bwd", _freeze(CON.bwd_config(kw["n"], kw["d"], dtype)))}
    if fn is launch_topk:
        return {("topk_similarity", _freeze(TOPK._config(kw["nq"], kw["ng"], kw["k"], dtype)))}
    if fn is launch_siglip:
        return {(f"siglip_{'grad' if grad else 'loss'}", _freeze(SIG.config(kw["n"], kw["d"], dtype, grad)))
                for grad in (False, True)}
    s, hd = kw["seq"], kw["head_dim"]
    return {("attention_fwd", _freeze(ATT._fwd_config(s, s, hd, dtype))),
            ("attention_bwd", _freeze(ATT._bwd_config(s, s, hd, dtype)))}


def _candidates(feature_dims, head_dims, seqs, dtypes):
    for dtype in dtypes:
        for k in range(1, MAX_TOPK + 1):
            yield launch_topk, dict(nq=256, ng=1024, d=512, k=k, dtype=dtype)
        for d in feature_dims:
            yield launch_contrastive, dict(n=4096, d=d, dtype=dtype)  # the configs do not depend on N
            yield launch_siglip, dict(n=4096, d=d, dtype=dtype)
        for hd in head_dims:
            for seq in seqs:
                yield launch_attention, dict(batch=2, seq=seq, heads=4, head_dim=hd, dtype=dtype)


def configs_of(cases) -> set:
    return set().union(*(case_configs(fn, kw) for fn, kw in cases))


def every_config() -> set:
    """The configs any supported input reaches: every dtype, feature and head dim; sequences sampled up to 4096."""
    return configs_of(_candidates(range(1, MAX_FEATURE_DIM + 1), range(1, MAX_HEAD_DIM + 1),
                                  (*range(1, 4097, 255), 511, 512), DTYPES))


def all_cases():
    """One launch per distinct config over CLIP-like inputs, then the flag variants at typical shapes."""
    cases, seen = [], set()
    for fn, kw in _candidates((16, 32, 64, 128, 256, 512, 768, 1024, 2048), (16, 32, 48, 64, 80, 96, 128), (77, 577),
                              ("bf16", "fp32")):
        new = case_configs(fn, kw) - seen
        if new:
            seen |= new
            cases.append((fn, kw))
    for dtype in ("bf16", "fp32"):
        # the JIT specializes k (k = 1 a constant, multiples of 16 a divisibility hint): the first k of each tile
        # config is 1 or odd, so compile the other specializations too
        cases += [(launch_topk, dict(nq=256, ng=1024, d=512, k=k, dtype=dtype)) for k in (2, 16, 32, 64, 128)]
        cases.append((launch_contrastive, dict(n=4096, d=512, dtype=dtype, bias=True, smoothing=0.1)))
        cases.append((launch_siglip, dict(n=4096, d=768, dtype=dtype, bias=False, negative_only=True)))
        cases.append((launch_attention, dict(batch=8, seq=77, heads=8, head_dim=64, dtype=dtype, causal=True,
                                             padding=True)))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Compiling through the JIT without a GPU.

class TargetDriver:
    """Triton's active driver as far as the JIT's binder needs it: a current target, device and stream."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # the JIT keeps one binder and kernel cache per device: one per target here

    def get_current_stream(self, device=None):
        return 0


_COMPILED = []  # (JITFunction, non-tensor arguments and the first tensor's dtype, CompiledKernel), by the patched run


def _compile_only_run(self, *args, grid, warmup, **kwargs):
    kernel = _ORIGINAL_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    bound = dict(zip(self.arg_names, args)) | kwargs
    # keep no tensor: the example inputs are large, and every launch is recorded
    kept = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)}
    kept["dtype"] = next(v.dtype for v in bound.values() if isinstance(v, torch.Tensor))
    _COMPILED.append((self, kept, kernel))
    return kernel


_ORIGINAL_RUN = JITFunction.run


def compile_launches(cases, arch):
    """Run each case's launches against sm_<arch>; returns the distinct compiled kernels, in launch order."""
    previous = driver._active  # not driver.active: without a GPU there is no default driver to create
    driver.set_active(TargetDriver(arch))
    JITFunction.run = _compile_only_run
    capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *a, **k: divmod(arch, 10)  # launchers that key configs on the arch
    try:
        _COMPILED.clear()
        for fn, kw in cases:
            fn(**kw)
        seen, out = set(), []
        for jit, args, kernel in _COMPILED:
            if kernel.hash not in seen:
                seen.add(kernel.hash)
                out.append((jit, args, kernel))
        return out
    finally:
        JITFunction.run = _ORIGINAL_RUN
        torch.cuda.get_device_capability = capability
        driver._active = previous


def _label(jit, args):
    name = jit.fn.__name__.strip("_").removesuffix("_kernel")  # _contrastive_fwd_kernel -> contrastive_fwd
    if name == "siglip":
        return "siglip_grad" if args.get("COMPUTE_GRAD") else "siglip_loss"
    if name.startswith("attn_"):
        return "attention_" + name[len("attn_"):]
    return name


def _sass_counts(cubin: bytes) -> tuple:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res)}
    ops = Counter(m.split(".")[0] for m in re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    return usage, ops


def describe(jit, args, kernel, arch) -> dict:
    usage, ops = _sass_counts(kernel.asm["cubin"])
    # a kernel pipelined by tl.range(num_stages=NUM_STAGES) takes its depth as a constexpr: that is its stages
    config = {k: v for k, v in args.items() if k.startswith("BLOCK_") or k == "NUM_STAGES"}
    flags = {k: v for k, v in args.items() if k.isupper() and not k.startswith("BLOCK_") and isinstance(v, bool)}
    return dict(
        kernel=_label(jit, args), arch=arch, dtype={v: k for k, v in DTYPES.items()}[args["dtype"]],
        config=config, num_warps=kernel.metadata.num_warps,
        num_stages=args.get("NUM_STAGES", kernel.metadata.num_stages), flags=flags,
        registers=usage.get("REG", -1), local=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        shared=kernel.metadata.shared, dots=kernel.asm["ttir"].count("tt.dot "),
        wgmma_dots=kernel.asm["ttgir"].count("ttng.warp_group_dot "), hgmma=ops["HGMMA"], hmma=ops["HMMA"],
        ldgsts=ops["LDGSTS"], utmaldg=ops["UTMALDG"], stl=ops["STL"])


def collect(archs=(90,), exhaustive=False, ops=None):
    cases = all_cases() if exhaustive else TYPICAL
    cases = [(fn, kw) for fn, kw in cases if ops is None or fn.__name__.removeprefix("launch_") in ops]
    return [describe(jit, args, kernel, arch) for arch in archs
            for jit, args, kernel in compile_launches(cases, arch)]


# ----------------------------------------------------------------------------------------------------------------
# The table for benchmarks/NOTES.md.

BEGIN, END = "<!-- compiled-kernels:begin -->", "<!-- compiled-kernels:end -->"


def markdown(rows) -> str:
    def cfg(r):
        c = r["config"]
        tile = " x ".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D") if k in c)
        if "BLOCK_TOP" in c:  # top-k: slots of the running top-k
            tile += f", top {c['BLOCK_TOP']}"
        if "BLOCK_D0" in c:  # attention: the head dim's column pieces
            tile += f", d {c['BLOCK_D0']}" + (f" + {c['BLOCK_D1']}" if c["BLOCK_D1"] else "")
        return f"{tile}, {r['num_warps']} w, {r['num_stages']} st"

    failures = check_failures(rows)
    failed = {id(r): sorted(name for (_, name), rs in failures.items() for x in rs if x is r) for r in rows}
    lines = ["| kernel | arch | dtype | flags | tile (M x N x K x D; top-k slots; head-dim pieces), warps, stages | "
             "regs | local B | smem KB | "
             "dots (wgmma) | HGMMA | HMMA | cp.async | fails |", "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: (r["kernel"], -r["arch"], r["dtype"], sorted(r["config"].items()))):
        flags = ", ".join(k.lower() for k, v in r["flags"].items() if v) or "-"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {flags} | {cfg(r)} | {r['registers']} | "
                     f"{r['local']} | {r['shared'] / 1024:.0f} | {r['dots']} ({r['wgmma_dots']}) | {r['hgmma']} | "
                     f"{r['hmma']} | {r['ldgsts']} | {', '.join(failed[id(r)]) or '-'} |")
    return "\n".join(lines)


def write_notes(path, rows, command):
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    body = (f"\nGenerated by `{command}` (triton {triton.__version__}; no GPU: compiled through the JIT's binder "
            f"for each target, read back with cuobjdump).\n\n" + markdown(rows) + "\n")
    with open(path, "w") as f:
        f.write(text[:start] + body + text[end:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT))
    p.add_argument("--all", action="store_true", help="every configuration over the input domain, not only typical")
    p.add_argument("--notes", help="rewrite the generated table of this markdown file (benchmarks/NOTES.md)")
    p.add_argument("--op", nargs="+", choices=("contrastive", "siglip", "attention", "topk"),
                   help="only these ops' launches (default: all)")
    args = p.parse_args(argv)
    rows = collect(tuple(args.arch), exhaustive=args.all, ops=args.op)
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.notes:
        write_notes(args.notes, rows, "python tests/triton_static.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
