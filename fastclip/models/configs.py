"""Model configurations, named and shaped as open_clip's ``model_configs/*.json`` (the fields mean the same).

A config is a dict ``{"embed_dim", "quick_gelu" (optional), "vision_cfg", "text_cfg"}``. ``vision_cfg["layers"]``
is an int for a ViT and a 4-tuple for OpenAI's modified ResNet (whose ``width`` is the stem width and whose
attention-pool heads are ``width * 32 // head_width``). Each base config also exists as ``<name>-quickgelu``
(OpenAI's activation, for OpenAI checkpoints and OpenCLIP's quickgelu runs) wherever open_clip has one.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple, Union


@dataclass
class VisionCfg:
    layers: Union[Tuple[int, int, int, int], int] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: Optional[int] = 16
    image_size: Union[Tuple[int, int], int] = 224


@dataclass
class TextCfg:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


def _cfg(cls, d) -> object:
    """A VisionCfg/TextCfg from a dataclass or a dict; unknown keys are an error (they would be ignored silently)."""
    if isinstance(d, cls):
        return d
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unsupported keys {sorted(unknown)} (supported: {sorted(known)})")
    return cls(**d)


def _text(width: int, heads: int, layers: int = 12) -> dict:
    return {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers}


def _rn(embed_dim, image_size, layers, width, text_width, text_heads) -> dict:
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": list(layers), "width": width, "patch_size": None},
            "text_cfg": _text(text_width, text_heads)}


def _vit(embed_dim, image_size, layers, width, patch_size, text, head_width=None, mlp_ratio=None) -> dict:
    vision = {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size}
    if head_width is not None:
        vision["head_width"] = head_width
    if mlp_ratio is not None:
        vision["mlp_ratio"] = mlp_ratio
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}


_BASE: Dict[str, dict] = {
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, _text(512, 8)),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, _text(512, 8)),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, _text(768, 12)),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, _text(768, 12)),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, _text(1024, 16, 24), head_width=80),
    "ViT-g-14": _vit(1024, 224, 40, 1408, 14, _text(1024, 16, 24), head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _vit(1280, 224, 48, 1664, 14, _text(1280, 20, 32), head_width=104, mlp_ratio=4.9231),
}
# open_clip ships a -quickgelu variant of every base above except ViT-g-14
_QUICKGELU = [n for n in _BASE if n != "ViT-g-14"]

MODEL_CONFIGS: Dict[str, dict] = {}
for _name, _c in _BASE.items():
    MODEL_CONFIGS[_name] = _c
    if _name in _QUICKGELU:
        MODEL_CONFIGS[_name + "-quickgelu"] = {"embed_dim": _c["embed_dim"], "quick_gelu": True,
                                               "vision_cfg": _c["vision_cfg"], "text_cfg": _c["text_cfg"]}


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())]


def list_models() -> List[str]:
    """Names of the built-in architectures, sorted as open_clip sorts them."""
    return sorted(MODEL_CONFIGS, key=_natural_key)


def get_model_config(name: str) -> dict:
    """A deep copy of the named config; ValueError listing the names when unknown."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return copy.deepcopy(MODEL_CONFIGS[name])


__all__ = ["VisionCfg", "TextCfg", "MODEL_CONFIGS", "list_models", "get_model_config"]
