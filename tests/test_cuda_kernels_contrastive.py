"""The CUDA contrastive-loss kernels (csrc/contrastive/) run on the CPU through the emulator (tests/emulator.py)
against a float64 reference computed from the same rounded fp16/bf16 inputs.

Tolerances are bounds, not fudge factors:
  * logits: the kernel forms t_ij = scale log2(e) <a_i, b_j> with exact 16-bit products summed in fp32 (one
    rounding per mma k16 step and per accumulation), so |dt| <= TOL_T = 2^-22 (d/16 + 4) scale log2(e) max_ij
    sum_k |a_ik b_jk| (+1e-6 for exp2/fp32 rounding of the scaled value);
  * stats: |d max| <= TOL_T; the sum of exp2 (1 + the kernel's rest) is relative to 2 ln2 TOL_T (its terms' exponent
    errors, max shift included) plus n 2^-23 (fp32 sums of positive terms) plus 1e-6 (exp2.approx is 2 ulp);
  * gradient: ds is rounded to the input type before the second GEMM (the contract; in fp16 as 2^14 ds, so it stays
    in the normal range), so element (i, k) may be off by u (|ds| @ |b|)_ik (u = 2^-11 fp16, 2^-8 bf16: twice the
    round-to-nearest bound), plus what dt does to the softmaxes, 2 ln2 TOL_T ((P + Q) @ |b|), plus the fp32
    accumulation, n 2^-23 (|ds| @ |b|);
  * ds_dot_i = sum_j ds_ij <a_i, b_j> (what d(logit_scale) is formed from): ds is not rounded there, so only the
    softmaxes' 2 ln2 TOL_T sum_j (P + Q)_ij |S_ij|, the dots' TOL_T / (scale log2 e) sum_j |ds_ij| and the fp32
    sums' n 2^-23 sum_j |ds_ij S_ij| remain (S_ij = <a_i, b_j>).
Padding rows past n and the gap between d and the row stride hold NaN: a load past the masks poisons the results.
"""
import ctypes

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
    lib.fc_contrastive_fwd.argtypes = [i32, vp, vp, i64, i64, i32, i32, vp, vp, vp, vp, vp]
    lib.fc_contrastive_bwd.restype = ctypes.c_char_p
    lib.fc_contrastive_bwd.argtypes = [i32, vp, vp, i64, i64, i32, i32, vp, vp, vp, vp, f32, f32, vp, vp]
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


def diag_logits(img_bits, txt_bits, n, d, kind, scale):
    """t_ii = scale log2(e) <a_i, b_i> in fp32, (n,), 128-aligned: what the caller hands both kernels."""
    a, b = (emulator.from_bits(x[:n, :d], kind).astype(np.float32) for x in (img_bits, txt_bits))
    out = emulator.aligned_empty((n,), np.float32)
    out[...] = (a * b).sum(1, dtype=np.float32) * np.float32(scale * LOG2E)
    return out


def fwd(lib, kind, img_bits, txt_bits, n, d, scale, tdiag=None):
    """(row max, row rest, column max, column rest), float64; rest = sum of 2^(t - max) - 1."""
    sc = emulator.aligned_empty((1,), np.float32)
    sc[0] = scale
    if tdiag is None:
        tdiag = diag_logits(img_bits, txt_bits, n, d, kind, scale)
    row = emulator.aligned_empty((2, n), np.float32)
    row[...] = np.nan
    col = emulator.aligned_empty((n, 2), np.float32)
    col[:, 0] = -np.inf
    col[:, 1] = -1.0
    err = lib.fc_contrastive_fwd(int(kind == "bf16"), emulator.ptr(img_bits), emulator.ptr(txt_bits),
                                 img_bits.shape[1], txt_bits.shape[1], n, d, emulator.ptr(sc), emulator.ptr(tdiag),
                                 emulator.ptr(row[0]), emulator.ptr(row[1]), emulator.ptr(col))
    assert err is None, err
    return (row[0].astype(np.float64), row[1].astype(np.float64), col[:, 0].astype(np.float64),
            col[:, 1].astype(np.float64))


