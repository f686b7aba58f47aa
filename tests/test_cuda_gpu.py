"""GPU checks of the ``cuda`` backend (``pytest -m gpu``): the compiled kernels against the reference, at the
shapes and tolerances of the Triton GPU tests, plus opcheck of the raw ops and torch.compile through them.

The same kernels are checked on the CPU through the emulator (tests/test_cuda_kernels_*.py); these tests are what
proves the PTX (mma/ldmatrix/cp.async fragment layouts) and the launch configuration on real hardware.
"""
import pytest
import torch

import fastclip
from fastclip.ops import _extension as cuda_backend

from .test_attention import GPU_SHAPES, check_against_reference, make_mask, make_qkv
from .test_contrastive import loss_and_grads, make_inputs
from .test_contrastive_gpu import check_gpu_loss

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_extension():
    why = cuda_backend.unavailable_reason()
    if why:
        pytest.fail(f"the cuda backend cannot run on this GPU machine: {why}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(1, 8), (77, 48), (1000, 512), (4097, 768), (3000, 1024), (513, 2048)])
@pytest.mark.parametrize("scale,bias,ls", [(1.0, None, 0.0), (100.0, -10.0, 0.1)])
def test_contrastive_matches_reference(dtype, n, d, scale, bias, ls):
    check_gpu_loss(make_inputs(n, d, dtype, scale=scale, bias=bias, device="cuda"), ls, "cuda")


def test_contrastive_strided_features():
    base = torch.randn(300, 2, 256, device="cuda", dtype=torch.bfloat16)
    img, txt = base[:, 0], base[:, 1]  # row stride 512
    scale = torch.tensor(20.0, device="cuda")
    a = fastclip.contrastive_loss(img, txt, scale, backend="cuda")
    b = fastclip.contrastive_loss(img.contiguous(), txt.contiguous(), scale, backend="cuda")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_contrastive_opcheck():
    img, txt, scale = make_inputs(130, 64, torch.bfloat16, scale=10.0, device="cuda")
    img, txt, s32 = img.detach(), txt.detach(), scale.detach().reshape(1).float()
    diag = s32 * 1.4426950408889634 * (img.float() * txt.float()).sum(1)
    torch.library.opcheck(torch.ops.fastclip.contrastive_stats_cuda.default, (img, txt, s32, diag))
    row, col = torch.ops.fastclip.contrastive_stats_cuda(img, txt, s32, diag)
    torch.library.opcheck(torch.ops.fastclip.contrastive_grad_cuda.default, (img, txt, s32, diag, row, col, 2.0, 0.0))


def test_contrastive_compile_fullgraph():
    leaves = make_inputs(1000, 256, torch.bfloat16, scale=30.0, device="cuda")

    def step(img, txt, scale):
        return fastclip.contrastive_loss(img, txt, scale, backend="cuda") * 2

    loss, grads = loss_and_grads(torch.compile(step, fullgraph=True), leaves)
    ref_loss, ref_grads = loss_and_grads(step, leaves)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s,h,d,mask_kind", GPU_SHAPES)
def test_attention_clip_shapes(dtype, b, s, h, d, mask_kind):
    leaves = make_qkv(b, s, h, d, dtype, device="cuda")
    causal, mask = make_mask(mask_kind, b, s, s, device="cuda")
    check_against_reference(leaves, causal, mask, "cuda", atol_fwd=1e-3, atol_bwd=1e-3)


@pytest.mark.parametrize("d", [32, 40, 64, 72, 80, 88, 96, 104, 112, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_head_dims(d, dtype):
    leaves = make_qkv(4, 131, 4, d, dtype, device="cuda")
    causal, mask = make_mask("causal+padding", 4, 131, 131, device="cuda")
    check_against_reference(leaves, causal, mask, "cuda", atol_fwd=1e-3, atol_bwd=1e-3)


def test_attention_packed_qkv_views_and_cross_lengths():
    qkv = torch.randn(3, 77, 3, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    check_against_reference((q, k, v), True, None, "cuda", atol_fwd=1e-3, atol_bwd=1e-3)
    q2 = torch.randn(2, 37, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k2 = torch.randn(2, 70, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    v2 = torch.randn(2, 70, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    check_against_reference((q2, k2, v2), True, None, "cuda", atol_fwd=1e-3, atol_bwd=1e-3)


def test_attention_opcheck():
    q, k, v = (t.detach() for t in make_qkv(2, 77, 4, 64, torch.bfloat16, device="cuda"))
    mask = torch.rand(2, 77, device="cuda") < 0.3
    torch.library.opcheck(torch.ops.fastclip.flash_attn_fwd_cuda.default, (q, k, v, mask, True, 0.125))
    out, lse = torch.ops.fastclip.flash_attn_fwd_cuda(q, k, v, mask, True, 0.125)
    torch.library.opcheck(torch.ops.fastclip.flash_attn_bwd_cuda.default,
                          (torch.randn_like(out), q, k, v, out, lse, mask, True, 0.125))


def test_auto_takes_cuda_only_on_evidence(monkeypatch):
    from fastclip import dispatch as choice
    from fastclip.dispatch import select

    dev = torch.device("cuda")
    arch = choice.device_arch(dev)
    monkeypatch.setitem(choice._CACHE, "entries", [])
    assert select("flash_attention", device=dev, dtype=torch.bfloat16, dim=64).backend == "triton"
    monkeypatch.setitem(choice._CACHE, "entries", [dict(op="flash_attention", arch=arch, dtype="bfloat16",
                                                        dim_max=64, backend="cuda")])
    assert select("flash_attention", device=dev, dtype=torch.bfloat16, dim=64).backend == "cuda"
    assert select("flash_attention", device=dev, dtype=torch.bfloat16, dim=80).backend == "triton"
    assert select("flash_attention", device=dev, dtype=torch.float16, dim=64).backend == "triton"
