"""The CUDA contrastive-loss kernels (csrc/contrastive/) run on the CPU through the emulator (tests/emulator.py)
against a float64 reference computed from the same rounded fp16/bf16 inputs.

Tolerances are bounds, not fudge factors:
  * logits: the kernel forms t_ij = scale log2(e) <a_i, b_j> with exact 16-bit products summed in fp32 (one
    rounding per mma k16 step and per accumulation), so |dt| <= TOL_T = 2^-22 (d/16 + 4) scale log2(e) max_ij
    sum_k |a_ik b_jk| (+1e-6 for exp2/fp32 rounding of the scaled value);
  * stats: |d max| <= TOL_T; the sum of exp2 is relative to 2 ln2 TOL_T (its terms' exponent errors, max shift
    included) plus n 2^-23 (fp32 sums of positive terms) plus 1e-6 (exp2.approx is 2 ulp);
  * gradient: ds is rounded to the input type before the second GEMM (the contract), so element (i, k) may be off by
    u (|ds| @ |b|)_ik (u = 2^-11 fp16, 2^-8 bf16: twice the round-to-nearest bound), plus what dt does to the
    softmaxes, 2 ln2 TOL_T ((P + Q) @ |b|), plus the fp32 accumulation, n 2^-23 (|ds| @ |b|).
Padding rows past n and the gap between d and the row stride hold NaN: a load past the masks poisons the results.
"""
import ctypes
import time

import numpy as np
import pytest

from . import emulator

pytestmark = pytest.mark.skipif(emulator.compiler_missing() is not None, reason=str(emulator.compiler_missing()))

LOG2E = 1.4426950408889634
SOURCES = ["contrastive/contrastive_fp16.cu", "contrastive/contrastive_bf16.cu", "emulate/contrastive_capi.cpp"]
U = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


@pytest.fixture(scope="module")
def lib():
    lib = emulator.build("contrastive", SOURCES)
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.fc_contrastive_fwd.restype = ctypes.c_char_p
    lib.fc_contrastive_fwd.argtypes = [i32, vp, vp, i64, i64, i32, i32, vp, vp, vp, vp]
    lib.fc_contrastive_bwd.restype = ctypes.c_char_p
    lib.fc_contrastive_bwd.argtypes = [i32, vp, vp, i64, i64, i32, i32, vp, vp, vp, f32, f32, vp]
    return lib


def features(n, d, kind, stride=None, rng=None):
    """(bits (n + 3, stride) with NaN padding, float64 values of the (n, d) rounded features). Unit-norm rows."""
    stride = stride or d
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = np.full((n + 3, stride), np.nan, dtype=np.float32)
    full[:n, :d] = x
    bits = emulator.to_bits(full, kind)
    return bits, emulator.from_bits(bits[:n, :d], kind)


def fwd(lib, kind, img_bits, txt_bits, n, d, scale):
    sc = emulator.aligned_empty((1,), np.float32)
    sc[0] = scale
    row = emulator.aligned_empty((2, n), np.float32)
    row[...] = np.nan
    col = emulator.aligned_empty((n, 2), np.float32)
    col[:, 0] = -np.inf
    col[:, 1] = 0.0
    err = lib.fc_contrastive_fwd(int(kind == "bf16"), emulator.ptr(img_bits), emulator.ptr(txt_bits),
                                 img_bits.shape[1], txt_bits.shape[1], n, d, emulator.ptr(sc),
                                 emulator.ptr(row[0]), emulator.ptr(row[1]), emulator.ptr(col))
    assert err is None, err
    return row[0].astype(np.float64), row[1].astype(np.float64), col[:, 0].astype(np.float64), col[:, 1].astype(np.float64)


def bwd(lib, kind, a_bits, b_bits, n, d, scale, a_stats, b_stats, diag, uniform):
    sc = emulator.aligned_empty((1,), np.float32)
    sc[0] = scale
    sa = emulator.aligned_empty((2, n), np.float32)
    sa[...] = a_stats
    sb = emulator.aligned_empty((2, n), np.float32)
    sb[...] = b_stats
    g = emulator.aligned_empty((n, d), np.float32)
    g[...] = np.nan
    err = lib.fc_contrastive_bwd(int(kind == "bf16"), emulator.ptr(a_bits), emulator.ptr(b_bits), a_bits.shape[1],
                                 b_bits.shape[1], n, d, emulator.ptr(sc), emulator.ptr(sa), emulator.ptr(sb),
                                 diag, uniform, emulator.ptr(g))
    assert err is None, err
    return g.astype(np.float64)


def tol_t(a, b, scale):
    d = a.shape[1]
    return 2.0 ** -22 * (d / 16 + 4) * scale * LOG2E * (np.abs(a) @ np.abs(b).T).max() + 1e-6


def ref_stats(t, axis):
    m = t.max(axis=axis)
    s = np.exp2(t - np.expand_dims(m, axis)).sum(axis=axis)
    return m, s


CASES = [  # n, d, scale, kind, image stride, text stride
    (1, 8, 1.0, "fp16", None, None),
    (5, 40, 30.0, "bf16", None, None),
    (70, 136, 100.0, "fp16", 152, None),
    (70, 40, 100.0, "bf16", None, 48),
    (200, 40, 30.0, "fp16", None, None),   # 2 row blocks x 4 column blocks (forward 128 x 64 tiles)
]


