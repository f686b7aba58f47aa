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
