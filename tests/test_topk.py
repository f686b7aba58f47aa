"""topk_similarity against a stable descending sort of the full score matrix (= torch.topk's values, with ties
broken by the lower index), every backend, odd sizes, k = 1..299 (the triton backend up to its limit, 128), ties,
NaN and inf, chunked galleries, gradients.
"""
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fastclip
from fastclip.bench.common import cpu_peak_supported
from fastclip.dispatch import select
from fastclip.ops.topk import TRITON_MAX_K
from fastclip.ops.topk.reference import topk_similarity_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (backend, dtype): bf16 does not run in the Triton interpreter
CASES = [("torch", torch.float32), ("torch", torch.float16), ("torch", torch.bfloat16), ("torch", torch.float64),
         ("triton", torch.float32), ("triton", torch.float16)]
if torch.cuda.is_available():
    CASES.append(("triton", torch.bfloat16))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ref(q, g, k):
    return topk_similarity_ref(q.double() if q.dtype == torch.float64 else q.float(), g.to(q.dtype).float()
                               if q.dtype != torch.float64 else g, k)


def _check_valid(q, g, k, values, indices):
    """Random inputs: summation order may swap near-equal scores, so check the result is *a* top-k: the values
    match the reference's, each value is the score of its index, and indices are distinct."""
    ref_v, _ = _ref(q, g, k)
    exact = (q.double() @ g.double().T)  # (Q, G)
    tol = 1e-5 * exact.abs().max().item() + 1e-6
    torch.testing.assert_close(values.double(), ref_v.double(), atol=tol, rtol=0)
    torch.testing.assert_close(exact.gather(1, indices), values.double(), atol=tol, rtol=0)
    assert (indices.sort(1).values.diff(dim=1) > 0).all(), "repeated indices"
    assert (values[:, :-1] >= values[:, 1:]).all(), "values not in descending order"


# The Triton interpreter is slow (seconds per kernel at k = 128): its cases are few and small, the rest are slow.
def _cases(cases, fast_triton):
    return [pytest.param(*c, marks=pytest.mark.slow) if c[0] == "triton" and c[1:] not in fast_triton else c
            for c in cases]


def _k_supported(backend, k):
    return backend != "triton" or k <= TRITON_MAX_K


RANDOM_SHAPES = [(1, 1, 3, 1), (3, 77, 33, 5), (77, 257, 19, 1), (5, 300, 8, 128), (13, 1000, 72, 256),
                 (5, 300, 8, 299)]


@pytest.mark.parametrize("backend,dtype,nq,ng,d,k", _cases(
    [c + s for c in CASES for s in RANDOM_SHAPES if _k_supported(c[0], s[-1])],
    fast_triton=[(torch.float32, 1, 1, 3, 1), (torch.float16, 3, 77, 33, 5), (torch.float32, 5, 300, 8, 128)]))
def test_random_matches_full_topk(backend, dtype, nq, ng, d, k):
    q = torch.randn(nq, d, device=DEVICE).to(dtype)
    g = torch.randn(ng, d, device=DEVICE).to(dtype)
    values, indices = fastclip.topk_similarity(q, g, k, backend=backend)
    assert values.shape == indices.shape == (nq, k)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert indices.dtype == torch.int64
    _check_valid(q, g, k, values, indices)
    # and the values are torch.topk's of the materialized matrix
    full = q.double() @ g.double().T if dtype == torch.float64 else q.float() @ g.float().T
    torch.testing.assert_close(values.to(full.dtype), full.topk(k, dim=1).values, atol=1e-4, rtol=0)


def _integer_features(n, d, lo=-2, hi=3):
    # small integers: every product and sum is exact in fp16/fp32, so all backends see identical scores
    return torch.randint(lo, hi, (n, d), device=DEVICE).float()


@pytest.mark.parametrize("backend,dtype,k", _cases(
    [c + (k,) for c in CASES if c[1] != torch.bfloat16 for k in (1, 2, 10, 64, 128, 256) if _k_supported(c[0], k)],
    fast_triton=[(torch.float32, 1), (torch.float16, 10), (torch.float16, 128)]))
