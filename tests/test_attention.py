"""flash_attention against the fp64 reference and SDPA (fastclip.nn.MultiheadAttention: test_nn.py).

Triton kernels run under TRITON_INTERPRET=1 on the CPU (fp32, fp16) at small CLIP-like shapes; bf16 and full
CLIP sizes are ``@pytest.mark.gpu``. Errors are bounded with flash-attn's criterion: fastclip's error against an
fp64 reference at most 2x (output) / 3x (gradients) that of the same computation in the inputs' dtype, plus atol.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.ops.attention.reference import attention_ref
from fastclip.dispatch import BackendError, cuda_ext_unavailable, select

from .helpers import assert_close, assert_close_to_ref, unit_roundoff

MASKS = ["none", "causal", "padding", "causal+padding", "all-padded"]
GRAD_NAMES = ("dq", "dk", "dv")


def make_qkv(b, s, h, d, dtype=torch.float32, *, s_k=None, device="cpu"):
    """Fresh (B, S, H, D) leaves q, k, v (k, v with S_k rows), drawn in fp64 then cast."""
    s_k = s if s_k is None else s_k
    shapes = [(b, s, h, d), (b, s_k, h, d), (b, s_k, h, d)]
    return [torch.randn(*sh, dtype=torch.float64, device=device).to(dtype).requires_grad_() for sh in shapes]


def make_mask(kind, b, s_q, s_k, device="cpu"):
    """(causal, key_padding_mask) for a mask kind. Padding masks leave rows that see no key on purpose."""
    causal = kind.startswith("causal")
    if kind in ("none", "causal"):
        return causal, None
    mask = torch.rand(b, s_k, device=device) < 0.3  # True = padding
    if kind == "all-padded":
        mask[0] = True  # batch 0: every query sees no key
    elif kind == "causal+padding":
        mask[-1, : min(5, s_k)] = True  # last batch: the first queries see no key under the causal mask
        mask[0, -1] = True
    return causal, mask


def attn_and_grads(fn, leaves, grad_out=None):
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out), grad_out


def upcast(leaves, dtype=torch.float64):
    return [t.detach().to(dtype).requires_grad_() for t in leaves]


def check_against_reference(leaves, causal, mask, backend, *, atol_fwd, atol_bwd, scale=None):
    """fastclip (backend) vs fp64 reference, bounded by same-dtype PyTorch's own error."""

    def fast(q, k, v):
        return fastclip.flash_attention(q, k, v, causal=causal, key_padding_mask=mask, softmax_scale=scale,
                                        backend=backend)

    def ref(upcast_flag):
        return lambda q, k, v: attention_ref(q, k, v, causal, mask, scale, upcast=upcast_flag)

    out, grads, g = attn_and_grads(fast, leaves)
    hi_out, hi_grads, _ = attn_and_grads(ref(True), upcast(leaves), g.double())
    lo_out, lo_grads, _ = attn_and_grads(ref(False), upcast(leaves, leaves[0].dtype), g)
    assert out.dtype == leaves[0].dtype and out.shape == leaves[0].shape
    assert torch.isfinite(out).all()
    assert_close_to_ref("out", out, hi_out, lo_out, factor=2, atol=atol_fwd)
    for name, gr, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert gr.dtype == leaves[0].dtype and gr.shape == h.shape
        assert torch.isfinite(gr).all(), f"{name} not finite"
        assert_close_to_ref(name, gr, h, lo, factor=3, atol=atol_bwd * (1 + h.abs().max().item()))
    return out, grads


# ---------------------------------------------------------------------------------------------------------------
# torch (SDPA) and reference backends: fp64, exact up to rounding


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("b,s,h,d", [(1, 1, 1, 8), (2, 3, 2, 16), (3, 50, 2, 59), (2, 77, 3, 80)])
def test_plain_backends_fp64(backend, mask_kind, b, s, h, d):
    leaves = make_qkv(b, s, h, d, torch.float64)
    causal, mask = make_mask(mask_kind, b, s, s)
    out, grads, g = attn_and_grads(
        lambda q, k, v: fastclip.flash_attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend),
        leaves)
    # an independent statement of the maths: SDPA's math kernel on explicit float masks, then zero empty rows
    attend = torch.ones(b, 1, s, s, dtype=torch.bool)
    if causal:
        attend = attend & torch.ones(s, s, dtype=torch.bool).tril()
    if mask is not None:
        attend = attend & ~mask[:, None, None, :]
    empty = ~attend.any(-1, keepdim=True)

    def direct(q, k, v):
        bias = torch.zeros(attend.shape, dtype=q.dtype).masked_fill(~(attend | empty), float("-inf"))
        p = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / d ** 0.5 + bias).softmax(-1)
        p = p.masked_fill(empty, 0.0)
        return (p @ v.transpose(1, 2)).transpose(1, 2)

    ref_out, ref_grads, _ = attn_and_grads(direct, upcast(leaves), g)
    assert_close("out", out, ref_out, rtol=1e-12, atol=1e-12)
    for name, gr, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, gr, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_low_precision(dtype):
    leaves = make_qkv(2, 77, 2, 64, dtype)
    causal, mask = make_mask("causal+padding", 2, 77, 77)
    # beyond 2x / 3x the naive bf16 error: one rounding of the result (was 2e-2, 5x the rounding: measured errors
    # are 0.6-2.3x the naive one, so an intermediate in a lower precision would have passed under it)
    atol = 1e-5 if dtype == torch.float32 else unit_roundoff(dtype)
    check_against_reference(leaves, causal, mask, "torch", atol_fwd=atol, atol_bwd=atol)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU)