def stats_of(m, rest):
    """(2, n) float32 (max, log2(1 + rest)), as the torch binding (csrc/ops.cpp) stores the kernels' output."""
    return np.stack([m, np.log1p(rest.astype(np.float32)) * LOG2E]).astype(np.float32)


def bwd(lib, kind, a_bits, b_bits, n, d, scale, a_stats, b_stats, diag, uniform, tdiag=None, ds_dot=True):
    """(grad_a (n, d), ds_dot (n,) or None (not asked for: a null pointer)), float64."""
    sc = emulator.aligned_empty((1,), np.float32)
    sc[0] = scale
    if tdiag is None:
        tdiag = diag_logits(a_bits, b_bits, n, d, kind, scale)
    sa = emulator.aligned_empty((2, n), np.float32)
    sa[...] = a_stats
    sb = emulator.aligned_empty((2, n), np.float32)
    sb[...] = b_stats
    g = emulator.aligned_empty((n, d), np.float32)
    g[...] = np.nan
    dot = emulator.aligned_empty((n,), np.float32)
    dot[...] = np.nan
    P = emulator.ptr
    err = lib.fc_contrastive_bwd(int(kind == "bf16"), P(a_bits), P(b_bits), a_bits.shape[1], b_bits.shape[1], n, d,
                                 P(sc), P(tdiag), P(sa), P(sb), diag, uniform, P(g), P(dot if ds_dot else None))
    assert err is None, err
    return g.astype(np.float64), (dot.astype(np.float64) if ds_dot else None)


def tol_t(a, b, scale):
    d = a.shape[1]
    return 2.0 ** -22 * (d / 16 + 4) * scale * LOG2E * (np.abs(a) @ np.abs(b).T).max() + 1e-6


def ref_stats(t, axis):
    m = t.max(axis=axis)
    s = np.exp2(t - np.expand_dims(m, axis)).sum(axis=axis)
    return m, s


KINDS = ["fp16", "bf16"]
CASES = [  # n, d, scale, image stride, text stride
    (1, 8, 1.0, None, None),
    (5, 40, 30.0, None, None),
    (70, 136, 100.0, 152, None),   # d tail (136 = 2 x 64 + 8), strided image rows
    (70, 40, 100.0, None, 48),     # strided text rows
    (130, 8, 1.0, None, None),     # 2 row blocks x 3 column blocks (forward tiles: 128 x 64)
    (200, 136, 30.0, None, None),  # 2 row blocks x 4 column blocks, 3 d slices (64, 64, 16)
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d,scale,si,st", CASES)
def test_forward_stats(lib, n, d, scale, si, st, kind):
    rng = np.random.default_rng(n * 1000 + d)
    ib, a = features(n, d, kind, si, rng)
    tb, b = features(n, d, kind, st, rng)
    rm, rs, cm, cs = fwd(lib, kind, ib, tb, n, d, scale)
    t = scale * LOG2E * (a @ b.T)
    tt = tol_t(a, b, scale)
    for (m, s), (km, kr) in ((ref_stats(t, 1), (rm, rs)), (ref_stats(t, 0), (cm, cs))):
        assert np.all(np.isfinite(km)) and np.all(np.isfinite(kr))
        assert np.abs(km - m).max() <= tt, (np.abs(km - m).max(), tt)
        rel = np.abs((1 + kr) / s - 1).max()
        assert rel <= 2 * np.log(2) * tt + n * 2.0 ** -23 + 1e-6, (rel, tt)


def round_to(x, kind):
    """ds as GEMM2 sees it: rounded to the input type, in fp16 as 2^14 ds (the kernel's range shift), scaled back."""
    import torch

    up = 2.0 ** 14 if kind == "fp16" else 1.0
    return torch.from_numpy(x * up).float().to(torch.float16 if kind == "fp16" else torch.bfloat16).double().numpy() / up


def check_grad(got, y, tx, sx, sy, n, kind, diag, uniform, tt):
    """got (fp32 grad of the a side) against ds @ y in float64, ds from the given (fp32) stats."""
    lse_x = sx[0].astype(np.float64) + sx[1]
    lse_y = sy[0].astype(np.float64) + sy[1]
    pq = np.exp2(tx - lse_x[:, None]) + np.exp2(tx - lse_y[None, :])
    ds = pq - diag * np.eye(n) - uniform
    ref = ds @ y
    absy = np.abs(y)
    bound = (U[kind] + n * 2.0 ** -23) * (np.abs(ds) @ absy) + 2 * np.log(2) * tt * (pq @ absy) + 1e-7
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got))
    assert np.all(err <= bound), (err.max(), (err / bound).max())
    # finer: the kernel rounds ds to the input type and nothing else coarse happens; its distance to
    # round(ds) @ y is a small fraction of the rounding's own effect (only rare rounding flips remain)
    ref_r = round_to(ds, kind) @ y
    assert rms(got - ref_r) <= 0.25 * rms(ref_r - ref) + 1e-6 * rms(ref) + 1e-7, (rms(got - ref_r), rms(ref_r - ref))
    return ds, pq