@pytest.mark.parametrize("n,d,scale,kind,si,st", CASES)
def test_forward_stats(lib, n, d, scale, kind, si, st):
    rng = np.random.default_rng(n * 1000 + d)
    ib, a = features(n, d, kind, si, rng)
    tb, b = features(n, d, kind, st, rng)
    rm, rs, cm, cs = fwd(lib, kind, ib, tb, n, d, scale)
    t = scale * LOG2E * (a @ b.T)
    tt = tol_t(a, b, scale)
    for (m, s), (km, ks) in ((ref_stats(t, 1), (rm, rs)), (ref_stats(t, 0), (cm, cs))):
        assert np.all(np.isfinite(km)) and np.all(np.isfinite(ks))
        assert np.abs(km - m).max() <= tt, (np.abs(km - m).max(), tt)
        rel = np.abs(ks / s - 1).max()
        assert rel <= 2 * np.log(2) * tt + n * 2.0 ** -23 + 1e-6, (rel, tt)


BWD_CASES = [  # n, d, scale, kind, label smoothing, a stride, b stride
    (1, 8, 1.0, "bf16", 0.0, None, None),
    (5, 40, 100.0, "fp16", 0.1, None, None),
    (70, 136, 30.0, "bf16", 0.0, None, 144),    # d 136: the 256-wide config (2 warps split d), tail masked
    (70, 40, 100.0, "fp16", 0.1, 48, None),
    (130, 40, 30.0, "bf16", 0.1, None, None),   # 3 row blocks x 3 column blocks (64 x 64)
    (9, 520, 30.0, "fp16", 0.1, None, None),    # the 1024-wide config
]


@pytest.mark.parametrize("n,d,scale,kind,ls,sa_,sb_", BWD_CASES)
def test_backward_both_roles(lib, n, d, scale, kind, ls, sa_, sb_):
    rng = np.random.default_rng(n * 1000 + d + 7)
    ib, a = features(n, d, kind, sa_, rng)
    tb, b = features(n, d, kind, sb_, rng)
    t = scale * LOG2E * (a @ b.T)
    rm, rs = ref_stats(t, 1)
    cm, cs = ref_stats(t, 0)
    row = np.stack([rm, np.log2(rs)]).astype(np.float32)
    col = np.stack([cm, np.log2(cs)]).astype(np.float32)
    diag, uniform = 2 * (1 - ls), 2 * ls / n
    tt = tol_t(a, b, scale)
    # image gradient (a = image) and text gradient (a = text, t transposed, stats swapped)
    for x_bits, y_bits, x, y, tx, sx, sy in ((ib, tb, a, b, t, row, col), (tb, ib, b, a, t.T, col, row)):
        lse_x = sx[0].astype(np.float64) + sx[1]
        lse_y = sy[0].astype(np.float64) + sy[1]
        pq = np.exp2(tx - lse_x[:, None]) + np.exp2(tx - lse_y[None, :])
        ds = pq - diag * np.eye(n) - uniform
        ref = ds @ y
        got = bwd(lib, kind, x_bits, y_bits, n, d, scale, sx, sy, diag, uniform)
        absy = np.abs(y)
        bound = (U[kind] + n * 2.0 ** -23) * (np.abs(ds) @ absy) + 2 * np.log(2) * tt * (pq @ absy) + 1e-7
        err = np.abs(got - ref)
        assert np.all(np.isfinite(got))
        assert np.all(err <= bound), (err.max(), (err / bound).max())


@pytest.mark.slow
@pytest.mark.parametrize("d,kind", [(264, "fp16"), (512, "bf16"), (2048, "fp16")])
def test_backward_wide_configs(lib, d, kind):
    # the 512- and 2048-wide configs (4 and 8 warps splitting d; one b stage)
    test_backward_both_roles(lib, 3, d, 30.0, kind, 0.1, None, None)


def test_launcher_validation(lib):
    n, d = 4, 16
    x = emulator.to_bits(np.zeros((n + 1, d + 8), np.float32), "fp16")
    sc = emulator.aligned_empty((1,), np.float32)
    out = emulator.aligned_empty((4 * n + 8,), np.float32)
    stats = emulator.aligned_empty((2, n), np.float32)
    grad = emulator.aligned_empty((n, d), np.float32)
    P = emulator.ptr

    def f(img, stride, n_, d_, col=None):
        return lib.fc_contrastive_fwd(0, img, P(x), stride, d + 8, n_, d_, P(sc), P(out), P(out[n:]),
                                      P(out[2 * n:]) if col is None else col)

    assert f(P(x), d + 8, n, 12) is not None  # d % 8
    assert f(P(x), d + 8, n, 0) is not None
    assert f(P(x), d + 8, n, 2056) is not None
    assert f(P(x), d + 8, 0, d) is not None
    assert b"aligned" in f(ctypes.c_void_p(x.ctypes.data + 2), d + 8, n, d)
    assert f(P(x), d + 4, n, d) is not None  # stride % 8
    assert f(P(x), 8, n, d) is not None  # stride < d
    assert f(ctypes.c_void_p(0), d + 8, n, d) is not None
    assert f(P(x), d + 8, n, d, col=ctypes.c_void_p(out.ctypes.data + 4)) is not None  # col_packed 8-byte alignment
    assert lib.fc_contrastive_bwd(1, P(x), P(x), d + 8, d + 8, n, 2064, P(sc), P(stats), P(stats), 2.0, 0.0,
                                  P(grad)) is not None
    assert lib.fc_contrastive_bwd(1, P(x), ctypes.c_void_p(x.ctypes.data + 8), d + 8, d + 8, n, d, P(sc), P(stats),
                                  P(stats), 2.0, 0.0, P(grad)) is not None
    assert lib.fc_contrastive_bwd(1, P(x), P(x), d + 8, d + 8, n, d, P(sc), P(stats), P(stats), 2.0, 0.0,
                                  None) is not None
    # a valid call still works after all that
    sc[0] = 1.0
    assert f(P(x), d + 8, n, d) is None