TRITON_SHAPES = [(1, 1, 1, 16), (2, 3, 2, 32), (2, 50, 2, 64), (1, 77, 2, 80), (1, 37, 3, 59), (1, 131, 1, 72)]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("b,s,h,d", TRITON_SHAPES)
def test_triton_fp32(mask_kind, b, s, h, d):
    leaves = make_qkv(b, s, h, d, torch.float32)
    causal, mask = make_mask(mask_kind, b, s, s)
    check_against_reference(leaves, causal, mask, "triton", atol_fwd=1e-5, atol_bwd=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "causal+padding", "all-padded"])
@pytest.mark.parametrize("b,s,h,d", [(2, 50, 2, 64), (1, 77, 2, 80), (1, 33, 2, 59)])
def test_triton_fp16(mask_kind, b, s, h, d):
    leaves = make_qkv(b, s, h, d, torch.float16)
    causal, mask = make_mask(mask_kind, b, s, s)
    u = unit_roundoff(torch.float16)  # one rounding of the fp16 result beyond flash-attn's 2x / 3x (was 1e-3)
    check_against_reference(leaves, causal, mask, "triton", atol_fwd=u, atol_bwd=u)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q,s_k", [(20, 45), (45, 20)])
def test_triton_cross_lengths(causal, s_q, s_k):
    leaves = make_qkv(2, s_q, 2, 32, torch.float32, s_k=s_k)
    mask = torch.rand(2, s_k) < 0.3
    check_against_reference(leaves, causal, mask, "triton", atol_fwd=1e-5, atol_bwd=1e-5, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["packed-bs3hd", "packed-sb3hd", "head-major", "step2-last-dim"])
def test_triton_strided_inputs(dtype, layout):
    """q, k, v as views with unusual strides; gradients flow back to the one buffer they view."""
    b, s, h, d = 2, 41, 2, 24
    if layout == "packed-bs3hd":  # a packed QKV projection, as MultiheadAttention produces it
        base = torch.randn(b, s, 3, h, d, dtype=torch.float64).to(dtype).requires_grad_()
        views = lambda x: x.unbind(2)  # noqa: E731
    elif layout == "packed-sb3hd":  # sequence-first (batch_first=False)
        base = torch.randn(s, b, 3, h, d, dtype=torch.float64).to(dtype).requires_grad_()
        views = lambda x: [t.transpose(0, 1) for t in x.unbind(2)]  # noqa: E731
    elif layout == "head-major":  # (3, B, H, S, D) storage, (B, S, H, D) views
        base = torch.randn(3, b, h, s, d, dtype=torch.float64).to(dtype).requires_grad_()
        views = lambda x: [t.transpose(1, 2) for t in x.unbind(0)]  # noqa: E731
    else:  # the last dim is not unit-stride
        base = torch.randn(b, s, h, 3, 2 * d, dtype=torch.float64).to(dtype).requires_grad_()
        views = lambda x: [t[..., ::2] for t in x.unbind(3)]  # noqa: E731
    q, k, v = views(base)
    assert not q.is_contiguous()
    causal, mask = make_mask("causal+padding", b, s, s)

    def fn(impl):
        return lambda x: impl(*views(x))

    fast = fn(lambda q, k, v: fastclip.flash_attention(q, k, v, causal=causal, key_padding_mask=mask,
                                                        backend="triton"))
    out, (grad,), g = attn_and_grads(fast, [base])
    hi_out, (hi_grad,), _ = attn_and_grads(fn(lambda q, k, v: attention_ref(q, k, v, causal, mask)),
                                           upcast([base]), g.double())
    lo_out, (lo_grad,), _ = attn_and_grads(fn(lambda q, k, v: attention_ref(q, k, v, causal, mask, upcast=False)),
                                           upcast([base], dtype), g)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_to_ref("out", out, hi_out, lo_out, factor=2, atol=atol)
    assert_close_to_ref("d_qkv", grad, hi_grad, lo_grad, factor=3, atol=atol * (1 + hi_grad.abs().max().item()))


