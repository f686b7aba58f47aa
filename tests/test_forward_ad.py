"""Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad). The fused backends run as PyTorch custom ops, which
have no forward-mode rule: PyTorch would drop the tangent without an error (a zero derivative from jvp, a missing
one from forward_ad). Every op refuses it there, naming the argument that carries the tangent, and the reference
backend (plain PyTorch) computes it. (The PyTorch attention backend is SDPA, which raises its own error on the CPU.)
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastclip

N, D = 7, 16
MESSAGE = r"^{}: forward-mode AD \(torch.func.jvp, torch.autograd.forward_ad\) does not run through backend '{}', " \
          r"which would drop the tangent that {} carries; use backend='reference'"


def _features():
    return F.normalize(torch.randn(N, D, dtype=torch.float64), dim=-1), \
        F.normalize(torch.randn(N, D, dtype=torch.float64), dim=-1)


def _ops():
    img, txt = _features()
    q, k, v = (torch.randn(2, 5, 2, D, dtype=torch.float64) for _ in range(3))
    return [
        ("contrastive_loss", "image_features", (img, txt),
         lambda b: lambda i, t: fastclip.contrastive_loss(i, t, 10.0, label_smoothing=0.1, backend=b)),
        ("siglip_loss", "image_features", (img, txt),
         lambda b: lambda i, t: fastclip.siglip_loss(i, t, 10.0, -5.0, backend=b)),
        ("topk_similarity", "queries", (img, txt),
         lambda b: lambda i, t: fastclip.topk_similarity(i, t, 3, backend=b)[0]),
        ("flash_attention", "q", (q, k, v),
         lambda b: lambda *x: fastclip.flash_attention(*(t.float() if b == "triton" else t for t in x), causal=True,
                                                       backend=b)),  # Triton takes no fp64
    ]


@pytest.mark.parametrize("index", range(4), ids=["contrastive", "siglip", "topk", "attention"])
def test_fused_backends_refuse_forward_ad_and_reference_computes_it(index):
    op, first, primals, make = _ops()[index]
    tangents = tuple(torch.randn_like(p) for p in primals)
    fused = "triton" if op == "flash_attention" else "torch"  # the attention torch backend is SDPA: see below
    with pytest.raises(NotImplementedError, match=MESSAGE.format(op, fused, first)):
        torch.func.jvp(make(fused), primals, tangents)
    # only the second input carries a tangent: it is the one named
    second = "text_features" if op in ("contrastive_loss", "siglip_loss") else ("gallery" if op == "topk_similarity"
                                                                                 else "k")
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=MESSAGE.format(op, fused, second)):
        make(fused)(primals[0], fwAD.make_dual(primals[1], tangents[1]), *primals[2:])
    # the reference backend's tangent is the directional derivative (central difference, fp64)
    _, jvp = torch.func.jvp(make("reference"), primals, tangents)
    h = 1e-6
    plus = make("reference")(*(p + h * t for p, t in zip(primals, tangents)))
    minus = make("reference")(*(p - h * t for p, t in zip(primals, tangents)))
    torch.testing.assert_close(jvp, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-8)
    if op == "flash_attention":  # the torch backend is SDPA, whose CPU kernel refuses forward AD itself
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch.func.jvp(make("torch"), primals, tangents)


def test_plain_calls_and_reverse_mode_are_untouched():
    """No tangent anywhere: the fused path runs as before (values and reverse-mode gradients equal the reference)."""
    img, txt = (t.requires_grad_() for t in _features())
    for b in ("torch", "reference"):
        loss = fastclip.contrastive_loss(img, txt, 10.0, backend=b)
        grads = torch.autograd.grad(loss, (img, txt))
        if b == "torch":
            fused = (loss, grads)
    torch.testing.assert_close(fused[0], loss)
    torch.testing.assert_close(fused[1], grads)


@pytest.mark.parametrize("op", ["contrastive_loss", "siglip_loss"])
@pytest.mark.parametrize("which", ["logit_scale", "logit_bias"])
def test_a_tangent_on_a_scalar_is_refused_too(op, which):
    """d loss / d logit_scale (or logit_bias) by forward mode: the scalar alone carries the tangent."""
    img, txt = _features()
    scalars = {"logit_scale": torch.tensor(10.0, dtype=torch.float64),
               "logit_bias": torch.tensor(-5.0, dtype=torch.float64)}
    with fwAD.dual_level():
        scalars[which] = fwAD.make_dual(scalars[which], torch.ones((), dtype=torch.float64))
        with pytest.raises(NotImplementedError, match=MESSAGE.format(op, "torch", which)):
            getattr(fastclip, op)(img, txt, scalars["logit_scale"], scalars["logit_bias"], backend="torch")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_attention_names_the_input_with_the_tangent(which):
    x = {name: torch.randn(2, 5, 2, D) for name in ("q", "k", "v")}
    with fwAD.dual_level():
        x[which] = fwAD.make_dual(x[which], torch.randn(2, 5, 2, D))
        with pytest.raises(NotImplementedError, match=MESSAGE.format("flash_attention", "triton", which)):
            fastclip.flash_attention(x["q"], x["k"], x["v"], backend="triton")
