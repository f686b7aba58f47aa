"""The build configuration of the CUDA extension and auto's cuda/triton choice (no compiler or GPU needed)."""
import glob
import os

import pytest
import torch

from fastclip import build
from fastclip import dispatch as choice
from fastclip.dispatch import select


def test_sources_are_every_kernel_file_and_the_bindings():
    srcs = build.sources(relative=True)
    assert srcs[0] == os.path.join("csrc", "ops.cpp")
    for op in ("contrastive", "attention"):
        cus = sorted(os.path.relpath(p, build.ROOT) for p in glob.glob(os.path.join(build.CSRC, op, "*.cu")))
        assert cus and all(c in srcs for c in cus), f"{op}: {cus} not all in {srcs}"
    assert not [s for s in srcs if "emulate" in s or os.sep + "tests" + os.sep in s]


def test_arch_flags():
    assert build.arch_flags("80;90") == ["-gencode", "arch=compute_80,code=sm_80", "-gencode",
                                         "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]
    assert build.arch_flags("8.6")[:2] == ["-gencode", "arch=compute_86,code=sm_86"]
    with pytest.raises(ValueError, match="sm_80 or newer"):
        build.arch_flags("75;80")
    with pytest.raises(ValueError, match="names no architecture"):
        build.arch_flags(" ; ")


def test_kernel_sources_include_no_torch_headers():
    # .cu files see only csrc/common/device.cuh: they build in seconds and the emulator compiles them as they are
    for path in glob.glob(os.path.join(build.CSRC, "*", "*.cu*")) + glob.glob(os.path.join(build.CSRC, "*", "*.h")):
        text = open(path).read()
        assert "#include <torch" not in text and "#include <ATen" not in text, path


def test_choice_table_is_valid_json_with_known_fields():
    for e in choice.choice_table():
        assert set(e) >= {"op", "arch", "dtype", "dim_max", "backend"}, e
        assert e["backend"] in ("cuda", "triton")


def test_preferred_picks_the_smallest_matching_bucket(monkeypatch):
    monkeypatch.setattr(choice, "device_arch", lambda device: "sm_90")
    monkeypatch.setitem(choice._CACHE, "entries", [
        dict(op="contrastive_loss", arch="sm_90", dtype="bfloat16", dim_max=2048, backend="triton"),
        dict(op="contrastive_loss", arch="sm_90", dtype="bfloat16", dim_max=512, backend="cuda"),
        dict(op="contrastive_loss", arch="sm_80", dtype="bfloat16", dim_max=4096, backend="cuda"),
    ])
    assert choice.preferred("contrastive_loss", "cuda", torch.bfloat16, 512) == "cuda"
    assert choice.preferred("contrastive_loss", "cuda", torch.bfloat16, 768) == "triton"
    assert choice.preferred("contrastive_loss", "cuda", torch.float16, 512) is None
    assert choice.preferred("flash_attention", "cuda", torch.bfloat16, 64) is None


def test_explicit_cuda_backend_explains_itself_on_the_cpu():
    with pytest.raises(Exception, match=r"backend 'cuda' cannot run.*cpu tensors are not supported"):
        select("contrastive_loss", "cuda", device=torch.device("cpu"), dtype=torch.bfloat16, dim=512)
    with pytest.raises(Exception, match=r"dim 12 is not a multiple of 8"):
        select("contrastive_loss", "cuda", device=torch.device("cpu"), dtype=torch.bfloat16, dim=12)
    with pytest.raises(Exception, match=r"dtype float32 is not supported"):
        select("flash_attention", "cuda", device=torch.device("cpu"), dtype=torch.float32, dim=64)


def test_choose_backends_from_csv(tmp_path):
    import importlib.util

    from fastclip.bench.common import CSV_FIELDS

    spec = importlib.util.spec_from_file_location("choose", os.path.join(build.ROOT, "benchmarks",
                                                                         "choose_backends.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dev = "NVIDIA H100 80GB HBM3 (sm_90)"
    rows = []
    for n, cu, tr in ((4096, 1.0, 2.0), (16384, 3.0, 4.0)):
        for prov, ms in (("cuda", cu), ("triton", tr)):
            rows.append(dict(op="contrastive_loss", provider=prov, mode="full", shape=f"N={n},D=512", dtype="bf16",
                             ms_p50=str(ms), device=dev, git_sha="abc", note=""))
    rows.append(dict(op="contrastive_loss", provider="cuda", mode="full", shape="N=4096,D=768", dtype="bf16",
                     ms_p50="9", device=dev, git_sha="abc", note=""))  # no triton row at D=768: no entry
    rows.append(dict(op="flash_attention", provider="fastclip-cuda", mode="full", shape="vit:B=8,S=50,H=12,D=64",
                     dtype="bf16", ms_p50="2", device=dev, git_sha="abc", note=""))
    rows.append(dict(op="flash_attention", provider="fastclip-triton", mode="full", shape="vit:B=8,S=50,H=12,D=64",
                     dtype="bf16", ms_p50="1", device=dev, git_sha="abc", note=""))
    entries = mod.choose([{k: r.get(k, "") for k in CSV_FIELDS} for r in rows])
    assert [(e["op"], e["arch"], e["dtype"], e["dim_max"], e["backend"]) for e in entries] == [
        ("contrastive_loss", "sm_90", "bfloat16", 512, "cuda"), ("flash_attention", "sm_90", "bfloat16", 64, "triton")]
    assert entries[0]["cuda_speedup"] == pytest.approx((2.0 * 4.0 / 3.0) ** 0.5, rel=1e-3)
