"""CLIP towers against open_clip: the same weights loaded strictly both ways give the same features.

Every built-in config family runs at reduced width (same patch sizes, head widths, MLP ratios and activations as
the full model); ViT-B-32 and RN50 also run at full size. Attention runs through both implementations:
``attn_impl="sdpa"`` and ``attn_impl="fastclip"``. Until ``fastclip.flash_attention`` lands on this branch, the
``flash`` fixture monkeypatches a STAND-IN for it (PyTorch SDPA following the kernel's exact contract), so the call
path, the (B, S, H, D) strided layouts and the masks are tested now; once the real kernel exists the fixture uses it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP as OCLIP  # noqa: E402
from open_clip.model import convert_weights_to_lp as oc_convert_weights_to_lp  # noqa: E402

import fastclip  # noqa: E402
import fastclip.functional as functional  # noqa: E402
from fastclip.models import (CLIP, CheckpointError, build_model_from_config, create_model,  # noqa: E402
                             create_model_from_state_dict, infer_config, list_models, load_checkpoint,
                             read_checkpoint)
from fastclip.models import configs as fc_configs  # noqa: E402
from fastclip.models.configs import MODEL_CONFIGS, get_model_config  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.open_clip_ref import image_size, oc_model, reduced_config, text_inputs  # noqa: E402

class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, q, k, v, **kw):
        self.calls.append(dict(q=q, k=k, v=v, **kw))
        return self.fn(q, k, v, **kw)


@pytest.fixture
def flash(monkeypatch):
    """Records every call to fastclip.functional.flash_attention (and passes it through)."""
    rec = _Recorder(functional.flash_attention)
    monkeypatch.setattr(functional, "flash_attention", rec, raising=False)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# Reduced configs of every family

# one name per distinct set of options (the every-name walk is tests/test_open_clip_configs.py)
FAMILIES = ["RN50", "RN50-quickgelu", "ViT-B-32", "ViT-B-32-quickgelu", "ViT-H-14", "ViT-g-14", "ViT-e-14",
            "ViT-M-16-alt", "ViT-L-14-CLIPA", "ViT-H-14-worldwide", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2",
            "ViT-B-32-SigLIP2-256", "ViT-SO400M-14-SigLIP", "ViT-SO400M-16-SigLIP-i18n-256"]


def _pair(cfg: dict, attn_impl: str, **kw):
    """(open_clip model, fastclip model) with the same weights: open_clip's random init loaded into fastclip."""
    ref = oc_model(cfg, **kw)
    model = build_model_from_config(cfg, attn_impl=attn_impl, **kw)
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


def _inputs(cfg: dict, batch: int = 3):
    size = image_size(cfg)
    return torch.randn(batch, 3, size, size), text_inputs(cfg, batch)


def _compare(ref, model, image, text, rtol=1e-5, atol=1e-6, encode=True):
    """forward (normalized features, logit scale) and, with ``encode``, unnormalized encode_image/encode_text."""
    if encode:
        assert_close("encode_image", model.encode_image(image), ref.encode_image(image), rtol=rtol, atol=atol)
        assert_close("encode_text", model.encode_text(text), ref.encode_text(text), rtol=rtol, atol=atol)
    out, out_ref = model(image, text), ref(image, text)
    assert len(out) == len(out_ref)
    for i, (a, b) in enumerate(zip(out, out_ref)):
        assert_close(f"forward[{i}]", a, b, rtol=rtol, atol=atol)


def _set_attn_impl(model, attn_impl: str):
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = attn_impl
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_open_clip(name, flash):
    cfg = reduced_config(name)
    image, text = _inputs(cfg, batch=2)
    ref, model = _pair(cfg, "sdpa")
    ref.eval(), model.eval()
    with torch.no_grad():
        _compare(ref, model, image, text)
        _set_attn_impl(model, "fastclip")
        _compare(ref, model, image, text, encode=False)
    assert flash.calls, "attn_impl='fastclip' never called fastclip.functional.flash_attention"
    # and back: fastclip's state dict loads strictly into open_clip
    oc_model(cfg).load_state_dict(model.state_dict(), strict=True)