def rms(v):
    return float(np.sqrt(np.mean(v ** 2)))


def check_ds_dot(got, ds, pq, dots, kind, scale, tt):
    """got (the kernel's ds_dot) against sum_j ds_ij dots_ij in float64 (dots = <a_i, b_j>), by the bound above; and
    far closer to it than the same sum over ds rounded as the second GEMM's operand (what d(logit_scale) would
    carry if it were formed from the gradient)."""
    n = ds.shape[0]
    ref = (ds * dots).sum(1)
    bound = (2 * np.log(2) * tt * (pq * np.abs(dots)).sum(1) + tt / (scale * LOG2E) * np.abs(ds).sum(1)
             + n * 2.0 ** -23 * np.abs(ds * dots).sum(1) + 1e-7)
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got))
    assert np.all(err <= bound), (err.max(), (err / bound).max())
    ref_r = (round_to(ds, kind) * dots).sum(1)
    assert rms(got - ref) <= 0.25 * rms(ref_r - ref) + 1e-6 * rms(ref) + 1e-7, (rms(got - ref), rms(ref_r - ref))


BWD_CASES = [  # n, d, scale, label smoothing, a stride, b stride
    (1, 8, 1.0, 0.0, None, None),
    (5, 40, 100.0, 0.1, None, None),
    (70, 136, 30.0, 0.0, None, 144),   # d 136: the 256-wide config (2 warps split d), tail masked
    (70, 40, 100.0, 0.1, 48, None),
    (130, 40, 30.0, 0.1, None, None),  # 3 row blocks x 3 column blocks (64 x 64)
    (130, 136, 100.0, 0.1, 152, None),  # 3 row blocks x 5 column blocks (64 x 32), split d
    (9, 520, 30.0, 0.1, None, None),   # the 1024-wide config
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d,scale,ls,sa_,sb_", BWD_CASES)
def test_backward_both_roles(lib, n, d, scale, ls, sa_, sb_, kind):
    rng = np.random.default_rng(n * 1000 + d + 7)
    ib, a = features(n, d, kind, sa_, rng)
    tb, b = features(n, d, kind, sb_, rng)
    t = scale * LOG2E * (a @ b.T)
    rm, rs = ref_stats(t, 1)
    cm, cs = ref_stats(t, 0)
    row = stats_of(rm, rs - 1)
    col = stats_of(cm, cs - 1)
    diag, uniform = 2 * (1 - ls), 2 * ls / n
    tt = tol_t(a, b, scale)
    # image gradient (a = image) and text gradient (a = text, t transposed, stats swapped)
    for x_bits, y_bits, x, y, tx, sx, sy in ((ib, tb, a, b, t, row, col), (tb, ib, b, a, t.T, col, row)):
        got, got_dot = bwd(lib, kind, x_bits, y_bits, n, d, scale, sx, sy, diag, uniform)
        ds, pq = check_grad(got, y, tx, sx, sy, n, kind, diag, uniform, tt)
        check_ds_dot(got_dot, ds, pq, x @ y.T, kind, scale, tt)


@pytest.mark.parametrize("d", [40, 264])  # ds_dot from one warp per row group; from 2 warps' disjoint columns
def test_backward_ds_dot_is_optional(lib, d):
    """A null ds_dot skips it and leaves grad_a bitwise unchanged."""
    n, scale = 70, 100.0
    rng = np.random.default_rng(d)
    (ib, a), (tb, b) = features(n, d, "bf16", None, rng), features(n, d, "bf16", None, rng)
    t = scale * LOG2E * (a @ b.T)
    (rm, rs), (cm, cs) = ref_stats(t, 1), ref_stats(t, 0)
    row, col = stats_of(rm, rs - 1), stats_of(cm, cs - 1)
    with_dot, dot = bwd(lib, "bf16", ib, tb, n, d, scale, row, col, 1.8, 0.2 / n)
    without, none = bwd(lib, "bf16", ib, tb, n, d, scale, row, col, 1.8, 0.2 / n, ds_dot=False)
    assert none is None and np.isfinite(dot).all()
    np.testing.assert_array_equal(with_dot, without)


@pytest.mark.parametrize("d,kind", [(264, "fp16"), (512, "bf16"), (776, "bf16"), (1024, "fp16"), (1288, "fp16"),
                                    (2048, "bf16")])
def test_backward_wide_configs(lib, d, kind):
    # the 512-, 1024- and 2048-wide configs (4 or 8 warps splitting d; one b stage at 2048); 776 and 1288 split d
    # unevenly (slices of 208 x 3 + 160, 176 x 7 + 64)
    test_backward_both_roles(lib, 3, d, 30.0, 0.1, None, None, kind)
    test_backward_both_roles(lib, 17, d, 100.0, 0.0, None, d + 8, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_end_to_end_against_autograd(lib, kind, ls):
    """Forward stats -> (max, log2 sum) as the torch binding stores them -> both gradient launches, scaled as the
    caller does, against torch autograd of the CLIP loss (float64, label smoothing) on the same rounded inputs."""
    import torch
    import torch.nn.functional as F

    n, d, scale = 70, 40, 30.0
    rng = np.random.default_rng(99)
    ib, a = features(n, d, kind, None, rng)
    tb, b = features(n, d, kind, None, rng)
    rm, rs, cm, cs = fwd(lib, kind, ib, tb, n, d, scale)
    row, col = stats_of(rm, rs), stats_of(cm, cs)
    diag, uniform = 2 * (1 - ls), 2 * ls / n
    g_img = bwd(lib, kind, ib, tb, n, d, scale, row, col, diag, uniform)[0] * scale / (2 * n)
    g_txt = bwd(lib, kind, tb, ib, n, d, scale, col, row, diag, uniform)[0] * scale / (2 * n)

    A = torch.tensor(a, requires_grad=True)
    B = torch.tensor(b, requires_grad=True)
    logits = scale * A @ B.T
    labels = torch.arange(n)
    loss = (F.cross_entropy(logits, labels, label_smoothing=ls) +
            F.cross_entropy(logits.T, labels, label_smoothing=ls)) / 2
    loss.backward()
    # bound: check_grad's, through the caller's factor scale / 2n, with the logits' error counted twice more
    # (the stats now come from the forward kernel: their lse is off by up to ~2 TOL_T)
    t = scale * LOG2E * (a @ b.T)
    tt = tol_t(a, b, scale)
    p_row = np.exp(np.log(2) * t - np.logaddexp.reduce(np.log(2) * t, axis=1, keepdims=True))
    p_col = np.exp(np.log(2) * t - np.logaddexp.reduce(np.log(2) * t, axis=0, keepdims=True))
    pq = p_row + p_col
    ds = pq - diag * np.eye(n) - uniform
    for got, ref, dsx, pqx, y in ((g_img, A.grad.numpy(), ds, pq, b), (g_txt, B.grad.numpy(), ds.T, pq.T, a)):
        absy = np.abs(y)
        bound = scale / (2 * n) * ((U[kind] + n * 2.0 ** -23) * (np.abs(dsx) @ absy) +
                                   4 * np.log(2) * tt * (pqx @ absy)) + 1e-7
        err = np.abs(got - ref)
        assert np.all(err <= bound), (err.max(), (err / bound).max())


def test_launcher_validation(lib):
    n, d = 4, 16
    x = emulator.to_bits(np.zeros((n + 1, d + 8), np.float32), "fp16")
    sc = emulator.aligned_empty((1,), np.float32)
    out = emulator.aligned_empty((4 * n + 8,), np.float32)
    stats = emulator.aligned_empty((2, n), np.float32)
    grad = emulator.aligned_empty((n, d), np.float32)
    dg = emulator.aligned_empty((n,), np.float32)
    dg[...] = 0.0
    P = emulator.ptr

    def f(img, stride, n_, d_, col=None, diag=P(dg)):
        return lib.fc_contrastive_fwd(0, img, P(x), stride, d + 8, n_, d_, P(sc), diag, P(out), P(out[n:]),
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
    assert lib.fc_contrastive_bwd(1, P(x), P(x), d + 8, d + 8, n, 2064, P(sc), P(dg), P(stats), P(stats), 2.0, 0.0,
                                  P(grad), None) is not None
    assert lib.fc_contrastive_bwd(1, P(x), ctypes.c_void_p(x.ctypes.data + 8), d + 8, d + 8, n, d, P(sc), P(dg),
                                  P(stats), P(stats), 2.0, 0.0, P(grad), None) is not None
    assert lib.fc_contrastive_bwd(1, P(x), P(x), d + 8, d + 8, n, d, P(sc), P(dg), P(stats), P(stats), 2.0, 0.0,
                                  None, None) is not None
    assert b"8-byte" in lib.fc_contrastive_bwd(1, P(x), P(x), d + 8, d + 8, n, d, P(sc), P(dg), P(stats), P(stats),
                                               2.0, 0.0, ctypes.c_void_p(grad.ctypes.data + 4), None)
    assert b"diag" in f(P(x), d + 8, n, d, diag=None)
    assert b"diag" in lib.fc_contrastive_bwd(1, P(x), P(x), d + 8, d + 8, n, d, P(sc), None, P(stats), P(stats), 2.0,
                                             0.0, P(grad), None)
    # a valid call still works after all that
    sc[0] = 1.0
    assert f(P(x), d + 8, n, d) is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sweep(lib, kind):
    """Tile-multiple and random shapes (n up to 256, n^2 d up to ~1e6), forward and both gradients."""
    rng = np.random.default_rng(12345)
    shapes = [(64, 64), (128, 128), (256, 16), (64, 256), (32, 512), (16, 1024), (16, 2048)]
    while len(shapes) < 11:
        d = 8 * int(rng.integers(1, 257))
        n = int(rng.integers(1, max(2, min(300, int(np.sqrt(1e6 / d))))))
        shapes.append((n, d))
    for n, d in shapes:
        scale = float(rng.choice([1.0, 30.0, 100.0]))
        stride = d + 8 * int(rng.integers(0, 3))
        test_forward_stats(lib, n, d, scale, stride, None, kind)
        test_backward_both_roles(lib, n, d, scale, float(rng.choice([0.0, 0.1])), None, stride, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mean_p", [0.9995, 0.99999])
def test_confident_regime_gradients(lib, kind, mean_p):
    """Trained-model features (mean p_ii > 0.999 at scale 100): both feature gradients, and d(scale) from the image
    pass's ds_dot, within 1% (relative norm) of fp64 on the same rounded inputs. ds is formed in fp32, targets
    included, before it is rounded; ds_dot never rounds it. The text pass's ds_dot sums to the same d(scale)."""
    import torch

    from fastclip.ops.contrastive.reference import contrastive_loss_ref

    from .helpers import confident_features, rel_norm_err

    n, d, scale = 40, 32, 100.0
    img, txt = confident_features(n, d, torch.float16 if kind == "fp16" else torch.bfloat16, mean_p=mean_p)
    ib, tb = emulator.to_bits(img.float().numpy(), kind), emulator.to_bits(txt.float().numpy(), kind)
    rm, rs, cm, cs = fwd(lib, kind, ib, tb, n, d, scale)
    row, col = stats_of(rm, rs), stats_of(cm, cs)
    coef = scale / (2 * n)
    g_img, dot_img = bwd(lib, kind, ib, tb, n, d, scale, row, col, 2.0, 0.0)
    g_txt, dot_txt = bwd(lib, kind, tb, ib, n, d, scale, col, row, 2.0, 0.0)
    d_scale, d_scale_t = (np.array(dot.sum(dtype=np.float32) / (2 * n)) for dot in (dot_img, dot_txt))
    leaves = [img.double().requires_grad_(), txt.double().requires_grad_(),
              torch.tensor(scale, dtype=torch.float64, requires_grad=True)]
    ref = torch.autograd.grad(contrastive_loss_ref(*leaves), leaves)
    for name, got, r in (("d_image", coef * g_img, ref[0]), ("d_text", coef * g_txt, ref[1]),
                         ("d_scale", d_scale, ref[2]), ("d_scale (text pass)", d_scale_t, ref[2])):
        err = rel_norm_err(torch.from_numpy(got), r)
        assert err <= 1e-2, f"{name}: relative norm error {err:.3e}"


@pytest.fixture
def emulated_ops(lib, monkeypatch):
    """torch.ops.fastclip.contrastive_{stats,grad}_cuda on CPU tensors through the emulator, doing what their
    bindings in csrc/ops.cpp do around the launch, so that the cuda backend's own Python
    (fastclip/ops/contrastive/cuda.py: diagonal, loss, scaling, d(logit_scale)) runs on the emulated kernels."""
    import torch

    def bits(x):
        kind = "bf16" if x.dtype == torch.bfloat16 else "fp16"
        return kind, emulator.to_bits(x.float().numpy(), kind)

    def aligned(t):
        out = emulator.aligned_empty(tuple(t.shape), np.float32)
        out[...] = t.numpy()
        return out

    def stats(image, text, scale, diag):
        (kind, ib), (_, tb) = bits(image), bits(text)
        n, d = image.shape
        rm, rr, cm, cr = fwd(lib, kind, ib, tb, n, d, float(scale), aligned(diag))
        return torch.from_numpy(stats_of(rm, rr)), torch.from_numpy(stats_of(cm, cr))

    def grad(a, b, scale, diag, a_stats, b_stats, diag_coef, uniform_coef, with_ds_dot=True):
        (kind, ab), (_, bb) = bits(a), bits(b)
        n, d = a.shape
        g, dot = bwd(lib, kind, ab, bb, n, d, float(scale), a_stats.numpy(), b_stats.numpy(), diag_coef,
                     uniform_coef, aligned(diag), ds_dot=with_ds_dot)
        return torch.from_numpy(g).float(), torch.from_numpy(dot).float() if with_ds_dot else torch.empty(0)

    monkeypatch.setattr(torch.ops.fastclip, "contrastive_stats_cuda", stats, raising=False)
    monkeypatch.setattr(torch.ops.fastclip, "contrastive_grad_cuda", grad, raising=False)


GRAD_SCALE = 2.0 ** 12  # a GradScaler-like loss scale: a confident loss's unscaled fp16 gradients are subnormal


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("regime,n,d,ls", [("trained", 33, 64, 0.0), ("trained", 33, 64, 0.1),
                                           ("confident", 40, 136, 0.0),
                                           pytest.param("confident", 40, 512, 0.1, marks=pytest.mark.slow)])
def test_backend_confident_regime(emulated_ops, kind, regime, n, d, ls):
    """The cuda backend (its Python over the emulated kernels) where a trained model puts the loss, against fp64 on
    the same rounded inputs: tests/regimes.py's trained features (p_ii from ~0.999 to 1 - 1e-12 at scale 100) and,
    at d = 136 and 512, tests/helpers.py's confident ones (mean p_ii = 0.99999; trained features there put 1 - p_ii
    near 1e-17, below what the fp64 reference itself resolves next to logits of ~50). Loss (fp32, before the op casts
    it to the features' dtype) within 1% of fp64: it is ~1e-5 .. 1e-7 next to logits of ~50, so lse - S_ii, a sum
    formed as 1 + rest, or a diagonal logit rounded differently from the row's max would be all rounding. Gradients
    of GRAD_SCALE * loss within 1% (relative norm), d(scale) within 0.1%, and all of them within flash-attn's rule
    against the naive same-dtype maths (tests/test_regimes_losses.py's bounds). d(scale) is a sum of terms
    ds_ij <I_i, T_j> where ds = P + Q - 2 nearly cancels: formed from the gradient (whose GEMM rounds ds to bf16) it
    was 0.2-3.5% off in bf16 without label smoothing (0.95% for the d = 136 case here); from the kernel's fp32 ds_dot
    it is within ~1e-5. The scale is fp32, as open_clip keeps logit_scale under autocast: d(scale) is then the
    kernels' own result (in fp16 it can be ~1e-6 GRAD_SCALE, subnormal there). d = 136 and 512 split the
    backward's GEMM1 over 2 and 4 warps, so a recomputed S_ii would round differently from the forward's."""
    import torch

    from fastclip.ops.contrastive import cuda

    from .helpers import assert_within_naive, confident_features, rel_norm_err, unit_roundoff
    from .regimes import contrastive_spec, trained_features

    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    if regime == "trained":
        img, txt = (x.detach() for x in trained_features(n, d, dtype))
    else:
        img, txt = confident_features(n, d, dtype, mean_p=0.99999, seed=d)
    scale = torch.tensor(100.0)
    loss, row, col = cuda.contrastive_fwd(img, txt, scale, None, ls, None)
    grads = cuda.contrastive_bwd(torch.tensor(GRAD_SCALE), img, txt, scale, None, row, col, ls, None)

    hi = [img.double().requires_grad_(), txt.double().requires_grad_(), scale.double().requires_grad_()]
    lo = [img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.to(dtype).requires_grad_()]
    hi_loss, lo_loss = contrastive_spec(*hi, label_smoothing=ls), contrastive_spec(*lo, label_smoothing=ls)
    hi_grads = torch.autograd.grad(hi_loss * GRAD_SCALE, hi)
    lo_grads = torch.autograd.grad(lo_loss * GRAD_SCALE, lo)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.double() - hi_loss).item() <= 1e-2 * hi_loss.item(), (loss.item(), hi_loss.item())
    u = unit_roundoff(dtype)
    assert_within_naive("loss", loss, hi_loss, (lo_loss.double() - hi_loss).abs().item(), factor=2, atol=4 * u * 100)
    for name, g, h, low, leaf in zip(("d_image", "d_text", "d_scale"), grads, hi_grads, lo_grads, (img, txt, scale)):
        assert g.dtype == leaf.dtype and g.shape == h.shape and torch.isfinite(g).all()
        bound = 1e-3 if name == "d_scale" else 1e-2
        assert rel_norm_err(g, h) <= bound, f"{name}: relative norm error {rel_norm_err(g, h):.3e}"
        assert_within_naive(name, g, h, (low.double() - h).abs().max().item(), factor=3,
                            atol=4 * u * (1 + h.abs().max().item()))
