"""Build models by name, load checkpoints from files, and infer architectures from state dicts.

Checkpoints come from files only (fastclip downloads nothing). Accepted formats:

- a plain state dict (``torch.save(model.state_dict(), path)``), open_clip's or fastclip's keys;
- a training checkpoint ``{"state_dict": ..., ...}``, possibly with DistributedDataParallel's ``module.`` prefix
  (or torch.compile's ``_orig_mod.``);
- OpenAI's TorchScript release archives (``ViT-B-32.pt`` ...): loaded with ``torch.jit.load`` and read through
  their ``state_dict()``, whose extra ``input_resolution``/``context_length``/``vocab_size`` entries are dropped.

Loading is strict: any missing key, unexpected key or shape mismatch raises :class:`CheckpointError` naming the file
and the first offending keys, before anything is copied into the model.
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from fastclip.models.configs import MODEL_CONFIGS, get_model_config, list_models
from fastclip.models.model import CLIP, set_precision
from fastclip.models.transformer import QuickGELU

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the file and the keys."""


def read_checkpoint(path: Union[str, os.PathLike], *, weights_only: bool = True) -> Tuple[Dict[str, Tensor], str]:
    """Read a checkpoint file into (state dict on the CPU, format) with format "state_dict", "training" or
    "torchscript". ``weights_only=False`` allows arbitrary pickled objects: only for files you trust."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r} (pretrained= must be a path to a local file; "
                                f"fastclip downloads nothing)")
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
    """Strip ``module.``/``_orig_mod.`` prefixes and drop OpenAI's non-parameter entries."""
    out = {}
    for k, v in state_dict.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        if k in _OPENAI_EXTRA_KEYS:
            continue
        out[k] = v
    return out


