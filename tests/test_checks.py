"""The input checks every op shares (fastclip._checks): the exact error a user reads for each bad input, the
boundaries of each accepted range, and the autocast cast at the public boundary."""
import re

import numpy as np
import pytest
import torch

import fastclip
from fastclip._checks import amp_cast, as_scalar, autocast_dtype, check_chunk_size, check_label_smoothing

IMG = torch.randn(4, 8)
TXT = torch.randn(4, 8)


def _raises(exc, message, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` whose message is exactly ``message``."""
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        fn(*args, **kwargs)


@pytest.mark.parametrize("loss", [fastclip.contrastive_loss, fastclip.siglip_loss])
def test_feature_errors_name_the_argument_shape_dtype_and_device(loss):
    meta = TXT.to("meta")
    _raises(TypeError, "image_features must be a torch.Tensor, got list", loss, [[1.0]], TXT, 10.0, -1.0)
    _raises(TypeError, "text_features must be a torch.Tensor, got ndarray", loss, IMG, TXT.numpy(), 10.0, -1.0)
    _raises(TypeError, "image_features must be a floating tensor (float16, bfloat16, float32 or float64), "
                       "got shape (4, 8), dtype int64, device cpu", loss, IMG.long(), TXT, 10.0, -1.0)
    _raises(ValueError, "text_features must be 2-D (batch, dim), got shape (4, 8, 1), dtype float32, device cpu",
            loss, IMG, TXT[..., None], 10.0, -1.0)
    _raises(ValueError, "image_features is empty: shape (0, 8), dtype float32, device cpu; the loss needs at least "
                        "one pair and one feature", loss, IMG[:0], TXT[:0], 10.0, -1.0)
    _raises(ValueError, "text_features is empty: shape (4, 0), dtype float32, device cpu; the loss needs at least "
                        "one pair and one feature", loss, IMG, TXT[:, :0], 10.0, -1.0)
    _raises(ValueError, "image_features and text_features are on different devices: image_features shape (4, 8), "
                        "dtype float32, device cpu; text_features shape (4, 8), dtype float32, device meta",
            loss, IMG, meta, 10.0, -1.0)
    _raises(TypeError, "image_features and text_features have different dtypes: image_features shape (4, 8), "
                       "dtype float16, device cpu; text_features shape (4, 8), dtype float32, device cpu",
            loss, IMG.half(), TXT, 10.0, -1.0)
    _raises(ValueError, "image_features and text_features have different feature dims: image_features shape "
                        "(4, 8), dtype float32, device cpu; text_features shape (4, 7), dtype float32, device cpu",
            loss, IMG, TXT[:, :7], 10.0, -1.0)
    _raises(ValueError, "image_features and text_features have different batch sizes (each image pairs with the "
                        "text of the same index): image_features shape (4, 8), dtype float32, device cpu; "
                        "text_features shape (3, 8), dtype float32, device cpu", loss, IMG, TXT[:3], 10.0, -1.0)


def test_attention_errors():
    q = torch.randn(1, 3, 2, 8)
    _raises(ValueError, "q is empty: shape (1, 0, 2, 8), dtype float32, device cpu", fastclip.flash_attention,
            q[:, :0], q, q)
    _raises(ValueError, "k must be 4-D (batch, seq, heads, head_dim), got shape (3, 2, 8), dtype float32, device cpu",
            fastclip.flash_attention, q, q[0], q)


def test_every_floating_dtype_is_accepted():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert fastclip.contrastive_loss(IMG.to(dtype), TXT.to(dtype), 10.0, backend="reference").isfinite()


def test_scalar_arguments():
    like = torch.zeros(2, 3, dtype=torch.float64)
    for number in (14.5, 14, np.float32(14.5), np.int64(14)):
        t = as_scalar(number, "logit_scale", like, required=True)
        assert t.dtype == torch.float32 and t.dim() == 0 and t.device == like.device
        assert t.item() == float(number)
    on_meta = as_scalar(2.5, "logit_scale", torch.zeros(2, 3, device="meta"), required=True)
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32  # a number joins the features' device
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # fp32 as open_clip's logit_scale parameter, whatever torch's default dtype
        assert as_scalar(2.5, "logit_scale", like, required=True).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)
    given = torch.tensor([3.0], dtype=torch.float64)
    assert as_scalar(given, "logit_bias", like, required=False) is given  # a tensor is passed on as it is
    assert as_scalar(None, "logit_bias", like, required=False) is None
    _raises(ValueError, "logit_scale is required", as_scalar, None, "logit_scale", like, required=True)
    for flag in (True, np.bool_(False)):
        _raises(TypeError, f"logit_scale must be a tensor or a number, got {type(flag).__name__}", as_scalar,
                flag, "logit_scale", like, required=True)
    _raises(ValueError, "logit_bias must have exactly one element, got shape (2,), dtype float32, device cpu",
            as_scalar, torch.ones(2), "logit_bias", like, required=False)
    _raises(TypeError, "logit_scale must be a floating tensor, got shape (), dtype int64, device cpu",
            as_scalar, torch.tensor(3), "logit_scale", like, required=True)


def test_scalar_devices():
    meta = torch.zeros(2, 3, device="meta")
    moved = as_scalar(torch.tensor(2.0), "logit_scale", meta, required=True)  # a CPU 0-d scalar follows
    assert moved.device == meta.device
    _raises(ValueError, "logit_scale is on cpu but the features are on meta", as_scalar, torch.tensor([2.0]),
            "logit_scale", meta, required=True)
    _raises(ValueError, "logit_bias is on meta but the features are on cpu", as_scalar,
            torch.tensor(2.0, device="meta"), "logit_bias", torch.zeros(2, 3), required=False)


def test_label_smoothing_bounds():
    for ls in (0, 0.0, 0.5, 1.0):
        assert check_label_smoothing(ls) == float(ls) and isinstance(check_label_smoothing(ls), float)
    for ls in (-1e-9, 1.0 + 1e-9):
        _raises(ValueError, f"label_smoothing must be in [0, 1], got {ls}", check_label_smoothing, ls)


def test_chunk_size_bounds():
    for ok in (None, 1, 7, np.int64(2)):
        check_chunk_size(ok)
    for bad in (0, -3, True, False):
        _raises(ValueError, f"chunk_size must be a positive integer or None, got {bad}", check_chunk_size, bad)


def test_autocast_dtype_per_device_type():
    assert autocast_dtype(torch.device("cpu")) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype(torch.device("cuda")) is None  # autocast is per device type
    # autocast's CUDA state is a flag torch keeps even without a GPU
    torch.set_autocast_enabled("cuda", True)
    try:
        assert autocast_dtype(torch.device("cuda", 0)) == torch.get_autocast_dtype("cuda")
        assert autocast_dtype("cpu") is None
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert autocast_dtype(torch.device("meta")) is None  # no autocast on other device types


def test_amp_cast():
    x = torch.randn(3, dtype=torch.float32)
    assert amp_cast(x, None) is x
    assert amp_cast(None, torch.bfloat16) is None
    assert amp_cast(x, torch.float32) is x
    for amp in (torch.bfloat16, torch.float16):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            y = x.to(dtype)
            assert amp_cast(y, amp).dtype == amp and torch.equal(amp_cast(y, amp), y.to(amp))
        for kept in (x.double(), x.long(), torch.ones(3, dtype=torch.bool)):  # fp64 and non-floats stay
            assert amp_cast(kept, amp) is kept
