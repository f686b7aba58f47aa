"""open_clip's configs, read as open_clip reads them: every name fastclip lists builds open_clip's architecture.

- coverage: every open_clip name whose towers fastclip builds natively is in ``list_models()``; the others are
  refused with a reason;
- every name at reduced width (meta device): open_clip's state-dict keys and shapes; outputs (slow: every name;
  the fast families are in test_models.py);
- SigLIP: a reduced open_clip ViT-B-16-SigLIP loads strictly into fastclip and back, same outputs (logit_bias);
- options no shipped config uses (attentional pool, sin-cos positions, "none"/"first"/"eos" pooling, embed_cls,
  text layer scale, act/norm kwargs), patch dropout, pos-embed resizing, safetensors, from/to open_clip.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

import fastclip  # noqa: E402
from fastclip.models import (CheckpointError, build_model_from_config, create_model, from_open_clip,  # noqa: E402
                             get_model_config, list_models, load_checkpoint, resize_pos_embed, to_open_clip)
from tests.helpers import assert_close  # noqa: E402
from tests.open_clip_ref import image_size, oc_model, reduced_config, text_inputs  # noqa: E402

OC_CONFIG_DIR = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
SIGLIP_TRUNKS = set(fastclip.models.TIMM_VITS)


def _native(cfg: dict) -> str:
    """'' when fastclip builds both towers of an open_clip config, else why not."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if "multimodal_cfg" in cfg:
        return "CoCa"
    if t.get("hf_model_name"):
        return "Hugging Face text tower"
    if v.get("timm_model_name") and v["timm_model_name"] not in SIGLIP_TRUNKS:
        return f"timm trunk {v['timm_model_name']}"
    return ""


def test_list_models_covers_every_native_open_clip_name():
    ours = set(list_models())
    for name in open_clip.list_models():
        why = _native(open_clip.get_model_config(name))
        assert (name in ours) == (not why), (name, why)
        if why:  # open_clip's JSON file itself is refused with the reason, never approximated
            with pytest.raises(ValueError, match="not built by fastclip"):
                create_model(os.path.join(OC_CONFIG_DIR, f"{name}.json"))
    for family in ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP", "ViT-gopt-16-SigLIP2-256", "ViT-L-14-CLIPA",
                   "ViT-e-14", "ViT-M-16-alt", "ViT-B-16-plus-240", "ViT-H-14-worldwide"):
        assert family in ours


@pytest.mark.parametrize("name", list_models())
def test_every_config_keys_and_shapes(name):
    cfg = reduced_config(name)
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in oc_model(cfg).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in build_model_from_config(cfg).state_dict().items()}
    assert ours == ref


