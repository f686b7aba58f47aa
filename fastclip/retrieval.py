"""Image-text retrieval metrics (recall@k as CLIP_benchmark reports them), on :func:`fastclip.topk_similarity`.

    metrics = recall_at_k(image_features, text_features, text_to_image, ks=(1, 5, 10))
    # {"image_retrieval_recall@1": ..., "text_retrieval_recall@1": ..., ...}
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastclip.ops.topk import topk_similarity


def recall_at_k(image_features: Tensor, text_features: Tensor, text_to_image: Union[Tensor, Sequence[int]],
                ks: Sequence[int] = (1, 5, 10), *, backend: str = "auto") -> Dict[str, float]:
    """CLIP_benchmark's retrieval recall@k, without the (T, I) score matrix.

    Args:
        image_features: (I, D); text_features: (T, D), same dtype (normalize them for cosine similarity, as
            CLIP_benchmark does).
        text_to_image: (T,) ints, the image of each caption (an image may have several captions, or none).
        ks: the k's.

    Returns:
        {"image_retrieval_recall@k": fraction of captions whose image is among the k images scoring highest
        against the caption; "text_retrieval_recall@k": fraction of images with at least one of their captions among
        the k captions scoring highest against the image}, for each k in ``ks`` (in that order), as Python floats.
        A k beyond the number of candidates counts every candidate (CLIP_benchmark's torch.topk would raise).
        Equal scores rank the lower index first (CLIP_benchmark leaves the order of ties to torch.topk).
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.int64, device=image_features.device)
    if t2i.dim() != 1 or t2i.shape[0] != text_features.shape[0]:
        raise ValueError(f"text_to_image must be 1-D with one entry per caption ({text_features.shape[0]}), "
                         f"got shape {tuple(t2i.shape)}")
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if t2i.numel() and (int(t2i.min()) < 0 or int(t2i.max()) >= n_img):
        raise ValueError(f"text_to_image has entries outside [0, {n_img}): min {int(t2i.min())}, max {int(t2i.max())}")
    if not ks or any(isinstance(k, bool) or int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    k_img, k_txt = min(max(ks), n_img), min(max(ks), n_txt)
    _, img_rank = topk_similarity(text_features, image_features, k_img, backend=backend)  # (T, k) image indices
    _, txt_rank = topk_similarity(image_features, text_features, k_txt, backend=backend)  # (I, k) caption indices
    img_hit = img_rank == t2i[:, None]  # (T, k): the caption's image at rank r
    txt_hit = t2i[txt_rank] == torch.arange(n_img, device=t2i.device)[:, None]  # (I, k): a caption of the image
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = img_hit[:, :k].any(dim=1).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = txt_hit[:, :k].any(dim=1).float().mean().item()
    return out


def read_captions(path: str) -> Tuple[List[str], List[str], List[int]]:
    """A CSV (or TSV, by extension) with a header holding ``filepath`` and ``caption`` (or ``title``) columns, one
    row per caption: returns (image paths, captions, text_to_image). Relative paths are read from the file's
    folder; an image repeated over rows is one image with several captions."""
    delimiter = "\t" if path.endswith((".tsv", ".tab")) else ","
    base = os.path.dirname(os.path.abspath(path))
    images, index, captions, t2i = [], {}, [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        cap_key = next((k for k in ("caption", "title") if k in (reader.fieldnames or [])), None)
        if "filepath" not in (reader.fieldnames or []) or cap_key is None:
            raise ValueError(f"{path}: expected a header with 'filepath' and 'caption' (or 'title') columns, got "
                             f"{reader.fieldnames}")
        for row in reader:
            p = os.path.join(base, row["filepath"])
            if p not in index:
                index[p] = len(images)
                images.append(p)
            captions.append(row[cap_key])
            t2i.append(index[p])
    if not captions:
        raise ValueError(f"{path}: no rows")
    return images, captions, t2i


def evaluate_retrieval(model, tokenizer, preprocess: Callable, captions_file: str, *, ks: Sequence[int] = (1, 5, 10),
                       batch_size: int = 64, device: Union[str, torch.device] = "cpu") -> Dict[str, float]:
    """recall@k of ``model`` on the captions file (see :func:`read_captions`), features normalized as
    CLIP_benchmark normalizes them."""
    from PIL import Image

    paths, captions, t2i = read_captions(captions_file)
    model.eval()
    img, txt = [], []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            batch = []
            for p in paths[i:i + batch_size]:
                with Image.open(p) as im:
                    batch.append(preprocess(im.convert("RGB")))
            img.append(F.normalize(model.encode_image(torch.stack(batch).to(device)), dim=-1))
        for i in range(0, len(captions), batch_size):
            txt.append(F.normalize(model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)), dim=-1))
    out = recall_at_k(torch.cat(img), torch.cat(txt), t2i, ks)
    out.update(num_images=len(paths), num_captions=len(captions))
    return out


__all__ = ["recall_at_k", "read_captions", "evaluate_retrieval"]
