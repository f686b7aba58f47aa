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
from fastclip import dispatch
from fastclip.dispatch import BackendError, Support, ops, register, select, supports

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


# ---------------------------------------------------------------------------------------------------------------
# select()'s walk through AUTO_ORDER, the environment override and the measured cuda/triton choice, on a toy op
# whose rows say they can run (as the cuda and triton rows do on a GPU machine), and the pieces select() uses.

def _noop():
    return None


@pytest.fixture
def toy(monkeypatch):
    """A registered op "toy" with all four backends available here (cuda: CUDA tensors, dims multiple of 8)."""
    monkeypatch.setitem(dispatch._REGISTRY, "toy", {})
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "device_arch", lambda device: "sm_90" if torch.device(device).type == "cuda"
                        else "")
    monkeypatch.setitem(dispatch._CACHE, "entries", [])
    for name in dispatch.AUTO_ORDER:
        register(Support("toy", name, impl=_noop, dtypes=frozenset({torch.float32, torch.float16}),
                         devices=frozenset({"cuda"}) if name == "cuda" else frozenset({"cpu", "cuda"}),
                         max_dim=64 if name in ("cuda", "triton") else None))
    return supports("toy")


def _prefer_cuda(monkeypatch, dim_max=64):
    monkeypatch.setitem(dispatch._CACHE, "entries", [
        dict(op="toy", arch="sm_90", dtype="float16", dim_max=dim_max, backend="cuda")])


def test_auto_order(toy, monkeypatch):
    cuda = torch.device("cuda")
    # without a measurement auto keeps triton over cuda, and on the CPU it never takes the interpreter
    assert select("toy", device=cuda, dtype=torch.float16, dim=32) is toy["triton"]
    assert select("toy", None, device="cpu", dtype=torch.float16, dim=32) is toy["torch"]
    _prefer_cuda(monkeypatch)
    assert select("toy", "auto", device=cuda, dtype=torch.float16, dim=32) is toy["cuda"]
    assert select("toy", device=cuda, dtype=torch.float16, dim=128) is toy["torch"]  # past cuda's and triton's max
    assert select("toy", device=cuda, dtype=torch.float32, dim=32) is toy["triton"]  # measured for fp16 only
    del toy["torch"]
    assert select("toy", device="cpu", dtype=torch.float16, dim=32) is toy["reference"]


def test_auto_refusal_lists_every_backend(toy):
    refused = "dtype float64 is not supported (dtypes: float16, float32)"
    with pytest.raises(BackendError) as err:
        select("toy", device="cuda", dtype=torch.float64, dim=72)
    assert str(err.value) == (
        "toy: no backend can run these inputs (device=cuda, dtype=torch.float64, dim=72):\n"
        "  cuda: skipped by auto: no committed benchmark shows it faster than triton for these inputs "
        "(fastclip/data/backend_choice.json)\n"
        f"  triton: {refused}; feature dim 72 > 64\n"
        f"  torch: {refused}\n"
        f"  reference: {refused}")
    del toy["torch"], toy["reference"]
    with pytest.raises(BackendError, match="\n  triton: skipped by auto on the CPU \\(the interpreter is for "
                                           "testing\\)$"):
        select("toy", device=torch.device("cpu"), dtype=torch.float16, dim=8)


