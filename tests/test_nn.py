"""fastclip.nn.MultiheadAttention against torch.nn.MultiheadAttention over a grid of arguments.

What the fused kernel covers must agree with torch within fp64 rounding (``torch`` backend) or fp32 rounding
(``triton`` under the interpreter) and must actually run fused (spied); everything else must be torch's own
result, bit for bit.
"""
import inspect

import pytest
import torch

import fastclip
import fastclip.nn as fnn

from .helpers import assert_close

E, H = 48, 4


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach fastclip.flash_attention."""
    calls = []

    def spy(q, k, v, **kw):
        calls.append(dict(q=q, k=k, v=v, **kw))
        return fastclip.flash_attention(q, k, v, **kw)

    monkeypatch.setattr(fnn, "flash_attention", spy)
    return calls


def _pair(backend="torch", dtype=torch.float64, **kw):
    """torch's layer with non-zero biases (so their gradients are tested) and fastclip's copy of it."""
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = fastclip.nn.MultiheadAttention(E, H, dtype=dtype, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(b, s_q, s_k, batch_first, dtype, *, cross, kdim=E, vdim=E):
    def make(s, d):
        x = torch.randn(b, s, d, dtype=torch.float64).to(dtype)
        return (x if batch_first else x.transpose(0, 1).contiguous()).requires_grad_()

    q = make(s_q, E)
    if not cross:
        return q, q, q
    return q, make(s_k, kdim), make(s_k, vdim)


def _run(module, query, key, value, kw):
    out, weights = module(query, key, value, **kw)
    leaves = [t for t in {id(t): t for t in (query, key, value)}.values()] + list(module.parameters())
    g = torch.Generator().manual_seed(0)
    grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g, dtype=out.dtype))
    return out.detach(), weights, grads


def _compare(ref, ours, query, key, value, kw, *, exact, tol=1e-10):
    out_r, w_r, grads_r = _run(ref, query, key, value, kw)
    out, w, grads = _run(ours, query, key, value, kw)
    if exact:
        assert torch.equal(out, out_r) or (out.isnan() == out_r.isnan()).all() and torch.equal(
            out.nan_to_num(), out_r.nan_to_num())
        assert (w is None and w_r is None) or torch.equal(w.nan_to_num(), w_r.nan_to_num())
    else:
        assert w is None and w_r is None
        assert_close("out", out, out_r, rtol=tol, atol=tol)
    for i, (gr, r) in enumerate(zip(grads, grads_r)):
        assert_close(f"grad {i}", gr.nan_to_num(), r.nan_to_num(), rtol=tol, atol=tol)


def _causal(n_q, n_k, form, dtype):
    above = torch.ones(n_q, n_k, dtype=torch.bool).triu(1)
    if form == "bool":
        return above
    return torch.zeros(n_q, n_k, dtype=dtype).masked_fill(above, float("-inf"))  # open_clip's text mask


def _padding(b, s_k, form, dtype, *, blind=False):
    pad = torch.rand(b, s_k) < 0.3
    pad[:, 0] = blind  # key 0 visible: under a causal mask every query then sees a key
    pad[:, -1] = False
    if form == "bool":
        return pad
    if form == "float":
        return torch.zeros(b, s_k, dtype=dtype).masked_fill(pad, float("-inf"))
    return torch.randn(b, s_k, dtype=dtype)  # "additive": a bias, not a padding mask


# the masks (attn_mask, key_padding_mask, is_causal) and whether the kernel covers them
MASKS = {
    "none": (None, None, False, True),
    "causal-bool": ("bool", None, False, True),
    "causal-float": ("float", None, False, True),
    "causal-hint": ("float", None, True, True),
    "pad-bool": (None, "bool", False, True),
    "pad-float": (None, "float", False, True),
    "causal-float+pad-bool": ("float", "bool", False, True),
    "causal-bool+pad-float": ("bool", "float", True, True),
    "pad-additive": (None, "additive", False, False),
    "attn-additive": ("additive", None, False, False),
    "attn-3d": ("3d", None, False, False),
    "pad-blind": (None, "blind", False, True),  # zeros for the blind queries, as torch's SDPA path
    "causal+pad-blind": ("bool", "blind-causal", False, True),
    "attn-additive+pad-bool-hint": ("additive", "bool", True, False),  # with padding torch applies the mask
}


def _masks(kind, b, s_q, s_k, dtype):
    attn, pad, hint, fused = MASKS[kind]
    if attn == "additive":
        attn_mask = torch.randn(s_q, s_k, dtype=dtype)
    elif attn == "3d":
        attn_mask = _causal(s_q, s_k, "float", dtype).expand(b * H, s_q, s_k).clone()
    else:
        attn_mask = None if attn is None else _causal(s_q, s_k, attn, dtype)
    if pad in ("blind", "blind-causal"):
        key_padding_mask = _padding(b, s_k, "bool", dtype, blind=pad == "blind-causal")
        if pad == "blind":
            key_padding_mask[0] = True
    else:
        key_padding_mask = None if pad is None else _padding(b, s_k, pad, dtype)
    return dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=hint), fused


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, mixing mask types
@pytest.mark.parametrize("kind,batch_first", [(kind, i % 2 == 0) for i, kind in enumerate(MASKS)] + [
    ("causal-float", True), ("pad-float", False)])
def test_matches_torch_self_attention(batch_first, kind, fused_calls):
    b, s = 3, 11
    ref, ours = _pair(batch_first=batch_first)
    x, _, _ = _inputs(b, s, s, batch_first, torch.float64, cross=False)
    kw, fused = _masks(kind, b, s, s, torch.float64)
    _compare(ref, ours, x, x, x, dict(kw, need_weights=False), exact=not fused)
    assert len(fused_calls) == int(fused), "fused" if fused else "torch's path"


@pytest.mark.parametrize("kind,batch_first", [("none", False), ("pad-bool", True), ("pad-float", False),
                                              ("causal-bool", True), ("pad-additive", False)])
def test_matches_torch_cross_attention(batch_first, kind, fused_calls):
    b, s_q, s_k = 2, 5, 9
    ref, ours = _pair(batch_first=batch_first)
    q, k, v = _inputs(b, s_q, s_k, batch_first, torch.float64, cross=True)
    kw, fused = _masks(kind, b, s_q, s_k, torch.float64)
    _compare(ref, ours, q, k, v, dict(kw, need_weights=False), exact=not fused)
    assert len(fused_calls) == int(fused)


@pytest.mark.parametrize("config,batch_first", [(dict(kdim=24, vdim=40), False), (dict(add_bias_kv=True), True),
                                                (dict(add_zero_attn=True), False), (dict(bias=False), True),
                                                (dict(dropout=0.3), False), (dict(dropout=0.3), True)])
def test_matches_torch_other_configs(config, batch_first, fused_calls):
    """Configurations outside the kernel run torch's path, bit for bit (dropout: the same random stream)."""
    b, s_q, s_k = 2, 6, 7
    ref, ours = _pair(batch_first=batch_first, **config)
    assert list(ours.state_dict()) == list(ref.state_dict())
    q, k, v = _inputs(b, s_q, s_k, batch_first, torch.float64, cross=True, kdim=config.get("kdim", E),
                      vdim=config.get("vdim", E))
    kw = dict(key_padding_mask=_padding(b, s_k, "bool", torch.float64), need_weights=False)
    torch.manual_seed(1)
    out_r, _, _ = _run(ref, q, k, v, kw)
    torch.manual_seed(1)
    out, _, _ = _run(ours, q, k, v, kw)
    fused = config == dict(bias=False)
    if fused:
        assert_close("out", out, out_r, rtol=1e-10, atol=1e-10)
    else:
        assert torch.equal(out, out_r)
    assert len(fused_calls) == int(fused)


