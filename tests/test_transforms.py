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
                                dict(resize_mode="longest", fill_color=128),
                                dict(resize_mode="longest", interpolation="bilinear")])
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


# ---------------------------------------------------------------------------------------------------------------
# Each step against the torchvision / open_clip function it replaces, on the sizes where an off-by-one shows: odd
# and even differences, one side smaller and one larger, exact fits, aspect ratios the random crop cannot draw.

from open_clip.transform import center_crop_or_pad  # noqa: E402
from torchvision.transforms import RandomResizedCrop  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from fastclip import transforms as T  # noqa: E402


def _same_image(a, b, what):
    assert a.mode == b.mode and a.size == b.size, what
    assert np.array_equal(np.asarray(a), np.asarray(b)), what
    if a.mode == "P":
        assert a.getpalette() == b.getpalette(), what


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "LA"])
def test_center_crop_or_pad_equals_open_clip(mode):
    img = make_image(mode, 7, 10, np.random.default_rng(2))  # width 7, height 10; crops below are (h, w)
    for crop in ((10, 7), (5, 3), (4, 6), (12, 7), (10, 9), (13, 8), (3, 12), (11, 11), (6, 6), (12, 5), (11, 3), (8, 9)):
        for fill in (0, 200):
            _same_image(T.center_crop(img, crop, fill), center_crop_or_pad(img, list(crop), fill=fill),
                        f"{mode} 7x10 -> {crop} fill {fill}")
        _same_image(T.center_crop(img, crop), TF.center_crop(img, list(crop)), f"{mode} default fill")


def test_resize_shortest_equals_torchvision():
    rng = np.random.default_rng(3)
    for w, h in ((50, 37), (37, 50), (20, 20), (33, 100), (100, 33)):
        img = make_image("RGB", w, h, rng)
        for size in (10, 20, 41):
            _same_image(T.resize_shortest(img, size), TF.resize(img, size, TF.InterpolationMode.BICUBIC),
                        f"{w}x{h} -> {size}")
            _same_image(T.resize_shortest(img, size, Image.BILINEAR),
                        TF.resize(img, size, TF.InterpolationMode.BILINEAR), f"{w}x{h} -> {size} bilinear")


def test_resize_keep_ratio_sides():
    img = Image.new("L", (30, 20))  # w, h
    assert T.resize_keep_ratio(img, (10, 10), 0.0).size == (15, 10)  # the short side fits
    assert T.resize_keep_ratio(img, (10, 10), 1.0).size == (10, 7)  # the long side fits: round(20 / 3) = 7
    assert T.resize_keep_ratio(img, (12, 40), 1.0).size == (18, 12)  # height limits: ratio max(20/12, 30/40)
    assert T.resize_keep_ratio(img, (12, 40), 0.0).size == (40, 27)  # round(26.67) = 27
    assert T.resize_keep_ratio(img, (20, 30), 1.0) is img  # the right size already: untouched, as torchvision


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (3 / 4, 4 / 3)),
                                         ((2.0, 3.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (1.0, 1.0)),
                                         ((0.5, 0.6), (0.2, 5.0))])
def test_random_resized_crop_params_equal_torchvision(scale, ratio):
    # scale > 1 can never be drawn: the fallback (central crop, ratio clamped) for tall, wide and square images
    for w, h in ((50, 37), (17, 403), (403, 17), (40, 40), (1, 1), (2, 9)):
        img = Image.new("RGB", (w, h))
        for seed in range(4):
            torch.manual_seed(seed)
            ref = RandomResizedCrop.get_params(img, list(scale), list(ratio))
            after_ref = torch.rand(1)
            torch.manual_seed(seed)
            assert T.random_resized_crop_params(img, scale, ratio) == tuple(ref), (w, h, scale, ratio, seed)
            assert torch.equal(torch.rand(1), after_ref)  # the same draws: the next crop is the same too


def test_train_ratio_and_interpolation_follow_open_clip():
    img = make_image("RGB", 60, 45, np.random.default_rng(4))
    torch.manual_seed(5)
    ref = oc_image_transform(32, True, interpolation="bilinear", aug_cfg=dict(scale=(0.3, 0.5)))(img)
    torch.manual_seed(5)
    _check(image_transform(32, True, interpolation="bilinear", scale=(0.3, 0.5))(img), ref, "train bilinear")
    t = T.ImageTransform(32, is_train=True, ratio=(1.0, 1.0), scale=(0.25, 0.25))
    torch.manual_seed(0)
    params = T.random_resized_crop_params(img, (0.25, 0.25), (1.0, 1.0))
    assert params[2:] == (26, 26)  # sqrt(0.25 * 60 * 45) = 25.98
    torch.manual_seed(0)
    i, j, h, w = params
    expected = T.to_normalized_tensor(img.crop((j, i, j + w, i + h)).resize((32, 32), Image.BICUBIC),
                                      T.OPENAI_DATASET_MEAN, T.OPENAI_DATASET_STD)
    assert torch.equal(t(img), expected)


