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