def test_dropout_in_eval_runs_fused(fused_calls):
    ref, ours = _pair(dropout=0.5)
    ref.eval(), ours.eval()
    x, _, _ = _inputs(2, 7, 7, False, torch.float64, cross=False)
    _compare(ref, ours, x, x, x, dict(need_weights=False), exact=False)
    assert len(fused_calls) == 1


@pytest.mark.parametrize("kind", ["pad-bool", "pad-blind", "causal+pad-blind"])
def test_inference_matches_torch(kind, fused_calls):
    """Autograd off: torch's native path gives NaN to a query that sees no key; such masks go to torch."""
    b, s = 3, 9
    ref, ours = _pair(batch_first=True)
    ref.eval(), ours.eval()
    x = torch.randn(b, s, E, dtype=torch.float64)
    kw, _ = _masks(kind, b, s, s, torch.float64)
    kw = dict(kw, need_weights=False)
    with torch.no_grad():
        out, out_r = ours(x, x, x, **kw)[0], ref(x, x, x, **kw)[0]
    if kind == "pad-bool":
        assert_close("out", out, out_r, rtol=1e-10, atol=1e-10)
    else:
        assert out_r.isnan().any() and torch.equal(out.isnan(), out_r.isnan())
        assert torch.equal(out.nan_to_num(), out_r.nan_to_num())
    assert len(fused_calls) == int(kind == "pad-bool")


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("kind", ["none", "causal-float", "pad-bool"])
def test_need_weights_is_torchs(average, kind, fused_calls):
    """torch's default need_weights=True: its weights and output, exactly."""
    b, s = 2, 8
    ref, ours = _pair()
    x, _, _ = _inputs(b, s, s, False, torch.float64, cross=False)
    kw, _ = _masks(kind, b, s, s, torch.float64)
    _compare(ref, ours, x, x, x, dict(kw, average_attn_weights=average), exact=True)
    assert not fused_calls