def test_config_names_and_fields_equal_open_clip():
    """fastclip's configs are open_clip's JSON files, unchanged."""
    names = list_models()
    oc_names = set(open_clip.list_models())
    assert names and set(names) <= oc_names
    for name in names:
        assert get_model_config(name) == open_clip.get_model_config(name), name


@pytest.mark.parametrize("name", ["ViT-bigG-14", "ViT-e-14", "ViT-gopt-16-SigLIP2-384", "ViT-SO400M-14-SigLIP-378",
                                  "RN50x64"])
def test_full_size_state_dict_keys_and_shapes(name):
    """Full-size models on the meta device: keys and shapes equal open_clip's; the shapes, with the head counts and
    activation filled in, give the config back."""
    with torch.device("meta"):
        ref_sd = open_clip.create_model(name, device="meta").state_dict()
        model = create_model(name)
    sd = model.state_dict()
    assert list(sd) and set(sd) == set(ref_sd)
    bad = [k for k in sd if sd[k].shape != ref_sd[k].shape]
    assert not bad, bad[:5]
    inferred = infer_config(sd)
    cfg = get_model_config(name)
    assert inferred["quick_gelu"] is None and inferred["text_cfg"]["heads"] is None
    if "timm_model_name" in cfg["vision_cfg"]:
        assert inferred["vision_cfg"]["timm_model_name"] is None
        inferred["vision_cfg"]["timm_model_name"] = cfg["vision_cfg"]["timm_model_name"]
    else:
        assert inferred["vision_cfg"]["head_width"] is None
        inferred["vision_cfg"]["head_width"] = cfg["vision_cfg"].get("head_width", 64)
        if not isinstance(cfg["vision_cfg"]["layers"], list):  # a ViT (not OpenAI's ResNet)
            assert inferred["vision_cfg"]["pool_type"] is None
            inferred["vision_cfg"]["pool_type"] = cfg["vision_cfg"].get("pool_type", "tok")
    inferred["text_cfg"]["heads"] = cfg["text_cfg"]["heads"]
    for k in ("no_causal_mask", "pool_type"):  # shapes say nothing here
        assert inferred["text_cfg"][k] is None
        inferred["text_cfg"][k] = cfg["text_cfg"].get(k, getattr(fastclip.models.TextCfg(), k))
    with torch.device("meta"):
        again = build_model_from_config(inferred).state_dict()
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in sd.items()}


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_full_size_forward(name):
    model = create_model(name, attn_impl="sdpa").eval()
    ref = open_clip.create_model(name).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    image = torch.randn(1, 3, 224, 224)
    text = fastclip.tokenize(["a photo of a dog"])
    with torch.no_grad():
        _compare(ref, model, image, text, rtol=2e-5, atol=1e-6, encode=False)


# ---------------------------------------------------------------------------------------------------------------
# Training behaviour: gradients, checkpointing, precision, autocast, tokens, masks


def _loss(out):
    img, txt, scale = out[:3]
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "RN50"])
def test_gradients_match_open_clip(name, flash):
    cfg = reduced_config(name)
    image, text = _inputs(cfg)
    ref, model = _pair(cfg, "fastclip", init_logit_bias=-10.0)
    _loss(ref(image, text)).backward()
    _loss(model(image, text)).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        if ref_grads[n] is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        assert_close(f"grad {n}", p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)


def test_grad_checkpointing_same_result(flash):
    cfg = reduced_config("ViT-B-16")
    image, text = _inputs(cfg)
    _, model = _pair(cfg, "fastclip")
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.transformer.grad_checkpointing and ckpt.visual.transformer.grad_checkpointing
    _loss(model(image, text)).backward()
    _loss(ckpt(image, text)).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        assert_close(f"grad {n}", q.grad, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "pure_bf16"])
