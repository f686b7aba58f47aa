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
import fastclip.nn as fnn
from fastclip.nn import MultiheadAttention

from .helpers import assert_close, assert_within_naive, naive_error, unit_roundoff
from .regimes import attention_spec, cross_attention_inputs, padding_mask, peaked_attention_inputs, \
    runnable_backends
from .test_nn import E, _causal, _pair, fused_calls  # noqa: F401 (fused_calls: a fixture)

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
    # factor 4, not flash-attn's 3: the naive error is itself one random sample, and over 200 seeds x 3 peaks the
    # kernel's dq/dk error reached 3.35x it (at peaks 8 and 12, where both round P to fp16 differently)
    for name, g, h_, l_ in zip(("dq", "dk", "dv"), grads, hi_grads, lo_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert_within_naive(name, g, h_, (l_.double() - h_).abs().max().item(), factor=4, atol=atol)


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


# ---------------------------------------------------------------------------------------------------------------
# fastclip.nn.MultiheadAttention: when it runs the kernel and when torch's path (whose result it must then be)


def _torch_result(ref, ours, x, kw, fused_calls, *, fused):
    """ours(x, x, x, **kw) vs torch's layer: within fp64 rounding when fused, else torch's own result (NaN rows
    included), bit for bit; and it was fused or not as stated."""
    out, out_r = ours(x, x, x, **kw)[0], ref(x, x, x, **kw)[0]
    assert len(fused_calls) == int(fused), "fused" if fused else "torch's path"
    fused_calls.clear()
    if fused:
        assert_close("out", out.detach(), out_r.detach(), rtol=1e-10, atol=1e-10)
    else:
        assert torch.equal(out.isnan(), out_r.isnan()) and torch.equal(out.nan_to_num(), out_r.nan_to_num())
    return out, out_r


def test_mask_memo_is_bounded():
    """The memo of mask facts keeps the 16 newest masks (a caller cycling through masks does not grow it), and
    an inference tensor (no version counter) is read every time."""
    facts = fnn._MaskFacts()
    masks = [torch.zeros(3) for _ in range(17)]
    reads = []

    def ask(i, t=None):
        return facts.get(masks[i] if t is None else t, ("q",), lambda: reads.append(i) or i)

    assert [ask(i) for i in range(17)] == list(range(17))
    assert ask(16) == 16 and ask(1) == 1 and reads == list(range(17)), "the 16 newest are remembered"
    assert ask(0) == 0 and reads[-1] == 0 and len(reads) == 18, "the oldest was dropped"
    assert len(facts._entries) == 16
    with torch.inference_mode():
        frozen = torch.zeros(3)
    assert ask(-1, frozen) == ask(-1, frozen) == -1 and reads[-2:] == [-1, -1]


def test_causal_pattern_on_the_masks_device(monkeypatch):
    """The causal pattern is built on the mask's device (no cross-device comparison)."""
    assert torch.equal(fnn.causal_pattern(2, 4, "cpu"), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]).bool())
    assert fnn.causal_pattern(2, 4, torch.device("meta")).device.type == "meta"
    devices = []
    real = fnn.causal_pattern
    monkeypatch.setattr(fnn, "causal_pattern", lambda n_q, n_k, device: devices.append(device) or real(n_q, n_k,
                                                                                                     device))
    assert fnn._is_causal_mask(_causal(3, 5, "float", torch.float32), 3, 5, torch.float32)
    assert devices == [torch.device("cpu")]