def test_unbatched_input_is_torchs(fused_calls):
    ref, ours = _pair()
    x = torch.randn(9, E, dtype=torch.float64, requires_grad=True)
    _compare(ref, ours, x, x, x, dict(need_weights=False, attn_mask=_causal(9, 9, "float", torch.float64)),
             exact=True)
    assert not fused_calls


def test_is_causal_without_mask(fused_calls):
    """An extension (torch raises): is_causal=True alone means the causal mask, fused or not."""
    ref, ours = _pair(batch_first=True)
    x, _, _ = _inputs(2, 6, 6, True, torch.float64, cross=False)
    mask = _causal(6, 6, "bool", torch.float64)
    out_r = ref(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert_close("out", ours(x, x, x, need_weights=False, is_causal=True)[0], out_r, rtol=1e-10, atol=1e-10)
    assert len(fused_calls) == 1
    out_w, w = ours(x, x, x, is_causal=True)  # need_weights=True: torch's path, with the causal mask supplied
    assert torch.equal(out_w, ref(x, x, x, attn_mask=mask)[0]) and w is not None


def test_is_causal_without_mask_builds_it_on_the_inputs_device(monkeypatch):
    """The causal mask handed to torch's path lives on the query's device (the meta device stands in for a GPU)."""
    masks = []
    forward = torch.nn.MultiheadAttention.forward
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward",
                        lambda self, *a, **kw: masks.append(kw["attn_mask"]) or forward(self, *a, **kw))
    mha = fastclip.nn.MultiheadAttention(16, 2, device="meta")
    x = torch.randn(5, 2, 16, device="meta")
    mha(x, x, x, is_causal=True)  # need_weights=True: torch's path
    assert masks[0].device.type == "meta" and masks[0].shape == (5, 5), masks


def test_is_causal_hint_mask_is_not_read(monkeypatch, fused_calls):
    """is_causal=True with a mask and no padding: torch trusts the hint and never reads the mask, nor does the
    layer (no device sync): fused, causal."""
    reads = []
    real = fnn.causal_pattern
    monkeypatch.setattr(fnn, "causal_pattern", lambda *a: reads.append(a) or real(*a))
    ref, ours = _pair(batch_first=True)
    x, _, _ = _inputs(2, 6, 6, True, torch.float64, cross=False)
    kw = dict(attn_mask=_causal(6, 6, "float", torch.float64), is_causal=True, need_weights=False)
    _compare(ref, ours, x, x, x, kw, exact=False)
    assert not reads and len(fused_calls) == 1 and fused_calls[0]["causal"]