def test_precision_dtypes_equal_open_clip(precision):
    cfg = reduced_config("ViT-B-32")
    ref, model = _pair(cfg, "sdpa")
    fastclip.models.set_precision(model, precision)
    dtype = torch.float16 if "fp16" in precision else torch.bfloat16
    if precision.startswith("pure"):
        ref.to(dtype)
    else:
        oc_convert_weights_to_lp(ref, dtype)
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == ref_sd[k].dtype, (k, v.dtype, ref_sd[k].dtype)
    assert model.ln_final.weight.dtype == (dtype if precision.startswith("pure") else torch.float32)


def test_mixed_bf16_matches_open_clip_closely():
    """precision="bf16": OpenAI's mixed precision (LayerNorm in fp32); same weights, same maths, close outputs."""
    cfg = reduced_config("ViT-B-32")
    image, text = _inputs(cfg)
    ref = OCLIP(**cfg, cast_dtype=torch.bfloat16).eval()  # LayerNormFp32 towers, as open_clip builds for bf16
    model = CLIP(**cfg, attn_impl="sdpa").eval()
    model.load_state_dict(ref.state_dict())
    oc_convert_weights_to_lp(ref, torch.bfloat16)
    fastclip.models.set_precision(model, "bf16")
    with torch.no_grad():
        a = model.encode_image(image.bfloat16())
        b = ref.encode_image(image.bfloat16())
        assert_close("bf16 image", a.float(), b.float(), rtol=2e-2, atol=1e-3)
        assert_close("bf16 text", model.encode_text(text).float(), ref.encode_text(text).float(), rtol=2e-2,
                     atol=1e-3)


def test_autocast_bf16_close_to_open_clip(flash):
    cfg = reduced_config("ViT-B-16-quickgelu")
    image, text = _inputs(cfg)
    ref, model = _pair(cfg, "fastclip")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = model(image, text), ref(image, text)
    for i in range(2):
        assert_close(f"autocast[{i}]", out[i].float(), out_ref[i].float(), rtol=3e-2, atol=1e-3)


def test_output_tokens(flash):
    cfg = reduced_config("ViT-B-32")
    image, text = _inputs(cfg)
    ref, model = _pair(cfg, "fastclip")
    ref.eval(), model.eval()
    ref.visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = model.encode_image(image, output_tokens=True)
        ref_pooled, ref_tokens = ref.visual(image)
        assert_close("pooled", pooled, ref_pooled, rtol=1e-5, atol=1e-6)
        assert_close("patch tokens", tokens, ref_tokens, rtol=1e-5, atol=1e-6)
        t_pooled, t_tokens = model.encode_text(text, output_tokens=True)
        assert t_tokens.shape == (text.shape[0], text.shape[1], cfg["text_cfg"]["width"])
        eot = t_tokens[torch.arange(text.shape[0]), text.argmax(-1)] @ model.text_projection
        assert_close("text pooled", t_pooled, eot, rtol=1e-6, atol=1e-6)
        rn_ref, rn = _pair(reduced_config("RN50"), "sdpa")
        rn.eval()
        p, tok = rn.encode_image(torch.randn(2, 3, 64, 64), output_tokens=True)
        assert p.shape == (2, 48) and tok.shape == (2, 4, 8 * 32)


@pytest.mark.parametrize("attn_impl", ["sdpa", "fastclip"])
def test_text_pad_mask_keeps_pooled_features(attn_impl, flash):
    cfg = reduced_config("ViT-B-32")
    _, text = _inputs(cfg)
    ref, model = _pair(cfg, attn_impl)
    masked = CLIP(**cfg, attn_impl=attn_impl, text_pad_mask=True)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close("pooled", masked.encode_text(text), ref.encode_text(text), rtol=1e-5, atol=1e-6)
    if attn_impl == "fastclip":
        mask = flash.calls[-1]["key_padding_mask"]
        assert mask is not None and mask.shape == text.shape and mask.dtype == torch.bool
        assert torch.equal(mask, torch.arange(text.shape[1]) > text.argmax(-1, keepdim=True))
        assert flash.calls[-1]["causal"] is True


