"""Model configurations: open_clip's ``model_configs/*.json``, read as open_clip reads them.

The JSON files of every open_clip model whose towers fastclip builds itself ship in ``fastclip/data/model_configs/``
(copied unchanged from open_clip, MIT: ``fastclip/data/LICENSE-open_clip.txt``). A config is a dict
``{"embed_dim", "quick_gelu"?, "init_logit_bias"?, "custom_text"?, "vision_cfg", "text_cfg"}`` whose
``vision_cfg``/``text_cfg`` take exactly the fields of open_clip's ``CLIPVisionCfg``/``CLIPTextCfg`` with the same
defaults (:class:`VisionCfg`, :class:`TextCfg`). Any open_clip JSON file can be passed by path; what fastclip does
not build (timm trunks other than SigLIP's ViT, Hugging Face text towers, CoCa, open_clip's "custom" attention
blocks) is refused with a message saying so, never approximated.

SigLIP's vision towers are named in open_clip by a timm model (``"timm_model_name": "vit_base_patch16_siglip_224"``);
:data:`TIMM_VITS` holds their architecture as timm defines it, so that timm is not needed to build them.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple, Union

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "model_configs")


@dataclass
class VisionCfg:
    """open_clip's ``CLIPVisionCfg``: the same fields, the same defaults."""
    layers: Union[Tuple[int, int, int, int], int] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: Union[Tuple[int, int], int] = 224
    ls_init_value: Optional[float] = None
    patch_dropout: float = 0.
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    no_ln_pre: bool = False
    pos_embed_type: str = "learnable"
    final_ln_after_pool: bool = False
    pool_type: str = "tok"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None
    block_type: Optional[str] = None
    qk_norm: bool = False
    scaled_cosine_attn: bool = False
    scale_heads: bool = False
    scale_attn_inner: bool = False
    scale_attn: bool = False
    scale_fc: bool = False
    timm_model_name: Optional[str] = None
    timm_model_pretrained: bool = False
    timm_pool: str = "avg"
    timm_proj: str = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.
    timm_drop_path: Optional[float] = None
    # fastclip only (open_clip has no such field): overrides of the timm model's arguments, as keyword arguments
    # of ``timm.create_model`` (embed_dim, depth, num_heads, mlp_ratio), for reduced-size towers in tests
    timm_kwargs: Optional[dict] = None


@dataclass
class TextCfg:
    """open_clip's ``CLIPTextCfg``: the same fields, the same defaults."""
    context_length: int = 77
    vocab_size: int = 49408
    hf_tokenizer_name: Optional[str] = None
    tokenizer_mode: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    embed_cls: bool = False
    pad_id: int = 0
    eos_id: int = 2
    no_causal_mask: bool = False
    final_ln_after_pool: bool = False  # read and ignored by open_clip's text tower; so here
    pool_type: str = "argmax"
    proj_bias: bool = False
    proj_type: str = "linear"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None
    block_type: Optional[str] = None
    qk_norm: bool = False
    scaled_cosine_attn: bool = False
    scale_heads: bool = False
    scale_attn_inner: bool = False
    scale_attn: bool = False
    scale_fc: bool = False
    hf_model_name: Optional[str] = None
    hf_model_pretrained: bool = True
    hf_proj_type: str = "mlp"
    hf_pooler_type: str = "mean_pooler"


# timm's SigLIP ViTs (timm/models/vision_transformer.py): no class token, "map" attention-pool head, LayerNorm eps
# 1e-6, qkv and patch-embedding biases. name -> (patch_size, width, depth, heads, mlp_ratio, activation, image_size)
_B, _L, _SO, _G = (768, 12, 12, 4.0), (1024, 24, 16, 4.0), (1152, 27, 16, 3.7362), (1536, 40, 16, 4.0)
TIMM_VITS: Dict[str, Tuple[int, int, int, int, float, str, int]] = {
    "vit_base_patch32_siglip_256": (32, *_B, "gelu_tanh", 256),
    "vit_base_patch16_siglip_224": (16, *_B, "gelu", 224),
    "vit_base_patch16_siglip_256": (16, *_B, "gelu", 256),
    "vit_base_patch16_siglip_384": (16, *_B, "gelu", 384),
    "vit_base_patch16_siglip_512": (16, *_B, "gelu", 512),
    "vit_large_patch16_siglip_256": (16, *_L, "gelu", 256),
    "vit_large_patch16_siglip_384": (16, *_L, "gelu", 384),
    "vit_large_patch16_siglip_512": (16, *_L, "gelu_tanh", 512),
    "vit_so400m_patch14_siglip_224": (14, *_SO, "gelu", 224),
    "vit_so400m_patch14_siglip_378": (14, *_SO, "gelu", 378),
    "vit_so400m_patch14_siglip_384": (14, *_SO, "gelu", 384),
    "vit_so400m_patch16_siglip_256": (16, *_SO, "gelu_tanh", 256),
    "vit_so400m_patch16_siglip_384": (16, *_SO, "gelu_tanh", 384),
    "vit_so400m_patch16_siglip_512": (16, *_SO, "gelu_tanh", 512),
    "vit_giantopt_patch16_siglip_256": (16, *_G, "gelu_tanh", 256),
    "vit_giantopt_patch16_siglip_384": (16, *_G, "gelu_tanh", 384),
}

