"""The tower modules of ``fastclip.models.transformer`` against open_clip's (and PyTorch's ``nn.MultiheadAttention``,
timm's ``PatchDropout``) on tiny configs, in fp64: the same weights loaded strictly give the same outputs, option by
option, and the same seed gives the same initialization. Each test takes milliseconds, so that mutation testing
(tools/mutate.py) can run them once per mutant."""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")
import open_clip.transformer as oct  # noqa: E402
from open_clip.pos_embed import get_2d_sincos_pos_embed  # noqa: E402

from fastclip.models import transformer as fct  # noqa: E402
from tests.helpers import assert_close, unit_roundoff  # noqa: E402

IMPLS = ["sdpa", "fastclip"]
TOL = dict(rtol=1e-10, atol=1e-12)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating parameter drawn at random (no zero bias, no unit LayerNorm weight hides a swap), in fp64."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module.double()


def _pair(ref: nn.Module, model: nn.Module):
    """open_clip's (or torch's) module with random weights, loaded strictly into fastclip's; both fp64, eval."""
    _randomize(ref)
    model.double().load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), model.eval()


def _same_init(make_ref, make_model, seed: int = 3):
    """Built from the same seed, fastclip's module holds open_clip's initial parameters, bit for bit."""
    torch.manual_seed(seed)
    ref = make_ref()
    torch.manual_seed(seed)
    model = make_model()
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k


# ---------------------------------------------------------------------------------------------------------------
# attention


