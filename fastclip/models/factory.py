"""Build models by name, load checkpoints from files, and infer architectures from state dicts.

Checkpoints come from files only (fastclip downloads nothing). Accepted formats:

- a plain state dict (``torch.save(model.state_dict(), path)``), open_clip's or fastclip's keys;
- a training checkpoint ``{"state_dict": ..., ...}``, possibly with DistributedDataParallel's ``module.`` prefix
  (or torch.compile's ``_orig_mod.``);
- safetensors files (``open_clip_model.safetensors``, the format of open_clip's hub releases), read with the
  ``safetensors`` package;
- OpenAI's TorchScript release archives (``ViT-B-32.pt`` ...): loaded with ``torch.jit.load`` and read through
  their ``state_dict()``, whose extra ``input_resolution``/``context_length``/``vocab_size`` entries are dropped.

Loading is strict: any missing key, unexpected key or shape mismatch raises :class:`CheckpointError` naming the file
and the first offending keys, before anything is copied into the model.
"""
from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastclip.models.configs import MODEL_CONFIGS, TextCfg, get_model_config, list_models
from fastclip.models.model import CLIP, build_model_from_config, set_precision
from fastclip.models.transformer import QuickGELU

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the file and the keys."""


def read_checkpoint(path: Union[str, os.PathLike], *, weights_only: bool = True) -> Tuple[Dict[str, Tensor], str]:
    """Read a checkpoint file into (state dict on the CPU, format) with format "state_dict", "training",
    "safetensors" or "torchscript". ``weights_only=False`` allows arbitrary pickled objects: only for files you
    trust."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r} (pretrained= must be a path to a local file; "
                                f"fastclip downloads nothing)")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path!r} needs the safetensors package: pip install safetensors") from None
        return load_file(path, device="cpu"), "safetensors"
    errors = []
    ckpt = None
    if not _is_torchscript(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as e:  # noqa: BLE001 - not a pickle/zip checkpoint: maybe an older TorchScript archive
            errors.append(f"torch.load: {type(e).__name__}: {e}")
    if ckpt is None:
        try:
            ckpt = torch.jit.load(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            errors.append(f"torch.jit.load: {type(e).__name__}: {e}")
            raise CheckpointError(f"cannot read checkpoint {path!r}:\n  " + "\n  ".join(errors)) from None
    if isinstance(ckpt, torch.jit.ScriptModule):
        return dict(ckpt.state_dict()), "torchscript"
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return dict(ckpt["state_dict"]), "training"
    if isinstance(ckpt, Mapping) and all(isinstance(v, Tensor) for v in ckpt.values()):
        return dict(ckpt), "state_dict"
    raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__} that is neither a state dict, a "
                          f"{{'state_dict': ...}} training checkpoint nor a TorchScript archive")


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip holding ``<name>/constants.pkl`` (a torch.save zip has no such entry)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def clean_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Strip ``module.``/``_orig_mod.`` prefixes (DDP's, torch.compile's; nested in any order, until none is left)
    and drop OpenAI's non-parameter entries."""
    out = {}
    for k, v in state_dict.items():
        prefix = next((p for p in _PREFIXES if k.startswith(p)), None)
        while prefix is not None:
            k = k[len(prefix):]
            prefix = next((p for p in _PREFIXES if k.startswith(p)), None)
        if k in _OPENAI_EXTRA_KEYS:
            continue
        out[k] = v
    return out


