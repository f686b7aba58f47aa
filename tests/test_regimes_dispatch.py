"""The dispatcher exactly at every bound each backend declares: max_dim, min_dim, dtypes, devices.

For every op and every Support row: dim = max_dim and dim = min_dim are accepted and one past either is refused
with a reason naming the dimension; every dtype in the row is accepted and every other floating dtype refused.
Rows that can run here are also checked through ``select`` (explicit backend), and the public functions are called
at the bound (``fastclip.contrastive_loss(..., backend="triton")`` at D = 2048 runs, D = 2049 raises
``BackendError``).
"""
import pytest
import torch

import fastclip
from fastclip.dispatch import BackendError, ops, select, supports

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ROWS = [pytest.param(op, name, id=f"{op}-{name}") for op in ops() for name in supports(op)]


def _dim_reasons(row, dim, dtype, device):
    return [r for r in row.not_supported_reasons(device, dtype, dim) if r.startswith(f"{row.dim_name} {dim} ")]


def _some(row):
    return sorted(row.dtypes, key=str)[0], sorted(row.devices)[0]


@pytest.mark.parametrize("op,name", ROWS)
def test_dim_bounds(op, name):
    row = supports(op)[name]
    dtype, device = _some(row)
    assert _dim_reasons(row, row.min_dim, dtype, device) == []
    assert _dim_reasons(row, row.min_dim - 1, dtype, device) == [f"{row.dim_name} {row.min_dim - 1} < {row.min_dim}"]
    if row.max_dim is None:
        assert _dim_reasons(row, 1 << 20, dtype, device) == []
    else:
        assert _dim_reasons(row, row.max_dim, dtype, device) == []
        assert _dim_reasons(row, row.max_dim + 1, dtype, device) == [
            f"{row.dim_name} {row.max_dim + 1} > {row.max_dim}"]


@pytest.mark.parametrize("op,name", ROWS)
def test_dtypes_and_devices(op, name):
    row = supports(op)[name]
    device = sorted(row.devices)[0]
    dim = row.min_dim if row.max_dim is None else row.max_dim
    for dtype in FLOATS:
        refused = [r for r in row.not_supported_reasons(device, dtype, dim) if r.startswith("dtype ")]
        assert bool(refused) == (dtype not in row.dtypes), (dtype, refused)
    dtype = sorted(row.dtypes, key=str)[0]
    for dev in ("cpu", "cuda"):
        refused = [r for r in row.not_supported_reasons(dev, dtype, dim) if r.startswith(f"{dev} tensors")]
        assert bool(refused) == (dev not in row.devices), (dev, refused)


@pytest.mark.parametrize("op,name", [p for p in ROWS if not supports(p.values[0])[p.values[1]].unavailable()])
def test_select_at_the_bounds(op, name):
    row = supports(op)[name]
    if "cpu" not in row.devices:
        pytest.skip("a GPU-only row")  # checked above through not_supported_reasons
    dtype = torch.float32
    assert select(op, name, device="cpu", dtype=dtype, dim=row.min_dim) is row
    with pytest.raises(BackendError, match=f"{row.dim_name} {row.min_dim - 1} < {row.min_dim}"):
        select(op, name, device="cpu", dtype=dtype, dim=row.min_dim - 1)
    if row.max_dim is not None:
        assert select(op, name, device="cpu", dtype=dtype, dim=row.max_dim) is row
        with pytest.raises(BackendError, match=f"{row.dim_name} {row.max_dim + 1} > {row.max_dim}"):
            select(op, name, device="cpu", dtype=dtype, dim=row.max_dim + 1)


def test_auto_never_fails_where_torch_runs():
    for op in ops():
        for dtype in FLOATS:
            assert select(op, "auto", device="cpu", dtype=dtype, dim=4096).backend in ("torch", "reference")


def _loss_args(dim):
    return torch.randn(2, dim), torch.randn(2, dim), torch.tensor(2.0), torch.tensor(-1.0)


@pytest.mark.parametrize("fn", ["contrastive_loss", "siglip_loss"])
def test_public_loss_refuses_past_triton_max_dim(fn):
    d = supports(fn)["triton"].max_dim
    with pytest.raises(BackendError, match=f"feature dim {d + 1} > {d}"):
        getattr(fastclip, fn)(*_loss_args(d + 1), backend="triton")


@pytest.mark.slow  # D = 2048 through the Triton interpreter
@pytest.mark.parametrize("fn", ["contrastive_loss", "siglip_loss"])
def test_public_loss_runs_at_triton_max_dim(fn):
    row = supports(fn)["triton"]
    if row.unavailable():
        pytest.skip(row.unavailable())
    f, x = getattr(fastclip, fn), _loss_args(row.max_dim)
    torch.testing.assert_close(f(*x, backend="triton"), f(*x, backend="torch"), rtol=1e-5, atol=1e-5)


def test_public_attention_at_triton_max_head_dim():
    row = supports("flash_attention")["triton"]
    if row.unavailable():
        pytest.skip(row.unavailable())
    q = torch.randn(1, 3, 1, row.max_dim)
    torch.testing.assert_close(fastclip.flash_attention(q, q, q, backend="triton"),
                               fastclip.flash_attention(q, q, q, backend="torch"), rtol=1e-5, atol=1e-5)
    q = torch.randn(1, 3, 1, row.max_dim + 1)
    with pytest.raises(BackendError, match=f"head_dim {row.max_dim + 1} > {row.max_dim}"):
        fastclip.flash_attention(q, q, q, backend="triton")