def _reference_attention(q, k, v, causal, pad):
    """softmax(q k^T / sqrt(D) + masks) v in fp64 on (B, S, H, D); causal is top-left (query i sees keys <= i)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    allowed = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril() if causal else torch.ones(
        q.shape[1], k.shape[1], dtype=torch.bool)
    allowed = allowed[None, None] & (~pad[:, None, None, :] if pad is not None else True)
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("attn_impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attend_cross_shapes(attn_impl, causal, padded):
    """q, k, v distinct, S_q != S_k, causal top-left with key padding (every query keeps a key)."""
    q, k, v = (torch.randn(2, s, 3, 8, dtype=torch.float64) for s in (5, 7, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 2] = True
    pad = pad if padded else None
    out = fct.attend(q, k, v, attn_impl, causal=causal, key_padding_mask=pad)
    assert_close("attend", out, _reference_attention(q, k, v, causal, pad), **TOL)


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_attention_equals_multihead_attention(attn_impl):
    """Self-attention with causal and key-padding masks against nn.MultiheadAttention, outputs and gradients."""
    ref, model = _pair(nn.MultiheadAttention(16, 4, batch_first=True), fct.Attention(16, 4, attn_impl))
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = masked
    for kw, ref_kw in [({}, {}), ({"causal": True}, {"attn_mask": causal}),
                       ({"causal": True, "key_padding_mask": pad}, {"attn_mask": causal, "key_padding_mask": pad})]:
        out = model(x, **kw)
        expected = ref(x, x, x, need_weights=False, **ref_kw)[0]
        assert_close(f"attention {kw}", out, expected, **TOL)
        g, g_ref = (torch.autograd.grad(o.square().sum(), x)[0] for o in (out, expected))
        assert_close(f"attention grad {kw}", g, g_ref, **TOL)


@pytest.mark.parametrize("attn_impl", IMPLS)
@pytest.mark.parametrize("kdim", [16, 12])
def test_cross_attention_equals_multihead_attention(attn_impl, kdim):
    """Packed (kdim == dim) and separate (kdim != dim) projections, random biases, S_q != S_k."""
    ref = nn.MultiheadAttention(16, 2, kdim=kdim, vdim=kdim, batch_first=True)
    ref, model = _pair(ref, fct.CrossAttention(16, 2, kdim, attn_impl))
    q_x, kv_x = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 9, kdim, dtype=torch.float64)
    expected = ref(q_x, kv_x, kv_x, need_weights=False)[0]
    assert_close("cross attention", model(q_x, kv_x), expected, **TOL)


@pytest.mark.parametrize("kdim", [16, 12])
def test_attention_init_equals_multihead_attention(kdim):
    _same_init(lambda: nn.MultiheadAttention(16, 4, batch_first=True), lambda: fct.Attention(16, 4))
    _same_init(lambda: nn.MultiheadAttention(16, 2, kdim=kdim, vdim=kdim, batch_first=True),
               lambda: fct.CrossAttention(16, 2, kdim))


def test_attention_refuses_bad_arguments():
    for make in (lambda: fct.Attention(10, 4), lambda: fct.CrossAttention(10, 4, 8)):
        with pytest.raises(ValueError, match="width 10 is not divisible by heads 4"):
            make()
    for make in (lambda: fct.Attention(8, 2, "flash"), lambda: fct.CrossAttention(8, 2, 8, "flash")):
        with pytest.raises(ValueError, match=r"attn_impl must be one of \('fastclip', 'sdpa'\), got 'flash'"):
            make()


# ---------------------------------------------------------------------------------------------------------------
# blocks


def test_layer_norm_upcast_keeps_its_eps():
    """fp32 weights, bf16 input: normalized in fp32 with the module's eps (open_clip's norm_kwargs), cast back."""
    ln = fct.LayerNorm(8, eps=0.1)
    _randomize(ln).float()
    x = torch.randn(3, 8).bfloat16()
    expected = torch.nn.functional.layer_norm(x.float(), (8,), ln.weight, ln.bias, 0.1).bfloat16()
    assert torch.equal(ln(x), expected)


def test_quick_gelu_and_layer_scale():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert_close("QuickGELU", fct.QuickGELU()(x), oct.QuickGELU()(x), **TOL)
    ls = fct.LayerScale(8, 0.3)
    assert torch.equal(ls.gamma, torch.full((8,), 0.3))
    assert torch.equal(ls(x.float()), x.float() * 0.3)
    assert isinstance(fct._layer_scale(8, None), nn.Identity)


@pytest.mark.parametrize("ls_init_value", [None, 0.2])
@pytest.mark.parametrize("act", ["gelu", "quickgelu"])
def test_residual_block_equals_open_clip(ls_init_value, act):
    act_layer = nn.GELU if act == "gelu" else oct.QuickGELU
    fc_act = nn.GELU if act == "gelu" else fct.QuickGELU
    make_ref = lambda: oct.ResidualAttentionBlock(16, 2, 2.5, ls_init_value, act_layer)  # noqa: E731
    make = lambda: fct.ResidualAttentionBlock(16, 2, 2.5, fc_act, "sdpa", ls_init_value)  # noqa: E731
    _same_init(make_ref, make)
    ref, model = _pair(make_ref(), make())
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)  # open_clip's additive causal mask
    assert_close("block", model(x), ref(x), **TOL)
    assert_close("causal block", model(x, causal=True), ref(x, attn_mask=mask), **TOL)


def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients():
    model = _randomize(fct.Transformer(16, 2, 2, attn_impl="sdpa"))
    ckpt = copy.deepcopy(model)
    ckpt.grad_checkpointing = True
    calls = []
    for block in ckpt.resblocks:
        block.register_forward_pre_hook(lambda m, args: calls.append(m))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    out = model(x, causal=True, key_padding_mask=pad)
    out.square().sum().backward()
    out_ckpt = ckpt(x, causal=True, key_padding_mask=pad)
    out_ckpt.square().sum().backward()
    assert_close("checkpointed", out_ckpt, out, **TOL)
    assert len(calls) == 4  # each block's forward run again in backward
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert_close(f"grad {n}", q.grad, p.grad, **TOL)
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    assert len(calls) == 2  # nothing to recompute without autograd
    calls.clear()
    ckpt.grad_checkpointing = False
    ckpt(x).sum().backward()
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------------------------
# patch dropout


def test_patch_dropout_draws_open_clips_and_timms_patches():
    import timm.layers

    x = torch.randn(3, 1 + 10, 4)
    for prob in (0.25, 0.5, 0.95):
        torch.manual_seed(1)
        out = fct.PatchDropout(prob).train()(x)
        torch.manual_seed(1)
        assert torch.equal(out, oct.PatchDropout(prob).train()(x))
        keep = max(1, int(10 * (1 - prob)))
        assert out.shape == (3, 1 + keep, 4) and torch.equal(out[:, 0], x[:, 0])
        torch.manual_seed(1)
        out = fct.patch_dropout(x, prob, 1, lowest=True)
        torch.manual_seed(1)
        assert torch.equal(out, timm.layers.PatchDropout(prob, num_prefix_tokens=1).train()(x))
    x = torch.randn(2, 2 + 6, 4)  # two prefix tokens, kept in front
    torch.manual_seed(2)
    out = fct.patch_dropout(x, 0.5, 2)
    assert out.shape == (2, 5, 4) and torch.equal(out[:, :2], x[:, :2])


def test_patch_dropout_identity_in_eval_and_bounds():
    x = torch.randn(2, 5, 4)
    assert fct.PatchDropout(0.5).eval()(x) is x
    assert fct.PatchDropout(0.0).train()(x) is x
    for prob in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"patch_dropout must be in \\[0, 1\\), got {prob}"):
            fct.PatchDropout(prob)


# ---------------------------------------------------------------------------------------------------------------
# vision tower

_VISION = dict(image_size=(32, 24), patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=12)
VISION_OPTIONS = {
    "tok": {},
    "avg+ls+quickgelu": dict(pool_type="avg", ls_init_value=0.3, act_layer="quickgelu"),
    "none": dict(pool_type="none"),
    "final_ln_after_pool+no_ln_pre": dict(final_ln_after_pool=True, no_ln_pre=True),
    "avg+final_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "sin_cos_2d": dict(image_size=24, patch_size=(8, 8), pos_embed_type="sin_cos_2d"),
    "rectangular patches": dict(patch_size=(8, 4)),  # a 4 x 6 grid
    "norm eps": dict(norm_layer="eps"),
    "attentional_pool": dict(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2),
    "attentional_pool+avg": dict(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=3,
                                 pool_type="avg", output_dim=24),
}


def _vision_kwargs(options: dict, fastclip_side: bool) -> dict:
    kw = {**_VISION, **options}
    if kw.get("act_layer") == "quickgelu":
        kw["act_layer"] = fct.QuickGELU if fastclip_side else oct.QuickGELU
    if kw.get("norm_layer") == "eps":  # open_clip's norm_kwargs
        kw["norm_layer"] = functools.partial(fct.LayerNorm if fastclip_side else oct.LayerNorm, eps=0.1)
    return kw


@pytest.mark.parametrize("attn_impl", IMPLS)
@pytest.mark.parametrize("options", list(VISION_OPTIONS))
def test_vision_transformer_equals_open_clip(options, attn_impl):
    """Pooled features and tokens against open_clip's VisionTransformer, non-square images (a 4 x 3 grid)."""
    opts = VISION_OPTIONS[options]
    ref, model = _pair(oct.VisionTransformer(**_vision_kwargs(opts, False), output_tokens=True),
                       fct.VisionTransformer(**_vision_kwargs(opts, True), attn_impl=attn_impl, output_tokens=True))
    size = _vision_kwargs(opts, True)["image_size"]
    image = torch.randn(2, 3, *fct._to_2tuple(size), dtype=torch.float64)
    (pooled, tokens), (ref_pooled, ref_tokens) = model(image), ref(image)
    assert_close("pooled", pooled, ref_pooled, **TOL)
    assert_close("tokens", tokens, ref_tokens, **TOL)
    model.output_tokens = False
    assert_close("pooled only", model(image), ref_pooled, **TOL)


