"""Zero-shot classification: class embeddings from prompt templates, and top-1/top-5 on an image folder.

    classifier = build_zero_shot_classifier(model, fastclip.tokenize, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES)
    logits = 100 * model.encode_image(images, normalize=True) @ classifier           # (B, C)

The class names (ImageNet-1k, CIFAR-10, CIFAR-100) and OpenAI's 80 ImageNet templates ship with the package
(``fastclip/data/zeroshot/``, MIT; see the LICENSE there). Templates are ``str.format`` strings with one ``{}``.
"""
from __future__ import annotations

import os
from itertools import islice
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_DATA = os.path.join(os.path.dirname(__file__), "data", "zeroshot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _lines(name: str) -> Tuple[str, ...]:
    with open(os.path.join(_DATA, name), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


IMAGENET_CLASSNAMES = _lines("imagenet1k_classnames.txt")
OPENAI_IMAGENET_TEMPLATES = _lines("openai_imagenet_templates.txt")
CIFAR10_CLASSNAMES = _lines("cifar10_classnames.txt")
CIFAR100_CLASSNAMES = _lines("cifar100_classnames.txt")


def _batched(items: Sequence, n: int):
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[Union[Callable, str]],
                               num_classes_per_batch: Optional[int] = 10, device: Union[str, torch.device] = "cpu",
                               use_tqdm: bool = False) -> Tensor:
    """(E, C) zero-shot classifier weights, as ``open_clip.build_zero_shot_classifier`` builds them.

    For class c: w_c = normalize(mean_t normalize(encode_text(template_t(c)))), one text batch per
    ``num_classes_per_batch`` classes (all at once if None), under ``torch.no_grad()``. ``model`` is anything with
    ``encode_text(tokens, normalize=True)``; ``tokenizer`` maps a list of strings to token ids (``fastclip.tokenize``);
    ``templates`` are format strings (``"a photo of a {}."``) or callables of the class name.
    """
    if not isinstance(templates, Sequence) or isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty sequence of format strings or callables, got {templates!r}")
    if not isinstance(classnames, Sequence) or isinstance(classnames, str) or not classnames:
        raise ValueError(f"classnames must be a non-empty sequence of strings, got {classnames!r}")
    use_format = isinstance(templates[0], str)
    n_templates = len(templates)

    def embed(names: List[str]) -> Tensor:
        texts = [t.format(c) if use_format else t(c) for c in names for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True)
        emb = emb.reshape(len(names), n_templates, -1).mean(dim=1)  # (classes, templates, E) -> (classes, E)
        return (emb / emb.norm(dim=1, keepdim=True)).T  # (E, classes)

    batches = list(_batched(classnames, num_classes_per_batch)) if num_classes_per_batch else [list(classnames)]
    if use_tqdm:
        from tqdm import tqdm

        batches = tqdm(batches, unit_scale=num_classes_per_batch or len(classnames))
    with torch.no_grad():
        return torch.cat([embed(b) for b in batches], dim=1)


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/**/<image>`` (torchvision's layout): classes are the sorted sub-folder names, labels their
    positions; items are (transform(image), label). Class names for prompts: folder names, "_" read as a space."""

    def __init__(self, root: str, transform: Callable):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist or is not a directory")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [(path, label) for label, c in enumerate(self.classes)
                        for path in list_images(os.path.join(root, c))]
        if not self.samples:
            raise ValueError(f"no images under {root!r} (expected root/<class>/<image>, extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def list_images(folder: str) -> List[str]:
    """Every image file under ``folder`` (recursive, by extension), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def accuracy(image_features: Tensor, classifier: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """Number of images whose label is among the top-k classes of ``image_features @ classifier``, per k (k capped
    at the number of classes), through :func:`fastclip.topk_similarity` (ties: the lower class index first)."""
    from fastclip.ops.topk import topk_similarity

    k_max = min(max(ks), classifier.shape[1])
    _, pred = topk_similarity(image_features, classifier.T.contiguous().to(image_features.dtype), k_max)  # (B, k)
    hit = pred == labels.to(pred.device)[:, None]
    return {k: int(hit[:, :min(k, k_max)].any(dim=1).sum()) for k in ks}


def evaluate_zero_shot(model, tokenizer, preprocess: Callable, root: str, *,
                       classnames: Optional[Sequence[str]] = None,
                       templates: Sequence[Union[Callable, str]] = OPENAI_IMAGENET_TEMPLATES, batch_size: int = 64,
                       device: Union[str, torch.device] = "cpu", num_workers: int = 0) -> Dict[str, float]:
    """Zero-shot top-1 / top-5 accuracy of ``model`` on the image folder ``root`` (see :class:`ImageFolder`).

    ``classnames`` (in sorted-folder order) default to the folder names. Returns {"top1", "top5",
    "num_samples", "num_classes"}; accuracies are fractions in [0, 1].
    """
    data = ImageFolder(root, preprocess)
    names = list(classnames) if classnames is not None else [c.replace("_", " ") for c in data.classes]
    if len(names) != len(data.classes):
        raise ValueError(f"{len(names)} class names for {len(data.classes)} class folders in {root!r}")
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, names, templates, device=device)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    correct = {1: 0, 5: 0}
    with torch.no_grad():
        for images, labels in loader:
            feats = F.normalize(model.encode_image(images.to(device)), dim=-1)
            for k, c in accuracy(feats, classifier.to(feats.dtype), labels).items():
                correct[k] += c
    n = len(data)
    return {"top1": correct[1] / n, "top5": correct[5] / n, "num_samples": n, "num_classes": len(names)}


__all__ = ["build_zero_shot_classifier", "evaluate_zero_shot", "accuracy", "ImageFolder", "list_images",
           "IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "CIFAR10_CLASSNAMES", "CIFAR100_CLASSNAMES"]
