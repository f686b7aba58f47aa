"""Live open_clip models into fastclip's and back: the config is read off the modules, the weights copied strictly.

    model = fastclip.from_open_clip(open_clip_model)     # same architecture, same weights, same outputs
    oc = fastclip.to_open_clip(model)                     # needs open_clip (and timm for SigLIP's towers)

What a module does not record is taken from its structure: the activation from the MLP's module (QuickGELU,
GELU and its ``approximate``), LayerNorm's ``eps``, the head counts from ``nn.MultiheadAttention.num_heads``,
layer scale from the ``ls_1`` modules, causality from the text tower's ``attn_mask``. open_clip models that
fastclip does not build (Hugging Face text towers, timm trunks other than SigLIP's ViT, CoCa, custom attention
blocks) raise a ValueError saying which part.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from fastclip.models.configs import TIMM_VITS
from fastclip.models.model import CLIP, build_model_from_config
from fastclip.models.factory import _ratio


def _act_norm(block: nn.Module, mlp_act: nn.Module, norm: nn.LayerNorm) -> dict:
    """act_kwargs / norm_kwargs / quick_gelu of a tower, from its first block's activation and LayerNorm."""
    out = {"quick_gelu": type(mlp_act).__name__ == "QuickGELU"}
    if isinstance(mlp_act, nn.GELU) and mlp_act.approximate != "none":
        out["act_kwargs"] = {"approximate": mlp_act.approximate}
    elif not isinstance(mlp_act, nn.GELU) and not out["quick_gelu"]:
        raise ValueError(f"activation {type(mlp_act).__name__} is not built by fastclip (QuickGELU or GELU)")
    if norm.eps != 1e-5:
        out["norm_kwargs"] = {"eps": norm.eps}
    return out


def _ls(block: nn.Module) -> Optional[float]:
    gamma = getattr(block.ls_1, "gamma", None)
    return None if gamma is None else float(gamma.detach().reshape(-1)[0])


def _blocks(transformer: nn.Module):
    blocks = transformer.resblocks
    if type(blocks[0]).__name__ != "ResidualAttentionBlock":
        raise ValueError(f"open_clip's {type(blocks[0]).__name__} (custom attention block) is not built by fastclip")
    return blocks


def _vision_cfg(visual: nn.Module) -> dict:
    kind = type(visual).__name__
    if kind == "TimmModel":
        return _timm_cfg(visual)
    if kind == "ModifiedResNet":
        width = visual.conv1.out_channels * 2
        return {"layers": [len(visual.layer1), len(visual.layer2), len(visual.layer3), len(visual.layer4)],
                "width": width, "head_width": width * 32 // visual.attnpool.num_heads,
                "image_size": visual.image_size, "patch_size": None}
    if kind != "VisionTransformer":
        raise ValueError(f"open_clip vision tower {kind} is not built by fastclip")
    blocks = _blocks(visual.transformer)
    b0 = blocks[0]
    width = visual.conv1.out_channels
    cfg = {"layers": len(blocks), "width": width, "head_width": width // b0.attn.num_heads,
           "mlp_ratio": _ratio(b0.mlp.c_fc.out_features, width), "patch_size": visual.patch_size[0],
           "image_size": list(visual.image_size), "ls_init_value": _ls(b0),
           "patch_dropout": getattr(visual.patch_dropout, "prob", 0.0),
           "no_ln_pre": isinstance(visual.ln_pre, nn.Identity),
           "pos_embed_type": "learnable" if visual.positional_embedding.requires_grad else "sin_cos_2d",
           "final_ln_after_pool": visual.final_ln_after_pool, "pool_type": visual.pool_type,
           "output_tokens": visual.output_tokens}
    if visual.attn_pool is not None:
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise ValueError("open_clip's 'parallel'/'cascade' attentional pooling is not built by fastclip")
        cfg.update(attentional_pool=True, attn_pooler_queries=visual.attn_pool.query.shape[0],
                   attn_pooler_heads=visual.attn_pool.attn.num_heads)
    act = _act_norm(b0, b0.mlp.gelu, b0.ln_1)
    cfg.update({k: v for k, v in act.items() if k != "quick_gelu"})
    cfg["_quick_gelu"] = act["quick_gelu"]
    return cfg


