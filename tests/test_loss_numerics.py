"""The losses where training actually runs: confident features (p_ii -> 1 at scale 100), collapsed (uniform)
features, label smoothing, partial tiles; every backend and dtype against fp64 maths on the same rounded inputs.

The confident criterion is beyond open_clip on purpose (its own fp16/bf16 gradients are 7-100% off there): feature
and logit_scale gradients within 1% (relative norm) of fp64. Elsewhere: at most 2x open_clip's error in that
dtype plus an absolute floor.
"""
import pytest
import torch

import fastclip
from fastclip.ops.contrastive.reference import contrastive_loss_ref
from fastclip.ops.siglip.reference import siglip_loss_ref

from .helpers import confident_features, rel_norm_err, uniform_features

open_clip_loss = pytest.importorskip("open_clip.loss")

# (backend, dtype): the torch backend runs bf16 on the CPU; Triton's interpreter has no bf16 dot
# (the interpreter is slow: Triton fp32, where these paths have no rounding to lose, runs with the slow tests)
CASES = [("torch", torch.float32), ("torch", torch.float16), ("torch", torch.bfloat16),
         pytest.param("triton", torch.float32, marks=pytest.mark.slow), ("triton", torch.float16)]
SIGLIP_CASES = CASES[:3] + [pytest.param("triton", dt, marks=pytest.mark.slow) for dt in (torch.float32, torch.float16)]
N = 40  # partial row and column blocks at the interpreter's 16 x 32 tiles


GRAD_SCALE = 2.0 ** 12  # a GradScaler-like loss scale: unscaled fp16 gradients of a confident loss are subnormal


def _grads(fn, img, txt, scale, *extra):
    """Loss and the gradients of GRAD_SCALE * loss, as a loss-scaled fp16 training step makes them."""
    leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()]
    loss = fn(*leaves, *extra)
    return loss.detach(), torch.autograd.grad(loss * GRAD_SCALE, leaves)


def _check_within(grads, ref, tol):
    for name, g, r in zip(("d_image", "d_text", "d_logit_scale"), grads, ref):
        err = rel_norm_err(g, r)
        assert err <= tol, f"{name}: relative norm error {err:.3e} > {tol}"


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("d", [32, 48])  # one D slice / several (Triton backward)
def test_contrastive_confident(backend, dtype, d):
    img, txt = confident_features(N, d, dtype, mean_p=0.99999, seed=d)
    p = (100 * img.double() @ txt.double().T).softmax(dim=1).diagonal()
    assert p.mean() > 0.999
    scale = torch.tensor(100.0, dtype=dtype)
    ref_loss, ref = _grads(contrastive_loss_ref, img.double(), txt.double(), scale.double())
    loss, grads = _grads(lambda *x: fastclip.contrastive_loss(*x, backend=backend), img, txt, scale)
    _check_within(grads, ref, 1e-2)
    # the loss (~1e-5 here) too: a plain lse_i - S_ii would be all rounding
    assert abs(loss.double() - ref_loss).item() <= 1e-2 * ref_loss.item()


@pytest.mark.parametrize("backend,dtype", CASES)
def test_contrastive_confident_label_smoothing(backend, dtype):
    img, txt = confident_features(N, 32, dtype, mean_p=0.99999, seed=1)
    scale = torch.tensor(100.0, dtype=dtype)
    _, ref = _grads(lambda *x: contrastive_loss_ref(*x, label_smoothing=0.1), img.double(), txt.double(),
                    scale.double())
    _, grads = _grads(lambda *x: fastclip.contrastive_loss(*x, label_smoothing=0.1, backend=backend), img, txt, scale)
    _check_within(grads, ref, 1e-2)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_contrastive_uniform(backend, dtype, eps):
    """Collapsed features: every logit equal, every gradient ~0. Within 2x open_clip's error (+ a floor)."""
    img, txt = uniform_features(N, 48, dtype, seed=2)
    scale = torch.tensor(100.0, dtype=dtype)
    _, ref = _grads(lambda *x: contrastive_loss_ref(*x, label_smoothing=eps), img.double(), txt.double(),
                    scale.double())
    _, lo = _grads(open_clip_loss.ClipLoss(), img, txt, scale) if not eps else _grads(
        lambda *x: contrastive_loss_ref(*x, label_smoothing=eps), img, txt, scale)
    _, grads = _grads(lambda *x: fastclip.contrastive_loss(*x, label_smoothing=eps, backend=backend), img, txt,
                      scale)
    for name, g, r, o in zip(("d_image", "d_text", "d_logit_scale"), grads, ref, lo):
        err = (g.double() - r).abs().max().item()
        base = (o.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-4, f"{name}: err {err:.3e}, open_clip {base:.3e}"


def test_triton_forward_is_bitwise_deterministic():
    img, txt = confident_features(N, 48, torch.float16, seed=3)
    scale = torch.tensor(100.0, dtype=torch.float16)
    runs = [torch.ops.fastclip.contrastive_loss_fwd(img, txt, scale, None, 0.0, "triton", 0) for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x.view(torch.int32) if x.dtype == torch.float32 else x, y.view(torch.int32)
                           if y.dtype == torch.float32 else y)


def _siglip_confident(d, dtype, seed):
    """Features with a margin and the bias between: every positive logit > 0 > every negative one, at scale 100."""
    img, txt = confident_features(N, d, dtype, mean_p=0.999999, seed=seed)
    cos = img.double() @ txt.double().T
    pos = cos.diagonal()
    neg = cos.masked_fill(torch.eye(N, dtype=torch.bool), -1.0).amax()
    assert pos.min() > neg, "no margin: raise d or mean_p"
    return img, txt, torch.tensor(-100.0 * (pos.min() + neg).item() / 2, dtype=dtype)


@pytest.mark.parametrize("backend,dtype", SIGLIP_CASES)
def test_siglip_confident(backend, dtype):
    img, txt, bias = _siglip_confident(128, dtype, seed=4)
    scale = torch.tensor(100.0, dtype=dtype)
    _, ref = _grads(siglip_loss_ref, img.double(), txt.double(), scale.double(), bias.double())
    _, grads = _grads(lambda i, t, s, b: fastclip.siglip_loss(i, t, s, b, backend=backend), img, txt, scale, bias)
    _check_within(grads, ref, 1e-2)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_siglip_uniform(backend, dtype):
    """Collapsed features, SigLIP's initial scale and bias: within 2x open_clip's error in that dtype (+ a floor)."""
    img, txt = uniform_features(N, 48, dtype, seed=5)
    scale, bias = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    _, ref = _grads(siglip_loss_ref, img.double(), txt.double(), scale.double(), bias.double())
    oc = open_clip_loss.SigLipLoss()
    _, lo = _grads(lambda i, t, s, b: oc(i, t, s, b), img, txt, scale, bias)
    _, grads = _grads(lambda i, t, s, b: fastclip.siglip_loss(i, t, s, b, backend=backend), img, txt, scale, bias)
    for name, g, r, o in zip(("d_image", "d_text", "d_logit_scale"), grads, ref, lo):
        err = (g.double() - r).abs().max().item()
        base = (o.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-4 * (1 + r.abs().max().item()), f"{name}: err {err:.3e}, open_clip {base:.3e}"
