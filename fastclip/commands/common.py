"""What the commands share: the model options, loading a model, and embedding images and texts in batches.

A model comes from ``--model NAME --pretrained FILE`` (NAME a ``fastclip.list_models()`` name or the path of an
open_clip model config JSON; a checkpoint's shapes do not tell its activation or head counts, so the architecture is
always named), or from ``--run DIR``: a ``fastclip train`` run folder, that is a directory containing
``config.json`` with a ``model`` key (at the top or under ``options``, as ``fastclip train`` writes it) and a
checkpoint file (``checkpoints/last.pt``, else the newest ``*.pt`` in the
folder or in ``checkpoints/``); the checkpoint's weights are its ``model`` or ``state_dict`` entry, or the file
itself when it is a plain state dict. The run's model name must be a ``fastclip.list_models()`` name or one of
``fastclip train``'s own configs (``fastclip.train.models``).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("model" + ("" if required else " (default: the one the index was built with)"))
    g.add_argument("--model", help="model name (fastclip.list_models()) or an open_clip model config JSON")
    g.add_argument("--pretrained", help="checkpoint file of that model (OpenAI, open_clip or fastclip train)")
    g.add_argument("--run", help="a fastclip train run folder (config.json with a 'model' key, and a checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)


def model_spec(args) -> Optional[dict]:
    """The model options as a dict (stored in an index), or None when none were given."""
    if args.run:
        if args.model or args.pretrained:
            raise SystemExit("give --run, or --model/--pretrained, not both")
        return {"run": os.path.abspath(args.run)}
    if args.pretrained and not args.model:
        raise SystemExit("--pretrained needs --model NAME (a fastclip.list_models() name or an open_clip config "
                         "JSON): a checkpoint's shapes do not tell its activation or head counts")
    if args.model and not args.pretrained:
        raise SystemExit(f"--model {args.model} needs --pretrained FILE (fastclip downloads no weights)")
    if args.model:
        model = os.path.abspath(args.model) if args.model.endswith(".json") else args.model
        return {"model": model, "pretrained": os.path.abspath(args.pretrained)}
    return None


def _run_checkpoint(run: str) -> Tuple[str, str]:
    cfg_path = os.path.join(run, "config.json")
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"--run {run}: no config.json there (expected a fastclip train run folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    name = cfg.get("model") or cfg.get("options", {}).get("model")  # fastclip train: {"options": {"model": ...}}
    if not name:
        raise SystemExit(f"--run {run}: config.json has no 'model' key")
    last = os.path.join(run, "checkpoints", "last.pt")
    found = [last] if os.path.isfile(last) else sorted(
        glob.glob(os.path.join(run, "*.pt")) + glob.glob(os.path.join(run, "checkpoints", "*.pt")),
        key=os.path.getmtime)
    if not found:
        raise SystemExit(f"--run {run}: no checkpoint (checkpoints/last.pt or *.pt)")
    return name, found[-1]


def _run_state_dict(path: str) -> dict:
    # a run folder is the user's own training output: its checkpoint also pickles optimizer and RNG states
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def load_model(spec: dict, device: str = "cpu"):
    """(model in eval mode on ``device``, tokenizer, preprocess) for a spec from :func:`model_spec`."""
    import fastclip
    from fastclip.models import CheckpointError, clean_state_dict, load_checkpoint, read_checkpoint

    siglip = False
    if "run" in spec:
        name, path = _run_checkpoint(spec["run"])
        sd = clean_state_dict(_run_state_dict(path))
        siglip = "logit_bias" in sd  # a run of --loss siglip: its model has SigLIP's logit_bias
    else:
        name, path, sd = spec.get("model"), spec["pretrained"], None
    train = _train_models()
    try:
        if name in fastclip.list_models():
            # the bias's initial value is overwritten by the checkpoint's
            model = fastclip.create_model(name, init_logit_bias=0.0 if siglip else None)
            load_checkpoint(model, sd if sd is not None else path)
        elif train is not None and name in train.TINY_MODELS:
            model = train.build_model(name, siglip=siglip)
            load_checkpoint(model, sd if sd is not None else path)
        elif name.endswith(".json") and "run" not in spec:  # an open_clip model config
            model = fastclip.create_model_from_state_dict(read_checkpoint(path)[0], model_name=name)
        else:
            model = None
    except CheckpointError as e:
        raise SystemExit(f"{spec.get('run') or path}: {e}") from None
    if model is None:
        where = f"config.json of {spec['run']}" if "run" in spec else "--model"
        raise SystemExit(f"model {name!r} ({where}) is neither a fastclip.list_models() name nor a fastclip train "
                         f"config in this version" + ("" if "run" in spec else ", nor a config .json"))
    model = model.to(device).eval()
    size = getattr(model.visual, "image_size", 224)
    context = getattr(model, "context_length", 77)  # fastclip train's tiny models read 20 tokens
    return model, functools.partial(fastclip.tokenize, context_length=context), fastclip.image_transform(size)


def _train_models():
    """``fastclip.train.models`` (its ``TINY_MODELS`` configs and ``build_model(name, siglip=...)``), where
    installed."""
    try:
        from fastclip.train import models
    except ImportError:
        return None
    return models


def read_image(path: str, preprocess: Callable) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        return preprocess(img.convert("RGB"))


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], device: str, batch_size: int = 256) -> torch.Tensor:
    """(len(texts), E) normalized fp32 text embeddings."""
    out = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device), normalize=True).float()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def embed_images(model, preprocess: Callable, paths: Sequence[str], device: str, batch_size: int = 64,
                 progress: bool = False) -> Tuple[torch.Tensor, List[str], List[Tuple[str, str]]]:
    """(embeddings (n, E) normalized fp32, the n paths read, [(path, why) for each unreadable file])."""
    from tqdm import tqdm

    feats, done, skipped = [], [], []
    for i in tqdm(range(0, len(paths), batch_size), disable=not progress, unit="batch"):
        batch, ok = [], []
        for p in paths[i:i + batch_size]:
            try:
                batch.append(read_image(p, preprocess))
                ok.append(p)
            except Exception as e:  # noqa: BLE001 - any unreadable or corrupt file is skipped and reported
                skipped.append((p, f"{type(e).__name__}: {e}"))
        if batch:
            feats.append(F.normalize(model.encode_image(torch.stack(batch).to(device)).float(), dim=-1))
            done.extend(ok)
    dim = model.text_projection.shape[1] if not feats else feats[0].shape[1]
    return (torch.cat(feats) if feats else torch.empty(0, dim, device=device)), done, skipped


def split_labels(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def templates_from(args) -> List[str]:
    """--template (repeatable) or --templates-file, else OpenAI's 80 ImageNet templates."""
    from fastclip.zeroshot import OPENAI_IMAGENET_TEMPLATES

    templates = list(args.template or []) + (read_lines(args.templates_file) if args.templates_file else [])
    templates = templates or list(OPENAI_IMAGENET_TEMPLATES)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise SystemExit(f"templates must contain '{{}}' exactly once (where the label goes): {bad[:3]}")
    return templates


def add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", action="append", help="prompt template with {} for the label (repeatable; "
                                                       "default: OpenAI's 80 ImageNet templates)")
    p.add_argument("--templates-file", help="one template per line")