def test_frozen_layer_with_input_gradient_runs_fused(fused_calls):
    """Parameters frozen, a gradient through the input (a frozen tower under a trainable one): torch's SDPA path,
    not its native inference path, so a query that sees no key gets zeros there and the kernel covers the mask."""
    ref, ours = _pair(batch_first=True)
    for p in [*ref.parameters(), *ours.parameters()]:
        p.requires_grad_(False)
    x = torch.randn(3, 9, E, dtype=torch.float64, requires_grad=True)
    kw, _ = _masks("pad-blind", 3, 9, 9, torch.float64)
    out, out_r = ours(x, x, x, need_weights=False, **kw)[0], ref(x, x, x, need_weights=False, **kw)[0]
    assert_close("out", out, out_r, rtol=1e-10, atol=1e-10)
    assert len(fused_calls) == 1


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first,kind", [(False, "causal-float+pad-bool"), (True, "pad-float")])
def test_triton_fp32(batch_first, kind, fused_calls):
    b, s = 2, 13
    ref, ours = _pair("triton", torch.float32, batch_first=batch_first)
    x, _, _ = _inputs(b, s, s, batch_first, torch.float32, cross=False)
    kw, fused = _masks(kind, b, s, s, torch.float32)
    _compare(ref, ours, x, x, x, dict(kw, need_weights=False), exact=False, tol=2e-5)
    assert fused and len(fused_calls) == 1


def _described(params):
    return [(p.name, p.default, p.kind) for p in params]


def test_signature_and_defaults_are_torchs():
    ours, theirs = inspect.signature(fastclip.nn.MultiheadAttention), inspect.signature(torch.nn.MultiheadAttention)
    extra = [p for p in ours.parameters.values() if p.name not in theirs.parameters]
    assert [p.name for p in extra] == ["backend"] and extra[0].kind is inspect.Parameter.KEYWORD_ONLY
    assert _described(p for p in ours.parameters.values() if p.name != "backend") == _described(
        theirs.parameters.values())
    assert _described(inspect.signature(fastclip.nn.MultiheadAttention.forward).parameters.values()) == _described(
        inspect.signature(torch.nn.MultiheadAttention.forward).parameters.values())
    assert isinstance(fastclip.nn.MultiheadAttention(E, H), torch.nn.MultiheadAttention)


@pytest.mark.parametrize("config", [dict(), dict(bias=False), dict(kdim=24, vdim=40), dict(add_bias_kv=True),
                                    dict(batch_first=True, dropout=0.1)])