@pytest.mark.parametrize("options", list(VISION_OPTIONS))
def test_vision_transformer_init_equals_open_clip(options):
    opts = VISION_OPTIONS[options]
    _same_init(lambda: oct.VisionTransformer(**_vision_kwargs(opts, False)),
               lambda: fct.VisionTransformer(**_vision_kwargs(opts, True)))


def test_vision_transformer_patch_dropout_in_training():
    kw = dict(_VISION, patch_dropout=0.5)
    ref, model = _pair(oct.VisionTransformer(**kw), fct.VisionTransformer(**kw, attn_impl="sdpa"))
    ref.train(), model.train()
    image = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(image)
    torch.manual_seed(5)
    assert_close("patch dropout", out, ref(image), **TOL)
    assert isinstance(fct.VisionTransformer(**_VISION).patch_dropout, nn.Identity)


def test_vision_transformer_attributes():
    model = fct.VisionTransformer(**_VISION, attn_impl="sdpa")
    ref = oct.VisionTransformer(**_VISION)
    assert model.image_size == (32, 24) and model.patch_size == (8, 8) and model.grid_size == (4, 3)
    assert model.output_dim == 12 and model.no_weight_decay() == ref.no_weight_decay()
    default = fct.VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2)
    assert default.transformer.resblocks[0].mlp.c_fc.out_features == 64  # mlp_ratio 4, as every CLIP's
    model.set_grad_checkpointing()
    assert model.transformer.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.transformer.grad_checkpointing
    assert model.positional_embedding.requires_grad
    sincos = fct.VisionTransformer(**{**_VISION, "image_size": 24}, pos_embed_type="sin_cos_2d")
    assert not sincos.positional_embedding.requires_grad  # fixed, as open_clip's