def test_triton_lse_and_empty_rows():
    """The forward's log-sum-exp (it drives the backward) against torch.logsumexp; -inf and zeros for empty rows."""
    from fastclip.ops.attention.triton import attention_fwd

    b, s, h, d = 2, 45, 2, 40
    q, k, v = [t.detach() for t in make_qkv(b, s, h, d)]
    causal, mask = make_mask("causal+padding", b, s, s)
    out, lse = attention_fwd(q, k, v, mask, causal, 0.2)
    scores = 0.2 * torch.einsum("bshd,bthd->bhst", q.double(), k.double())
    attend = torch.ones(s, s, dtype=torch.bool).tril() & ~mask[:, None, None, :]
    expect = scores.masked_fill(~attend, float("-inf")).logsumexp(-1)  # (B, H, S); -inf for empty rows
    empty = torch.isinf(expect)
    assert empty.any(), "the mask should leave queries that see no key"
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert_close("lse", lse[~empty], expect[~empty], rtol=1e-6, atol=1e-5)
    assert (out.transpose(1, 2)[empty] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_fully_padded_rows_zero_output_and_finite_grads(backend):
    leaves = make_qkv(2, 19, 2, 16)
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[1] = True  # batch 1 sees nothing
    out, grads, _ = attn_and_grads(
        lambda q, k, v: fastclip.flash_attention(q, k, v, key_padding_mask=mask, backend=backend), leaves)
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    for name, gr in zip(GRAD_NAMES, grads):
        assert torch.isfinite(gr).all(), name
        assert (gr[1] == 0).all(), name


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_nan_out(backend, where):
    q, k, v = [t.detach() for t in make_qkv(1, 9, 1, 16)]
    {"q": q, "k": k, "v": v}[where][0, 4, 0, 3] = float("nan")
    out = fastclip.flash_attention(q, k, v, backend=backend)
    if where == "q":
        assert torch.isnan(out[0, 4]).all() and not torch.isnan(out[0, :4]).any()
    else:  # every query attends to key 4
        assert torch.isnan(out).any(-1).all()


# ---------------------------------------------------------------------------------------------------------------
# Bad input and backend selection


def test_bad_inputs_raise_clear_errors():
    q, k, v = [t.detach() for t in make_qkv(2, 5, 3, 8)]
    mask = torch.zeros(2, 5, dtype=torch.bool)
    cases = [
        ((q[0], k, v), {}, ValueError, r"q must be 4-D.*\(5, 3, 8\)"),
        ((q, k, v[..., :4]), {}, ValueError, r"k and v must have the same shape.*\(2, 5, 3, 4\)"),
        ((q[:1], k, v), {}, ValueError, r"q must match k and v.*\(1, 5, 3, 8\)"),
        ((q[:, :, :2], k, v), {}, ValueError, r"q must match k and v"),
        ((q[..., :4], k, v), {}, ValueError, r"head_dim"),
        ((q, k.double(), v), {}, TypeError, r"one dtype.*float64"),
        ((q.long(), k.long(), v.long()), {}, TypeError, r"q must be a floating.*int64"),
        ((q, k, v.to(torch.int32)), {}, TypeError, r"v must be a floating"),
        ((q.numpy(), k, v), {}, TypeError, r"q must be a torch.Tensor"),
        ((q, k, v.to("meta")), {}, ValueError, r"one device"),
        ((q[:, :0], k, v), {}, ValueError, r"q is empty"),
        ((q, k, v), dict(key_padding_mask=mask.float()), TypeError, r"key_padding_mask must be a bool.*float32"),
        ((q, k, v), dict(key_padding_mask=mask[:, :4]), ValueError, r"key_padding_mask must be \(batch, seq_k\) = "
                                                                     r"\(2, 5\).*\(2, 4\)"),
        ((q, k, v), dict(key_padding_mask=mask[0]), ValueError, r"key_padding_mask must be \(batch, seq_k\)"),
        ((q, k, v), dict(key_padding_mask=[[True]]), TypeError, r"key_padding_mask must be a torch.Tensor"),
        ((q, k, v), dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a number"),
        ((q, k, v), dict(softmax_scale=float("inf")), ValueError, r"softmax_scale must be finite"),
        ((q, k, v), dict(backend="bogus"), ValueError, r"backend='bogus'"),
    ]
    for args, kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fastclip.flash_attention(*args, **kw)


def test_explicit_backend_that_cannot_run_raises():
    q, k, v = [t.detach() for t in make_qkv(1, 4, 1, 8)]
    with pytest.raises(BackendError, match="bfloat16 does not run in the Triton interpreter"):
        fastclip.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")
    with pytest.raises(BackendError, match="triton.*dtype float64 is not supported"):
        fastclip.flash_attention(q.double(), k.double(), v.double(), backend="triton")
    big = [t.detach() for t in make_qkv(1, 4, 1, 160)]
    with pytest.raises(BackendError, match="head_dim 160 > 128"):
        fastclip.flash_attention(*big, backend="triton")
    with pytest.raises(BackendError, match=r"'cuda' cannot run these inputs.*" + re.escape(cuda_ext_unavailable())
                       + r".*dtype float32 is not supported.*head_dim 8 < 32"):
        fastclip.flash_attention(q, k, v, backend="cuda")


def test_auto_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert select("flash_attention", "auto", device=cpu, dtype=dtype, dim=64).backend == "torch"
    assert select("flash_attention", "auto", device=torch.device("cuda"), dtype=torch.float64,
                  dim=64).backend == "torch" or not torch.cuda.is_available()
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    assert select("flash_attention", "auto", device=cpu, dtype=torch.float32, dim=64).backend == "reference"


def test_info_lists_attention():
    from fastclip.info import report

    text = report()
    assert "flash_attention" in text and "max head_dim=128" in text


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and the custom-op contract


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(with_mask):
    q, k, v = make_qkv(2, 21, 2, 16)
    mask = (torch.rand(2, 21) < 0.3) if with_mask else None
    torch.library.opcheck(torch.ops.fastclip.flash_attention_fwd.default, (q, k, v, mask, with_mask, 0.25, "triton"))
    out, lse = torch.ops.fastclip.flash_attention_fwd(q.detach(), k.detach(), v.detach(), mask, with_mask, 0.25,
                                                      "triton")
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastclip.flash_attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, mask, with_mask, 0.25, "triton"))


