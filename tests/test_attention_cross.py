"""flash_attention beyond self-attention, on every backend: q, k, v distinct with S_q != S_k, causal (top-left),
key padding, k and v in different layouts, odd head dims, and the launch geometry at large B * H.

Errors are bounded with flash-attn's criterion against an fp64 reference (see test_attention.py); the top-left
causal contract and the confident-attention regime are checked against statements that do not use the reference.
"""
import pytest
import torch

import fastclip
from fastclip.ops.attention.reference import attention_ref

from .helpers import assert_close
from .test_attention import GRAD_NAMES, attn_and_grads, check_against_reference, upcast

BACKENDS = ["reference", "torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def cross_qkv(b, s_q, s_k, h, d, dtype):
    """Distinct q, k, v leaves in three layouts: q head-major storage, k a view of a packed (B, S_k, 2, H, D) KV
    projection, v contiguous. k and v therefore have different strides (a kernel loading V with K's strides is
    wrong)."""
    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    q = draw(b, h, s_q, d).transpose(1, 2)  # (B, S_q, H, D) view of (B, H, S_q, D)
    k = draw(b, s_k, 2, h, d)[:, :, 1]  # (B, S_k, H, D) view of a packed KV projection
    v = draw(b, s_k, h, d)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert k.stride() != v.stride() and q.stride() != v.stride()
    return leaves


def padding(b, s_k, *, first_keys=0):
    """(B, S_k) bool, a strided view (every other column of a wider mask). ``first_keys`` pads the first keys of
    the last batch, so that under a causal mask its first queries see no key."""
    wide = torch.rand(b, 2 * s_k) < 0.3
    mask = wide[:, ::2]
    mask[-1, :first_keys] = True
    assert not mask.is_contiguous()
    return mask


CROSS = [  # (b, s_q, s_k, h, d, causal, pad)
    (2, 20, 45, 2, 32, True, True),     # more keys than queries: keys past S_q are seen by no query
    (2, 45, 20, 2, 32, True, True),     # more queries: queries past S_k see every key
    (1, 1, 33, 2, 16, False, True),     # one query (decoding-like)
    (2, 33, 1, 1, 16, True, False),     # one key
    pytest.param(1, 77, 50, 1, 24, False, True, marks=pytest.mark.slow),  # text queries over image keys
    pytest.param(1, 50, 77, 2, 40, True, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s_q,s_k,h,d,causal,pad", CROSS)
def test_cross_attention(backend, dtype, b, s_q, s_k, h, d, causal, pad):
    leaves = cross_qkv(b, s_q, s_k, h, d, dtype)
    mask = padding(b, s_k, first_keys=3) if pad else None
    out, grads = check_against_reference(leaves, causal, mask, backend, atol_fwd=TOL[dtype], atol_bwd=TOL[dtype],
                                         scale=0.3)
    if causal and s_k > s_q:  # keys no query can see get exactly zero gradient
        assert (grads[1][:, s_q:] == 0).all() and (grads[2][:, s_q:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_q,s_k", [(5, 12), (12, 5), (7, 7)])
def test_causal_is_top_left(backend, s_q, s_k):
    """Query i sees keys 0..i whatever S_q and S_k (SDPA's is_causal), stated without the reference: row i equals
    non-causal attention over k[:, :i + 1]. (Bottom-right alignment, flash-attn's, would shift the window by
    S_k - S_q.)"""
    q, k, v = [t.detach() for t in cross_qkv(2, s_q, s_k, 2, 16, torch.float32)]
    out = fastclip.flash_attention(q, k, v, causal=True, backend=backend)
    for i in range(s_q):
        j = min(i + 1, s_k)
        row = fastclip.flash_attention(q[:, i:i + 1], k[:, :j], v[:, :j], backend="reference")
        assert_close(f"row {i}", out[:, i:i + 1], row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [8, 40, 72, 88, 112, 128])
def test_head_dims(backend, d):
    """Head dims up to 128: one column piece (8), two (40 = 32 + 16, 72 = 64 + 16, 88 = 64 + 32, 128 = 64 + 64),
    and a second piece mostly masked (112 in 64 + 64)."""
    leaves = cross_qkv(1, 19, 33, 2, d, torch.float32)
    check_against_reference(leaves, True, padding(1, 33), backend, atol_fwd=1e-5, atol_bwd=1e-5)


def confident_qkv(b, s, h, d, dtype):
    """Attention as a trained model has it: each query attends almost only to its own key (P_ii ~ 1), and dO is
    nearly parallel to O (the gradient of a loss on the output's norm). Then dS_ii = P_ii (dP_ii - delta_i) is a
    near-cancellation of two O(|dO| |O|) terms, so delta_i = sum_d O_id dO_id must be formed in fp32."""
    k = torch.nn.functional.normalize(torch.randn(b, s, h, d, dtype=torch.float64), dim=-1)
    q = 8 * d ** 0.5 * k + 0.3 * torch.randn(b, s, h, d, dtype=torch.float64)  # scores ~ 8 on the diagonal
    v = torch.randn(b, s, h, d, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_regime_fp16_gradients(backend):
    """fp16 gradients within 1% (relative norm) of fp64 on the same rounded inputs, where P_ii -> 1: an
    intermediate (delta, dS) rounded to fp16 before the subtraction shows here, not with diffuse random inputs."""
    b, s, h, d = 2, 37, 2, 64
    leaves = confident_qkv(b, s, h, d, torch.float16)
    out = fastclip.flash_attention(*leaves, backend=backend)
    g = (4 * out.detach().float() + 0.05 * torch.randn(out.shape)).half()  # dO ~ parallel to O
    grads = torch.autograd.grad(out, leaves, g)
    hi = upcast(leaves)
    ref_out, ref_grads, _ = attn_and_grads(lambda q, k, v: attention_ref(q, k, v), hi, g.double())
    p_diag = torch.einsum("bshd,bshd->bhs", hi[0], hi[1]).mul(d ** -0.5)
    assert p_diag.mean() > 7, "the inputs should make attention confident"
    for name, gr, r in zip(GRAD_NAMES, grads, ref_grads):
        rel = ((gr.double() - r).norm() / r.norm()).item()
        assert rel < 6e-3, f"{name}: relative error {rel:.2e} against fp64 in the confident regime"


def test_grid_puts_batch_heads_on_axis_0(monkeypatch):
    """B * H beyond CUDA's 65,535 limit on grid axes 1 and 2 (large-batch evaluation) must still launch: the grids
    the launchers compute, with the kernels replaced by spies (70,008 programs are too many for the interpreter)."""
    from fastclip.ops.attention import triton as A

    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(A, "_attn_fwd_kernel", Spy())
    monkeypatch.setattr(A, "_attn_bwd_kernel", Spy())
    b, s, h, d = 5834, 3, 12, 16  # B * H = 70,008
    q, k, v = (torch.zeros(b, s, h, d) for _ in range(3))
    out, lse = A.attention_fwd(q, k, v, None, True, 0.25)
    A.attention_bwd(out, q, k, v, out, lse, None, True, 0.25)
    assert len(grids) == 2
    for grid in grids:
        assert grid[0] == b * h and all(g <= 65535 for g in grid[1:]), grid


def test_head_pieces_and_alignment():
    """Head dims pad to the next multiple of 16 or 32 (not to 128); the 16-byte alignment hint only when true."""
    from fastclip.ops.attention.triton import _align, _head_pieces

    padded = {d: sum(_head_pieces(d)) for d in (8, 16, 24, 40, 48, 59, 64, 72, 80, 88, 96, 104, 128)}
    assert padded == {8: 16, 16: 16, 24: 32, 40: 48, 48: 48, 59: 64, 64: 64, 72: 80, 80: 80, 88: 96, 96: 96,
                      104: 128, 128: 128}
    packed = torch.empty(2, 7, 3, 4, 88, dtype=torch.float16)  # heads 176 bytes apart: 16-byte aligned
    assert _align(*packed.unbind(2)) == 8
    assert _align(packed[..., 1:, :].unbind(2)[0]) == 8  # heads offset by whole heads stay aligned
    assert _align(packed[..., :87].unbind(2)[0], packed[..., 1:].unbind(2)[0]) == 1  # one view starts mid-row
    assert _align(torch.empty(2, 7, 4, 59, dtype=torch.float16)) == 1  # rows 118 bytes apart
    assert _align(torch.empty(2, 7, 4, 72)) == 4  # fp32: 4 elements per 16 bytes


def test_sm90_backward_pads_head_dims_88_96_to_128(monkeypatch):
    """On sm_90 the 16-bit backward runs head dims 88 and 96 as 64 + 64 columns with 64-row tiles (every product on
    warp-group MMA without spills; tests/triton_static.py); the forward and sm_80 keep 64 + 32. The padded pieces
    then give the gradients of the unpadded head dim (interpreter, fp32, small tiles with the sm_90 pieces)."""
    from fastclip.ops import tuned
    from fastclip.ops.attention import triton as A

    def pieces(config):
        return config["BLOCK_D0"], config["BLOCK_D1"]

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tables
    for arch, bwd in ((90, (64, 64)), (80, (64, 32))):
        monkeypatch.setattr(tuned, "gpu_arch", lambda arch=arch: arch)
        for d in (88, 96):
            assert pieces(A._bwd_config(77, 77, d, torch.bfloat16)) == bwd
            assert pieces(A._fwd_config(77, 77, d, torch.bfloat16)) == (64, 32)
            assert pieces(A._bwd_config(77, 77, d, torch.float32)) == (64, 32)
    monkeypatch.setattr(tuned, "gpu_arch", lambda: 90)
    assert A._bwd_config(77, 77, 96, torch.float16)["BLOCK_M"] == 64
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreter_bwd_config = A._bwd_config
    monkeypatch.setattr(A, "_bwd_config", lambda *args: dict(interpreter_bwd_config(*args), BLOCK_D0=64, BLOCK_D1=64))
    leaves = cross_qkv(1, 19, 21, 2, 96, torch.float32)
    check_against_reference(leaves, True, padding(1, 21), "triton", atol_fwd=1e-5, atol_bwd=1e-5)
