"""fastclip.image_transform (PIL + numpy + torch) against open_clip's torchvision pipeline: bit-identical."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")
pytest.importorskip("torchvision")
from open_clip.transform import image_transform as oc_image_transform  # noqa: E402

import fastclip  # noqa: E402
from fastclip.transforms import image_transform  # noqa: E402

MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA", "F", "I", "YCbCr"]
SHAPES = [(50, 37), (224, 224), (301, 200), (17, 403), (9, 9)]  # (width, height)


def make_image(mode: str, w: int, h: int, rng) -> Image.Image:
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        assert img.mode == "I;16"
        return img
    # smooth-ish content so that resampling filters matter, plus noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    rgb = Image.fromarray(np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE)
    return rgb.convert(mode)


def _check(ours, ref, what):
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape, what
    assert torch.equal(ours, ref), f"{what}: max abs diff {(ours - ref).abs().max().item():.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_eval_equals_open_clip(mode):
    rng = np.random.default_rng(abs(hash(mode)) % 2**32)
    for w, h in SHAPES:
        img = make_image(mode, w, h, rng)
        for size in (224, 33, (24, 40)):
            _check(image_transform(size)(img), oc_image_transform(size, False)(img), f"{mode} {w}x{h} -> {size}")


@pytest.mark.parametrize("kw", [dict(resize_mode="longest"), dict(resize_mode="squash"),
                                dict(interpolation="bilinear"), dict(mean=(0.5, 0.5, 0.5), std=0.25),
                                dict(resize_mode="longest", fill_color=128)])
def test_eval_options_equal_open_clip(kw):
    rng = np.random.default_rng(0)
    for mode in ("RGB", "P", "RGBA"):
        for w, h in SHAPES:
            img = make_image(mode, w, h, rng)
            for size in (32, (24, 40)):
                _check(image_transform(size, **kw)(img), oc_image_transform(size, False, **kw)(img),
                       f"{kw} {mode} {w}x{h} -> {size}")


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "I;16"])
def test_train_equals_open_clip_with_same_seed(mode):
    rng = np.random.default_rng(1)
    for w, h in SHAPES:
        img = make_image(mode, w, h, rng)
        for size, scale in ((32, (0.9, 1.0)), (48, (0.08, 1.0))):
            for seed in range(3):
                torch.manual_seed(seed)
                ref = oc_image_transform(size, True, aug_cfg=dict(scale=scale))(img)
                torch.manual_seed(seed)
                ours = image_transform(size, is_train=True, scale=scale)(img)
                _check(ours, ref, f"train {mode} {w}x{h} -> {size} seed {seed}")


def test_defaults_and_errors():
    t = fastclip.image_transform(224)
    out = t(Image.new("RGB", (640, 480), (255, 0, 128)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert "224" in repr(t)
    with pytest.raises(TypeError, match="PIL"):
        t(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="resize_mode"):
        image_transform(224, resize_mode="crop")