def _fmt_keys(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checkpoint(model: CLIP, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]], *,
                    weights_only: bool = True, resize_pos_embed: bool = False) -> CLIP:
    """Load a checkpoint file (any format above) or a state dict into ``model``, strictly; returns the model.

    As open_clip's ``load_checkpoint``: a scalar/1-element ``logit_scale``/``logit_bias`` is reshaped to the
    model's, and a model with ``logit_bias`` loading a checkpoint without one gets zero. With
    ``resize_pos_embed=True`` the image positional embedding is interpolated to the model's grid
    (:func:`resize_pos_embed`); otherwise a checkpoint for another image size is a mismatch.
    """
    if isinstance(checkpoint, Mapping):
        sd, fmt, source = dict(checkpoint), "state_dict", "state dict"
    else:
        sd, fmt = read_checkpoint(checkpoint, weights_only=weights_only)
        source = f"checkpoint {os.fspath(checkpoint)!r}"
    sd = clean_state_dict(sd)
    if fmt == "torchscript" and not any(isinstance(m, QuickGELU) for m in model.modules()):
        warnings.warn(f"{source} is a TorchScript archive (OpenAI's release format), whose models use QuickGELU, "
                      f"but this model uses nn.GELU: use the '-quickgelu' model name", stacklevel=2)
    if resize_pos_embed:
        _resize(sd, model)
    expected = model.state_dict()
    for name in ("logit_scale", "logit_bias"):
        if name in sd and name in expected and sd[name].numel() == 1 and sd[name].shape != expected[name].shape:
            sd[name] = sd[name].reshape(expected[name].shape)
    if "logit_bias" in expected and "logit_bias" not in sd and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(expected["logit_bias"])
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}" for k in expected
                  if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_fmt_keys(mismatched, 3)}")
        raise CheckpointError(f"{source} does not match the model ({_describe(model)}): " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def _describe(model: CLIP) -> str:
    v = model.visual
    if hasattr(v, "trunk"):
        t = v.trunk
        vis = (f"timm ViT width {t.pos_embed.shape[-1]}, {len(t.blocks)} layers, patch {t.patch_size[0]}, "
               f"image {t.image_size[0]}")
    elif hasattr(v, "patch_size"):
        vis = (f"ViT width {v.conv1.out_channels}, {v.transformer.layers} layers, patch {v.patch_size[0]}, "
               f"image {v.image_size[0]}")
    else:
        vis = f"ModifiedResNet width {v.conv1.out_channels * 2}, image {v.image_size}"
    text = model._text_tower()
    return (f"{vis}; text width {text.transformer.width}, {text.transformer.layers} layers, context "
            f"{model.context_length}; embed_dim {model.config['embed_dim']}")


def resize_pos_embed(state_dict: Dict[str, Tensor], model: CLIP, interpolation: str = "bicubic",
                     antialias: bool = True) -> None:
    """Interpolate the image positional embedding of ``state_dict`` (in place) to ``model``'s patch grid, as
    open_clip's ``resize_pos_embed``: the class-token row is kept, the (g, g) grid of the others resized with
    ``F.interpolate(mode=interpolation, antialias=antialias)``. SigLIP's ``visual.trunk.pos_embed`` (1, g*g, C),
    which has no class-token row, is resized the same way. Nothing happens when the sizes already agree."""
    for key, extra in (("visual.positional_embedding", 1), ("visual.trunk.pos_embed", 0)):
        old = state_dict.get(key)
        grid = getattr(getattr(model.visual, "trunk", model.visual), "grid_size", None)
        if old is None or grid is None:
            continue
        lead = old.shape[:-2]  # () or (1,)
        old2 = old.reshape(-1, old.shape[-1])  # (extra + n, C)
        if old2.shape[0] == grid[0] * grid[1] + extra:
            continue
        tok, img = old2[:extra], old2[extra:]
        g_old = math.isqrt(img.shape[0])
        if g_old * g_old != img.shape[0]:
            raise CheckpointError(f"{key} has {img.shape[0]} grid positions, not a square grid")
        img = img.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        img = F.interpolate(img.float(), size=grid, mode=interpolation, antialias=antialias, align_corners=False)
        img = img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(old.dtype)  # (g'*g', C)
        state_dict[key] = torch.cat([tok, img]).reshape(*lead, -1, old.shape[-1])


_resize = resize_pos_embed  # load_checkpoint's argument of that name shadows the function


def _finish(model: CLIP, precision: str, device) -> CLIP:
    set_precision(model, precision)
    if device is not None:
        model.to(device)
    return model


def create_model(name: Union[str, os.PathLike], pretrained: Optional[Union[str, os.PathLike]] = None, *,
                 precision: str = "fp32", device: Optional[Union[str, torch.device]] = None,
                 attn_impl: str = "fastclip", output_dict: bool = False, text_pad_mask: bool = False,
                 init_logit_bias: Optional[float] = None, force_quick_gelu: bool = False,
                 force_patch_dropout: Optional[float] = None, force_image_size=None,
                 weights_only: bool = True) -> CLIP:
    """The model ``name`` (see :func:`list_models`, or the path of an open_clip JSON config), randomly
    initialized or loaded from the file ``pretrained``.

    Args:
        name: an open_clip model name: "ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16-SigLIP", "RN50", ...; OpenAI's
            checkpoints need the "-quickgelu" names. Or a path to a JSON file in open_clip's config schema.
        pretrained: path to a checkpoint (state dict, training checkpoint, safetensors file or OpenAI
            TorchScript archive).
        precision: "fp32" (default; train with autocast), "fp16"/"bf16" (OpenAI's mixed low precision: linear and
            conv weights in low precision, norms and embeddings fp32) or "pure_fp16"/"pure_bf16".
        device: where to put the model (default: stays on the CPU).
        attn_impl: "fastclip" (``fastclip.flash_attention``) or "sdpa" (PyTorch's).
        output_dict, text_pad_mask: see :class:`CLIP`; ``init_logit_bias`` overrides the config's.
        force_quick_gelu, force_patch_dropout, force_image_size: as open_clip's ``create_model`` (the
            positional embedding of ``pretrained`` is then interpolated to the new image size).

    The model is returned in training mode, as open_clip's ``create_model``; call ``.eval()`` for inference.
    """
    cfg = get_model_config(name)
    if force_quick_gelu:
        cfg["quick_gelu"] = True
    if force_patch_dropout is not None:
        cfg["vision_cfg"]["patch_dropout"] = force_patch_dropout
    if force_image_size is not None:
        cfg["vision_cfg"]["image_size"] = force_image_size
        if cfg["vision_cfg"].get("timm_model_name"):
            cfg["vision_cfg"]["timm_kwargs"] = {**(cfg["vision_cfg"].get("timm_kwargs") or {}),
                                                "img_size": force_image_size}
    if init_logit_bias is not None:
        cfg["init_logit_bias"] = init_logit_bias
    model = build_model_from_config(cfg, attn_impl=attn_impl, output_dict=output_dict, text_pad_mask=text_pad_mask)
    if pretrained is not None:
        load_checkpoint(model, pretrained, weights_only=weights_only, resize_pos_embed=force_image_size is not None)
    return _finish(model, precision, device)


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd for m in [pat.match(k)] if m})


