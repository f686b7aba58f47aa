"""Shared by the model tests: open_clip's models for a config (timm trunks at reduced size included) and reduced
configs of every family."""
from __future__ import annotations

import contextlib
import copy

import torch

from fastclip.models import TIMM_VITS, get_model_config


@contextlib.contextmanager
def timm_kwargs(kwargs):
    """Within: open_clip's TimmModel builds its trunk with these extra timm.create_model arguments (the reduced
    sizes of fastclip's ``timm_kwargs``)."""
    import open_clip.timm_model as tm

    orig = tm.timm.create_model

    def create(name, **kw):
        return orig(name, **{**kw, **(kwargs or {})})

    tm.timm.create_model = create
    try:
        yield
    finally:
        tm.timm.create_model = orig


def oc_model(cfg: dict, **kw):
    """open_clip's model for a config dict, as open_clip's create_model builds it (CLIP or CustomTextCLIP)."""
    import open_clip

    cfg = copy.deepcopy(cfg)
    extra = cfg["vision_cfg"].pop("timm_kwargs", None)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    with timm_kwargs(extra):
        return cls(**cfg, **kw)


def reduced_config(name: str) -> dict:
    """The named config at small width and depth, keeping what distinguishes the family: patch size, head width,
    MLP ratio, activation, pooling and every other option, ResNet vs ViT vs SigLIP's timm trunk; vocabularies
    larger than OpenAI's are cut to OpenAI's 49,408."""
    cfg = get_model_config(name)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if v.get("timm_model_name"):
        patch = TIMM_VITS[v["timm_model_name"]][0]
        v["timm_kwargs"] = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 3 * patch}
        v["image_size"] = 3 * patch
    elif isinstance(v["layers"], (list, tuple)):
        v.update(layers=[1, 1, 1, 1], width=8, image_size=64)  # grid 2x2; 4 heads of 64 in the attention pool
    else:
        hw = v.get("head_width", 64)
        v.update(layers=2, width=2 * hw, image_size=3 * v["patch_size"])  # 2 heads, 3x3 patches + class token
    t.update(width=64, heads=2, layers=2, vocab_size=min(t.get("vocab_size", 49408), 49408))
    cfg["embed_dim"] = 48
    return cfg


def image_size(cfg: dict) -> int:
    return cfg["vision_cfg"]["image_size"]


def text_inputs(cfg: dict, batch: int = 3) -> torch.Tensor:
    """OpenAI-tokenized texts at the config's context length; for "eos" pooling the end-of-text id is the
    config's ``eos_id``."""
    import fastclip

    t = cfg["text_cfg"]
    text = fastclip.tokenize(["a photo of a cat", "", "a diagram " * 40][:batch] + ["x"] * max(0, batch - 3),
                             context_length=t.get("context_length", 77))
    if t.get("pool_type") == "eos":
        text[text == 49407] = t.get("eos_id", 2)
    return text % t.get("vocab_size", 49408)