_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _cfg(cls, d):
    """A VisionCfg/TextCfg from a dataclass or a dict; unknown keys are an error, as in open_clip (whose dataclass
    constructor raises), and so are the options fastclip does not build."""
    if isinstance(d, cls):
        cfg = d
    else:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unsupported keys {sorted(unknown)} (supported: {sorted(known)})")
        cfg = cls(**d)
    where = "vision_cfg" if cls is VisionCfg else "text_cfg"
    custom = [k for k in _CUSTOM_BLOCK if getattr(cfg, k)]
    if custom or cfg.block_type not in (None, "default"):
        raise ValueError(f"{where}: open_clip's custom attention block ({custom or cfg.block_type}) is not built by "
                         f"fastclip; its blocks are the default pre-LN ones")
    if cls is TextCfg and cfg.hf_model_name:
        raise ValueError(f"text_cfg: Hugging Face text towers ({cfg.hf_model_name!r}) are not built by fastclip")
    if cls is VisionCfg and cfg.timm_model_name:
        if cfg.timm_model_name not in TIMM_VITS:
            raise ValueError(f"vision_cfg: the timm model {cfg.timm_model_name!r} is not built by fastclip (it builds "
                             f"timm's SigLIP ViTs: {', '.join(TIMM_VITS)})")
        if cfg.timm_model_pretrained:
            raise ValueError("vision_cfg: timm_model_pretrained=True would download ImageNet weights; fastclip loads "
                             "weights from files only (pass pretrained=)")
        if cfg.timm_drop_path:
            raise ValueError(f"vision_cfg: timm_drop_path={cfg.timm_drop_path} (stochastic depth) is not implemented")
        if cfg.timm_pool != "map" or cfg.timm_proj not in (None, "", "none", "linear"):
            raise ValueError(f"vision_cfg: timm_pool={cfg.timm_pool!r}, timm_proj={cfg.timm_proj!r}: fastclip builds "
                             f"SigLIP's trunks with timm_pool 'map' and timm_proj 'none', 'linear' or null")
    return cfg


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())]


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{path!r} is not an open_clip model config (needs embed_dim, vision_cfg and text_cfg)")
    return cfg


def _load_builtin() -> Dict[str, dict]:
    return {os.path.splitext(f)[0]: _read_json(os.path.join(CONFIG_DIR, f))
            for f in sorted(os.listdir(CONFIG_DIR)) if f.endswith(".json")}


MODEL_CONFIGS: Dict[str, dict] = _load_builtin()


def add_model_config(path: Union[str, os.PathLike]) -> None:
    """Register an open_clip JSON config file (or every ``*.json`` in a folder) under its file name."""
    path = os.fspath(path)
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".json")] \
        if os.path.isdir(path) else [path]
    for f in files:
        MODEL_CONFIGS[os.path.splitext(os.path.basename(f))[0]] = _read_json(f)


def list_models() -> List[str]:
    """Names of the built-in architectures, sorted as open_clip sorts them."""
    return sorted(MODEL_CONFIGS, key=_natural_key)


def get_model_config(name: Union[str, os.PathLike]) -> dict:
    """A deep copy of the named config, or of the JSON file at ``name``; ValueError listing the names when
    unknown."""
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.endswith(".json") and os.path.isfile(name)):
        return _read_json(os.fspath(name))
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return copy.deepcopy(MODEL_CONFIGS[name])


__all__ = ["VisionCfg", "TextCfg", "MODEL_CONFIGS", "TIMM_VITS", "list_models", "get_model_config",
           "add_model_config"]