def test_attention_gets_strided_views_of_packed_qkv(flash):
    cfg = reduced_config("ViT-B-32")
    image, text = _inputs(cfg)
    _, model = _pair(cfg, "fastclip")
    flash.calls.clear()
    model(image, text)
    n_vis, n_txt = cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"]
    assert len(flash.calls) == n_vis + n_txt
    for i, call in enumerate(flash.calls):
        q, k, v = call["q"], call["k"], call["v"]
        assert q.dim() == 4 and q.shape == k.shape == v.shape
        B, S, H, D = q.shape
        ptr = q.untyped_storage().data_ptr()
        assert k.untyped_storage().data_ptr() == ptr and v.untyped_storage().data_ptr() == ptr  # no copies
        assert q.stride() == (S * 3 * H * D, 3 * H * D, D, 1)
        assert call["causal"] is (i >= n_vis)  # vision first, non-causal; then text, causal
        assert call.get("key_padding_mask") is None


def test_logit_scale_and_bias():
    model = CLIP(**reduced_config("ViT-B-32"), attn_impl="sdpa", init_logit_bias=-10.0, output_dict=True)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    out = model(*_inputs(reduced_config("ViT-B-32")))
    assert set(out) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5) and out["logit_bias"].item() == -10.0
    with pytest.raises(ValueError, match="attn_impl"):
        CLIP(**reduced_config("ViT-B-32"), attn_impl="flash")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("attn_impl", ["sdpa", "fastclip"])
