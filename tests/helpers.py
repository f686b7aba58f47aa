"""Comparison helpers shared by the tests."""
from __future__ import annotations

import torch


def describe_error(name: str, out: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (out.double() - ref.double()).abs()
    if diff.numel() == 0:
        return f"{name}: empty"
    flat = int(torch.nan_to_num(diff, nan=float("inf")).reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (f"{name}: max abs err {diff.max().item():.3e} at {idx} (out {out.reshape(-1)[flat].item():.6g}, "
            f"ref {ref.reshape(-1)[flat].item():.6g}); ref max |.| {ref.abs().max().item():.3e}; "
            f"shape {tuple(out.shape)}")


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float) -> None:
    """|out - ref| <= atol + rtol * max|ref|, elementwise; prints where and how much on failure."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref).any(), f"{name}: NaN in output"
    bound = atol + rtol * ref.double().abs().max().item()
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    assert err <= bound, describe_error(name, out, ref) + f"; bound {bound:.3e}"


def assert_close_to_ref(name: str, out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, *,
                        factor: float, atol: float) -> None:
    """flash-attn's criterion: err(out) <= factor * err(same-dtype PyTorch) + atol, both against ref_hi."""
    err = (out.double() - ref_hi.double()).abs().max().item()
    base = (ref_lo.double() - ref_hi.double()).abs().max().item()
    assert err <= factor * base + atol, (describe_error(name, out, ref_hi)
                                        + f"; same-dtype PyTorch err {base:.3e}, allowed {factor} x that + {atol:g}")


# ---------------------------------------------------------------------------------------------------------------
# Error bounds for reduced precision (fp16/bf16): derived, not guessed.
#
# flash-attn's rule: a fused kernel in dtype X may err against an fp64 reference at most `factor` times as much as
# the same computation done naively in X (inputs rounded to X, every op in X, as PyTorch does it). The naive
# error is measured, so the bound follows the inputs' scale and condition; `atol` only covers results that the
# naive computation gets exactly. `unit_roundoff(dtype)` gives u = 2^-(mantissa bits + 1), the unit of a stated
# bound where no naive computation exists (e.g. LayerNorm: one rounding of an fp32 result, <= u |y|).

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def naive_error(fn, inputs, dtype: torch.dtype) -> float:
    """max |fn(inputs in dtype) - fn(inputs in fp64)|: the error of the naive computation in ``dtype``."""
    lo = fn(*[t.detach().to(dtype) for t in inputs])
    hi = fn(*[t.detach().double() for t in inputs])
    return (lo.double() - hi).abs().max().item()


def assert_within_naive(name: str, out: torch.Tensor, ref_hi: torch.Tensor, naive_err: float, *,
                        factor: float = 2.0, atol: float = 0.0) -> None:
    """flash-attn's criterion with the naive error already measured: |out - ref_hi| <= factor * naive_err + atol."""
    err = (out.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    assert err <= factor * naive_err + atol, (describe_error(name, out, ref_hi)
                                             + f"; naive same-dtype err {naive_err:.3e}, allowed {factor} x that"
                                             + f" + {atol:g}")


# ---------------------------------------------------------------------------------------------------------------
# Feature regimes for loss tests. Each returns unit-norm (image, text), (n, d), rounded to ``dtype`` (the values the
# kernels see; compare against fp64 maths on these same rounded values).


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def confident_features(n: int, d: int, dtype: torch.dtype = torch.float32, *, scale: float = 100.0,
                       mean_p: float = 0.9995, seed: int = 0):
    """A trained model's features: each text a noisy copy of its image, so the diagonal softmax p_ii of
    S = scale * I @ T.T has mean ``mean_p`` (0.9995: late in CLIP training at scale 100), per row from ~1 - 1e-2
    to ~1 (the spread is the noise's). The image-text alignment is found by bisection in fp64 on the fp64
    features, before rounding to ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    img = _unit(torch.randn(n, d, generator=gen, dtype=torch.float64))
    noise = _unit(torch.randn(n, d, generator=gen, dtype=torch.float64))

    def mean_diag_p(w: float) -> float:
        txt = _unit(w * img + noise)
        return (scale * img @ txt.T).softmax(dim=1).diagonal().mean().item()

    lo, hi = 0.0, 1e3  # mean_diag_p grows with the weight w of the image in its text
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_diag_p(mid) < mean_p else (lo, mid)
    txt = _unit(hi * img + noise)
    return img.to(dtype), txt.to(dtype)


def uniform_features(n: int, d: int, dtype: torch.dtype = torch.float32, *, seed: int = 0):
    """All features equal (the start of training, collapsed): every logit is the same, every softmax uniform."""
    gen = torch.Generator().manual_seed(seed)
    v = _unit(torch.randn(1, d, generator=gen, dtype=torch.float64)).expand(n, d)
    return v.to(dtype).clone(), v.to(dtype).clone()


def rel_norm_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (0 when both are 0)."""
    den = ref.double().norm().item()
    num = (out.double() - ref.double()).norm().item()
    return num / den if den else num