def _is_gelu_tanh(act: nn.Module) -> bool:
    """timm's GELUTanh (its own class) or nn.GELU(approximate="tanh"); plain GELU otherwise, and anything else
    is refused."""
    if type(act).__name__ == "GELUTanh" or getattr(act, "approximate", None) == "tanh":
        return True
    if type(act).__name__ != "GELU":
        raise ValueError(f"timm trunk activation {type(act).__name__} is not built by fastclip (GELU, GELU-tanh)")
    return False


def _timm_cfg(visual: nn.Module) -> dict:
    trunk = visual.trunk
    name = getattr(trunk, "pretrained_cfg", {}).get("architecture")
    if name not in TIMM_VITS:
        raise ValueError(f"the timm trunk {name!r} is not built by fastclip (it builds: {', '.join(TIMM_VITS)})")
    b0 = trunk.blocks[0]
    act = b0.mlp.act
    actual = {"img_size": trunk.patch_embed.img_size[0], "patch_size": trunk.patch_embed.patch_size[0],
              "embed_dim": trunk.embed_dim, "depth": len(trunk.blocks), "num_heads": b0.attn.num_heads,
              "act_layer": "gelu_tanh" if _is_gelu_tanh(act) else "gelu"}
    base = dict(zip(("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "act_layer", "img_size"),
                    TIMM_VITS[name]))
    hidden = b0.mlp.fc1.out_features
    actual["mlp_ratio"] = base["mlp_ratio"] if int(trunk.embed_dim * base["mlp_ratio"]) == hidden \
        else _ratio(hidden, trunk.embed_dim)
    kwargs = {k: v for k, v in actual.items() if v != base[k]}
    head = visual.head
    proj = "linear" if hasattr(head, "proj") else ("none" if isinstance(trunk.head, nn.Identity) else None)
    if hasattr(head, "mlp"):
        raise ValueError("timm_proj='mlp' is not built by fastclip")
    cfg = {"image_size": list(visual.image_size), "timm_model_name": name, "timm_pool": "map", "timm_proj": proj,
           "timm_proj_bias": proj == "linear" and head.proj.bias is not None,
           "timm_drop": head.drop.p if proj == "linear" else 0.0,
           "patch_dropout": getattr(trunk.patch_drop, "prob", 0.0), "_quick_gelu": None}
    if kwargs:
        cfg["timm_kwargs"] = kwargs
    return cfg


def _text_cfg(model: nn.Module) -> dict:
    custom = hasattr(model, "text")
    text = model.text if custom else model
    if custom and type(text).__name__ != "TextTransformer":
        raise ValueError(f"open_clip text tower {type(text).__name__} is not built by fastclip")
    blocks = _blocks(text.transformer)
    b0 = blocks[0]
    width = text.token_embedding.embedding_dim
    cls_emb = getattr(text, "cls_emb", None) if custom else None
    proj = text.text_projection
    cfg = {"context_length": text.positional_embedding.shape[0] - int(cls_emb is not None),
           "vocab_size": text.token_embedding.num_embeddings, "width": width, "heads": b0.attn.num_heads,
           "layers": len(blocks), "mlp_ratio": _ratio(b0.mlp.c_fc.out_features, width), "ls_init_value": _ls(b0),
           "embed_cls": cls_emb is not None, "no_causal_mask": text.attn_mask is None,
           "pool_type": text.pool_type if custom else model.text_pool_type,
           "eos_id": text.eos_id if custom else model.text_eos_id, "pad_id": getattr(text, "pad_id", 0),
           "proj_type": "none" if proj is None else "linear",
           "proj_bias": isinstance(proj, nn.Linear), "output_tokens": getattr(text, "output_tokens", False)}
    if isinstance(proj, nn.Linear) and proj.bias is None:
        raise ValueError("a bias-free nn.Linear text projection is not an open_clip config")
    act = _act_norm(b0, b0.mlp.gelu, b0.ln_1)
    cfg.update({k: v for k, v in act.items() if k != "quick_gelu"})
    cfg["_quick_gelu"] = act["quick_gelu"]
    return cfg


def open_clip_config(model: nn.Module) -> dict:
    """The open_clip config (JSON schema) of a live open_clip ``CLIP`` or ``CustomTextCLIP``."""
    kind = type(model).__name__
    if kind not in ("CLIP", "CustomTextCLIP"):
        raise ValueError(f"open_clip model class {kind} is not built by fastclip (CLIP and CustomTextCLIP are)")
    vision, text = _vision_cfg(model.visual), _text_cfg(model)
    qv, qt = vision.pop("_quick_gelu", None), text.pop("_quick_gelu")
    if qv is not None and qv != qt:
        raise ValueError("the image and text towers use different activations (QuickGELU in one only): no open_clip "
                         "config expresses that")
    text_proj = (model.text if hasattr(model, "text") else model).text_projection
    if text_proj is None:
        embed_dim = model.visual.output_dim if hasattr(model.visual, "output_dim") else text["width"]
    else:
        embed_dim = text_proj.out_features if isinstance(text_proj, nn.Linear) else text_proj.shape[1]
    cfg = {"embed_dim": embed_dim, "quick_gelu": qt, "vision_cfg": vision, "text_cfg": text}
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
    if kind == "CustomTextCLIP":
        cfg["custom_text"] = True
    return cfg


def from_open_clip(model: nn.Module, *, attn_impl: str = "fastclip") -> CLIP:
    """fastclip's model for a live open_clip model: the same config (read off its modules), its weights copied
    (strictly), the same ``output_dict``, training mode and device. Its outputs equal the open_clip model's."""
    cfg = open_clip_config(model)
    nonscalar = model.logit_scale.dim() == 1
    param = next(model.parameters())
    with torch.device("meta"):
        out = build_model_from_config(cfg, attn_impl=attn_impl, output_dict=bool(getattr(model, "output_dict", False)),
                                      nonscalar_logit_scale=nonscalar)
    out.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    return out.to(param.device).train(model.training)


def to_open_clip(model: CLIP):
    """open_clip's model (``open_clip.model.CLIP`` or ``CustomTextCLIP``) for a fastclip model, from
    ``model.config`` with the weights copied strictly. A reduced SigLIP trunk (``timm_kwargs``) is built with
    ``timm.create_model(name, **timm_kwargs)`` as open_clip's ``TimmModel`` would build it (open_clip first builds
    the full-size trunk its config names, which is then replaced)."""
    import open_clip

    cfg = copy.deepcopy(model.config)
    vision = cfg["vision_cfg"]
    timm_kwargs = vision.pop("timm_kwargs", None)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    nonscalar = model.logit_scale.dim() == 1
    oc = cls(**cfg, nonscalar_logit_scale=nonscalar, output_dict=model.output_dict)
    if timm_kwargs:
        import timm

        drop = vision.get("patch_dropout", 0.0)
        trunk = timm.create_model(vision["timm_model_name"], num_classes=oc.visual.trunk.num_classes,
                                  global_pool="map", **({"patch_drop_rate": drop} if drop else {}), **timm_kwargs)
        if vision.get("timm_proj") == "linear":
            trunk.reset_classifier(0, global_pool="map")
        oc.visual.trunk = trunk
        if hasattr(oc.visual.head, "proj"):
            oc.visual.head.proj = nn.Linear(trunk.embed_dim, cfg["embed_dim"], bias=vision.get("timm_proj_bias", False))
    oc.load_state_dict(model.state_dict(), strict=True)
    param = next(model.parameters())
    return oc.to(param.device).train(model.training)


__all__ = ["from_open_clip", "to_open_clip", "open_clip_config"]