def test_under_compile_mask_values_are_not_read(monkeypatch, fused_calls):
    """While torch.compile traces (simulated here: torch.compiler.is_compiling() is True) no mask value is read:
    a float attn_mask or key_padding_mask, causal or not, goes to torch's path; a bool padding mask with the
    causal hint (and no attn_mask) stays fused."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    b, s = 2, 6
    ref, ours = _pair(batch_first=True)
    x = torch.randn(b, s, E, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, -2:] = True
    float_pad = torch.zeros(b, s, dtype=torch.float64).masked_fill(pad, float("-inf"))
    for kw in (dict(attn_mask=torch.randn(s, s, dtype=torch.float64)),
               dict(attn_mask=_causal(s, s, "float", torch.float64)), dict(key_padding_mask=float_pad)):
        _torch_result(ref, ours, x, dict(kw, need_weights=False), fused_calls, fused=False)
    # with a padding mask torch reads attn_mask's values, not the hint: stay fused by passing no attn_mask
    out = ours(x, x, x, key_padding_mask=pad, is_causal=True, need_weights=False)[0]
    assert len(fused_calls) == 1 and fused_calls[0]["causal"]
    out_r = ref(x, x, x, key_padding_mask=pad, attn_mask=_causal(s, s, "bool", None), need_weights=False)[0]
    assert_close("out", out.detach(), out_r.detach(), rtol=1e-10, atol=1e-10)


def test_one_padding_mask_causal_and_not(fused_calls):
    """Autograd off, one bool padding mask that pads key 0 of a row (no row all padding): without the causal mask
    every query sees a key (fused); with it the row's first query sees none, so torch's path (NaN there, as torch's
    native path gives). The memo must not answer the second question with the first's answer."""
    b, s = 3, 7
    ref, ours = _pair(batch_first=True)
    ref.eval(), ours.eval()
    x = torch.randn(b, s, E, dtype=torch.float64)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, 0] = pad[2, 3:] = True
    with torch.no_grad():
        _torch_result(ref, ours, x, dict(key_padding_mask=pad, need_weights=False), fused_calls, fused=True)
        out, _ = _torch_result(ref, ours, x, dict(key_padding_mask=pad, attn_mask=_causal(s, s, "bool", None),
                                                  need_weights=False), fused_calls, fused=False)
    assert out[0, 0].isnan().all() and not out[1:].isnan().any()