def _ratio(mlp_width: int, width: int) -> float:
    """An mlp_ratio r with int(width * r) == mlp_width (the model computes the MLP width that way)."""
    r = mlp_width / width
    return r if int(width * r) == mlp_width else (mlp_width + 0.5) / width


def infer_config(state_dict: Mapping[str, Tensor]) -> dict:
    """What the tensor shapes of a CLIP state dict (OpenAI's, open_clip's ``CLIP`` or ``CustomTextCLIP`` layout)
    determine, as an open_clip-style config. What they do not determine is None: ``quick_gelu`` (the activation),
    ``vision_cfg["head_width"]`` and ``text_cfg["heads"]`` (head counts), the ViT's ``pool_type``, the text
    tower's ``no_causal_mask`` and ``pool_type``, and for a SigLIP trunk ``vision_cfg["timm_model_name"]``.
    LayerNorm's eps and GELU's ``approximate`` are not visible either and are left out (open_clip's defaults):
    check them. Fill the Nones in and pass the result as ``config=`` to :func:`create_model_from_state_dict`."""
    sd = state_dict
    custom = any(k.startswith("text.") for k in sd)
    t = "text." if custom else ""
    try:
        if "visual.trunk.pos_embed" in sd:
            w = sd["visual.trunk.patch_embed.proj.weight"]
            vision = {"image_size": w.shape[-1] * math.isqrt(sd["visual.trunk.pos_embed"].shape[1]),
                      "timm_model_name": None, "timm_pool": "map", "timm_proj": "none"}
        elif "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
            mlp_width = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = {"image_size": patch * grid, "layers": _count_blocks(sd, "visual.transformer.resblocks."),
                      "width": width, "patch_size": patch, "mlp_ratio": _ratio(mlp_width, width),
                      "head_width": None, "pool_type": None}
        else:
            layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            out_width = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
            vision = {"image_size": out_width * 32, "layers": layers,
                      "width": sd["visual.layer1.0.conv1.weight"].shape[0], "patch_size": None, "head_width": None}
        text_width = sd[t + "ln_final.weight"].shape[0]
        text = {"context_length": sd[t + "positional_embedding"].shape[0],
                "vocab_size": sd[t + "token_embedding.weight"].shape[0], "width": text_width, "heads": None,
                "layers": _count_blocks(sd, t + "transformer.resblocks."),
                "mlp_ratio": _ratio(sd[t + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0], text_width)}
        if t + "text_projection" in sd:  # a (C, E) matrix
            embed_dim = sd[t + "text_projection"].shape[1]
        elif t + "text_projection.weight" in sd:  # an nn.Linear (proj_bias): weight (E, C)
            embed_dim = sd[t + "text_projection.weight"].shape[0]
        else:  # no projection (proj_type "none"): the text features are the tower's width
            embed_dim = text_width
            text["proj_type"] = "none"
        text["proj_bias"] = t + "text_projection.weight" in sd
        text["no_causal_mask"] = text["pool_type"] = None
    except KeyError as e:
        raise CheckpointError(f"cannot infer a CLIP architecture: the state dict has no {e.args[0]!r} "
                              f"(first keys: {_fmt_keys(sd)})") from None
    cfg = {"embed_dim": embed_dim, "quick_gelu": None, "vision_cfg": vision, "text_cfg": text}
    if "logit_bias" in sd:
        cfg["init_logit_bias"] = 0.0  # a logit_bias exists; its value is the checkpoint's once loaded
    if custom:
        cfg["custom_text"] = True
    return cfg


