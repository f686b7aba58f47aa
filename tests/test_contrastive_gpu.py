"""GPU checks of the contrastive loss (``pytest -m gpu``): bf16, full sizes, memory, torch.compile."""
import pytest
import torch

import fastclip
from fastclip.ops.contrastive import reference

from .helpers import assert_close_to_ref
from .test_contrastive import GRAD_NAMES, loss_and_grads, make_inputs, upcast

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 5), (77, 48), (1000, 512), (4097, 768), (3000, 1024), (513, 2048)])
@pytest.mark.parametrize("scale,bias,ls", [(1.0, None, 0.0), (100.0, -10.0, 0.1)])
def test_triton_cuda_matches_reference(dtype, n, d, scale, bias, ls):
    check_gpu_loss(make_inputs(n, d, dtype, scale=scale, bias=bias, device="cuda"), ls, "triton")


def check_gpu_loss(leaves, ls, backend):
    """loss and every gradient of ``backend`` against fp64, bounded by same-dtype PyTorch's own error."""
    dtype = leaves[0].dtype
    hi_loss, hi_grads = loss_and_grads(lambda *x: reference.contrastive_loss_ref(*x, label_smoothing=ls),
                                       upcast(leaves, torch.float64))
    lo_loss, lo_grads = loss_and_grads(lambda *x: reference.contrastive_loss_ref(*x, label_smoothing=ls),
                                       upcast(leaves, dtype))
    loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, label_smoothing=ls, backend=backend),
                                 leaves)
    assert loss.dtype == dtype
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=atol * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        if name == "d_logit_bias":
            continue  # exactly zero by construction; the references give rounding noise
        assert_close_to_ref(name, g, h, lo, factor=3, atol=atol * h.abs().max().item())


def test_triton_cuda_run_to_run():
    # the column merge order varies between runs; the result must not move by more than rounding
    img, txt, scale = make_inputs(20000, 512, torch.bfloat16, scale=50.0, device="cuda")
    a = fastclip.contrastive_loss(img, txt, scale, backend="triton").float().item()
    for _ in range(5):
        b = fastclip.contrastive_loss(img, txt, scale, backend="triton").float().item()
        assert abs(a - b) <= 1e-2 * abs(a)


def test_cuda_memory_beyond_inputs_and_grads_at_64k():
    n, d = 65536, 512
    img, txt, scale = make_inputs(n, d, torch.bfloat16, scale=14.3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fastclip.contrastive_loss(img, txt, scale, backend="triton").backward()
    torch.cuda.synchronize()
    grads = img.grad.numel() * img.grad.element_size() + txt.grad.numel() * txt.grad.element_size()
    extra_mb = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
    assert extra_mb < 64, f"loss added {extra_mb:.1f} MB beyond inputs and gradients"


@pytest.mark.slow
def test_one_million_pairs_bf16():
    n, d = 1 << 20, 512
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs an 80 GB GPU")
    img, txt, scale = make_inputs(n, d, torch.bfloat16, scale=14.3, device="cuda")
    loss = fastclip.contrastive_loss(img, txt, scale, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    # random unit features: every logit is near 0, so the loss is near log(N)
    assert abs(loss.float().item() - torch.log(torch.tensor(float(n))).item()) < 0.5


def test_compile_inductor_fullgraph():
    leaves = make_inputs(1000, 256, torch.bfloat16, scale=30.0, bias=-5.0, device="cuda")

    def step(img, txt, scale, bias):
        return fastclip.ContrastiveLoss()(img, txt, scale, bias) * 2

    loss, grads = loss_and_grads(torch.compile(step, fullgraph=True), leaves)
    ref_loss, ref_grads = loss_and_grads(step, leaves)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads[:3], ref_grads[:3]):
        torch.testing.assert_close(g, r)
