"""The CUDA flash attention kernels (csrc/attention/) run on the CPU through the emulator (tests/emulator.py) against a
float64 reference computed from the same rounded fp16/bf16 inputs.

Tolerances are error bounds of the kernels' arithmetic, not fudge factors (u = 2^-11 fp16, 2^-8 bf16, the unit
roundoff; every bound below is doubled for safety, which is still far below what any indexing/masking bug gives):
  * scores: S = Q K^T uses exact 16-bit products summed in fp32 (one rounding per mma k16 step and accumulation), so
    |dS| <= TS = 2^-22 (d/16 + 4) scale max_ij sum_k |q_ik k_jk| (+1e-6 for exp2/log2 approximations);
  * out: O is rounded to the type (u |O|); P is rounded to the type before P V (u (P |V|)); the score error moves
    the softmax by at most TS per entry, i.e. (2 TS) (P |V|) on O;  lse: 2 TS + 2e-6 (1 + |lse|);
  * backward: P is recomputed from the kernel's own lse (error 3 TS relative), dP = dO V^T in fp32
    (e_dP = 2^-22 (d/16 + 4) |dO| |V|^T), delta = rowsum(dO O) from the kernel's rounded O (e_delta = |dO| tol_O),
    dS is rounded to the type (u |dS|): per entry E = u |dS| + 3 TS P (|dP| + |delta|) + P (e_dP + e_delta), so
    |d dQ| <= u |dQ| + scale E |K|, |d dK| <= u |dK| + scale E^T |Q|, |d dV| <= u |dV| + (u + 3 TS) P^T |dO|.
Inputs sit in buffers whose head-dim gap (or unused rows/columns) hold NaN, and outputs/workspace start as NaN: a load
past the masks or a missing store poisons the comparison.
"""
import ctypes

import numpy as np
import pytest
import torch

from . import emulator

pytestmark = pytest.mark.skipif(emulator.compiler_missing() is not None, reason=str(emulator.compiler_missing()))

SOURCES = ["attention/flash_fwd_fp16.cu", "attention/flash_fwd_bf16.cu", "attention/flash_bwd_fp16.cu",
           "attention/flash_bwd_bf16.cu", "emulate/attention_capi.cpp"]
U = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
NAN16 = 0xFFFF  # NaN in both 16-bit types


@pytest.fixture(scope="module")
def lib():
    lib = emulator.build("attention", SOURCES)
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fwd_args = [i32, vp, vp, vp, vp, vp, vp, i32, i32, i32, i32, i32, f32, i32, vp, i64]
    lib.fc_flash_fwd.restype = ctypes.c_char_p
    lib.fc_flash_fwd.argtypes = fwd_args + [vp, vp, vp]
    lib.fc_flash_bwd.restype = ctypes.c_char_p
    lib.fc_flash_bwd.argtypes = fwd_args + [vp, vp, vp, vp, vp, vp, vp, vp, vp]
    lib.fc_flash_bwd_workspace.restype = ctypes.c_size_t
    lib.fc_flash_bwd_workspace.argtypes = [i32, i32, i32, i32, i32]
    return lib


def _strides(*s):
    return np.array(s, dtype=np.int64)