def test_from_torch_shares_parameters(config):
    ref = torch.nn.MultiheadAttention(E, H, **config).eval()
    state = torch.random.get_rng_state()
    ours = fastclip.nn.MultiheadAttention.from_torch(ref, backend="torch")
    assert torch.equal(torch.random.get_rng_state(), state), "from_torch drew random numbers"
    assert not ours.training and ours.backend == "torch"
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(a is b for a, b in zip(ours.parameters(), ref.parameters()))
    for attr in ("embed_dim", "num_heads", "dropout", "batch_first", "kdim", "vdim", "add_zero_attn",
                 "_qkv_same_embed_dim"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        fastclip.nn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


def test_mask_values_read_once_per_tensor(monkeypatch):
    """One mask object through many layers: its values are read once; an in-place change is seen."""
    reads = []
    real = fnn.causal_pattern
    monkeypatch.setattr(fnn, "causal_pattern", lambda *a: reads.append(a) or real(*a))
    mha = fastclip.nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    mask = _causal(5, 5, "float", torch.float32)
    for _ in range(3):
        mha(x, x, x, need_weights=False, attn_mask=mask)
    assert len(reads) == 1
    mask[0, 1] = 0.0  # no longer causal: read again, and torch's path
    out = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert len(reads) == 2
    assert torch.equal(out, torch.nn.MultiheadAttention.forward(mha, x, x, x, need_weights=False,
                                                                attn_mask=mask)[0])


def test_feeds_kernel_views_without_copies(fused_calls):
    mha = fastclip.nn.MultiheadAttention(32, 2, batch_first=True, backend="triton")
    x = torch.randn(2, 7, 32)
    mha(x, x, x, need_weights=False, is_causal=True)
    q, k, v = (fused_calls[0][n] for n in "qkv")
    assert q.shape == (2, 7, 2, 16)
    ptr = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == ptr and v.untyped_storage().data_ptr() == ptr
    assert q.stride() == (7 * 96, 96, 16, 1) and k.data_ptr() - q.data_ptr() == 32 * q.element_size()
    # and the kernel's (B, S, H, D) output is (B, S, E) for out_proj as it is
    out = fastclip.flash_attention(q, k, v, backend="triton")
    assert out.is_contiguous() and out.flatten(2)._base is out


def test_loads_open_clip_block(fused_calls):
    transformer = pytest.importorskip("open_clip.transformer")
    block = transformer.ResidualAttentionBlock(64, 4, batch_first=True).double()
    ours = fastclip.nn.MultiheadAttention(64, 4, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(block.attn.state_dict(), strict=True)
    block.attn.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 77, 64, dtype=torch.float64)
    causal_mask = torch.full((77, 77), float("-inf"), dtype=torch.float64).triu(1)  # open_clip's text mask
    expect = block.attn(x, x, x, need_weights=False, attn_mask=causal_mask)[0]
    assert_close("out", ours(x, x, x, need_weights=False, attn_mask=causal_mask)[0].detach(), expect.detach(),
                 rtol=1e-10, atol=1e-12)
    assert len(fused_calls) == 1 and fused_calls[0]["causal"]


@pytest.mark.gpu
def test_gpu_bf16_vit_layer(fused_calls):
    """A ViT-B layer in bf16 on the GPU with open_clip's text mask: fused (auto picks triton) and torch's values."""
    ref = torch.nn.MultiheadAttention(768, 12, batch_first=True, device="cuda", dtype=torch.bfloat16)
    ours = fastclip.nn.MultiheadAttention.from_torch(ref)
    x = torch.randn(8, 77, 768, device="cuda", dtype=torch.bfloat16)
    mask = torch.full((77, 77), float("-inf"), device="cuda", dtype=torch.bfloat16).triu(1)
    out = ours(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert len(fused_calls) == 1
    assert_close("out", out.float(), ref(x, x, x, need_weights=False, attn_mask=mask)[0].float(), rtol=2e-2,
                 atol=2e-2)


def test_bad_arguments():
    for embed_dim, num_heads in [(15, 2), (0, 2), (-4, 2), (16, 0), (16, -2)]:
        with pytest.raises(ValueError, match="positive multiple of num_heads"):
            fastclip.nn.MultiheadAttention(embed_dim, num_heads)
    for embed_dim, num_heads in [(1, 1), (16, 1)]:  # the smallest layers are valid
        assert fastclip.nn.MultiheadAttention(embed_dim, num_heads).head_dim == embed_dim // num_heads
    mha = fastclip.nn.MultiheadAttention(16, 2)
    with pytest.raises(AssertionError, match="16"):  # torch's own check, through torch's path
        mha(torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), need_weights=False)


def test_inputs_the_kernel_does_not_take_are_torchs(fused_calls):
    """Query and key/value of different dtypes (which torch runs under autocast), key and value of different
    shapes, a mask on another device than the inputs: torch's path, its result or its own error."""
    ref = torch.nn.MultiheadAttention(E, H)
    ours = fastclip.nn.MultiheadAttention.from_torch(ref, backend="torch")
    q, kv = torch.randn(5, 2, E), torch.randn(7, 2, E).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(q, kv, kv, need_weights=False)[0], ref(q, kv, kv, need_weights=False)[0])
    with pytest.raises(AssertionError, match="does not match value shape"):
        ours(q, torch.randn(7, 2, E), torch.randn(6, 2, E), need_weights=False)
    with pytest.raises(AssertionError, match="key_padded_mask.shape"):
        ours(q, q, q, need_weights=False, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    meta = fastclip.nn.MultiheadAttention(E, H, device="meta")
    x = torch.randn(5, 2, E, device="meta")
    with pytest.raises(RuntimeError, match="not on the expected device"):
        meta(x, x, x, need_weights=False, attn_mask=_causal(5, 5, "float", torch.float32))
    assert not fused_calls


def test_autocast_open_clip_text_layer(fused_calls):
    """open_clip's AMP text layer: fp32 residual stream and mask, bf16 projections under autocast; fused, and
    torch's values within bf16 rounding."""
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = fastclip.nn.MultiheadAttention.from_torch(ref, backend="torch")
    x = torch.randn(2, 9, E)
    mask = _causal(9, 9, "float", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, x, x, need_weights=False, attn_mask=mask)[0]
        expect = ref(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert len(fused_calls) == 1 and fused_calls[0]["causal"] and out.dtype == expect.dtype
    assert_close("out", out.float(), expect.float(), rtol=2e-2, atol=2e-2)