def test_explicit_backend_and_environment(toy, monkeypatch):
    assert select("toy", "triton", device="cpu", dtype=torch.float16, dim=8) is toy["triton"]  # explicit: taken
    with pytest.raises(BackendError) as err:
        select("toy", "cuda", device="cpu", dtype=torch.float64, dim=12)
    assert str(err.value) == ("toy: backend 'cuda' cannot run these inputs (device=cpu, dtype=torch.float64, "
                              "feature dim=12): cpu tensors are not supported (devices: cuda); dtype float64 is not "
                              "supported (dtypes: float16, float32)")
    for env in ("auto", " auto ", ""):
        monkeypatch.setenv("FASTCLIP_BACKEND", env)
        assert select("toy", device="cpu", dtype=torch.float16, dim=8) is toy["torch"]
    monkeypatch.setenv("FASTCLIP_BACKEND", " reference ")
    assert select("toy", device="cpu", dtype=torch.float16, dim=8) is toy["reference"]
    assert select("toy", "torch", device="cpu", dtype=torch.float16, dim=8) is toy["torch"]  # explicit wins
    monkeypatch.setenv("FASTCLIP_BACKEND", "triton")
    with pytest.raises(BackendError, match=r"^toy: backend 'triton' \(FASTCLIP_BACKEND\) cannot run these inputs "
                                           r"\(device=cpu, dtype=torch.float64, feature dim=8\): dtype float64"):
        select("toy", device="cpu", dtype=torch.float64, dim=8)
    monkeypatch.setenv("FASTCLIP_BACKEND", "Torch")
    with pytest.raises(ValueError, match=r"^FASTCLIP_BACKEND='Torch' \(environment variable\) is not one of "
                                         r"\('auto', 'reference', 'torch', 'triton', 'cuda'\)$"):
        select("toy", device="cpu", dtype=torch.float16, dim=8)
    monkeypatch.delenv("FASTCLIP_BACKEND")
    with pytest.raises(ValueError, match=r"^backend='AUTO' is not one of"):
        select("toy", "AUTO", device="cpu", dtype=torch.float16, dim=8)


def test_backend_the_op_lacks(toy, monkeypatch):
    del toy["triton"], toy["cuda"]
    monkeypatch.setitem(dispatch._BACKEND_UNAVAILABLE, "triton", lambda: "no triton here")
    with pytest.raises(BackendError) as err:
        select("toy", "triton", device="cpu", dtype=torch.float16, dim=8)
    assert str(err.value) == ("toy: backend 'triton' has no implementation of this op in this version (implemented "
                              "by: torch, reference); besides, no triton here")
    monkeypatch.setenv("FASTCLIP_BACKEND", "cuda")
    monkeypatch.setitem(dispatch._BACKEND_UNAVAILABLE, "cuda", lambda: None)
    with pytest.raises(BackendError) as err:
        select("toy", device="cpu", dtype=torch.float16, dim=8)
    assert str(err.value) == ("toy: backend 'cuda' (FASTCLIP_BACKEND) has no implementation of this op in this "
                              "version (implemented by: torch, reference)")
    monkeypatch.delenv("FASTCLIP_BACKEND")
    del toy["torch"]
    with pytest.raises(BackendError) as err:
        select("toy", "torch", device="cpu", dtype=torch.float16, dim=8)
    assert str(err.value) == ("toy: backend 'torch' has no implementation of this op in this version (implemented "
                              "by: reference)")


def test_register_and_lookup(toy):
    assert "toy" in ops() and ops() == sorted(ops())
    row = Support("toy", "torch", impl=_noop)
    assert register(row) is row and supports("toy")["torch"] is row  # a second row replaces the first
    with pytest.raises(ValueError, match=r"^unknown backend 'numpy'; expected one of \('reference', 'torch', "
                                         r"'triton', 'cuda'\)$"):
        register(Support("toy", "numpy", impl=_noop))
    assert "numpy" not in supports("toy")
    with pytest.raises(KeyError, match="unknown op 'nope'; known: \\[.*'toy'"):
        supports("nope")


def test_new_op_gets_its_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))  # the real registry stays as it is
    row = register(Support("toy2", "reference", impl=_noop))
    assert supports("toy2") == {"reference": row}


def test_support_reasons_in_order():
    row = Support("toy", "cuda", impl=_noop, devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16}),
                  min_dim=8, max_dim=16, dim_name="head_dim", unavailable=lambda: "not built",
                  extra_checks=(lambda dev, dtype, dim: [f"extra {dev} {dtype} {dim}"],))
    assert row.not_supported_reasons("cpu", torch.float32, 4) == [
        "not built", "cpu tensors are not supported (devices: cuda)",
        "dtype float32 is not supported (dtypes: float16)", "head_dim 4 < 8", "extra cpu torch.float32 4"]
    assert row.not_supported_reasons(torch.device("cuda", 1), torch.float16, 17)[1:] == [
        "head_dim 17 > 16", "extra cuda torch.float16 17"]
    row = Support("toy", "torch", impl=_noop)
    assert row.not_supported_reasons("meta", torch.int8, 1 << 20) == [
        "meta tensors are not supported (devices: cpu, cuda)",
        "dtype int8 is not supported (dtypes: bfloat16, float16, float32, float64)"]