def test_sizes_and_normalization():
    img = make_image("RGB", 30, 20, np.random.default_rng(6))
    for size in ([16], (16,), 16, (16, 16), [16, 16]):
        _check(image_transform(size)(img), oc_image_transform(16, False)(img), f"size {size!r}")
    assert image_transform([12, 20])(img).shape == (3, 12, 20)
    for mean, std in (([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), (0.5, 0.25), ((0.1, 0.2, 0.3), 0.5)):
        _check(image_transform(16, mean=mean, std=std)(img),
               oc_image_transform(16, False, mean=mean, std=std)(img), f"mean {mean} std {std}")
    x = np.asarray(TF.center_crop(TF.resize(img, 16, TF.InterpolationMode.BICUBIC), 16), dtype=np.float32)
    mean, std = np.array(T.OPENAI_DATASET_MEAN, np.float32), np.array(T.OPENAI_DATASET_STD, np.float32)
    expected = torch.from_numpy(((x / 255 - mean) / std).transpose(2, 0, 1).copy())
    torch.testing.assert_close(image_transform(16)(img), expected, rtol=1e-6, atol=1e-6)  # OpenAI's by default


def test_default_dtype_is_torchvision_s():
    img = make_image("RGB", 30, 20, np.random.default_rng(7))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours, ref = image_transform(16)(img), oc_image_transform(16, False)(img)
    finally:
        torch.set_default_dtype(old)
    assert ours.dtype == ref.dtype == torch.float64 and torch.equal(ours, ref)


def test_options_are_checked_and_shown():
    with pytest.raises(ValueError, match=r"^resize_mode must be 'shortest', 'longest' or 'squash', got 'crop'$"):
        image_transform(224, resize_mode="crop")
    with pytest.raises(ValueError, match=r"^interpolation must be one of \['bicubic', 'bilinear'\], got 'nearest'$"):
        image_transform(224, interpolation="nearest")
    with pytest.raises(TypeError, match=r"^image_transform expects a PIL.Image.Image, got ndarray$"):
        image_transform(224)(np.zeros((4, 4, 3), np.uint8))
    t = image_transform((24, 40), mean=0.5, std=0.25, resize_mode="longest", interpolation="bilinear")
    assert (t.image_size, t.size, t.resize_mode, t.interpolation, t.fill_color) == ((24, 40), (24, 40), "longest",
                                                                                     "bilinear", 0)
    assert repr(t) == ("ImageTransform(size=(24, 40), resize(longest, bilinear) + center_crop, RGB, "
                       "mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))")
    assert repr(image_transform(32, True, scale=(0.5, 1.0))) == (
        "ImageTransform(size=(32, 32), random_resized_crop(scale=(0.5, 1.0), ratio=(0.75, 1.333), bicubic), RGB, "
        f"mean={T.OPENAI_DATASET_MEAN}, std={T.OPENAI_DATASET_STD})")
    assert image_transform(32, fill_color=7, resize_mode="longest").fill_color == 7


def test_no_warning():
    # the pixels are copied out of PIL's read-only buffer: torch warns (once per process) on a non-writable array
    import warnings

    img = make_image("RGB", 30, 20, np.random.default_rng(8))
    old = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # a warning torch gave once already in this process is given again
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            image_transform(16)(img)
            image_transform(16, is_train=True)(img)
    finally:
        torch.set_warn_always(old)


def test_class_defaults_and_other_geometries_equal_open_clip():
    img = make_image("RGB", 30, 20, np.random.default_rng(9))
    _check(T.ImageTransform(16, resize_mode="longest")(img), oc_image_transform(16, False, resize_mode="longest")(img),
           "ImageTransform defaults")
    _check(image_transform(16, resize_mode="squash", interpolation="bilinear")(img),
           oc_image_transform(16, False, resize_mode="squash", interpolation="bilinear")(img), "squash bilinear")
    torch.manual_seed(3)
    ref = oc_image_transform((24, 40), True)(img)
    torch.manual_seed(3)
    _check(image_transform((24, 40), is_train=True)(img), ref, "train (24, 40)")