def test_towers_compile_fullgraph(attn_impl, flash):
    """No graph breaks: the vision and text towers trace whole under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    cfg = reduced_config("ViT-B-16-quickgelu")
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 1  # compile time grows with the unrolled blocks
    image, text = _inputs(cfg, batch=2)
    _, model = _pair(cfg, attn_impl)
    eager_img, eager_txt = model.encode_image(image), model.encode_text(text)
    enc_img = torch.compile(model.encode_image, backend="aot_eager", fullgraph=True)
    enc_txt = torch.compile(model.encode_text, backend="aot_eager", fullgraph=True)
    img, txt = enc_img(image), enc_txt(text)
    assert_close("compiled image", img, eager_img, rtol=1e-5, atol=1e-6)
    assert_close("compiled text", txt, eager_txt, rtol=1e-5, atol=1e-6)
    (img.sum() + txt.sum()).backward()
    assert model.visual.conv1.weight.grad is not None and model.token_embedding.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture
def tiny_name(monkeypatch):
    """A small config registered under a name, so create_model(name, pretrained=...) runs on tiny files."""
    cfg = reduced_config("ViT-B-32-quickgelu")
    monkeypatch.setitem(fc_configs.MODEL_CONFIGS, "test-tiny-quickgelu", cfg)
    return "test-tiny-quickgelu", cfg


def _same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    sb = {k: v for k, v in sb.items() if k not in skip}
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def test_plain_state_dict_roundtrip(tmp_path, tiny_name):
    name, cfg = tiny_name
    ref = OCLIP(**cfg)
    path = tmp_path / "plain.pt"
    torch.save(ref.state_dict(), path)
    model = create_model(name, pretrained=str(path), attn_impl="sdpa")
    _same_weights(model, ref)
    # fastclip's own save loads back, and into open_clip
    torch.save(model.state_dict(), tmp_path / "fc.pt")
    _same_weights(create_model(name, pretrained=tmp_path / "fc.pt"), model)
    fresh = OCLIP(**cfg)
    fresh.load_state_dict(torch.load(tmp_path / "fc.pt", weights_only=True), strict=True)


def test_training_checkpoint_with_module_prefix(tmp_path, tiny_name):
    name, cfg = tiny_name
    ref = OCLIP(**cfg)
    ckpt = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in ref.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    _same_weights(create_model(name, pretrained=tmp_path / "epoch_3.pt"), ref)
    sd, fmt = read_checkpoint(tmp_path / "epoch_3.pt")
    assert fmt == "training"


def _openai_torchscript_archive(path, cfg):
    """An archive in OpenAI's release format: a traced CLIP (open_clip's, QuickGELU) whose state_dict() has
    OpenAI's keys, fp16 linear/conv/attention weights and the input_resolution/context_length/vocab_size entries."""
    m = OCLIP(**cfg, quick_gelu=True).eval()
    del m.context_length, m.vocab_size
    mask = m._buffers.pop("attn_mask")  # OpenAI's archives hold the causal mask as a constant, not in state_dict
    object.__setattr__(m, "attn_mask", mask)
    m.register_buffer("input_resolution", torch.tensor(cfg["vision_cfg"]["image_size"]))
    m.register_buffer("context_length", torch.tensor(cfg["text_cfg"]["context_length"]))
    m.register_buffer("vocab_size", torch.tensor(cfg["text_cfg"]["vocab_size"]))
    size = cfg["vision_cfg"]["image_size"]
    image, text = torch.randn(1, 3, size, size), torch.zeros(1, cfg["text_cfg"]["context_length"], dtype=torch.long)
    traced = torch.jit.trace_module(m, dict(forward=(image, text), encode_text=(text,), encode_image=(image,)),
                                    check_trace=False)
    oc_convert_weights_to_lp(m, torch.float16)  # the traced module shares these parameters
    torch.jit.save(traced, str(path))
    return m


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("family", ["ViT-B-32", "RN50"])
def test_openai_torchscript_archive(tmp_path, family):
    cfg = reduced_config(family)
    if family.startswith("ViT"):
        cfg["vision_cfg"].update(width=128)  # OpenAI's layout has 64-wide heads, which open_clip's loader assumes
    cfg["text_cfg"].update(width=128)
    path = tmp_path / "openai.pt"
    src = _openai_torchscript_archive(path, cfg)
    sd, fmt = read_checkpoint(path)
    assert fmt == "torchscript" and "input_resolution" in sd and sd["text_projection"].dtype == torch.float16
    with pytest.raises(CheckpointError, match="model_name= or config="):
        create_model_from_state_dict(sd)
    model = create_model_from_state_dict(sd, config={**cfg, "quick_gelu": True}, attn_impl="sdpa").eval()
    _same_weights(model, src, skip=("input_resolution", "context_length", "vocab_size"))
    # open_clip's own OpenAI loader reads the same archive; both give the same features
    ref = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").eval()
    image, text = _inputs(cfg)
    with torch.no_grad():
        _compare(ref, model, image, text)
    # and through load_checkpoint into a model built from the config
    m2 = CLIP(**cfg, quick_gelu=True, attn_impl="sdpa")
    load_checkpoint(m2, path)
    _same_weights(m2, src, skip=("input_resolution", "context_length", "vocab_size"))
    with pytest.warns(UserWarning, match="quickgelu"):
        load_checkpoint(CLIP(**cfg, attn_impl="sdpa"), path)