def _fmt_keys(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checkpoint(model: CLIP, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]], *,
                    weights_only: bool = True) -> CLIP:
    """Load a checkpoint file (any format above) or a state dict into ``model``, strictly; returns the model.

    As open_clip's ``load_checkpoint``: a scalar/1-element ``logit_scale``/``logit_bias`` is reshaped to the
    model's, and a model with ``logit_bias`` loading a checkpoint without one gets zero. Positional embeddings are
    not resized: a checkpoint for another image size or context length is a mismatch.
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
    if hasattr(v, "patch_size"):
        vis = (f"ViT width {v.conv1.out_channels}, {v.transformer.layers} layers, patch {v.patch_size[0]}, "
               f"image {v.image_size[0]}")
    else:
        vis = f"ModifiedResNet width {v.conv1.out_channels * 2}, image {v.image_size}"
    return (f"{vis}; text width {model.transformer.width}, {model.transformer.layers} layers, context "
            f"{model.context_length}; embed_dim {model.text_projection.shape[1]}")


def _finish(model: CLIP, precision: str, device) -> CLIP:
    set_precision(model, precision)
    if device is not None:
        model.to(device)
    return model


def create_model(name: str, pretrained: Optional[Union[str, os.PathLike]] = None, *, precision: str = "fp32",
                 device: Optional[Union[str, torch.device]] = None, attn_impl: str = "fastclip",
                 output_dict: bool = False, text_pad_mask: bool = False, init_logit_bias: Optional[float] = None,
                 weights_only: bool = True) -> CLIP:
    """The model ``name`` (see :func:`list_models`), randomly initialized or loaded from the file ``pretrained``.

    Args:
        name: an open_clip model name: "ViT-B-32", "ViT-B-32-quickgelu", "RN50", ...; OpenAI's checkpoints need
            the "-quickgelu" names.
        pretrained: path to a checkpoint (state dict, training checkpoint or OpenAI TorchScript archive).
        precision: "fp32" (default; train with autocast), "fp16"/"bf16" (OpenAI's mixed low precision: linear and
            conv weights in low precision, norms and embeddings fp32) or "pure_fp16"/"pure_bf16".
        device: where to put the model (default: stays on the CPU).
        attn_impl: "fastclip" (``fastclip.flash_attention``) or "sdpa" (PyTorch's).
        output_dict, text_pad_mask, init_logit_bias: see :class:`CLIP`.

    The model is returned in training mode, as open_clip's ``create_model``; call ``.eval()`` for inference.
    """
    cfg = get_model_config(name)
    model = CLIP(**cfg, init_logit_bias=init_logit_bias, attn_impl=attn_impl, output_dict=output_dict,
                 text_pad_mask=text_pad_mask)
    if pretrained is not None:
        load_checkpoint(model, pretrained, weights_only=weights_only)
    return _finish(model, precision, device)


def _count_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd for m in [pat.match(k)] if m})


def infer_config(state_dict: Mapping[str, Tensor], quick_gelu: bool = True) -> dict:
    """An open_clip-style config from the tensor shapes of a CLIP state dict (OpenAI's or open_clip's layout).

    Head counts are not visible in shapes: when the shapes equal a built-in config's, its head widths are used (so
    ViT-H-14's 80-wide heads are right); otherwise heads are 64 wide, as in every OpenAI model. The activation is
    not visible either: ``quick_gelu`` (OpenAI's, the default) or nn.GELU (most OpenCLIP-trained checkpoints).
    """
    sd = state_dict
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            mlp_width = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = {"image_size": patch * grid, "layers": _count_blocks(sd, "visual.transformer.resblocks."),
                      "width": width, "patch_size": patch, "mlp_ratio": _ratio(mlp_width, width)}
        else:
            layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            out_width = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"image_size": out_width * 32, "layers": layers,
                      "width": sd["visual.layer1.0.conv1.weight"].shape[0], "patch_size": None}
        text_width = sd["ln_final.weight"].shape[0]
        text = {"context_length": sd["positional_embedding"].shape[0],
                "vocab_size": sd["token_embedding.weight"].shape[0], "width": text_width, "heads": text_width // 64,
                "layers": _count_blocks(sd, "transformer.resblocks."),
                "mlp_ratio": _ratio(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], text_width)}
        embed_dim = sd["text_projection"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"cannot infer a CLIP architecture: the state dict has no {e.args[0]!r} "
                              f"(first keys: {_fmt_keys(sd)})") from None
    for known in MODEL_CONFIGS.values():  # borrow the head widths of a built-in config with the same shapes
        kv, kt = known["vision_cfg"], known["text_cfg"]
        same = (known["embed_dim"] == embed_dim and list(_as_list(kv["layers"])) == list(_as_list(vision["layers"]))
                and kv["width"] == vision["width"] and kv.get("patch_size") == vision["patch_size"]
                and kv["image_size"] == vision["image_size"] and kt["width"] == text["width"]
                and kt["layers"] == text["layers"])
        if same:
            if "head_width" in kv:
                vision["head_width"] = kv["head_width"]
            text["heads"] = kt["heads"]
            break
    return {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text}


def _as_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


def _ratio(mlp_width: int, width: int) -> float:
    """An mlp_ratio r with int(width * r) == mlp_width (the model computes the MLP width that way)."""
    r = mlp_width / width
    return r if int(width * r) == mlp_width else (mlp_width + 0.5) / width


def create_model_from_state_dict(state_dict: Mapping[str, Tensor], *, quick_gelu: bool = True,
                                 precision: str = "fp32", device: Optional[Union[str, torch.device]] = None,
                                 attn_impl: str = "fastclip", output_dict: bool = False,
                                 text_pad_mask: bool = False) -> CLIP:
    """A CLIP model whose architecture is inferred from the state dict's shapes (:func:`infer_config`), loaded
    strictly from it. Accepts OpenAI's release layout (fp16 weights; the ``input_resolution``,
    ``context_length`` and ``vocab_size`` entries are dropped), open_clip's, and ``module.``-prefixed keys."""
    sd = clean_state_dict(state_dict)
    cfg = infer_config(sd, quick_gelu=quick_gelu)
    init_bias = float(sd["logit_bias"].float().reshape(-1)[0]) if "logit_bias" in sd else None
    model = CLIP(**cfg, init_logit_bias=init_bias, attn_impl=attn_impl, output_dict=output_dict,
                 text_pad_mask=text_pad_mask)
    load_checkpoint(model, sd)
    return _finish(model, precision, device)


__all__ = ["create_model", "create_model_from_state_dict", "load_checkpoint", "read_checkpoint", "infer_config",
           "clean_state_dict", "list_models", "CheckpointError"]