def _candidates(sd: Mapping[str, Tensor], inferred: dict) -> list:
    """Built-in names whose models have exactly the state dict's keys and shapes (built on the meta device, after
    a cheap filter on the text tower's size)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k not in ("logit_scale", "logit_bias")}
    t = inferred["text_cfg"]
    out = []
    for name in list_models():
        text = TextCfg(**MODEL_CONFIGS[name]["text_cfg"])
        if (text.width, text.layers, text.context_length, text.vocab_size) != \
                (t["width"], t["layers"], t["context_length"], t["vocab_size"]):
            continue
        with torch.device("meta"):
            model = build_model_from_config(MODEL_CONFIGS[name], attn_impl="sdpa")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in ("logit_scale", "logit_bias")}
        if expected == shapes:
            out.append(name)
    return out


def create_model_from_state_dict(state_dict: Mapping[str, Tensor], model_name: Optional[str] = None, *,
                                 config: Optional[dict] = None, precision: str = "fp32",
                                 device: Optional[Union[str, torch.device]] = None, attn_impl: str = "fastclip",
                                 output_dict: bool = False, text_pad_mask: bool = False) -> CLIP:
    """A CLIP model for the state dict, loaded strictly from it. Accepts OpenAI's release layout (fp16 weights;
    the ``input_resolution``, ``context_length`` and ``vocab_size`` entries are dropped), open_clip's, and
    ``module.``/``_orig_mod.``-prefixed keys.

    The activation (QuickGELU or GELU) and the head counts are not determined by tensor shapes, so the
    architecture comes from ``model_name`` (a built-in name or an open_clip JSON path) or ``config`` (an
    open_clip config dict, e.g. :func:`infer_config`'s with its None fields filled in). Without either this raises
    :class:`CheckpointError` naming the built-in configs whose shapes match the state dict.
    """
    sd = clean_state_dict(state_dict)
    if model_name is None and config is None:
        inferred = infer_config(sd)
        names = _candidates(sd, inferred)
        hint = (f"built-in configs with exactly these shapes: {', '.join(names)}" if names else
                f"no built-in config has these shapes; pass config= (fastclip.models.infer_config(state_dict) gives "
                f"what the shapes determine, with None for the rest: {inferred})")
        raise CheckpointError("the activation (QuickGELU or GELU) and the attention head counts cannot be told from "
                              f"tensor shapes: pass model_name= or config= ({hint})")
    if model_name is not None and config is not None:
        raise ValueError("pass model_name= or config=, not both")
    cfg = get_model_config(model_name) if model_name is not None else config
    model = build_model_from_config(cfg, attn_impl=attn_impl, output_dict=output_dict, text_pad_mask=text_pad_mask)
    load_checkpoint(model, sd)
    return _finish(model, precision, device)


__all__ = ["create_model", "create_model_from_state_dict", "load_checkpoint", "read_checkpoint", "infer_config",
           "clean_state_dict", "resize_pos_embed", "list_models", "CheckpointError"]
