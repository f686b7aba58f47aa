"""Autocast and fp32 precision: every loss and attention backend under torch.autocast, for any input dtype.

Under autocast open_clip's `logit_scale * image @ text.T` (and SDPA) run their GEMMs in the autocast dtype, so
AMP training hands the loss fp32 features (F.normalize returns fp32 there) and expects bf16/fp16 tensor-core
GEMMs. These tests check, on the CPU, which dtype reaches each backend's kernels, that the values and gradients
match open_clip's under the same autocast, and that fp32 outside autocast follows
torch.get_float32_matmul_precision().
"""
import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

import fastclip
from fastclip.ops import attention as attention_op
from fastclip.ops import contrastive as contrastive_op
from fastclip.ops import siglip as siglip_op

# (autocast dtype, backends that run it on the CPU): the interpreter has no bf16, so triton runs fp16 autocast
CASES = [(torch.bfloat16, "reference"), (torch.bfloat16, "torch"), (torch.float16, "reference"),
         (torch.float16, "torch"), (torch.float16, "triton")]
FEATURE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# every (autocast dtype, backend, feature dtype) the CPU runs (bf16 features never reach the interpreter's triton)
LOSS_CASES = [(amp, b, f) for amp, b in CASES for f in FEATURE_DTYPES if not (b == "triton" and f == torch.bfloat16)]


def _record_impl(monkeypatch, module, n_inputs):
    """Wrap the op's backend lookup so each forward call records the dtypes of the ``n_inputs`` tensors its
    backend receives first (features, or q, k, v), and every call checks autocast is off inside the backend."""
    seen = []
    real = module._impl

    def impl(backend, which):
        fn = real(backend, which)

        def run(*args, **kwargs):
            if which == 0:
                seen.append(tuple(a.dtype for a in args[:n_inputs]))
            assert not torch.is_autocast_enabled("cpu"), "a backend ran with autocast on"
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(module, "_impl", impl)
    return seen


def _features(n, d, dtype):
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).to(dtype).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).to(dtype).requires_grad_()
    return img, txt


def _run(fn, img, txt, amp):
    img.grad = txt.grad = None
    with torch.autocast("cpu", dtype=amp):
        loss = fn(img, txt)
    loss.backward()
    return loss, img.grad.clone(), txt.grad.clone()


@pytest.mark.parametrize("amp,backend,feat_dtype", LOSS_CASES)
def test_contrastive_under_autocast(monkeypatch, amp, backend, feat_dtype):
    seen = _record_impl(monkeypatch, contrastive_op, 2)
    img, txt = _features(37, 24, feat_dtype)
    scale = torch.tensor(30.0)
    ours = _run(lambda i, t: fastclip.contrastive_loss(i, t, scale, backend=backend), img, txt, amp)
    theirs = _run(lambda i, t: ClipLoss()(i, t, scale), img, txt, amp)
    assert ours[0].dtype == theirs[0].dtype == torch.float32  # cross_entropy returns fp32 under autocast
    assert ours[1].dtype == feat_dtype and ours[2].dtype == feat_dtype
    if backend != "reference":
        assert seen and all(d == (amp, amp) for d in seen), seen
    # open_clip rounds the logits to the autocast dtype; fastclip accumulates them in fp32: compare both with fp64
    # on the inputs as the GEMM sees them (rounded to the autocast dtype)
    hi = _run(lambda i, t: ClipLoss()(i.to(amp).double(), t.to(amp).double(), scale.double()),
              img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_(), torch.bfloat16)
    for k, name in enumerate(["loss", "d_image", "d_text"]):
        err_ours = (ours[k].double() - hi[k].double()).abs().max().item()
        err_theirs = (theirs[k].double() - hi[k].double()).abs().max().item()
        assert err_ours <= 2 * err_theirs + 1e-3 * hi[k].double().abs().max().item() + 1e-6, \
            (name, err_ours, err_theirs)