def test_lazy_imports_on_call():
    parse = dispatch.Lazy("builtins", "int")
    assert (parse.module, parse.name) == ("builtins", "int")
    assert parse("ff", base=16) == 255  # positional and keyword arguments are passed on


def test_interpreter_and_cuda_kernel_refusals(monkeypatch):
    reason = "bfloat16 does not run in the Triton interpreter (CPU)"
    assert dispatch.no_bf16_in_interpreter("cpu", torch.bfloat16, 64) == [reason]
    assert dispatch.no_bf16_in_interpreter("cpu", torch.float16, 64) == []
    assert dispatch.no_bf16_in_interpreter("cuda", torch.bfloat16, 64) == []
    for dim in range(1, 41):
        expected = [f"dim {dim} is not a multiple of 8 (the kernels load 16-byte rows)"] if dim % 8 else []
        assert dispatch.cuda_kernel_reasons("cpu", torch.float16, dim) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, ok in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap: c)
        sm = f"sm_{cap[0]}{cap[1]}"
        expected = [] if ok else [f"the GPU is {sm}; the kernels need sm_80 or newer (bf16 mma.sync, cp.async)"]
        assert dispatch.cuda_kernel_reasons("cuda", torch.float16, 64) == expected
        assert dispatch.cuda_kernel_reasons("cpu", torch.float16, 64) == []  # the GPU matters for CUDA tensors only