class Case:
    """Inputs (bits with their strides, float64 values), the kernels' outputs, and the float64 reference."""

    def __init__(self, kind, B, H, sq, sk, d, causal=False, pad=None, packed=False, seed=0, q_mult=1.0):
        rng = np.random.default_rng(seed)
        self.kind, self.B, self.H, self.sq, self.sk, self.d, self.causal = kind, B, H, sq, sk, d, causal
        self.scale = d ** -0.5
        if packed:  # q, k, v: views of one (B, S, 3, H, d) projection
            assert sq == sk
            buf = rng.standard_normal((B, sq, 3, H, d)).astype(np.float32)
            buf[:, :, 0] *= q_mult
            self._buf = emulator.to_bits(buf, kind)
            self.q_bits, self.k_bits, self.v_bits = self._buf[:, :, 0], self._buf[:, :, 1], self._buf[:, :, 2]
            st = _strides(sq * 3 * H * d, 3 * H * d, d)
            self.q_str = self.k_str = self.v_str = st
        else:  # (B, S, H, d + 8) with a NaN gap after each head's d values
            dp = d + 8

            def make(s, mult):
                full = np.full((B, s, H, dp), np.nan, dtype=np.float32)
                full[..., :d] = rng.standard_normal((B, s, H, d)) * mult
                return emulator.to_bits(full, kind), _strides(s * H * dp, H * dp, dp)

            self.q_bits, self.q_str = make(sq, q_mult)
            self.k_bits, self.k_str = make(sk, 1.0)
            self.v_bits, self.v_str = make(sk, 1.0)
        self.q = torch.from_numpy(emulator.from_bits(self.q_bits[..., :d], kind))
        self.k = torch.from_numpy(emulator.from_bits(self.k_bits[..., :d], kind))
        self.v = torch.from_numpy(emulator.from_bits(self.v_bits[..., :d], kind))
        self.kp = None
        if pad is not None:  # pad[b] = number of trailing padded keys of batch b (sk = every key)
            kp = emulator.aligned_empty((B, sk + 5), np.uint8)  # row stride sk + 5
            kp[...] = 0
            for b, n in enumerate(pad):
                kp[b, sk - n:sk] = 1
            kp[:, sk:] = 7  # past sk: must never be read as a mask
            self.kp = kp
        dout = np.full((B, sq, H, d + 8), np.nan, dtype=np.float32)  # strided too, NaN in the gap
        dout[..., :d] = rng.standard_normal((B, sq, H, d))
        self.dout_bits = emulator.to_bits(dout, kind)
        self.dout_str = _strides(sq * H * (d + 8), H * (d + 8), d + 8)
        self.dout = torch.from_numpy(emulator.from_bits(self.dout_bits[..., :d], kind))

    def fwd_args(self):
        return (int(self.kind == "bf16"), emulator.ptr(self.q_bits), emulator.ptr(self.k_bits),
                emulator.ptr(self.v_bits), emulator.ptr(self.q_str), emulator.ptr(self.k_str),
                emulator.ptr(self.v_str), self.B, self.H, self.sq, self.sk, self.d, self.scale, int(self.causal),
                emulator.ptr(self.kp), 0 if self.kp is None else self.kp.shape[1])

    # --- kernels -------------------------------------------------------------------------------------------------
    def run_fwd(self, lib):
        B, H, sq, d = self.B, self.H, self.sq, self.d
        dp = d + 8  # output with a gap that must stay NaN
        self.o_bits = emulator.aligned_empty((B, sq, H, dp), np.uint16)
        self.o_bits[...] = NAN16
        self.o_str = _strides(sq * H * dp, H * dp, dp)
        self.lse_out = emulator.aligned_empty((B, H, sq), np.float32)
        self.lse_out[...] = np.nan
        err = lib.fc_flash_fwd(*self.fwd_args(), emulator.ptr(self.o_bits), emulator.ptr(self.o_str),
                               emulator.ptr(self.lse_out))
        assert err is None, err
        assert np.all(self.o_bits[..., d:] == NAN16), "the kernel wrote past the head dim"
        self.o_out = torch.from_numpy(emulator.from_bits(self.o_bits[..., :d], self.kind))
        return self.o_out, torch.from_numpy(self.lse_out.astype(np.float64))

    def run_bwd(self, lib):
        B, H, sq, sk, d = self.B, self.H, self.sq, self.sk, self.d
        outs = []
        for s in (sq, sk, sk):
            a = emulator.aligned_empty((B, s, H, d), np.uint16)
            a[...] = NAN16
            outs.append(a)
        nbytes = lib.fc_flash_bwd_workspace(B, H, sq, sk, d)
        ws = emulator.aligned_empty((nbytes // 4,), np.float32, align=256)
        ws[...] = np.nan  # the kernel must not rely on any initial content
        err = lib.fc_flash_bwd(*self.fwd_args(), emulator.ptr(self.o_bits), emulator.ptr(self.o_str),
                               emulator.ptr(self.lse_out), emulator.ptr(self.dout_bits), emulator.ptr(self.dout_str),
                               *(emulator.ptr(a) for a in outs), emulator.ptr(ws))
        assert err is None, err
        return [torch.from_numpy(emulator.from_bits(a, self.kind)) for a in outs]

    # --- float64 reference and bounds -----------------------------------------------------------------------------
    def reference(self):
        q, k, v, dout = self.q, self.k, self.v, self.dout
        B, H, sq, sk, d, u = self.B, self.H, self.sq, self.sk, self.d, U[self.kind]
        s = torch.einsum("bshd,bthd->bhst", q, k) * self.scale
        valid = torch.ones(sq, sk, dtype=torch.bool)
        if self.causal:
            valid = valid.tril()
        valid = valid[None, None].expand(B, H, sq, sk)
        if self.kp is not None:
            kp = torch.from_numpy(self.kp[:, :sk].astype(bool))
            valid = valid & ~kp[:, None, None, :]
        lse = torch.logsumexp(s.masked_fill(~valid, -np.inf), -1)  # -inf for a row with no key
        p = torch.where(valid, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
        o = torch.einsum("bhst,bthd->bshd", p, v)
        dp = torch.einsum("bshd,bthd->bhst", dout, v)
        delta = (dout * o).sum(-1).permute(0, 2, 1)  # (B, H, sq)
        ds = p * (dp - delta[..., None])
        dq = torch.einsum("bhst,bthd->bshd", ds, k) * self.scale
        dk = torch.einsum("bhst,bshd->bthd", ds, q) * self.scale
        dv = torch.einsum("bhst,bshd->bthd", p, dout)

        aq, ak, av, ado = q.abs(), k.abs(), v.abs(), dout.abs()
        ts = 2.0 ** -22 * (d / 16 + 4) * self.scale * torch.einsum("bshd,bthd->bhst", aq, ak).max().item() + 1e-6
        pv = torch.einsum("bhst,bthd->bshd", p, av)
        tol_o = 2 * (u * o.abs() + (u + 2 * ts) * pv) + 1e-7
        tol_lse = 2 * ts + 2e-6 * (1 + torch.where(torch.isinf(lse), 0.0, lse).abs())
        e_dp = 2.0 ** -22 * (d / 16 + 4) * torch.einsum("bshd,bthd->bhst", ado, av)
        e_delta = (ado * tol_o).sum(-1).permute(0, 2, 1)
        e = u * ds.abs() + 3 * ts * p * (dp.abs() + delta.abs()[..., None]) + p * (e_dp + e_delta[..., None])
        tol_dq = 2 * (u * dq.abs() + self.scale * torch.einsum("bhst,bthd->bshd", e, ak)) + 1e-7
        tol_dk = 2 * (u * dk.abs() + self.scale * torch.einsum("bhst,bshd->bthd", e, aq)) + 1e-7
        tol_dv = 2 * (u * dv.abs() + (u + 3 * ts) * torch.einsum("bhst,bshd->bthd", p, ado)) + 1e-7
        return dict(o=(o, tol_o), lse=(lse, tol_lse), dq=(dq, tol_dq), dk=(dk, tol_dk), dv=(dv, tol_dv))


def check(name, got, ref, tol):
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.nonzero(torch.isnan(got))[:5].tolist()}"
    both_inf = torch.isinf(ref) & (got == ref)
    err = torch.where(both_inf, 0.0, (got - ref).abs())
    bad = ~(err <= tol)
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = (err / tol).max().item()
        raise AssertionError(f"{name}: {int(bad.sum())} of {got.numel()} outside the bound (worst {worst:.3g}x); "
                             f"first {idx}: got {[got[tuple(i)].item() for i in idx]}, "
                             f"ref {[ref[tuple(i)].item() for i in idx]}")
    return (err / tol).max().item()


def run_and_check(lib, case, backward=True):
    ref = case.reference()
    o, lse = case.run_fwd(lib)
    check("out", o, *ref["o"])
    check("lse", lse, *ref["lse"])
    if backward:
        dq, dk, dv = case.run_bwd(lib)
        check("dq", dq, *ref["dq"])
        check("dk", dk, *ref["dk"])
        check("dv", dv, *ref["dv"])
    return ref


# ---------------------------------------------------------------------------------------------------------------
# Fast cases (a few d per dtype; the sweep is under -m slow)

FAST = [
    # kind, B, H, sq, sk, d, causal, pad, packed
    ("fp16", 1, 1, 1, 1, 32, False, None, False),
    ("bf16", 1, 1, 1, 1, 128, True, None, False),
    ("bf16", 1, 2, 7, 7, 80, False, None, False),
    ("fp16", 2, 1, 77, 77, 64, True, [20, 77], False),  # text tower: causal + padding, batch 1 all padded
    ("bf16", 2, 1, 77, 77, 40, True, [5, 77], False),
    ("fp16", 1, 2, 50, 50, 64, False, None, True),  # vision tower, q/k/v views of a packed projection
    ("bf16", 1, 1, 50, 50, 128, False, None, True),
    ("fp16", 1, 1, 37, 70, 128, True, None, False),  # causal, sq < sk (top-left aligned)
    ("bf16", 1, 1, 70, 37, 32, True, [0], False),  # causal, sq > sk
    ("bf16", 1, 1, 150, 150, 64, False, [13], False),  # 3 key blocks, 3 query blocks
    ("fp16", 1, 1, 150, 140, 80, True, None, False),  # 3 key blocks causal, d padded to 96
    ("fp16", 1, 1, 257, 257, 64, False, None, True),  # ViT-L/14 tokens: 5 blocks, the last with 1 row/key
    ("bf16", 1, 1, 65, 33, 96, True, [4], False),  # 1 row/key past a 16 boundary, causal, d = D_PAD = 96
]


@pytest.mark.parametrize("kind,B,H,sq,sk,d,causal,pad,packed", FAST,
                         ids=[f"{c[0]}-b{c[1]}h{c[2]}-{c[3]}x{c[4]}-d{c[5]}{'-causal' if c[6] else ''}"
                              f"{'-pad' if c[7] else ''}{'-packed' if c[8] else ''}" for c in FAST])
def test_flash_attention(lib, kind, B, H, sq, sk, d, causal, pad, packed):
    case = Case(kind, B, H, sq, sk, d, causal=causal, pad=pad, packed=packed, seed=sq * 131 + d, q_mult=1.5)
    run_and_check(lib, case)


def test_all_padded_batch_gives_zeros(lib):
    case = Case("fp16", 2, 1, 20, 20, 32, causal=False, pad=[3, 20], seed=3)
    run_and_check(lib, case)
    assert torch.all(case.o_out[1] == 0)
    assert torch.all(torch.isneginf(torch.from_numpy(case.lse_out[1])))
    dq, dk, dv = case.run_bwd(lib)
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    # padded keys of batch 0 get zero dk, dv
    assert torch.all(dk[0, 17:] == 0) and torch.all(dv[0, 17:] == 0)


def test_backward_deterministic(lib):
    case = Case("bf16", 1, 1, 100, 100, 64, causal=True, seed=5)
    case.run_fwd(lib)
    a = case.run_bwd(lib)
    b = case.run_bwd(lib)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_reference_matches_autograd():
    """The closed-form float64 gradients of Case.reference agree with autograd of fastclip's attention_ref."""
    from fastclip.ops.attention.reference import attention_ref

    case = Case("bf16", 2, 2, 9, 11, 32, causal=True, pad=[2, 11], seed=1)
    ref = case.reference()
    q, k, v = (x.clone().requires_grad_(True) for x in (case.q, case.k, case.v))
    kpm = torch.from_numpy(case.kp[:, :case.sk].astype(bool))
    out = attention_ref(q, k, v, causal=True, key_padding_mask=kpm, softmax_scale=case.scale)
    out.backward(case.dout)
    torch.testing.assert_close(out, ref["o"][0], rtol=1e-12, atol=1e-12)
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        torch.testing.assert_close(t.grad, ref[name][0], rtol=1e-10, atol=1e-12)


def test_launcher_validation(lib):
    case = Case("fp16", 1, 1, 8, 8, 64, seed=2)
    base = list(case.fwd_args())
    o = emulator.aligned_empty((1, 8, 1, 64), np.uint16)
    lse = emulator.aligned_empty((1, 1, 8), np.float32)
    o_str = _strides(8 * 64, 64, 64)

    def fwd(**over):
        args = list(base)
        names = ["bf16", "q", "k", "v", "qs", "ks", "vs", "B", "H", "sq", "sk", "d", "scale", "causal", "kp", "kps"]
        for key, val in over.items():
            args[names.index(key)] = val
        return lib.fc_flash_fwd(*args, emulator.ptr(o), emulator.ptr(o_str), emulator.ptr(lse))

    assert fwd() is None
    for bad_d in (24, 36, 136, 0):
        assert b"head dim" in fwd(d=bad_d)
    assert b"aligned" in fwd(q=ctypes.c_void_p(case.q_bits.ctypes.data + 2))
    assert b"strides" in fwd(qs=emulator.ptr(_strides(8 * 72, 72, 68)))
    assert b"positive" in fwd(sq=0)
    assert b"positive" in fwd(H=0)
    assert b"null" in fwd(k=ctypes.c_void_p(0))
    # backward: misaligned workspace and output
    case.run_fwd(lib)
    outs = [emulator.aligned_empty((1, 8, 1, 64), np.uint16) for _ in range(3)]
    ws = emulator.aligned_empty((lib.fc_flash_bwd_workspace(1, 1, 8, 8, 64) // 4 + 64,), np.float32, align=256)
    def bwd(ws_ptr, dq_ptr):
        return lib.fc_flash_bwd(*case.fwd_args(), emulator.ptr(case.o_bits), emulator.ptr(case.o_str),
                                emulator.ptr(case.lse_out), emulator.ptr(case.dout_bits), emulator.ptr(case.dout_str), dq_ptr,
                                emulator.ptr(outs[1]), emulator.ptr(outs[2]), ws_ptr)

    assert bwd(emulator.ptr(ws), emulator.ptr(outs[0])) is None
    assert b"workspace" in bwd(ctypes.c_void_p(ws.ctypes.data + 16), emulator.ptr(outs[0]))
    assert b"aligned" in bwd(emulator.ptr(ws), ctypes.c_void_p(outs[0].ctypes.data + 8))


# ---------------------------------------------------------------------------------------------------------------
# Broader sweep

SLOW = [(kind, sq, sk, d, causal)
        for kind in ("fp16", "bf16")
        for d in (32, 40, 64, 72, 80, 96, 104, 128)
        for sq, sk, causal in ((77, 77, True), (50, 50, False), (65, 64, False), (64, 65, True), (197, 197, False))]


@pytest.mark.slow
@pytest.mark.parametrize("kind,sq,sk,d,causal", SLOW)
def test_flash_attention_sweep(lib, kind, sq, sk, d, causal):
    pad = [sk // 3, 0] if causal else None
    case = Case(kind, 2 if pad else 1, 1, sq, sk, d, causal=causal, pad=pad, seed=d + sq, q_mult=2.0)
    run_and_check(lib, case)
