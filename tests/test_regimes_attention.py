"""Cross-attention on every backend: q, k, v distinct, S_q != S_k, k and v with different strides, causal +
padding; near one-hot attention (every query dominated by one key, where dS = P (dP - delta) cancels); and
``fastclip.nn.MultiheadAttention``'s separate-projection branch against torch's, biases included.

Bounds: flash-attn's rule against the fp64 specification (``tests/regimes.py``): at most 2x (output) / 3x
(gradients) the error of the same maths done naively in the inputs' dtype.
"""
import math

import pytest
import torch

import fastclip
from fastclip.nn import MultiheadAttention

from .helpers import assert_within_naive, naive_error, unit_roundoff
from .regimes import attention_spec, cross_attention_inputs, padding_mask, peaked_attention_inputs, \
    runnable_backends

B, H, D = 2, 2, 16
SHAPES = [(5, 13), (13, 5), (1, 7)]  # (S_q, S_k): fewer queries than keys, more, a single query
MASKS = {"none": (False, False), "causal": (True, False), "padding": (False, True), "causal+padding": (True, True)}
DTYPES = [torch.float32, torch.float16]


def _cases():
    """Every backend x dtype x shape x mask; causal + padding (the hardest) at the 2-D shapes in fp32 and at 13x5
    in fp16 run by default, the rest is marked slow."""
    for dtype in DTYPES:
        for backend in runnable_backends("flash_attention", dtype, D):
            for s_q, s_k in SHAPES:
                for mask, (causal, padded) in MASKS.items():
                    fast = mask == "causal+padding" and (s_q, s_k) in (SHAPES[:2] if dtype == torch.float32
                                                                     else [(13, 5)])
                    yield pytest.param(dtype, backend, s_q, s_k, causal, padded,
                                       id=f"{str(dtype)[6:]}-{backend}-{s_q}x{s_k}-{mask}",
                                       marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("dtype,backend,s_q,s_k,causal,padded", list(_cases()))
def test_cross_attention(dtype, backend, s_q, s_k, causal, padded):
    q, k, v, leaves = cross_attention_inputs(B, s_q, s_k, H, D, dtype)
    mask = padding_mask(B, s_k) if padded else None

    def fast(q_, k_, v_, scale):
        return fastclip.flash_attention(q_, k_, v_, causal=causal, key_padding_mask=mask, softmax_scale=scale,
                                        backend=backend)

    check_cross_attention(fast, leaves, causal, mask)


def check_cross_attention(fast, leaves, causal, mask, scale=0.37):
    """fast(q, k, v, scale) on the views of ``leaves`` (from ``cross_attention_inputs``) vs the fp64 spec: output
    and the gradients of the three buffers, by flash-attn's rule. scale is not 1/sqrt(D): a kernel that ignores
    softmax_scale fails."""
    q, packed, v_bhsd = leaves
    dtype = q.dtype

    def views(q_, packed_, v_):
        return q_, packed_[:, :, 1], v_.transpose(1, 2)

    def spec(q_, k_, v_):
        return attention_spec(q_, k_, v_, causal, mask, scale)

    out = fast(*views(*leaves), scale)
    assert out.dtype == dtype and out.shape == q.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    hi_leaves = [t.detach().double().requires_grad_() for t in leaves]
    hi_out = spec(*views(*hi_leaves))
    hi_grads = torch.autograd.grad(hi_out, hi_leaves, dout.double())
    naive = naive_error(spec, views(*leaves), dtype)
    atol = 1e-6 if dtype == torch.float32 else 1e-4  # results the naive computation gets exactly (zero rows)
    assert_within_naive("out", out, hi_out, naive, factor=2, atol=atol)

    lo_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    lo_grads = torch.autograd.grad(spec(*views(*lo_leaves)), lo_leaves, dout)
    # dS = P (dP - delta) cancels, and the naive computation may happen to get it exactly (a query with one
    # visible key has dq = 0 exactly; with padding every query of a batch may be such a query). A kernel computes
    # dP = dO . v_j and delta = dO . O in a different order: allow a few roundings of dP in the dtype plus the
    # fp32 accumulation of D products, times the |q| or |k| that dq = scale dS k and dk = scale dS^T q carry.
    qk_max = max(q.abs().max().item(), packed.abs().max().item())
    d = q.shape[-1]
    terms = scale * dout.abs().max().item() * v_bhsd.abs().max().item() * qk_max
    atol_g = terms * (8 * unit_roundoff(dtype) + 2 * d * unit_roundoff(torch.float32))
    for name, g, hi, lo in zip(("dq", "dk (packed)", "dv"), grads, hi_grads, lo_grads):
        assert g.dtype == dtype and g.shape == hi.shape
        naive_g = (lo.double() - hi).abs().max().item()
        assert_within_naive(name, g, hi, naive_g, factor=3, atol=atol_g)
    assert (grads[1][:, :, 0] == 0).all() and (grads[1][:, :, 2] == 0).all(), "gradient outside k's slot"


@pytest.mark.parametrize("backend", [b for b in runnable_backends("flash_attention", torch.float16, 32)
                                     if b != "reference"])
@pytest.mark.parametrize("peak", [8.0, 12.0, 24.0])
def test_near_one_hot_attention(backend, peak):
    """fp16, each query's softmax dominated by one key (1 - p ~ 1e-2, ~3e-4 = fp16's rounding of 1, ~1e-9): output and
    gradients against fp64 by flash-attn's rule (2x / 3x the naive same-dtype error). The gradients' atol is only the
    fp32 accumulation of D products times the sizes dq = c dS k carries: delta = <dO, O> (from O as stored, as in
    flash-attn) and dP = dO . v_j are separate fp32 sums of the same products once O rounds to v_j exactly."""
    b, s, h, d, dtype = 1, 20, 2, 32, torch.float16
    q, k, v = peaked_attention_inputs(b, s, h, d, peak, dtype)
    scale = 1 / math.sqrt(d)
    out = fastclip.flash_attention(q, k, v, softmax_scale=scale, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def spec(*t):
        return attention_spec(*t, False, None, scale)

    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    hi_out, lo_out = spec(*hi), spec(*lo)
    assert_within_naive("out", out, hi_out, (lo_out.double() - hi_out).abs().max().item(), factor=2,
                        atol=unit_roundoff(dtype) * 1e-3)
    hi_grads = torch.autograd.grad(hi_out, hi, dout.double())
    lo_grads = torch.autograd.grad(lo_out, lo, dout)
    terms = scale * dout.abs().max().item() * v.abs().max().item() * max(q.abs().max().item(), k.abs().max().item())
    atol = terms * 2 * d * unit_roundoff(torch.float32)
    for name, g, h_, l_ in zip(("dq", "dk", "dv"), grads, hi_grads, lo_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert_within_naive(name, g, h_, (l_.double() - h_).abs().max().item(), factor=3, atol=atol)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_separate_projections_equal_torch(batch_first, causal):
    """query, key, value three tensors (S_q != S_k), non-zero biases: the separate-projection branch, vs torch's."""
    e, heads, s_q, s_k, b = 32, 4, 5, 9, 3
    ref = torch.nn.MultiheadAttention(e, heads, batch_first=batch_first, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = MultiheadAttention(e, heads, batch_first=batch_first, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict(), strict=True)

    def seq_first(x):
        return x if batch_first else x.transpose(0, 1).contiguous()

    query = seq_first(torch.randn(b, s_q, e, dtype=torch.float64))
    key = seq_first(torch.randn(b, s_k, e, dtype=torch.float64))
    value = seq_first(torch.randn(b, s_k, e, dtype=torch.float64))
    pad = padding_mask(b, s_k, empty_row=False)
    pad[:, 0] = False  # every query sees key 0, so torch's output is defined everywhere (no NaN rows)
    attn_mask = torch.ones(s_q, s_k, dtype=torch.bool).triu(1) if causal else None  # torch: True = masked
    out, _ = ours(query, key, value, key_padding_mask=pad, attn_mask=attn_mask, need_weights=False,
                  is_causal=causal)
    ref_out, _ = ref(query, key, value, key_padding_mask=pad, attn_mask=attn_mask, need_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), list(ours.parameters()))
    ref_grads = torch.autograd.grad(ref_out.sum(), list(ref.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