def test_triton_availability(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_interpret()
    for off in ("0", "true", ""):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        assert not dispatch.triton_interpret()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.triton_interpret()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(dispatch._TRITON_IMPORT, "err", None)
    assert dispatch.triton_unavailable() == ("no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run the "
                                             "kernels on the CPU, slowly)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dispatch.triton_unavailable() is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dispatch.triton_unavailable() is None
    monkeypatch.setitem(dispatch._TRITON_IMPORT, "err", "broken")
    assert dispatch.triton_unavailable() == "broken"


def test_triton_import_failure_is_reported_and_cached(monkeypatch):
    import sys

    import triton.language

    real = sys.modules["triton.language"]
    monkeypatch.delitem(dispatch._TRITON_IMPORT, "err", raising=False)
    monkeypatch.setitem(sys.modules, "triton.language", None)  # importing it raises ImportError
    expected = ("triton is not importable (ModuleNotFoundError: import of triton.language halted; None in sys.modules); "
                "pip install triton")
    assert dispatch._triton_import_error() == expected
    # the real module back (never a fresh import of it: modules that hold the old one, as the interpreter does, would
    # see a second triton.language and every later kernel launch would fail)
    monkeypatch.setitem(sys.modules, "triton.language", real)
    assert dispatch._triton_import_error() == expected  # cached: not imported again
    monkeypatch.delitem(dispatch._TRITON_IMPORT, "err")
    assert dispatch._triton_import_error() is None


def test_choice_table_file(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    monkeypatch.setattr(dispatch, "CHOICE_TABLE", str(path))
    assert dispatch._read() == []  # no file: nothing measured
    path.write_text('{"comment": "no entries yet"}')
    assert dispatch._read() == []
    path.write_text('{"entries": [{"op": "toy", "arch": "sm_90", "dtype": "float16", "dim_max": 64, '
                    '"backend": "cuda"}]}')
    assert dispatch._read() == [dict(op="toy", arch="sm_90", dtype="float16", dim_max=64, backend="cuda")]


def test_device_arch(monkeypatch):
    calls = []

    def capability(idx):
        calls.append(idx)
        return (8, 6) if idx == 1 else (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dispatch, "_CACHE", {"entries": []})
    assert dispatch.device_arch("cpu") == "" and dispatch.device_arch(torch.device("meta")) == ""
    assert dispatch.device_arch("cuda:0") == "sm_90"
    assert dispatch.device_arch(torch.device("cuda")) == "sm_86"  # the current device
    assert dispatch.device_arch("cuda:1") == "sm_86" and dispatch.device_arch("cuda:0") == "sm_90"
    assert calls == [0, 1]  # once per device


def test_preferred_reads_the_device_and_the_smallest_bucket(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dispatch, "_CACHE", {"entries": [
        dict(op="toy", arch="sm_90", dtype="float16", dim_max=256, backend="triton"),
        dict(op="toy", arch="sm_90", dtype="float16", dim_max=64, backend="cuda"),
        dict(op="toy", arch="sm_90", dtype="float16", dim_max=64, backend="triton"),  # a duplicate bucket: first wins
    ]})
    assert dispatch.preferred("toy", "cuda", torch.float16, 64) == "cuda"
    assert dispatch.preferred("toy", "cuda", torch.float16, 65) == "triton"
    assert dispatch.preferred("toy", "cuda", torch.float16, 257) is None
    assert dispatch.preferred("toy", "cpu", torch.float16, 64) is None  # measured on sm_90, not on the CPU


def test_among_limits_the_backends_a_caller_runs(monkeypatch):
    """select(among=..., caller=...): auto takes the first backend of the auto order that is in ``among`` and runs
    the inputs, and says why it skipped the others; an explicit backend, or FASTCLIP_BACKEND's, outside ``among``
    is refused with the caller's name and the backends it runs."""
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, dim=16)
    table = supports("contrastive_loss")
    assert select("contrastive_loss", **kw) is table["torch"]
    assert select("contrastive_loss", among=("reference",), caller="X", **kw) is table["reference"]
    assert select("contrastive_loss", among=("reference", "torch"), **kw) is table["torch"]
    assert select("contrastive_loss", "reference", among=("reference",), **kw) is table["reference"]
    with pytest.raises(BackendError, match=r"^contrastive_loss: backend 'torch' is not run by X \(it runs "
                                           r"reference, triton\)$"):
        select("contrastive_loss", "torch", among=("reference", "triton"), caller="X", **kw)
    with pytest.raises(BackendError, match=r"backend 'torch' is not run by this caller \(it runs reference\)"):
        select("contrastive_loss", "torch", among=("reference",), **kw)
    with pytest.raises(BackendError, match=r"no backend can run these inputs(.|\n)*\n  torch: not run by X\n"
                                           r"  reference: not run by X$"):
        select("contrastive_loss", among=("cuda",), caller="X", **kw)
    with pytest.raises(BackendError, match=r"(?m)^  torch: not run by this caller$") as err:
        select("contrastive_loss", among=(), **kw)
    assert "  triton: " in str(err.value)
    monkeypatch.setenv("FASTCLIP_BACKEND", "torch")
    with pytest.raises(BackendError, match=r"backend 'torch' \(FASTCLIP_BACKEND\) is not run by X"):
        select("contrastive_loss", among=("reference",), caller="X", **kw)
    assert select("contrastive_loss", among=("torch",), caller="X", **kw) is table["torch"]


def test_max_sizes_bounds_through_select(monkeypatch):
    """A row's other size limits (``Support.max_sizes``: top-k's Triton k <= 128) exactly at the bound: the limit is
    taken, one past it an explicit backend raises naming the size, and auto gives it as its reason."""
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, dim=16)
    row = supports("topk_similarity")["triton"]
    limit = row.max_sizes["k"]
    assert select("topk_similarity", "triton", sizes={"k": limit}, **kw) is row
    with pytest.raises(BackendError, match=rf"backend 'triton' cannot run these inputs .*: k {limit + 1} > {limit} "
                                           rf"\(the largest k this backend takes\)"):
        select("topk_similarity", "triton", sizes={"k": limit + 1}, **kw)
    assert select("topk_similarity", "triton", **kw) is row  # no sizes given: nothing to refuse
    with pytest.raises(BackendError, match=rf"\n  triton: k {limit + 1} > {limit} \(the largest k"):  # auto's reason
        select("topk_similarity", among=("triton",), sizes={"k": limit + 1}, **kw)
    with pytest.raises(BackendError, match=r"\n  triton: skipped by auto on the CPU"):  # within the bound
        select("topk_similarity", among=("triton",), sizes={"k": limit}, **kw)