@pytest.mark.parametrize("amp,backend,feat_dtype", LOSS_CASES)
def test_siglip_under_autocast(monkeypatch, amp, backend, feat_dtype):
    seen = _record_impl(monkeypatch, siglip_op, 2)
    img, txt = _features(29, 16, feat_dtype)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    ours = _run(lambda i, t: fastclip.siglip_loss(i, t, scale, bias, backend=backend), img, txt, amp)
    theirs = _run(lambda i, t: SigLipLoss()(i, t, scale, bias), img, txt, amp)
    # open_clip's SigLIP: the autocast-dtype logits times labels in the features' dtype
    assert ours[0].dtype == theirs[0].dtype == torch.promote_types(feat_dtype, amp)
    if backend != "reference":
        assert seen and all(d == (amp, amp) for d in seen), seen
    hi = _run(lambda i, t: SigLipLoss()(i.to(amp).double(), t.to(amp).double(), scale.double(), bias.double()),
              img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_(), torch.bfloat16)
    for k, name in enumerate(["loss", "d_image", "d_text"]):
        err_ours = (ours[k].double() - hi[k].double()).abs().max().item()
        err_theirs = (theirs[k].double() - hi[k].double()).abs().max().item()
        floor = 1e-2 * hi[k].double().abs().max().item() if feat_dtype != torch.float32 else 1e-3 * \
            hi[k].double().abs().max().item()
        assert err_ours <= 2 * err_theirs + floor + 1e-6, (name, err_ours, err_theirs)


def test_siglip_module_under_cpu_autocast_does_not_crash():
    # the regression: "mat1 and mat2 must have the same dtype" in the torch backend's addmm_ under CPU autocast
    img, txt = _features(9, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastclip.SigLIPLoss()(img, txt, torch.tensor(10.0), torch.tensor(-5.0))
    loss.backward()
    assert torch.isfinite(loss) and img.grad.dtype == torch.float32 and torch.isfinite(img.grad).all()


@pytest.mark.parametrize("amp,backend", CASES)
def test_attention_under_autocast(monkeypatch, amp, backend):
    seen = _record_impl(monkeypatch, attention_op, 3)
    q, k, v = (torch.randn(2, 13, 2, 16, requires_grad=True) for _ in range(3))
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=amp):
        out = fastclip.flash_attention(q, k, v, causal=True, backend=backend)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in ref_leaves), is_causal=True).transpose(1, 2)
    assert out.dtype == ref.dtype == amp  # SDPA runs in the autocast dtype and returns it
    dout = torch.randn(out.shape)
    out.float().backward(dout)
    ref.float().backward(dout)
    if backend == "triton":
        assert seen and all(d == (amp, amp, amp) for d in seen), seen
    tol = 2e-2 if amp == torch.bfloat16 else 4e-3
    assert (out.float() - ref.float()).abs().max().item() < tol
    for name, leaf, r in zip("qkv", (q, k, v), ref_leaves):  # the causal mask reaches the backward too
        assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all(), name
        assert (leaf.grad - r.grad).abs().max().item() < 4 * tol * (1 + r.grad.abs().max().item()), name


def test_fp32_follows_float32_matmul_precision():
    from fastclip.ops.contrastive.triton import _input_precision

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _input_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("medium")
        assert _input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


def test_fp64_is_never_cast_by_autocast():
    img, txt = _features(7, 8, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastclip.contrastive_loss(img, txt, 10.0, backend="torch")
    assert loss.dtype == torch.float64
    ref = ClipLoss()(img, txt, torch.tensor(10.0, dtype=torch.float64))
    assert abs(loss.item() - ref.item()) < 1e-12


@pytest.mark.parametrize("scale", [np.float32(14.0), np.float64(14.0), np.int64(14)])
def test_numpy_scalar_logit_scale(scale):
    img, txt = _features(5, 8, torch.float32)
    a = fastclip.contrastive_loss(img, txt, scale)
    b = fastclip.contrastive_loss(img, txt, 14.0)
    assert a.item() == b.item()
    with pytest.raises(TypeError, match="logit_scale"):
        fastclip.contrastive_loss(img, txt, np.bool_(True))


def test_bad_backend_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTCLIP_BACKEND", "bogus")
    img, txt = _features(5, 8, torch.float32)
    with pytest.raises(ValueError, match="FASTCLIP_BACKEND='bogus'"):
        fastclip.contrastive_loss(img, txt, 10.0)