def test_frozen_layer_with_grad_enabled_is_torchs_native_path(fused_calls):
    """Parameters frozen (requires_grad=False) but grad mode on: torch's native inference path still runs and
    gives NaN to a query that sees no key, so such a mask goes to torch."""
    b, s = 2, 5
    ref, ours = _pair(batch_first=True)
    ref.eval().requires_grad_(False), ours.eval().requires_grad_(False)
    x = torch.randn(b, s, E, dtype=torch.float64)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1] = True
    out, _ = _torch_result(ref, ours, x, dict(key_padding_mask=pad, need_weights=False), fused_calls, fused=False)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_from_torch_keeps_every_option():
    """from_torch copies the configuration (add_zero_attn, dropout, batch_first) with torch's results, defaults to
    backend "auto", and refuses what it cannot hold: a non-MultiheadAttention, or state (an extra parameter of a
    subclass) it would drop."""
    ref = torch.nn.MultiheadAttention(E, H, dropout=0.2, add_zero_attn=True, batch_first=True,
                                      dtype=torch.float64).eval()
    ours = MultiheadAttention.from_torch(ref)
    assert ours.backend == "auto" and ours.add_zero_attn and ours.dropout == 0.2 and ours.batch_first
    x = torch.randn(2, 5, E, dtype=torch.float64)
    assert torch.equal(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention, got Linear"):
        MultiheadAttention.from_torch(torch.nn.Linear(2, 2))

    class Tagged(torch.nn.MultiheadAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.temperature = torch.nn.Parameter(torch.ones(()))

    with pytest.raises(RuntimeError, match="temperature"):
        MultiheadAttention.from_torch(Tagged(E, H))


def test_key_is_value_or_query_is_key(fused_calls):
    """A decoder's cross-attention passes one memory tensor as key and value (query is not key), and a layer may
    get query is key with another value: neither is self-attention, whose packed projection would be wrong."""
    ref, ours = _pair()  # torch's defaults: sequence first
    query = torch.randn(5, 2, E, dtype=torch.float64)
    memory = torch.randn(8, 2, E, dtype=torch.float64)
    value = torch.randn(5, 2, E, dtype=torch.float64)
    for q, k, v in ((query, memory, memory), (query, query, value)):
        out = ours(q, k, v, need_weights=False)[0]
        assert_close("out", out.detach(), ref(q, k, v, need_weights=False)[0].detach(), rtol=1e-10, atol=1e-10)
    assert len(fused_calls) == 2


@pytest.mark.parametrize("batch_first,shape", [(False, (6, 2, E)), (True, (2, 6, E)), (True, (6, E))])
def test_is_causal_alone_on_torchs_path(batch_first, shape, fused_calls):
    """is_causal=True without attn_mask (fastclip's extension) on torch's path (need_weights=True): the causal
    (L, S) mask is built from the sequence dim of the layout (sequence first, batch first, unbatched), on the
    input's device."""
    ref, ours = _pair(batch_first=batch_first)
    x = torch.randn(shape, dtype=torch.float64)
    seq = 1 if batch_first and x.dim() == 3 else 0
    (out, w), (out_r, w_r) = ours(x, x, x, is_causal=True), ref(x, x, x, attn_mask=_causal(6, 6, "bool", None))
    assert torch.equal(out, out_r) and torch.equal(w, w_r) and x.shape[seq] == 6 and not fused_calls
    meta = MultiheadAttention(E, H, batch_first=batch_first, device="meta")
    assert meta(x.to("meta"), x.to("meta"), x.to("meta"), is_causal=True)[0].shape == shape


def test_is_causal_hint_reaches_torch(fused_calls):
    """On torch's path the is_causal hint is torch's: with attn_mask and no padding torch trusts it and never
    reads the mask (here an all-zero float mask, so the hint alone makes attention causal)."""
    ref, ours = _pair(kdim=24, vdim=24)  # separate k/v sizes: torch's path
    q = torch.randn(5, 2, E, dtype=torch.float64)
    kv = torch.randn(5, 2, 24, dtype=torch.float64)
    kw = dict(need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.float64), is_causal=True)
    out, out_r = ours(q, kv, kv, **kw)[0], ref(q, kv, kv, **kw)[0]
    assert torch.equal(out, out_r) and not fused_calls
    assert not torch.equal(out, ref(q, kv, kv, need_weights=False, attn_mask=kw["attn_mask"])[0])


def test_forward_defaults_are_torchs(fused_calls):
    """ours(q, k, v) with torch's defaults (need_weights=True, average_attn_weights=True, sequence first): torch's
    output and head-averaged (B, L, S) weights, exactly."""
    ref, ours = _pair()
    q, kv = torch.randn(4, 2, E, dtype=torch.float64), torch.randn(6, 2, E, dtype=torch.float64)
    (out, w), (out_r, w_r) = ours(q, kv, kv), ref(q, kv, kv)
    assert w.shape == (2, 4, 6) and torch.equal(out, out_r) and torch.equal(w, w_r) and not fused_calls


def test_layer_backend_reaches_the_kernel():
    """The layer's backend is the kernel's: an explicit backend that cannot run the inputs raises, as
    fastclip.flash_attention does, instead of another backend running silently."""
    x = torch.randn(2, 3, E, dtype=torch.bfloat16)
    layer = MultiheadAttention(E, H, batch_first=True, dtype=torch.bfloat16, backend="triton")
    with pytest.raises(fastclip.BackendError, match="'triton' cannot run these inputs"):
        layer(x, x, x, need_weights=False)  # CPU bf16: the interpreter does not run bf16; with a GPU, not CPU


# ---------------------------------------------------------------------------------------------------------------
# the "torch" backend: what it hands F.scaled_dot_product_attention, and rows that see no key


@pytest.mark.parametrize("s_q,s_k,causal,padded,sdpa_causal", [
    (6, 6, True, False, True),  # causal self-attention: SDPA's is_causal (its flash kernel may run), no mask
    (6, 6, False, False, False), (4, 9, False, False, False),  # no mask at all
    (4, 9, True, False, False), (9, 4, True, False, False),  # S_q != S_k: an explicit top-left mask
    (6, 6, True, True, False), (4, 9, False, True, False)])
def test_torch_backend_calls_sdpa(monkeypatch, s_q, s_k, causal, padded, sdpa_causal):
    """SDPA gets is_causal=True only where its alignment cannot matter (S_q = S_k, no padding), a boolean mask
    only where there is something to mask, and softmax_scale in every case; the result is the specification's."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v, leaves = cross_attention_inputs(2, s_q, s_k, H, D, torch.float64)
    mask = padding_mask(2, s_k) if padded else None
    out = fastclip.flash_attention(q, k, v, causal=causal, key_padding_mask=mask, softmax_scale=0.37,
                                   backend="torch")
    (kw,) = calls
    assert kw["scale"] == 0.37 and bool(kw.get("is_causal")) == sdpa_causal
    assert (kw.get("attn_mask") is None) == (sdpa_causal or not (causal or padded))
    if sdpa_causal or not (causal or padded):
        check_cross_attention(lambda q_, k_, v_, scale: fastclip.flash_attention(
            q_, k_, v_, causal=causal, key_padding_mask=mask, softmax_scale=scale, backend="torch"), leaves, causal,
            mask)
    else:
        assert_close("out", out, attention_spec(q, k, v, causal, mask, 0.37), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, True)])
def test_torch_backend_nan_query_that_sees_no_key(causal, padded):
    """A query holding NaN (in one head) gets NaN in that head, unless it sees no key: then it ignores every score,
    its own NaN included, and gets zeros (as the kernels do)."""
    q, k, v = [t.detach() for t in cross_attention_inputs(2, 5, 7, H, D, torch.float64)[:3]]
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1] = True  # batch 1 sees no key
    q[:, 2, 0, 3] = float("nan")
    out = fastclip.flash_attention(q, k, v, causal=causal, key_padding_mask=mask if padded else None,
                                   backend="torch")
    assert out[0, 2, 0].isnan().all() and (out[1] == 0).all() if padded else out[:, 2, 0].isnan().all()
    assert not out[0, :2].isnan().any() and not out[0, 3:].isnan().any() and not out[:, :, 1].isnan().any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q,s_k", [(4, 9), (9, 4)])
def test_sdpa_mask(causal, s_q, s_k):
    """sdpa_mask: SDPA's (B, 1, S_q, S_k) mask, True = attend, and the (B, 1, S_q, 1) queries that see no key;
    those rows are all True in the mask, so that no SDPA kernel meets a fully masked row. Built on the padding
    mask's device."""
    from fastclip.ops.attention.pytorch import attention_sdpa, sdpa_mask

    pad = padding_mask(3, s_k)
    pad[2] = True  # batch 2 sees no key
    attend, empty = sdpa_mask(pad, causal, s_q)
    see = ~pad[:, None, None, :] & (torch.arange(s_k) <= torch.arange(s_q)[:, None] if causal
                                    else torch.ones(s_q, s_k, dtype=torch.bool))  # (B, 1, S_q, S_k)
    want_empty = ~see.any(-1, keepdim=True)
    assert attend.shape == (3, 1, s_q, s_k) and empty.shape == (3, 1, s_q, 1)
    assert torch.equal(empty, want_empty) and empty[2].all() and not empty[1].all()
    assert torch.equal(attend, see | want_empty) and attend.any(-1).all()
    meta = sdpa_mask(pad.to("meta"), causal, s_q)
    assert all(t.device.type == "meta" for t in meta)
    # and attention_sdpa's own masks (causal, S_q != S_k, no padding) are made on the inputs' device
    q, k = torch.empty(2, s_q, H, D, device="meta"), torch.empty(2, s_k, H, D, device="meta")
    assert attention_sdpa(q, k, k, causal, None, 0.3).shape == (2, s_q, H, D)