def _compare_outputs(ref, model, cfg, atol=2e-6, forward=True):
    image = torch.randn(2, 3, image_size(cfg), image_size(cfg))
    text = text_inputs(cfg, batch=2)
    with torch.no_grad():
        assert_close("encode_image", model.encode_image(image), ref.encode_image(image), rtol=1e-5, atol=atol)
        assert_close("encode_text", model.encode_text(text), ref.encode_text(text), rtol=1e-5, atol=atol)
        if not forward:
            return
        out, out_ref = model(image, text), ref(image, text)
    assert len(out) == len(out_ref)
    for i, (a, b) in enumerate(zip(out, out_ref)):
        assert_close(f"forward[{i}]", a, b, rtol=1e-5, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_config_outputs(name):
    cfg = reduced_config(name)
    ref = oc_model(cfg).eval()
    model = build_model_from_config(cfg, attn_impl="fastclip").eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    _compare_outputs(ref, model, cfg, forward=False)  # forward (normalization, logit scale and bias) is elsewhere


@pytest.mark.parametrize("attn_impl", ["fastclip", "sdpa"])
def test_siglip_b16_loads_strictly_both_ways(attn_impl, monkeypatch):
    """A randomly initialized reduced-width open_clip ViT-B-16-SigLIP: strict load into fastclip (from a file too),
    the same encode_image / encode_text / forward with logit_bias, and strict load back into open_clip."""
    cfg = reduced_config("ViT-B-16-SigLIP")
    ref = oc_model(cfg).eval()
    assert any(k.startswith("visual.trunk.attn_pool.") for k in ref.state_dict())
    model = build_model_from_config(cfg, attn_impl=attn_impl).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    _compare_outputs(ref, model, cfg)
    out = model(torch.randn(1, 3, image_size(cfg), image_size(cfg)), text_inputs(cfg, 1))
    assert len(out) == 4 and out[3].item() == -10.0  # logit_bias, as open_clip's init_logit_bias
    back = oc_model(cfg)
    back.load_state_dict(model.state_dict(), strict=True)
    if attn_impl == "fastclip":  # the bidirectional text tower: no causal mask reaches the kernel
        import fastclip.functional as functional

        calls, orig = [], functional.flash_attention
        monkeypatch.setattr(functional, "flash_attention",
                            lambda q, k, v, **kw: calls.append(kw) or orig(q, k, v, **kw))
        model.encode_text(text_inputs(cfg, 1))
        assert len(calls) == cfg["text_cfg"]["layers"] and not any(c["causal"] for c in calls)


def test_options_no_shipped_config_uses():
    """Every option of open_clip's vision and text configs, against open_clip."""
    vision = {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 2.5,
              "ls_init_value": 0.1, "attentional_pool": True, "attn_pooler_queries": 5, "attn_pooler_heads": 2,
              "pos_embed_type": "sin_cos_2d", "pool_type": "avg", "act_kwargs": {"approximate": "tanh"},
              "norm_kwargs": {"eps": 1e-3}}
    text = {"context_length": 12, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2, "ls_init_value": 0.5,
            "embed_cls": True, "pad_id": 0, "proj_bias": True, "norm_kwargs": {"eps": 1e-6}}
    cases = [
        {"embed_dim": 48, "custom_text": True, "vision_cfg": vision, "text_cfg": text},
        {"embed_dim": 64, "vision_cfg": {**vision, "attentional_pool": False, "pool_type": "tok", "no_ln_pre": True,
                                         "final_ln_after_pool": True, "pos_embed_type": "learnable"},
         "text_cfg": {**text, "embed_cls": False, "pool_type": "eos", "eos_id": 7, "no_causal_mask": True,
                      "proj_type": "none", "proj_bias": False}},
        {"embed_dim": 16, "quick_gelu": True, "custom_text": True,
         "vision_cfg": {**vision, "attentional_pool": False, "pool_type": "avg", "patch_size": [8, 8],
                        "act_kwargs": None},
         "text_cfg": {**text, "embed_cls": False, "pool_type": "first"}},
    ]
    for cfg in cases:
        ref = oc_model(cfg).eval()
        model = build_model_from_config(cfg).eval()
        model.load_state_dict(ref.state_dict(), strict=True)
        image = torch.randn(3, 3, 32, 32)
        tokens = torch.randint(1, 300, (3, 12))
        tokens[0, 5:] = 0  # padding: masked keys when embed_cls
        tokens[1, 3] = 7  # the eos id
        with torch.no_grad():
            assert_close("image", model.encode_image(image), ref.encode_image(image), rtol=1e-5, atol=2e-6)
            assert_close("text", model.encode_text(tokens), ref.encode_text(tokens), rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="custom attention block"):
        build_model_from_config({**cases[1], "vision_cfg": {**cases[1]["vision_cfg"], "qk_norm": True}})
    with pytest.raises(ValueError, match="unsupported keys"):
        build_model_from_config({**cases[1], "text_cfg": {**text, "bogus": 1}})


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-SigLIP"])
def test_patch_dropout_in_training_equals_open_clip(name):
    """In training, the same seed drops the same patches as open_clip (native ViT) and timm (SigLIP trunk); eval
    keeps every patch."""
    cfg = reduced_config(name)
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    ref = oc_model(cfg).train()
    model = build_model_from_config(cfg).train()
    model.load_state_dict(ref.state_dict(), strict=True)
    image = torch.randn(3, 3, image_size(cfg), image_size(cfg))
    torch.manual_seed(7)
    a = model.encode_image(image)
    torch.manual_seed(7)
    b = ref.encode_image(image)
    assert_close("patch dropout", a, b, rtol=1e-5, atol=2e-6)
    torch.manual_seed(8)
    assert not torch.allclose(model.encode_image(image), a)  # another draw, other patches
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close("eval", model.encode_image(image), ref.encode_image(image), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-SigLIP"])
def test_resize_pos_embed_equals_open_clip(name):
    from open_clip.model import resize_pos_embed as oc_resize

    cfg = reduced_config(name)
    src = oc_model(cfg)
    big = copy.deepcopy(cfg)
    v = big["vision_cfg"]
    if "timm_kwargs" in v:
        v["timm_kwargs"]["img_size"] = v["image_size"] = 5 * v["timm_kwargs"]["img_size"] // 3
    else:
        v["image_size"] = 5 * v["patch_size"]
    model = build_model_from_config(big)
    sd = dict(src.state_dict())
    resize_pos_embed(sd, model)
    load_checkpoint(model, src.state_dict(), resize_pos_embed=True)
    key = "visual.trunk.pos_embed" if "timm_kwargs" in v else "visual.positional_embedding"
    assert torch.equal(model.state_dict()[key], sd[key])
    if key == "visual.positional_embedding":
        ref_sd = dict(src.state_dict())
        oc_resize(ref_sd, oc_model(big))
        assert torch.equal(sd[key], ref_sd[key])
    else:  # open_clip leaves timm trunks to timm, whose resample_abs_pos_embed is the same interpolation
        from timm.layers import resample_abs_pos_embed

        ref = resample_abs_pos_embed(src.state_dict()[key], new_size=model.visual.trunk.grid_size,
                                     num_prefix_tokens=0)
        assert_close("pos_embed", sd[key], ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(build_model_from_config(big), src.state_dict())


def test_safetensors_checkpoint(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    cfg = reduced_config("ViT-B-16-SigLIP")
    ref = oc_model(cfg)
    path = tmp_path / "open_clip_model.safetensors"
    safetensors.save_file(ref.state_dict(), str(path))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    model = create_model(str(tmp_path / "cfg.json"), pretrained=path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "RN50", "ViT-L-14-CLIPA", "ViT-B-32-SigLIP2-256",
                                  "ViT-M-16-alt"])
def test_from_open_clip_and_back(name):
    cfg = reduced_config(name)
    ref = oc_model(cfg, output_dict=True).eval()
    model = from_open_clip(ref)
    assert not model.training and model.output_dict
    assert model.config["vision_cfg"].get("timm_kwargs") == cfg["vision_cfg"].get("timm_kwargs")
    back = to_open_clip(model).eval()
    assert type(back) is type(ref)
    image = torch.randn(2, 3, image_size(cfg), image_size(cfg))
    text = text_inputs(cfg, 2)
    with torch.no_grad():
        a, b, c = ref(image, text), model(image, text), back(image, text)
    for key in a:
        assert_close(key, b[key], a[key], rtol=1e-5, atol=2e-6)
        assert torch.equal(c[key], a[key]), key