def test_ties_lower_index_first(backend, dtype, k):
    # d = 3 with entries in {-1, 0, 1}: 27 distinct gallery rows over 300, so almost every score is tied
    nq = 45 if backend == "torch" else 5
    q = _integer_features(nq, 3, -1, 2).to(dtype)
    g = _integer_features(300, 3, -1, 2).to(dtype)
    values, indices = fastclip.topk_similarity(q, g, k, backend=backend)
    ref_v, ref_i = _ref(q, g, k)
    assert torch.equal(indices, ref_i)
    assert torch.equal(values.float(), ref_v.float())


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_all_equal_scores_give_first_indices(backend):
    q = torch.ones(4, 8, device=DEVICE)
    g = torch.ones(100, 8, device=DEVICE)
    values, indices = fastclip.topk_similarity(q, g, 17, backend=backend)
    assert torch.equal(indices, torch.arange(17, device=DEVICE).expand(4, 17))
    assert torch.equal(values, torch.full((4, 17), 8.0, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_signed_zero_is_a_tie(backend):
    # scores -0.0 (gallery row 0) and +0.0 (row 1) are equal, as in torch: lower index first
    q = torch.tensor([[1.0, 0.0]], device=DEVICE)
    g = torch.tensor([[-0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]], device=DEVICE)
    _, indices = fastclip.topk_similarity(q, g, 3, backend=backend)
    assert indices.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_nan_and_inf_rank_as_torch(backend):
    """NaN ranks above every number (torch.topk/torch.sort), NaNs tie among themselves by index."""
    q = _integer_features(9, 6)
    g = _integer_features(200, 6)
    q[2] = float("nan")  # a NaN query: every score NaN -> indices 0..k-1
    g[[150, 40, 99]] = float("nan")  # NaN gallery rows: first for every query, in index order
    g[7, 0] = float("inf")  # scores +-inf (or NaN where the query's entry is 0: inf * 0)
    k = 12
    values, indices = fastclip.topk_similarity(q, g, k, backend=backend)
    ref_v, ref_i = _ref(q, g, k)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(values, ref_v, equal_nan=True, atol=0, rtol=0)
    assert indices[2].tolist() == list(range(k))
    full = q @ g.T
    torch.testing.assert_close(values, full.topk(k, dim=1).values, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend,chunk", [("torch", 1), ("torch", 64), ("torch", 333), ("reference", 64),
                                           ("triton", 333), pytest.param("triton", 64, marks=pytest.mark.slow)])
def test_gallery_chunks_merge_exactly(backend, chunk):
    q = _integer_features(21 if backend != "triton" else 5, 5)
    g = _integer_features(700, 5)
    k = 40
    ref = fastclip.topk_similarity(q, g, k, backend=backend)
    out = fastclip.topk_similarity(q, g, k, backend=backend, gallery_chunk=chunk)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(out[1], _ref(q, g, k)[1])


def test_torch_tiles_merge_exactly():
    from fastclip.ops.topk import pytorch

    q = _integer_features(37, 4)
    g = _integer_features(1001, 4)
    ref_v, ref_i = _ref(q, g, 30)
    for block_q, block_g in [(1, 31), (5, 97), (37, 1001)]:
        v, i = pytorch.topk_similarity(q, g, 30, block_q=block_q, block_g=block_g)
        assert torch.equal(i, ref_i) and torch.equal(v, ref_v)


@pytest.mark.parametrize("k,block_q,block_g", [(1, 64, 64), (3, 50, 192), (3, 64, 500), (2, 64, 1024)])
def test_torch_late_tiles_merge_exactly(k, block_q, block_g):
    """Many gallery tiles with ties everywhere, and NaN and inf that only late tiles hold."""
    from fastclip.ops.topk import pytorch

    q = _integer_features(64, 3, -1, 2)
    g = _integer_features(3000, 3, -1, 2)
    q[5] = float("nan")
    g[[2100, 1337]] = float("nan")  # every query's first entries, found in a late tile
    g[2500, 0], g[2600, 1] = float("inf"), float("-inf")
    ref_v, ref_i = _ref(q, g, k)
    v, i = pytorch.topk_similarity(q, g, k, block_q=block_q, block_g=block_g)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(v, ref_v, equal_nan=True, atol=0, rtol=0)
    g[[2100, 1337]] = 0.0  # no NaN: ties decide everything
    v, i = pytorch.topk_similarity(q[:4], g, k, block_q=block_q, block_g=block_g)
    assert torch.equal(i, _ref(q[:4], g, k)[1])


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_torch_tile_order_is_exact(order):
    """The torch backend's tiled merge, whatever order the scores come in along the gallery (each tile better than
    the last, worse, or random), with ties at the k-th score, a NaN query and a NaN gallery row only the last tile
    holds: exactly the full matrix's stable order."""
    from fastclip.ops.topk import pytorch

    q = _integer_features(50, 4, -3, 4)
    g = _integer_features(2000, 4, -3, 4)
    if order != "random":
        key = g @ q[0]  # the scores of query 0 sorted along the gallery
        g = g[key.argsort(descending=order == "descending", stable=True)]
    q[7] = float("nan")
    g[1990, 2] = float("nan")
    k = 9
    ref_v, ref_i = _ref(q, g, k)
    for block_q, block_g in [(50, 100), (16, 37), (50, 2000)]:
        v, i = pytorch.topk_similarity(q, g, k, block_q=block_q, block_g=block_g)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(v, ref_v, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("width", [4, 16, 128])
@pytest.mark.parametrize("order", ["random", "ascending"])
def test_torch_entrant_blocks_are_exact(monkeypatch, width, order):
    """After its first tile the torch backend searches a tile only in the column blocks whose maximum beats a row's
    running k-th score (or is NaN), and gathers those blocks' entrants, or takes the tile's top-k when a row has
    many. Both routes, with ties at the k-th score everywhere, inf, a NaN query and a NaN gallery row in a late
    tile, give exactly the full matrix's stable order; a tile width that is no multiple of the block width (the
    last tile here) is one block per row."""
    from fastclip.ops.topk import pytorch

    monkeypatch.setattr(pytorch, "ENTRANT_BLOCK", width)
    full_topk = []
    tile_topk = pytorch.tile_topk
    monkeypatch.setattr(pytorch, "tile_topk", lambda s, k: full_topk.append(s.shape) or tile_topk(s, k))
    q = _integer_features(40, 4, -3, 4)
    g = _integer_features(3000, 4, -3, 4)
    if order == "ascending":  # each tile better than the last for query 0: its rows take many entrants per tile
        g = g[(g @ q[0]).argsort(stable=True)]
    q[7] = float("nan")
    g[2900, 1] = float("nan")
    g[2950, 0], g[2960, 2] = float("inf"), float("-inf")
    k = 7
    ref_v, ref_i = _ref(q, g, k)
    v, i = pytorch.topk_similarity(q, g, k, block_q=16, block_g=256)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(v, ref_v, equal_nan=True, atol=0, rtol=0)
    later = full_topk[3:]  # the first tile's three query chunks take the top-k of the whole tile
    assert len(later) < 3 * (3000 // 256), "every later tile took the full top-k: the entrant route never ran"
    if order == "ascending":
        assert later, "no later tile took the full top-k"


def test_memmap_gallery_fp16(tmp_path):
    import numpy as np

    g = torch.randn(513, 16).half()
    np.save(tmp_path / "g.npy", g.numpy())
    mm = torch.from_numpy(np.load(tmp_path / "g.npy", mmap_mode="r+"))
    q = torch.randn(7, 16).half()
    v, i = fastclip.topk_similarity(q, mm, 9, gallery_chunk=100)
    _check_valid(q, g, 9, v, i)


@pytest.mark.parametrize("backend,dtype,default_device", [
    ("torch", torch.float64, None), ("triton", torch.float32, None), ("torch", torch.float16, None),
    ("torch", torch.bfloat16, None), ("torch", torch.float32, "meta")])
def test_gradient_matches_reference(backend, dtype, default_device):
    """The gradients against autograd through the reference (in fp32 for half inputs: the backward gathers the
    chosen rows in the values' dtype and returns each gradient in its input's dtype), with both inputs requiring a
    gradient and with each alone; also with torch's default device set to another one (meta here, cuda for a
    user), which no buffer of the forward may follow."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q0, g0 = torch.randn(11, 11, dtype=torch.float64).to(dtype), torch.randn(97, 11, dtype=torch.float64).to(dtype)
    gv = torch.randn(11, 6, dtype=acc)
    rq, rg = q0.to(acc).clone().requires_grad_(), g0.to(acc).clone().requires_grad_()
    rv, ri = topk_similarity_ref(rq, rg, 6)
    (rv * gv).sum().backward()
    for needs in [(True, True), (True, False), (False, True)]:
        q, g = q0.clone().requires_grad_(needs[0]), g0.clone().requires_grad_(needs[1])
        with torch.device(default_device) if default_device else contextlib.nullcontext():
            v, i = fastclip.topk_similarity(q, g, 6, backend=backend)
            (v * gv).sum().backward()
        assert torch.equal(i, ri)
        for leaf, ref, need in [(q, rq, needs[0]), (g, rg, needs[1])]:
            if not need:
                assert leaf.grad is None
                continue
            assert leaf.grad.dtype == dtype
            # sums of a few products in another order than the reference's, then one rounding to the dtype
            tol = 8 * torch.finfo(dtype).eps
            torch.testing.assert_close(leaf.grad.to(acc), ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())


def test_opcheck():
    q, g = torch.randn(5, 8), torch.randn(40, 8)
    torch.library.opcheck(torch.ops.fastclip.topk_similarity.default, (q, g, 3, "torch", 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.fastclip.topk_similarity.default, (q, g, 3, "torch", 16),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    q, g = torch.randn(5, 8), torch.randn(40, 8)
    f = torch.compile(lambda a, b: fastclip.topk_similarity(a, b, 4, backend="torch"), fullgraph=True,
                      backend="eager")
    v, i = f(q, g)
    rv, ri = _ref(q, g, 4)
    assert torch.equal(i, ri)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(q=torch.randn(3, 4), g=torch.randn(5, 6), k=2), ValueError, "feature dims"),
    (dict(q=torch.randn(3, 4), g=torch.randn(5, 4).double(), k=2), TypeError, "different dtypes"),
    (dict(q=torch.randn(3, 4), g=torch.randn(5, 4), k=6), ValueError, r"k must be .*gallery size = 5"),
    (dict(q=torch.randn(3, 4), g=torch.randn(5, 4), k=0), ValueError, "k must be"),
    (dict(q=torch.randn(3, 4), g=torch.randn(5, 4), k=2.0), ValueError, "k must be"),
    (dict(q=torch.randn(4), g=torch.randn(5, 4), k=2), ValueError, r"queries must be 2-D.*shape \(4,\)"),
    (dict(q=torch.randn(3, 4), g=torch.randint(0, 3, (5, 4)), k=2), TypeError, "gallery must be a floating"),
    (dict(q=torch.randn(0, 4), g=torch.randn(5, 4), k=2), ValueError, "queries is empty"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        fastclip.topk_similarity(kwargs["q"], kwargs["g"], kwargs["k"])


def test_explicit_backend_refusal_says_why():
    with pytest.raises(fastclip.BackendError, match="float64 is not supported"):
        fastclip.topk_similarity(torch.randn(3, 4).double(), torch.randn(5, 4).double(), 2, backend="triton")


def test_triton_k_limit():
    """The triton kernel keeps the running top-k in registers, up to k = 128: asked for explicitly beyond that it
    refuses, naming k and the limit; "auto" takes the torch backend there (on a GPU, where it would take triton)."""
    q, g = torch.randn(3, 8), torch.randn(200, 8)
    with pytest.raises(fastclip.BackendError, match=rf"backend 'triton'.*k {TRITON_MAX_K + 1} > {TRITON_MAX_K}"):
        fastclip.topk_similarity(q, g, TRITON_MAX_K + 1, backend="triton")
    from fastclip.ops.topk import triton as kernel

    with pytest.raises(ValueError, match=rf"k = {TRITON_MAX_K + 1}: .* k <= {TRITON_MAX_K}"):  # the launcher too
        kernel.topk_similarity(q, g, TRITON_MAX_K + 1)
    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        pick = {k: select("topk_similarity", "auto", device=cuda, dtype=dtype, dim=512, sizes={"k": k}).backend
                for k in (1, TRITON_MAX_K, TRITON_MAX_K + 1, 1000)}
        assert pick == {1: "triton", TRITON_MAX_K: "triton", TRITON_MAX_K + 1: "torch", 1000: "torch"}
    values, indices = fastclip.topk_similarity(q, g, TRITON_MAX_K + 1)  # auto on the CPU: torch, any k
    full = q @ g.T
    torch.testing.assert_close(values, full.topk(TRITON_MAX_K + 1, dim=1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.gather(1, indices), values, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_host_gallery_streamed_to_gpu():
    q = torch.randn(300, 64, device="cuda")
    g = torch.randn(5000, 64)  # on the host
    v, i = fastclip.topk_similarity(q, g, 10, gallery_chunk=999)
    assert v.device.type == "cuda" and i.device.type == "cuda"
    _check_valid(q.cpu(), g, 10, v.cpu(), i.cpu())


@pytest.mark.gpu
def test_host_gallery_gradient_on_both_devices():
    """The backward of a host gallery streamed to the GPU gathers the chosen rows from the host, returns the queries'
    gradient on the GPU and the gallery's on the host. Small-integer features: scores exact on both devices."""
    q = _integer_features(30, 16).cuda().requires_grad_()
    g = _integer_features(500, 16).cpu().requires_grad_()  # on the host
    gv = torch.randn(30, 7)
    v, i = fastclip.topk_similarity(q, g, 7, gallery_chunk=128)
    (v * gv.cuda()).sum().backward()
    rq, rg = q.detach().cpu().requires_grad_(), g.detach().clone().requires_grad_()
    rv, ri = topk_similarity_ref(rq, rg, 7)
    (rv * gv).sum().backward()
    assert torch.equal(i.cpu(), ri)
    assert q.grad.device.type == "cuda" and g.grad.device.type == "cpu"
    torch.testing.assert_close(q.grad.cpu(), rq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.grad, rg.grad, rtol=1e-5, atol=1e-5)


MEMORY_SCRIPT = r"""
import json, sys, torch
import fastclip
from fastclip.bench.common import peak_memory_mb
q, g = torch.randn(2048, 32), torch.randn(65536, 32)
fastclip.topk_similarity(q[:3], g[:50], 10, backend="torch")  # first-call set-up is not the op's memory
out = {}
def run():
    out["v"] = fastclip.topk_similarity(q, g, 10, backend="torch")
print(json.dumps({"peak_mb": peak_memory_mb(run, torch.device("cpu"))}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs to measure peak memory")
def test_memory_never_q_by_g():
    # the (2048, 65536) fp32 score matrix would be 512 MB; one tile is 16 MB, the result 0.3 MB
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr[-3000:]
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    assert 0 < peak < 100, f"peak {peak:.0f} MB"


def test_bench_topk_writes_csv(tmp_path, capsys):
    from fastclip.bench.common import read_csv
    from fastclip.cli import main

    csv_path = tmp_path / "topk.csv"
    assert main(["bench", "topk", "--q", "16", "--g", "300", "--d", "8", "--k", "5", "--rep", "2", "--csv",
                 str(csv_path)]) == 0
    rows = read_csv(str(csv_path))
    assert [r["provider"] for r in rows] == ["fastclip", "faiss", "torch.topk"]
    assert all(r["shape"] == "Q=16,G=300,D=8,k=5" and float(r["ms_p50"]) > 0 for r in rows)
    assert "faiss" in capsys.readouterr().out


@pytest.mark.parametrize("providers", [["fastclip", "torch.topk"], ["faiss"], ["fastclip"]])
def test_bench_topk_any_subset_of_providers(tmp_path, capsys, providers):
    # the GPU pass runs fastclip against torch.topk alone; the fastclip / faiss ratio is printed only with both
    from fastclip.bench.common import read_csv
    from fastclip.cli import main

    csv_path = tmp_path / "topk.csv"
    assert main(["bench", "topk", "--q", "8", "--g", "100", "--d", "8", "--k", "3", "--rep", "1", "--provider",
                 *providers, "--csv", str(csv_path)]) == 0
    assert [r["provider"] for r in read_csv(str(csv_path))] == providers
    assert "fastclip / faiss" not in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_scores_in_the_autocast_dtype(backend):
    # both inputs are cast (as autocast casts both operands of queries @ gallery.T), on every backend
    q, g = torch.randn(9, 16), torch.randn(50, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, i = fastclip.topk_similarity(q, g, 7, backend=backend)
        v_chunked, i_chunked = fastclip.topk_similarity(q, g, 7, backend=backend, gallery_chunk=13)
    rv, ri = fastclip.topk_similarity(q.bfloat16(), g.bfloat16(), 7, backend=backend)
    assert torch.equal(v, rv) and torch.equal(i, ri)
    # other GEMM shapes may sum the (exact) bf16 products in another order: the last fp32 bit may differ
    torch.testing.assert_close(v_chunked, rv, atol=1e-5, rtol=1e-6)
    assert torch.equal(i_chunked, ri)




@pytest.mark.parametrize("gallery_chunk", [0, -3, True, 2.0, "4"])
def test_bad_gallery_chunk(gallery_chunk):
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=rf"^gallery_chunk must be a positive integer or None, got "
                                         rf"{re.escape(repr(gallery_chunk))}$"):
        fastclip.topk_similarity(q, g, 2, gallery_chunk=gallery_chunk)


def test_bad_input_messages_name_the_layout_and_the_devices():
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"^queries must be 2-D \(queries, dim\), got shape \(4,\), dtype float32"):
        fastclip.topk_similarity(q[0], g, 2)
    with pytest.raises(ValueError, match=r"^gallery must be 2-D \(gallery size, dim\), got shape \(4,\), dtype"):
        fastclip.topk_similarity(q, g[0], 2)
    # a gallery on another device than the queries must be on the host (streamed from there); meta stands in for
    # a GPU: the checks refuse a meta gallery with host queries, naming both ...
    with pytest.raises(ValueError, match=re.escape(
            "gallery must be on the queries' device or on the CPU (streamed to the queries' device), got queries "
            "shape (3, 4), dtype float32, device cpu; gallery shape (5, 4), dtype float32, device meta")):
        fastclip.topk_similarity(q, g.to("meta"), 2)
    # ... and let a host gallery with meta queries, or both on meta, through to the dispatcher (no backend runs meta)
    for qd, gd in [("meta", "cpu"), ("meta", "meta")]:
        with pytest.raises(fastclip.BackendError, match="meta tensors are not supported"):
            fastclip.topk_similarity(q.to(qd), g.to(gd), 2, backend="torch")


def test_host_gallery_chunk_rows(monkeypatch):
    """A gallery on another device than the queries (the host; meta stands in for a GPU) reaches the op in chunks
    of _HOST_CHUNK_BYTES // (D * element size) rows, at least one; gallery_chunk overrides; a gallery on the
    queries' device goes whole (0) unless gallery_chunk says otherwise."""
    from fastclip.ops import topk

    monkeypatch.setattr(topk, "_HOST_CHUNK_BYTES", 1000)
    for dtype, d, gallery_chunk, rows in [(torch.float16, 10, None, 50), (torch.float32, 10, None, 25),
                                          (torch.float32, 10, 7, 7), (torch.float64, 300, None, 1)]:
        q, g = torch.randn(3, d, device="meta", dtype=dtype), torch.randn(60, d, dtype=dtype)
        chunk = topk._gallery_chunk(q, g, gallery_chunk)
        assert chunk == rows and type(chunk) is int, (dtype, d, gallery_chunk, chunk)  # the op's schema: an int
    q, g = torch.randn(3, 10), torch.randn(60, 10)
    assert topk._gallery_chunk(q, g, None) == 0
    assert topk._gallery_chunk(q, g, 7) == 7


def test_chunks_reach_the_backend_on_the_queries_device_and_dtype():
    """Each chunk of a host gallery is moved to the queries' device and dtype before a backend sees it (fp16
    queries on meta, an fp32 host gallery); the merged result is (Q, k) in the accumulation dtype there."""
    from fastclip.ops import topk

    seen = []

    def impl(q, part, k):
        seen.append((part.device.type, part.dtype, part.shape[0], k))
        return q.new_zeros((q.shape[0], k), dtype=torch.float32), q.new_zeros((q.shape[0], k), dtype=torch.int64)

    q, g = torch.randn(3, 8, device="meta", dtype=torch.float16), torch.randn(50, 8)
    v, i = topk._chunked(q, g, 12, impl, 20)
    assert seen == [("meta", torch.float16, 20, 12), ("meta", torch.float16, 20, 12), ("meta", torch.float16, 10, 10)]
    assert v.shape == i.shape == (3, 12) and v.device.type == i.device.type == "meta"
    assert v.dtype == torch.float32 and i.dtype == torch.int64


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gallery_goes_whole_unless_chunked(monkeypatch, backend):
    """A gallery on the queries' device reaches the backend in one piece (the host budget does not apply to it),
    or gallery_chunk rows at a time."""
    from fastclip.ops import topk

    monkeypatch.setattr(topk, "_HOST_CHUNK_BYTES", 64)  # 4 rows of 4 fp32: would show if it applied
    seen = []
    row = topk.supports(topk.OP)[backend]
    monkeypatch.setitem(topk.supports(topk.OP), backend, dataclasses.replace(
        row, impl=lambda q, part, k: seen.append(part.shape[0]) or topk_similarity_ref(q, part, k)))
    q, g = torch.randn(3, 4), torch.randn(50, 4)
    ref = topk_similarity_ref(q, g, 5)
    for gallery_chunk, parts in [(None, [50]), (20, [20, 20, 10])]:
        seen.clear()
        out = fastclip.topk_similarity(q, g, 5, backend=backend, gallery_chunk=gallery_chunk)
        assert seen == parts, (gallery_chunk, seen)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("gallery_chunk", [None, 13])
def test_values_dtype_does_not_follow_the_default_dtype(gallery_chunk):
    # values are fp32 for fp16/fp32 inputs whatever torch.set_default_dtype says (fp64 users set it)
    q, g = torch.randn(4, 8), torch.randn(40, 8)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for dtype in (torch.float16, torch.float32):
            v, _ = fastclip.topk_similarity(q.to(dtype), g.to(dtype), 5, backend="torch", gallery_chunk=gallery_chunk)
            assert v.dtype == torch.float32, (dtype, v.dtype)
    finally:
        torch.set_default_dtype(default)


def test_reference_backend_is_plain_autograd():
    """The reference backend is the naive maths without the custom op, so every autograd mode works on it:
    forward-mode AD (jvp; through the custom op, which has no formula for it, the tangent comes out zero) gives
    the derivative of the chosen scores, d(q_i . g_j) = dq_i . g_j + q_i . dg_j."""
    q, g = torch.randn(5, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    dq, dg = torch.randn_like(q), torch.randn_like(g)
    (v, i), (dv, _) = torch.func.jvp(lambda a, b: fastclip.topk_similarity(a, b, 4, backend="reference"), (q, g),
                                     (dq, dg))
    assert torch.equal(i, topk_similarity_ref(q, g, 4)[1])
    torch.testing.assert_close(dv, (dq[:, None, :] * g[i]).sum(-1) + (q[:, None, :] * dg[i]).sum(-1))
