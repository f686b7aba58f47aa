"""The compiled extension on a machine without a GPU: it loads, its ops are registered with the documented schemas,
CPU tensors get a clear error after the argument checks, and the fake implementations give torch.compile shapes.

CI builds the extension before the tests (.ci/run) and sets FASTCLIP_REQUIRE_CUDA_EXT=1, so a build that is missing
fails here instead of skipping. Elsewhere, without the extension, these tests skip and say how to build it.
"""
import os

import pytest
import torch

from fastclip.ops import _extension as cuda_backend
from fastclip.dispatch import BackendError, select

if not cuda_backend.built():
    if os.environ.get("FASTCLIP_REQUIRE_CUDA_EXT") == "1":
        raise RuntimeError(f"FASTCLIP_REQUIRE_CUDA_EXT=1 but {cuda_backend.unavailable_reason()}")
    pytest.skip(f"{cuda_backend.unavailable_reason()}", allow_module_level=True)

OPS = {
    "contrastive_stats_cuda": "contrastive_stats_cuda(Tensor image, Tensor text, Tensor scale, Tensor diag) "
                              "-> (Tensor, Tensor)",
    "contrastive_grad_cuda": "contrastive_grad_cuda(Tensor a, Tensor b, Tensor scale, Tensor diag, Tensor a_stats, "
                             "Tensor b_stats, float diag_coef, float uniform_coef, bool with_ds_dot=True) -> (Tensor, Tensor)",
    "flash_attn_fwd_cuda": "flash_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
                           "float softmax_scale) -> (Tensor, Tensor)",
    "flash_attn_bwd_cuda": "flash_attn_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                           "Tensor? key_padding_mask, bool causal, float softmax_scale) -> (Tensor, Tensor, Tensor)",
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_registered_with_schema(name):
    schema = str(getattr(torch.ops.fastclip, name).default._schema)
    assert schema == "fastclip::" + OPS[name]


def _feats(n=10, d=64, dtype=torch.bfloat16):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype), torch.ones(1)


def test_cpu_tensors_get_a_clear_error():
    img, txt, s = _feats()
    with pytest.raises(RuntimeError, match=r"contrastive_stats_cuda: the CUDA kernels need CUDA tensors; "
                                           r"got \[10, 64\] BFloat16 on cpu.*backend='torch'"):
        torch.ops.fastclip.contrastive_stats_cuda(img, txt, s, torch.zeros(10))
    stats = torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match="contrastive_grad_cuda: the CUDA kernels need CUDA tensors"):
        torch.ops.fastclip.contrastive_grad_cuda(img, txt, s, torch.zeros(10), stats, stats, 2.0, 0.0)
    q = torch.randn(2, 7, 3, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"flash_attn_fwd_cuda: the CUDA kernels need CUDA tensors; "
                                           r"got \[2, 7, 3, 32\] Half on cpu"):
        torch.ops.fastclip.flash_attn_fwd_cuda(q, q, q, None, False, 0.1)
    with pytest.raises(RuntimeError, match="flash_attn_bwd_cuda: the CUDA kernels need CUDA tensors"):
        torch.ops.fastclip.flash_attn_bwd_cuda(q, q, q, q, q, torch.zeros(2, 3, 7), None, True, 0.1)