def test_create_model_from_state_dict_formats():
    cfg = reduced_config("ViT-L-14")
    ref = OCLIP(**cfg, init_logit_bias=-5.0)
    sd = {"module._orig_mod." + k: v.half() for k, v in ref.state_dict().items()}
    sd.update(input_resolution=torch.tensor(42), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    model = create_model_from_state_dict(sd, config={**cfg, "init_logit_bias": 0.0}, attn_impl="sdpa",
                                         precision="fp16")
    assert model.logit_bias is not None and model.visual.conv1.weight.dtype == torch.float16
    assert model.visual.patch_size == (14, 14) and model.visual.image_size == (42, 42)
    assert model.visual.transformer.resblocks[0].attn.heads == 2


def test_create_model_from_state_dict_never_guesses():
    """Shapes do not tell the activation or the head count: without model_name= or config= it raises, naming the
    built-in configs with those shapes; a wrong head count given explicitly is what the user asked for."""
    ref = open_clip.create_model("ViT-B-32", device="meta")
    sd = {k: torch.empty_like(v, device="meta") for k, v in ref.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"activation.*head counts.*ViT-B-32, ViT-B-32-quickgelu"):
        create_model_from_state_dict(sd)
    cfg = reduced_config("ViT-B-32")
    cfg["text_cfg"]["width"] = 96  # no built-in config has these shapes
    small = OCLIP(**cfg).state_dict()
    with pytest.raises(CheckpointError, match="no built-in config has these shapes.*infer_config"):
        create_model_from_state_dict(small)
    with pytest.raises(ValueError, match="not both"):
        create_model_from_state_dict(small, "ViT-B-32", config=cfg)
    model = create_model_from_state_dict(small, config=cfg, attn_impl="sdpa")
    assert model.transformer.resblocks[0].attn.heads == 2
    assert torch.equal(model.state_dict()["visual.proj"], small["visual.proj"])


def test_clean_state_dict_strips_nested_prefixes_in_any_order():
    from fastclip.models import clean_state_dict

    x = torch.zeros(1)
    for key in ("_orig_mod.module.x", "module._orig_mod.x", "module.module._orig_mod.module.x", "x"):
        assert list(clean_state_dict({key: x})) == ["x"], key
    assert list(clean_state_dict({"module.input_resolution": x, "y": x})) == ["y"]


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_model("ViT-B-32", pretrained=str(missing))


def test_mismatched_checkpoint_errors(tmp_path, tiny_name):
    name, cfg = tiny_name
    other = copy.deepcopy(cfg)
    other["text_cfg"]["width"] = 128
    other["text_cfg"]["layers"] = 3
    torch.save(OCLIP(**other).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        create_model(name, pretrained=tmp_path / "other.pt")
    msg = str(e.value)
    assert "other.pt" in msg and "unexpected keys: transformer.resblocks.2." in msg
    assert "shape mismatches" in msg and "text_projection (128, 48) vs model (64, 48)" in msg
    sd = OCLIP(**cfg).state_dict()
    del sd["visual.proj"]
    sd["visual.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt.*missing keys: visual.proj.*unexpected keys: visual.extra"):
        create_model(name, pretrained=tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        create_model(name, pretrained=tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("ViT-X-99")
    with pytest.raises(CheckpointError, match="cannot infer"):
        create_model_from_state_dict({"foo": torch.zeros(1)})


def test_exports():
    for name in ("create_model", "create_model_from_state_dict", "list_models", "tokenize", "image_transform",
                 "get_tokenizer", "from_open_clip", "to_open_clip"):
        assert callable(getattr(fastclip, name))
    assert fastclip.list_models() == list_models()


def test_towers_benchmark_cpu_smoke(tmp_path, capsys):
    from fastclip.bench import towers
    from fastclip.bench import BENCHES

    assert BENCHES["towers"][0] == "fastclip.bench.towers"
    csv = tmp_path / "towers.csv"
    tiny = ("tiny-vit", "tiny-text", "tiny-siglip")
    assert towers.main(["--device", "cpu", "--tower", *tiny, "--rep", "1", "--csv", str(csv)]) == 0
    from fastclip.bench.common import read_csv

    rows = read_csv(str(csv))
    assert {(r["provider"], r["shape"]) for r in rows} == {(p, f"{t},B=2") for p in ("fastclip", "open_clip")
                                                          for t in tiny}
    assert all(float(r["ms_p50"]) > 0 for r in rows)
