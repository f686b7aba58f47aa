"""Image preprocessing equal to open_clip's ``image_transform``, with PIL + numpy + torch (no torchvision).

Evaluation (``is_train=False``), as open_clip's default ("shortest" resize mode):
    resize the short side to the target with PIL's bicubic filter (the long side to int(size * long / short); the
    call is skipped when the size is already right, as torchvision's) -> centre crop (top/left offsets
    int(round((H - h) / 2))) -> ``convert("RGB")`` (any PIL mode) -> uint8 (H, W, 3) to float (3, H, W) / 255 ->
    (x - mean) / std with OpenAI's mean and std.
Training (``is_train=True``): torchvision's ``RandomResizedCrop`` (scale (0.9, 1.0) by default as open_clip, aspect
ratio (3/4, 4/3), bicubic), drawn from torch's global RNG in the same order, so the same seed gives the same crop
-> RGB -> tensor -> normalize.

The resize and crop run in the image's own mode before the RGB conversion, as open_clip's pipeline does (so a "P"
image is resized with nearest neighbour, which PIL forces for palette images). Every step calls the same PIL
function with the same arguments as torchvision, so the output is bit-identical to open_clip's.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _size2(size) -> Tuple[int, int]:
    """(height, width) from an int or a 1- or 2-sequence."""
    if isinstance(size, (tuple, list)):
        return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))
    return int(size), int(size)


def _resize(img: Image.Image, h: int, w: int, resample: int) -> Image.Image:
    if img.size == (w, h):
        return img  # torchvision returns the image untouched when it already has the size
    return img.resize((w, h), resample)


def resize_shortest(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Short side to ``size``, long side to int(size * long / short) (torchvision's ``Resize(int)``)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return _resize(img, new_h, new_w, resample)


def resize_keep_ratio(img: Image.Image, size: Tuple[int, int], longest: float,
                      resample: int = Image.BICUBIC) -> Image.Image:
    """open_clip's ``ResizeKeepRatio``: scale both sides by one factor so that the shortest (``longest=0``) or the
    longest (``longest=1``) side fits ``size`` (h, w), rounding each side."""
    w, h = img.size
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return _resize(img, round(h / ratio), round(w / ratio), resample)


def center_crop(img: Image.Image, size: Tuple[int, int], fill: int = 0) -> Image.Image:
    """Crop (h, w) at the centre, zero-padding (``fill``) first where the image is smaller (torchvision's
    ``center_crop``; open_clip's ``CenterCropOrPad``)."""
    crop_h, crop_w = size
    w, h = img.size
    if crop_w > w or crop_h > h:
        ltrb = ((crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0,
                (crop_w - w + 1) // 2 if crop_w > w else 0, (crop_h - h + 1) // 2 if crop_h > h else 0)
        bands = len(img.getbands())
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=ltrb, fill=tuple([fill] * bands) if bands > 1 else fill)
        if palette is not None:
            img.putpalette(palette)
        w, h = img.size
        if (crop_w, crop_h) == (w, h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def random_resized_crop_params(img: Image.Image, scale: Sequence[float],
                               ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform),
    drawn exactly as torchvision's ``RandomResizedCrop.get_params`` (same torch RNG calls in the same order)."""
    width, height = img.size
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    # fallback: the central crop with the closest allowed aspect ratio
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float: (uint8 / 255 - mean) / std, in torchvision's order of operations."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8, copy=True)  # (H, W, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)
    x = x.to(dtype=torch.get_default_dtype()).div(255)
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


class ImageTransform:
    """A PIL image -> (3, H, W) float tensor; see :func:`image_transform`."""

    def __init__(self, image_size, is_train: bool = False, mean=None, std=None, resize_mode: str = "shortest",
                 interpolation: str = "bicubic", fill_color: int = 0, scale: Tuple[float, float] = (0.9, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)):
        mean = mean or OPENAI_DATASET_MEAN
        std = std or OPENAI_DATASET_STD
        self.mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
        self.std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest', 'longest' or 'squash', got {resize_mode!r}")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        self.image_size = image_size
        self.size = _size2(image_size)
        self.is_train, self.resize_mode, self.fill_color = is_train, resize_mode, fill_color
        self.interpolation = interpolation
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def _geometry(self, img: Image.Image) -> Image.Image:
        if self.is_train:  # open_clip always crops for training with bicubic, whatever the interpolation option
            i, j, h, w = random_resized_crop_params(img, self.scale, self.ratio)
            img = img.crop((j, i, j + w, i + h))
            return _resize(img, self.size[0], self.size[1], Image.BICUBIC)
        resample = _INTERPOLATION[self.interpolation]
        if self.resize_mode == "squash":
            return _resize(img, self.size[0], self.size[1], resample)
        if self.resize_mode == "longest":
            img = resize_keep_ratio(img, self.size, 1.0, resample)
            return center_crop(img, self.size, self.fill_color)
        if self.size[0] == self.size[1]:
            img = resize_shortest(img, self.size[0], resample)
        else:  # open_clip resizes non-square targets with ResizeKeepRatio's default (bicubic) filter
            img = resize_keep_ratio(img, self.size, 0.0, Image.BICUBIC)
        return center_crop(img, self.size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"image_transform expects a PIL.Image.Image, got {type(img).__name__}")
        return to_normalized_tensor(self._geometry(img), self.mean, self.std)

    def __repr__(self) -> str:
        what = (f"random_resized_crop(scale={self.scale}, ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), bicubic)"
                if self.is_train else f"resize({self.resize_mode}, {self.interpolation}) + center_crop")
        return (f"ImageTransform(size={self.size}, {what}, RGB, mean={self.mean}, std={self.std})")


def image_transform(image_size: Union[int, Tuple[int, int]], is_train: bool = False,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, *,
                    resize_mode: str = "shortest", interpolation: str = "bicubic", fill_color: int = 0,
                    scale: Tuple[float, float] = (0.9, 1.0)) -> ImageTransform:
    """open_clip's preprocessing as a callable: PIL image (any mode) -> (3, H, W) float32 tensor.

    Args:
        image_size: int or (height, width), e.g. ``model.visual.image_size``.
        is_train: random resized crop (``scale``, aspect ratio 3/4..4/3, bicubic) instead of resize + centre crop.
        mean, std: per-channel normalization (default OpenAI's); a number applies to all three channels.
        resize_mode: "shortest" (default), "longest" (fit inside, pad with ``fill_color``) or "squash".
        interpolation: "bicubic" (default) or "bilinear", for evaluation.

    Equivalent (with torchvision)::

        open_clip.image_transform(image_size, is_train, mean, std, resize_mode, interpolation, fill_color,
                                  aug_cfg=dict(scale=scale))
    """
    return ImageTransform(image_size, is_train, mean, std, resize_mode, interpolation, fill_color, scale)


__all__ = ["image_transform", "ImageTransform", "OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD"]