def test_vision_transformer_refuses_bad_options():
    cases = [(dict(pool_type="max"), "pool_type must be 'tok', 'avg' or 'none', got 'max'"),
             (dict(pos_embed_type="rope"), "pos_embed_type must be 'learnable' or 'sin_cos_2d', got 'rope'"),
             (dict(attentional_pool="parallel"), "attentional_pool='parallel' \\(open_clip's untested"),
             (dict(pos_embed_type="sin_cos_2d"), r"needs a square grid, got \(4, 3\)")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            fct.VisionTransformer(**{**_VISION, **options})


def test_sincos_2d_pos_embed_equals_open_clip():
    for width, grid in [(16, 3), (32, 5), (8, 1)]:
        ref = torch.from_numpy(get_2d_sincos_pos_embed(width, grid, cls_token=True)).float()
        out = fct.sincos_2d_pos_embed(width, grid)
        assert out.dtype == torch.float32
        assert_close(f"sincos {width} {grid}", out, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs a width divisible by 4, got 18"):
        fct.sincos_2d_pos_embed(18, 3)


@pytest.mark.parametrize("context_dim", [16, 24])
def test_attentional_pooler_equals_open_clip(context_dim):
    make_ref = lambda: oct.AttentionalPooler(16, context_dim, n_head=2, n_queries=3)  # noqa: E731
    make = lambda: fct.AttentionalPooler(16, context_dim, n_head=2, n_queries=3, attn_impl="sdpa")  # noqa: E731
    _same_init(make_ref, make)
    ref, model = _pair(make_ref(), make())
    x = torch.randn(2, 7, context_dim, dtype=torch.float64)
    assert_close("pooler", model(x), ref(x), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# text tower

_TEXT = dict(context_length=9, vocab_size=40, width=16, heads=2, layers=3, mlp_ratio=2.0, output_dim=12)
TEXT_OPTIONS = {
    "argmax": {},
    "argmax+ls": dict(ls_init_value=0.2),
    "embed_cls": dict(embed_cls=True, pad_id=0, proj_bias=True),
    "eos+bidirectional": dict(pool_type="eos", eos_id=7, no_causal_mask=True),
    "eos, default id": dict(pool_type="eos"),
    "first+no_proj": dict(pool_type="first", proj_type="none"),
    "last+proj_bias": dict(pool_type="last", no_causal_mask=True, proj_bias=True),
    "none": dict(pool_type="none", output_dim=None),
    "norm eps": dict(norm_layer="eps"),
}


def _text_kwargs(options: dict, fastclip_side: bool) -> dict:
    kw = {**_TEXT, **options}
    if kw.get("norm_layer") == "eps":  # open_clip's norm_kwargs
        kw["norm_layer"] = functools.partial(fct.LayerNorm if fastclip_side else oct.LayerNorm, eps=0.1)
    return kw


def _text_inputs():
    text = torch.randint(1, 30, (3, 9))
    text[0, 4], text[0, 5:] = 39, 0  # end-of-text (the largest id), then padding
    text[1, 8], text[1, 5] = 39, 2  # and the default eos id
    text[2, 2], text[2, 6], text[2, 3:] = 7, 7, 0  # eos id twice, padding
    text[2, 1] = 39
    return text


@pytest.mark.parametrize("attn_impl", IMPLS)
@pytest.mark.parametrize("options", list(TEXT_OPTIONS))
def test_text_transformer_equals_open_clip(options, attn_impl):
    opts = TEXT_OPTIONS[options]
    ref = oct.TextTransformer(**_text_kwargs(opts, False), output_tokens=True,
                              use_pad_mask=opts.get("embed_cls", False))
    ref, model = _pair(ref, fct.TextTransformer(**_text_kwargs(opts, True), attn_impl=attn_impl, output_tokens=True))
    text = _text_inputs()
    (pooled, tokens), (ref_pooled, ref_tokens) = model(text), ref(text)
    assert_close("pooled", pooled, ref_pooled, **TOL)
    assert_close("tokens", tokens, ref_tokens, **TOL)
    if not opts.get("no_causal_mask") and not opts.get("embed_cls"):
        # shorter than the context (open_clip's tower takes context_length tokens only): causal, so the first 6
        # tokens' outputs are those of the full sequence
        assert_close("short tokens", model(text[:, :6])[1], ref_tokens[:, :6], **TOL)
    model.output_tokens = False
    assert_close("pooled only", model(text), ref(text)[0], **TOL)


@pytest.mark.parametrize("options", list(TEXT_OPTIONS))
def test_text_transformer_init_equals_open_clip(options):
    opts = TEXT_OPTIONS[options]
    _same_init(lambda: oct.TextTransformer(**_text_kwargs(opts, False)),
               lambda: fct.TextTransformer(**_text_kwargs(opts, True)))


@pytest.mark.parametrize("attn_impl", IMPLS)
def test_text_pad_mask_masks_keys_after_end_of_text(attn_impl, monkeypatch):
    """The pooled features stay open_clip's; the kernel gets the keys past end-of-text as padding."""
    import fastclip.functional as functional

    calls, orig = [], functional.flash_attention
    monkeypatch.setattr(functional, "flash_attention", lambda *a, **kw: calls.append(kw) or orig(*a, **kw))
    ref, model = _pair(oct.TextTransformer(**_TEXT), fct.TextTransformer(**_TEXT, attn_impl=attn_impl,
                                                                         text_pad_mask=True))
    text = _text_inputs()
    assert_close("pooled", model(text), ref(text), **TOL)
    if attn_impl == "fastclip":
        assert len(calls) == 3
        for kw in calls:
            assert kw["causal"] is True and torch.equal(kw["key_padding_mask"], fct.eot_key_padding_mask(text))
    mask = fct.eot_key_padding_mask(text)
    assert torch.equal(mask, torch.arange(9) > text.argmax(-1, keepdim=True))
    assert mask[0].tolist() == [False] * 5 + [True] * 4 and not mask[1].any()


def test_text_transformer_attributes_and_errors():
    model = fct.TextTransformer(**_TEXT, embed_cls=True)
    ref = oct.TextTransformer(**_TEXT, embed_cls=True)
    assert model.no_weight_decay() == ref.no_weight_decay() == {"positional_embedding", "cls_emb"}
    assert fct.TextTransformer(**_TEXT).no_weight_decay() == {"positional_embedding"}
    assert model.transformer.get_cast_dtype() == torch.float32
    assert fct.Transformer(16, 1, 2).to(torch.float16).get_cast_dtype() == torch.float16
    assert model.to(torch.bfloat16).transformer.get_cast_dtype() == torch.bfloat16
    model.set_grad_checkpointing()
    assert model.transformer.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.transformer.grad_checkpointing
    with pytest.raises(ValueError, match="pool_type must be 'first', 'last', 'argmax', 'eos' or 'none', got 'max'"):
        fct.TextTransformer(**_TEXT, pool_type="max")
    message = ("text_pad_mask=True is exact only for a causal tower pooled at end-of-text (no_causal_mask=False, "
               "pool_type='argmax', embed_cls=False)")
    for options in (dict(no_causal_mask=True), dict(pool_type="last"), dict(embed_cls=True)):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            fct.TextTransformer(**_TEXT, text_pad_mask=True, **options)


def test_text_tower_runs_in_its_weights_dtype():
    """Token and positional embeddings cast to the blocks' dtype (open_clip's cast_dtype)."""
    model = fct.TextTransformer(**_TEXT, attn_impl="sdpa").to(torch.bfloat16)
    ref = oct.TextTransformer(**_TEXT).to(torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    text = _text_inputs()
    out = model(text)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref(text))


def test_attention_hands_the_kernel_strided_views_of_one_packed_projection(monkeypatch):
    import fastclip.functional as functional

    calls, orig = [], functional.flash_attention
    monkeypatch.setattr(functional, "flash_attention",
                        lambda q, k, v, **kw: calls.append((q, k, v, kw)) or orig(q, k, v, **kw))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    fct.Attention(16, 4)(torch.randn(2, 5, 16), causal=True, key_padding_mask=pad)
    (q, k, v, kw), = calls
    assert q.shape == k.shape == v.shape == (2, 5, 4, 4)
    ptr = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == ptr == v.untyped_storage().data_ptr()  # no copies
    assert q.stride() == k.stride() == v.stride() == (5 * 48, 48, 4, 1)
    assert v.data_ptr() - k.data_ptr() == k.data_ptr() - q.data_ptr() == 16 * q.element_size()
    assert kw["causal"] is True and kw["key_padding_mask"] is pad


@pytest.mark.parametrize("ours, theirs", [(fct.VisionTransformer, oct.VisionTransformer),
                                          (fct.TextTransformer, oct.TextTransformer),
                                          (fct.AttentionalPooler, oct.AttentionalPooler),
                                          (fct.Transformer, oct.Transformer),
                                          (fct.ResidualAttentionBlock, oct.ResidualAttentionBlock),
                                          (fct.LayerScale, oct.LayerScale)])
def test_defaults_equal_open_clips(ours, theirs):
    """A drop-in: every argument both take has open_clip's default where open_clip has one (the LayerNorm classes
    aside: fastclip's own)."""
    import inspect

    a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    shared = [n for n in a if n in b and n != "norm_layer" and b[n].default is not inspect.Parameter.empty]
    assert shared
    for name in shared:
        assert a[name].default == b[name].default, name


def test_default_towers_equal_open_clips():
    """Built with their defaults (on the meta device: no memory, no time), the towers hold open_clip's parameters
    (names and shapes), heads and options."""
    with torch.device("meta"):
        pairs = [(fct.TextTransformer(), oct.TextTransformer()),
                 (fct.VisionTransformer(224, 32, 64, 1, 2), oct.VisionTransformer(224, 32, 64, 1, 2, mlp_ratio=4.0)),
                 (fct.VisionTransformer(224, 32, 64, 1, 2, attentional_pool=True),
                  oct.VisionTransformer(224, 32, 64, 1, 2, 4.0, attentional_pool=True)),
                 (fct.AttentionalPooler(64, 32), oct.AttentionalPooler(64, 32)),
                 (fct.Transformer(64, 1, 2), oct.Transformer(64, 1, 2)),
                 (fct.ResidualAttentionBlock(64, 2), oct.ResidualAttentionBlock(64, 2))]
    for model, ref in pairs:
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        heads = [m.heads for m in model.modules() if isinstance(m, (fct.Attention, fct.CrossAttention))]
        assert heads == [m.num_heads for m in ref.modules() if isinstance(m, nn.MultiheadAttention)]
        assert {m.attn_impl for m in model.modules() if hasattr(m, "attn_impl")} == {"fastclip"}
    assert pairs[4][0].grad_checkpointing is False and not pairs[4][1].grad_checkpointing
    text, ref = pairs[0]
    for name in ("context_length", "vocab_size", "pad_id", "eos_id", "pool_type", "output_dim"):
        assert getattr(text, name) == getattr(ref, name), name
    assert not text.no_causal_mask and ref.attn_mask is not None  # causal
    assert torch.equal(fct.LayerScale(4).gamma, oct.LayerScale(4).gamma)


def test_attn_impl_reaches_every_attention(monkeypatch):
    """The towers' attn_impl (default "fastclip") is every attention's, the attentional pooler's included."""
    import fastclip.functional as functional

    calls, orig = [], functional.flash_attention
    monkeypatch.setattr(functional, "flash_attention", lambda *a, **kw: calls.append(kw) or orig(*a, **kw))
    vision = dict(_VISION, attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2)
    for tower in (fct.VisionTransformer(**vision), fct.TextTransformer(**_TEXT),
                  fct.AttentionalPooler(16, 24, n_queries=3)):
        impls = {m.attn_impl for m in tower.modules() if hasattr(m, "attn_impl")}
        assert impls == {"fastclip"}, impls
    vit = fct.VisionTransformer(**vision, attn_impl="sdpa")
    assert {m.attn_impl for m in vit.modules() if hasattr(m, "attn_impl")} == {"sdpa"}
    vit(torch.randn(1, 3, 32, 24))
    assert not calls
    fct.VisionTransformer(**vision)(torch.randn(1, 3, 32, 24))
    assert len(calls) == 3  # two blocks and the pooler
    assert fct.AttentionalPooler(16, 24, n_queries=3).attn.heads == 8  # open_clip's n_head


def test_eot_key_padding_mask_on_the_texts_device():
    """(The meta device stands for a GPU here: mixing it with CPU tensors fails as CUDA does.)"""
    text = torch.randint(0, 10, (2, 5), device="meta")
    assert fct.eot_key_padding_mask(text).device.type == "meta"


def test_sdpa_mask_on_the_inputs_device():
    q = torch.randn(2, 5, 3, 8, device="meta")
    pad = torch.zeros(2, 5, dtype=torch.bool, device="meta")
    assert fct.attend(q, q, q, "sdpa", causal=True, key_padding_mask=pad).device.type == "meta"


def test_mixed_precision_towers_equal_open_clips():
    """OpenAI's mixed precision (bf16 linear, conv and attention weights; fp32 embeddings and LayerNorms): the
    embeddings are cast to the blocks' dtype and fp32 images to the patchifier's, as open_clip's towers with
    LayerNormFp32 run on bf16 images."""
    from open_clip.model import convert_weights_to_lp as oc_convert_weights_to_lp

    from fastclip.models import convert_weights_to_lp

    towers = [(oct.VisionTransformer(**_VISION, norm_layer=oct.LayerNormFp32),
               fct.VisionTransformer(**_VISION, attn_impl="sdpa"), torch.randn(2, 3, 32, 24)),
              (oct.TextTransformer(**_TEXT, norm_layer=oct.LayerNormFp32),
               fct.TextTransformer(**_TEXT, attn_impl="sdpa"), _text_inputs()),
              (oct.TextTransformer(**_TEXT, embed_cls=True, use_pad_mask=True, norm_layer=oct.LayerNormFp32),
               fct.TextTransformer(**_TEXT, embed_cls=True, attn_impl="sdpa"), _text_inputs())]
    for ref, model, x in towers:
        ref, model = (m.float() for m in _pair(ref, model))
        oc_convert_weights_to_lp(ref, torch.bfloat16)
        convert_weights_to_lp(model, torch.bfloat16)
        if getattr(ref, "cls_emb", None) is not None:  # open_clip appends it uncast (fp32 into bf16 blocks: fails)
            ref.cls_emb.data = ref.cls_emb.data.bfloat16()
        out = model(x)  # an fp32 image: cast to the patchifier's dtype
        assert out.dtype == torch.bfloat16
        expected = ref(x.bfloat16() if x.is_floating_point() else x)
        # the two round differently in bf16 (sdpa on strided views vs nn.MultiheadAttention): 8 units of bf16's
        # roundoff of the largest output (measured: up to 3.6 units over 100 draws)
        assert_close(type(model).__name__, out.float(), expected.float(), rtol=8 * unit_roundoff(torch.bfloat16),
                     atol=0)


@pytest.mark.gpu
def test_towers_on_the_gpu_make_their_masks_and_draws_there():
    """On CUDA (the CPU cannot tell devices apart): patch dropout's draws and the key masks (end-of-text, sdpa's
    causal & padding) are made on the inputs' device."""
    x = torch.randn(2, 1 + 6, 4, device="cuda")
    out = fct.patch_dropout(x, 0.5, 1)
    assert out.device == x.device and out.shape == (2, 4, 4)
    text = _text_inputs().cuda()
    assert fct.eot_key_padding_mask(text).device == text.device
    ref, model = _pair(oct.TextTransformer(**_TEXT), fct.TextTransformer(**_TEXT, attn_impl="sdpa",
                                                                         text_pad_mask=True))
    assert_close("pooled", model.cuda()(text), ref.cuda()(text), rtol=1e-9, atol=1e-10)
