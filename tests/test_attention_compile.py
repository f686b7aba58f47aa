"""What the GPU would run for flash attention: every tile the Triton launchers can pick, compiled for sm_90 as a
launch would compile it, without a GPU.

The launchers (``attention_fwd``/``attention_bwd``) are called with CPU tensors of the real dtypes, shapes and
strides; each kernel launch is intercepted and bound by the JIT's own binder (the same specialization: pointer
alignment, 16-divisible integers, stride 1 as a constant), then compiled for GPUTarget("cuda", 90, 64) and
assembled by Triton's bundled ptxas (``-v`` for registers and spills). Per kernel the test asserts: no spills,
shared memory within sm_90's limit, loads pipelined (asynchronous copies) for 16-bit inputs whose rows are 16-byte
aligned, and every product on warp-group MMA where its tiles have 64+ rows.
``python tests/test_attention_compile.py`` prints the table in benchmarks/NOTES.md.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SM90_SHARED = 227 * 1024
PADDED_DIMS = (16, 32, 48, 64, 80, 96, 128)  # one GPU_TILES row each, per kernel and precision
TABLE_DIMS = (16, 32, 48, 59, 64, 72, 80, 88, 96, 128)  # and 72/88 (16-byte alignment hint), 59 (none)


def _cases(full):
    """(dtype name, head dim, causal + padding): the test compiles every tile row once, under causal + padding
    (the most registers), bf16 also at 72 and 88; the printed table has both masks at every TABLE_DIMS."""
    if full:
        return [(t, d, c) for t in ("bfloat16", "float32") for d in TABLE_DIMS for c in (False, True)]
    return [("bfloat16", d, True) for d in sorted(PADDED_DIMS + (72, 88))] + [("float32", d, True) for d in PADDED_DIMS]


def _compile_all(full):  # runs in a process where TRITON_INTERPRET is unset
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastclip.ops.attention import triton as A

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", 90, 64)
    backend = make_backend(target)
    rows = []

    def compile_launch(kernel, *args, grid, warmup, **kwargs):
        bound, spec, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        gpu = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # sm_90a
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                             text=True)
        os.unlink(f.name)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        dots = r"%([A-Za-z][A-Za-z_0-9]*?)(?:_\d+)?(?::\d+)? = {} "  # the result's name: the source variable's
        rows.append(dict(
            kernel=kernel.fn.__name__[6:9], tiles=[kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D0", "BLOCK_D1")],
            warps=options.num_warps, stages=options.num_stages,
            wgmma=sorted(set(re.findall(dots.format("ttng.warp_group_dot"), ttgir))),
            mma=sorted(set(re.findall(dots.format("tt.dot"), ttgir))),
            async_copies=ttgir.count("ttg.async_copy_global_to_local"),
            registers=int(re.search(r"Used (\d+) registers", res.stderr).group(1)),
            spill=int(re.search(r"(\d+) bytes spill stores", res.stderr).group(1)),
            shared=compiled.metadata.shared))

    for kernel in (A._attn_fwd_kernel, A._attn_bwd_kernel):
        kernel.run = compile_launch.__get__(kernel)
    for dtype_name, d, causal_pad in _cases(full):
        b, s, h, dtype = 4, 77, 12, getattr(torch, dtype_name)
        q = torch.empty(b, s, 3, h, d, dtype=dtype)[:, :, 0]  # a packed QKV projection's view
        k, v = torch.empty(b, s, h, d, dtype=dtype), torch.empty(b, s, h, d, dtype=dtype)
        mask = torch.zeros(b, s, dtype=torch.bool) if causal_pad else None
        out, lse = A.attention_fwd(q, k, v, mask, causal_pad, d ** -0.5)
        A.attention_bwd(torch.empty_like(out), q, k, v, out, lse, mask, causal_pad, d ** -0.5)
        for r in rows[-2:]:
            r.update(dtype=dtype_name, d=d, causal_pad=causal_pad)
    return rows


def _rows():
    ptxas = pytest.importorskip("triton").__file__.replace("__init__.py", "backends/nvidia/bin/ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no bundled ptxas (not Linux x86-64)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(HERE), timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.mark.slow
def test_attention_kernels_compiled_for_sm90():
    rows = _rows()
    assert len(rows) == 2 * len(_cases(full=False))
    for r in rows:
        print(r)
        assert r["spill"] == 0, f"register spills: {r}"
        assert r["shared"] <= SM90_SHARED, f"shared memory over sm_90's limit: {r}"
        if r["dtype"] == "float32":  # IEEE fp32: FMA, not tensor cores
            continue
        if r["d"] % 8 == 0:  # rows 16-byte aligned: vector loads, so asynchronous copies
            assert r["async_copies"] > 0, f"loads not pipelined: {r}"
        block_m, block_n = r["tiles"][:2]
        # products with BLOCK_M rows: fwd S, O; bwd dQ. With BLOCK_N rows: bwd S^T, dV, dP^T, dK
        m_dots = {"fwd": {"s", "acc0", "acc1"}, "bwd": {"dq0", "dq1"}}[r["kernel"]]
        expect = {n for n in r["wgmma"] + r["mma"] if (block_m if n in m_dots else block_n) >= 64}
        assert expect <= set(r["wgmma"]), f"products with 64+ rows not on warp-group MMA: {r}"
        if r["kernel"] == "bwd":  # 64 x 64 tiles at every head dim (88 and 96 padded to 128)
            assert not r["mma"], f"all five backward products should be on warp-group MMA: {r}"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    os.environ.pop("TRITON_INTERPRET", None)
    rows = _compile_all(full="--json" not in sys.argv)
    if "--json" in sys.argv:
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print("| dtype | head dim | mask | kernel | BLOCK_M x BLOCK_N, columns | warps, stages | warp-group MMA | "
              "mma.sync | registers, spills | shared |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            m, n, d0, d1 = r["tiles"]
            print(f"| {r['dtype']} | {r['d']} | {'causal+pad' if r['causal_pad'] else 'none'} | {r['kernel']} | "
                  f"{m} x {n}, {d0}{f' + {d1}' if d1 else ''} | {r['warps']}, {r['stages']} | "
                  f"{' '.join(r['wgmma']) or '-'} | {' '.join(r['mma']) or '-'} | {r['registers']}, {r['spill']} | "
                  f"{r['shared'] // 1024} KB |")