def test_compile_fullgraph_block():
    e, h, s = 32, 2, 13

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(e)
            self.attn = fastclip.nn.MultiheadAttention(e, h, batch_first=True, backend="triton")

        def forward(self, x, pad):
            y = self.ln(x)
            return x + self.attn(y, y, y, key_padding_mask=pad, need_weights=False, is_causal=True)[0]

    block = Block()
    x = torch.randn(2, s, e, requires_grad=True)
    pad = torch.rand(2, s) < 0.2
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    params = [x] + list(block.parameters())
    out = compiled(x, pad)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    out_ref = block(x, pad)
    grads_ref = torch.autograd.grad(out_ref, params, g)
    assert_close("out", out.detach(), out_ref.detach(), rtol=1e-6, atol=1e-6)
    for gr, r in zip(grads, grads_ref):
        assert_close("grad", gr, r, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16/fp16 and full CLIP sizes (skipped without a CUDA GPU)

GPU_SHAPES = [  # (batch, seq, heads, head_dim, mask kind): the towers' shapes, at small batches
    (8, 50, 12, 64, "none"), (4, 197, 12, 64, "none"), (4, 257, 16, 64, "none"), (2, 577, 16, 64, "none"),
    (2, 730, 16, 64, "none"), (4, 257, 16, 80, "none"), (16, 77, 8, 64, "causal"),
    (16, 77, 8, 64, "causal+padding"), (8, 77, 16, 80, "causal+padding"), (4, 197, 12, 64, "all-padded"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s,h,d,mask_kind", GPU_SHAPES)
def test_gpu_clip_shapes(dtype, b, s, h, d, mask_kind):
    leaves = make_qkv(b, s, h, d, dtype, device="cuda")
    causal, mask = make_mask(mask_kind, b, s, s, device="cuda")
    check_against_reference(leaves, causal, mask, "triton", atol_fwd=1e-3, atol_bwd=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 40, 59, 72, 80, 88, 96, 104, 112, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_head_dims(d, dtype):
    leaves = make_qkv(4, 131, 4, d, dtype, device="cuda")
    causal, mask = make_mask("causal+padding", 4, 131, 131, device="cuda")
    atol = 1e-3 if dtype != torch.float32 else 1e-4  # fp32 may run as tf32 when the user allows it
    check_against_reference(leaves, causal, mask, "triton", atol_fwd=atol, atol_bwd=atol)


@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    assert select("flash_attention", "auto", device=torch.device("cuda"), dtype=torch.bfloat16,
                  dim=64).backend == "triton"


def test_bench_smoke(tmp_path):
    from fastclip.bench.attention import main

    csv = tmp_path / "attention.csv"
    assert main(["--case", "text-pad", "--rep", "1", "--csv", str(csv)]) == 0
    text = csv.read_text()
    assert "fastclip-torch" in text and "reference" in text and "causal,pad" in text


def test_triton_expanded_grad_output():
    """out.sum().backward() hands the kernel a stride-0 dO."""
    leaves = make_qkv(1, 20, 2, 16)
    grads = torch.autograd.grad(fastclip.flash_attention(*leaves, causal=True, backend="triton").sum(), leaves)
    hi = upcast(leaves)
    ref = torch.autograd.grad(attention_ref(*hi, causal=True).sum(), hi)
    for name, gr, r in zip(GRAD_NAMES, grads, ref):
        assert_close(name, gr, r, rtol=1e-5, atol=1e-6)


def test_bad_input_messages_in_full():
    """Each refusal's whole message: the argument, what it must be, and every input's shape, dtype and device."""
    q, k, v = [t.detach() for t in make_qkv(2, 5, 3, 8)]
    mask = torch.zeros(2, 5, dtype=torch.bool)

    def fmt(t):
        return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"

    def shapes(a, b, c):
        return f"q {fmt(a)}; k {fmt(b)}; v {fmt(c)}"

    cases = [
        ((q, k.double(), v), {}, TypeError, "q, k and v must have one dtype: " + shapes(q, k.double(), v)),
        ((q, k, v.half()), {}, TypeError, "q, k and v must have one dtype: " + shapes(q, k, v.half())),
        ((q, k.to("meta"), v), {}, ValueError, "q, k and v must be on one device: " + shapes(q, k.to("meta"), v)),
        ((q, k, v.to("meta")), {}, ValueError, "q, k and v must be on one device: " + shapes(q, k, v.to("meta"))),
        ((q, k, v[:, :4]), {}, ValueError,
         "k and v must have the same shape (batch, seq_k, heads, head_dim): " + shapes(q, k, v[:, :4])),
        ((q[:1], k, v), {}, ValueError,
         "q must match k and v in batch, heads and head_dim (dims 0, 2, 3): " + shapes(q[:1], k, v)),
        ((q[:, :, :2], k, v), {}, ValueError,
         "q must match k and v in batch, heads and head_dim (dims 0, 2, 3): " + shapes(q[:, :, :2], k, v)),
        ((q[..., :4], k, v), {}, ValueError,
         "q must match k and v in batch, heads and head_dim (dims 0, 2, 3): " + shapes(q[..., :4], k, v)),
        ((q, k, v), dict(key_padding_mask=[[True]]), TypeError,
         "key_padding_mask must be a torch.Tensor or None, got list"),
        ((q, k, v), dict(key_padding_mask=mask.float()), TypeError,
         "key_padding_mask must be a bool tensor (True = padding key to ignore), got " + fmt(mask.float())),
        ((q, k, v), dict(key_padding_mask=mask[:, :4]), ValueError,
         f"key_padding_mask must be (batch, seq_k) = (2, 5), got {fmt(mask[:, :4])}; k {fmt(k)}"),
        ((q, k, v), dict(key_padding_mask=mask[:1]), ValueError,
         f"key_padding_mask must be (batch, seq_k) = (2, 5), got {fmt(mask[:1])}; k {fmt(k)}"),
        ((q, k, v), dict(key_padding_mask=mask.to("meta")), ValueError, "key_padding_mask is on meta but k is on cpu"),
        ((q, k, v), dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a number or None, got str"),
        ((q, k, v), dict(softmax_scale=True), TypeError, "softmax_scale must be a number or None, got bool"),
        ((q, k, v), dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be finite, got inf"),
        ((q, k, v), dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite, got nan"),
    ]
    for args, kw, exc, message in cases:
        with pytest.raises(exc, match=f"^{re.escape(message)}$"):
            fastclip.flash_attention(*args, **kw)
    # cross-attention (S_q != S_k) and an integer scale are accepted, by the default backend ("auto") too
    out = fastclip.flash_attention(q[:, :2], k, v, softmax_scale=1)
    assert_close("out", out, attention_ref(q[:, :2], k, v, False, None, 1.0), rtol=1e-5, atol=1e-6)