@pytest.mark.parametrize("case,match", [
    (dict(d=12), r"multiple of 8 in \[8, 2048\]; got image \[10, 12\]"),
    (dict(dtype=torch.float32), r"both be float16 or both bfloat16; got image \[10, 64\] Float"),
    (dict(text_n=9), r"same shape; got image \[10, 64\] BFloat16 on cpu and text \[9, 64\]"),
    (dict(scale=torch.ones(2)), r"scale must be a one-element float32 tensor; got \[2\]"),
])
def test_contrastive_argument_checks(case, match):
    img, txt, s = _feats(d=case.get("d", 64), dtype=case.get("dtype", torch.bfloat16))
    if "text_n" in case:
        txt = txt[:case["text_n"]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastclip.contrastive_stats_cuda(img, txt, case.get("scale", s), torch.zeros(len(img)))


def test_contrastive_grad_checks_the_stats_and_diag():
    img, txt, s = _feats()
    diag, stats = torch.zeros(10), torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match=r"a_stats must be \(2, 10\) float32 .*got \[10\]"):
        torch.ops.fastclip.contrastive_grad_cuda(img, txt, s, diag, torch.zeros(10), stats, 2.0, 0.0)
    for op, args in (("contrastive_stats_cuda", ()), ("contrastive_grad_cuda", (stats, stats, 2.0, 0.0))):
        with pytest.raises(RuntimeError, match=r"diag must be \(10\) float32, the base-2 diagonal logits; got \[9\]"):
            getattr(torch.ops.fastclip, op)(img, txt, s, torch.zeros(9), *args)
        with pytest.raises(RuntimeError, match=r"diag must be \(10\) float32.*got \[10\] Half"):
            getattr(torch.ops.fastclip, op)(img, txt, s, diag.half(), *args)


@pytest.mark.parametrize("shape,match", [
    ((2, 7, 3, 24), r"head_dim must be a multiple of 8 in \[32, 128\]; got q \[2, 7, 3, 24\]"),
    ((2, 7, 3, 136), r"head_dim must be a multiple of 8 in \[32, 128\]"),
    ((2, 7, 3, 36), r"head_dim must be a multiple of 8"),
])
def test_attention_argument_checks(shape, match):
    q = torch.randn(*shape, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastclip.flash_attn_fwd_cuda(q, q, q, None, False, 0.1)


def test_attention_mask_and_dtype_checks():
    q = torch.randn(2, 7, 3, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be \(batch, seq_k\) bool = \(2, 7\); got \[2, 6\]"):
        torch.ops.fastclip.flash_attn_fwd_cuda(q, q, q, torch.zeros(2, 6, dtype=torch.bool), False, 0.1)
    with pytest.raises(RuntimeError, match="must all be float16 or all bfloat16"):
        torch.ops.fastclip.flash_attn_fwd_cuda(q, q.half(), q, None, False, 0.1)


def test_fake_implementations_give_shapes():
    with torch._subclasses.FakeTensorMode():
        img, txt = torch.empty(100, 512, dtype=torch.bfloat16), torch.empty(100, 512, dtype=torch.bfloat16)
        diag = torch.empty(100)
        row, col = torch.ops.fastclip.contrastive_stats_cuda(img, txt, torch.ones(1), diag)
        assert row.shape == col.shape == (2, 100) and row.dtype == torch.float32
        g, ds_dot = torch.ops.fastclip.contrastive_grad_cuda(img, txt, torch.ones(1), diag, row, col, 2.0, 0.0)
        assert g.shape == (100, 512) and g.dtype == torch.float32
        assert ds_dot.shape == (100,) and ds_dot.dtype == torch.float32
        _, none = torch.ops.fastclip.contrastive_grad_cuda(img, txt, torch.ones(1), diag, row, col, 2.0, 0.0, False)
        assert none.shape == (0,) and none.dtype == torch.float32
        q = torch.empty(2, 77, 8, 64, dtype=torch.float16)
        out, lse = torch.ops.fastclip.flash_attn_fwd_cuda(q, q, q, None, True, 0.125)
        assert out.shape == q.shape and lse.shape == (2, 8, 77) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.fastclip.flash_attn_bwd_cuda(q, q, q, q, out, lse, None, True, 0.125)
        assert dq.shape == dk.shape == dv.shape == q.shape


def test_backend_reports_built_but_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cuda_backend.unavailable_reason() == "the CUDA extension is built but there is no CUDA GPU"
    from fastclip.info import report

    assert "cuda       unavailable: the CUDA extension is built but there is no CUDA GPU" in report()
    with pytest.raises(BackendError, match="built but there is no CUDA GPU"):
        select("contrastive_loss", "cuda", device=torch.device("cpu"), dtype=torch.bfloat16, dim=512)
    assert select("contrastive_loss", "auto", device=torch.device("cpu"), dtype=torch.bfloat16,
                  dim=512).backend == "torch"
