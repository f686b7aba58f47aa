"""SigLIPLoss / siglip_loss against open_clip's SigLipLoss and the fp64 reference, every backend, one process."""
import re

import pytest
import torch

import fastclip
from fastclip.ops.siglip import reference
from fastclip.dispatch import BackendError, cuda_ext_unavailable, select

from .helpers import assert_close, assert_close_to_ref
from .test_contrastive import GRAD_NAMES, loss_and_grads, make_inputs, upcast

open_clip_loss = pytest.importorskip("open_clip.loss")


def siglip_inputs(n, d, dtype=torch.float64, *, scale=10.0, bias=-10.0, normalize=True):
    return make_inputs(n, d, dtype, scale=scale, bias=bias, normalize=normalize)


def open_clip_siglip(*leaves):
    img, txt, scale = leaves[:3]
    bias = leaves[3] if len(leaves) > 3 else None
    return open_clip_loss.SigLipLoss()(img, txt, scale, bias)


def ref_negative_only(*leaves):
    return reference.siglip_loss_ref(*leaves, negative_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Against open_clip (the contract): reference and torch backends in fp64, torch in fp32


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("n,d", [(1, 5), (3, 16), (77, 48), (257, 96)])
@pytest.mark.parametrize("scale,bias,normalize", [(1.0, -10.0, True), (10.0, -10.0, True), (100.0, 0.3, True),
                                                  (30.0, None, False), (100.0, 25.0, True)])
def test_matches_open_clip_fp64(backend, n, d, scale, bias, normalize):
    leaves = siglip_inputs(n, d, scale=scale, bias=bias, normalize=normalize)
    ref_loss, ref_grads = loss_and_grads(open_clip_siglip, upcast(leaves))
    loss, grads = loss_and_grads(
        lambda *x: fastclip.SigLIPLoss(backend=backend, chunk_size=7 if n > 7 else None)(
            *x[:3], x[3] if len(x) > 3 else None), leaves)
    assert loss.dtype == torch.float64
    assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d", [(3, 16), (197, 64)])
@pytest.mark.parametrize("scale,bias", [(1.0, -10.0), (100.0, -5.0)])
def test_torch_fp32(n, d, scale, bias):
    leaves = siglip_inputs(n, d, torch.float32, scale=scale, bias=bias)
    hi_loss, hi_grads = loss_and_grads(open_clip_siglip, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(open_clip_siglip, upcast(leaves, torch.float32))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend="torch"), leaves)
    assert loss.dtype == torch.float32
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=1e-5 * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert g.dtype == torch.float32
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-6 * (1 + h.abs().max().item()))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("n,m", [(1, 1), (3, 5), (40, 33), (17, 17)])
def test_negative_only_blocks(backend, n, m):
    # the building block of the distributed modes: another rank's texts, every pair a negative, N != M allowed
    from fastclip.ops.siglip import siglip_block

    dtype = torch.float32 if backend == "triton" else torch.float64
    img, _, scale, bias = siglip_inputs(n, 24, dtype, bias=-3.0)
    txt = make_inputs(m, 24, dtype)[1]
    leaves = [img, txt, scale, bias]
    ref_loss, ref_grads = loss_and_grads(ref_negative_only, upcast(leaves))
    if n == m:  # open_clip's own block maths (square only) agrees with the reference
        oc = open_clip_loss.SigLipLoss()._loss(*upcast(leaves), negative_only=True)
        assert_close("open_clip block", oc.detach(), ref_loss, rtol=1e-12, atol=0)
    loss, grads = loss_and_grads(
        lambda *x: siglip_block(*x, negative_only=True, backend=backend, chunk_size=4), leaves)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_close("loss", loss, ref_loss, rtol=tol, atol=tol)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=tol, atol=tol * 1e-1)


@pytest.mark.parametrize("chunk", [1, 2, 13, 64, 1000])
def test_torch_chunk_sizes(chunk):
    leaves = siglip_inputs(64, 12, scale=50.0, bias=-4.0)
    ref_loss, ref_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend="torch", chunk_size=chunk), leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-10, atol=1e-13)


def test_extreme_logits_are_exact():
    # |S| up to ~125: softplus in both tails (F.softplus's threshold would be 2e-9 off; log1p(exp(-|S|)) is not)
    leaves = siglip_inputs(33, 8, scale=100.0, bias=25.0)
    ref_loss, ref_grads = loss_and_grads(open_clip_siglip, upcast(leaves))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend="torch"), leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-13, atol=0)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-12, atol=1e-14)


def test_torch_memory_is_linear():
    # open_clip's loss holds N x N logits (and its chunked variants every block) for the backward; the torch path
    # holds a few chunk x N tiles during the forward and none after it
    from fastclip.bench.common import cpu_peak_supported, peak_memory_mb

    if not cpu_peak_supported():
        pytest.skip("no /proc/self/clear_refs here")
    n, d, chunk = 4096, 32, 128
    leaves = siglip_inputs(n, d, torch.float32)

    def step():
        fastclip.siglip_loss(*leaves, backend="torch", chunk_size=chunk).backward()

    step()  # warm-up: allocator and thread pools
    mb = peak_memory_mb(step, torch.device("cpu"))
    full_logits_mb = n * n * 4 / 2**20  # 64 MB
    linear_mb = (6 * n * d * 4 + 6 * chunk * n * 4) / 2**20  # inputs' gradients, unit gradients, a few tiles
    assert mb < full_logits_mb / 2, f"{mb:.1f} MB extra; the N x N logits alone are {full_logits_mb:.0f} MB"
    assert mb < linear_mb + 16, f"{mb:.1f} MB extra, expected about {linear_mb:.1f} MB"


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU): fp32 and fp16 against the fp64 reference, odd shapes, strides

TRITON_SHAPES = [(1, 5), (3, 16), (17, 5), (77, 48), (33, 130)]


@pytest.mark.parametrize("n,d", TRITON_SHAPES)
@pytest.mark.parametrize("scale,bias,normalize", [(1.0, -10.0, True), (100.0, -3.0, True), (10.0, None, False)])
def test_triton_fp32(n, d, scale, bias, normalize):
    leaves = siglip_inputs(n, d, torch.float32, scale=scale, bias=bias, normalize=normalize)
    hi_loss, hi_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves, torch.float32))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x[:3], x[3] if len(x) > 3 else None,
                                                                  backend="triton"), leaves)
    assert loss.dtype == torch.float32
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=2e-5 * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert g.dtype == torch.float32 and g.shape == h.shape
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-5 * (1 + h.abs().max().item()))


@pytest.mark.parametrize("n,d", [(3, 16), (77, 48), (64, 80)])
@pytest.mark.parametrize("scale,bias", [(1.0, -10.0), (100.0, -5.0)])
def test_triton_fp16(n, d, scale, bias):
    leaves = siglip_inputs(n, d, torch.float16, scale=scale, bias=bias)
    hi_loss, hi_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves, torch.float16))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend="triton"), leaves)
    assert loss.dtype == torch.float16
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=1e-3 * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert g.dtype == torch.float16
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-3 * h.abs().max().item())


def test_triton_strided_inputs():
    # features as views into wider buffers, one transposed: strides (1, N) and (3D, 3)
    n, d = 37, 24
    img = torch.randn(d, n).mul(0.2).T.requires_grad_()
    txt = torch.randn(n, 3 * d).mul(0.2)[:, ::3].requires_grad_()
    assert not img.is_contiguous() and not txt.is_contiguous()
    leaves = [img, txt, torch.tensor(9.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)]
    ref_loss, ref_grads = loss_and_grads(reference.siglip_loss_ref, upcast([t.contiguous() for t in leaves]))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend="triton"), leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_upstream_gradient_and_retain_graph(backend):
    # the gradient is made in the forward for g = 1 and scaled in the backward: check g != 1, and that a second
    # backward through a retained graph gives the same answer (nothing was scaled in place)
    leaves = siglip_inputs(21, 16, torch.float32, scale=5.0, bias=-2.0)
    ref_loss, ref_grads = loss_and_grads(lambda *x: -3.5 * reference.siglip_loss_ref(*x), upcast(leaves))
    loss = -3.5 * fastclip.siglip_loss(*leaves, backend=backend)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for name, a, b, r in zip(GRAD_NAMES, first, second, ref_grads):
        assert torch.equal(a, b), name
        assert_close(name, a, r, rtol=2e-5, atol=1e-6)


def test_torch_backend_chunks(monkeypatch):
    """Row chunks of the torch backend, in the forward and in the text gradient the backward may ask for: chunk_size
    rows, or by default as many as keep a chunk x M tile within DEFAULT_TILE_ELEMENTS (M: the texts), at least one."""
    from fastclip.ops.siglip import pytorch

    chunks, softplus = [], pytorch._softplus_
    monkeypatch.setattr(pytorch, "_softplus_",
                        lambda x: (chunks.append(x.shape[0]) if x.dim() == 2 else None) or softplus(x))
    img, txt, scale, bias = [t.detach() for t in siglip_inputs(23, 8)]
    for m, chunk_size, tile, expected in [(23, 10, 1 << 22, [10, 10, 3]), (23, None, 1 << 22, [23]),
                                          (23, None, 100, [4] * 5 + [3]), (23, None, 10, [1] * 23),
                                          (1, None, 10, [10, 10, 3])]:
        monkeypatch.setattr(pytorch, "DEFAULT_TILE_ELEMENTS", tile)
        chunks.clear()
        pytorch.siglip_fwd(img, txt[:m], scale, bias, m != 23, True, chunk_size)
        pytorch.siglip_bwd_text(torch.tensor(1.0, dtype=img.dtype), img, txt[:m], scale, bias, m != 23, chunk_size)
        assert chunks == expected * 2, (m, chunk_size, tile)


def test_torch_backend_on_the_features_device():
    # every buffer is made on the features' device (meta here: any other device than the CPU would do), and no
    # gradient buffer at all when no gradient is wanted
    from fastclip.ops.siglip import pytorch

    img, txt = torch.randn(7, 4, device="meta"), torch.randn(5, 4, device="meta")
    scale, bias = torch.tensor(3.0, device="meta"), torch.tensor(1.0, device="meta")
    for negative_only in (False, True):
        out = pytorch.siglip_fwd(img, txt, scale, bias, negative_only, True, 3)
        assert all(t.device.type == "meta" for t in out)
        loss, d_img, d_txt, _, _ = pytorch.siglip_fwd(img, txt, scale, bias, negative_only, False, 3)
        assert loss.device.type == "meta" and d_img is None and d_txt is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("negative_only", [False, True])
def test_backward_makes_a_deferred_text_gradient(backend, negative_only):
    # a forward may leave dT to the backward (a (0, D) placeholder, as Triton's does): the backward op then has the
    # backend make dT for the upstream gradient g, with the forward's negative_only and chunks; every backend can
    img, txt, scale, bias = [t.detach() for t in siglip_inputs(13, 8, torch.float32, scale=5.0, bias=-2.0)]
    hi = upcast([img, txt, scale, bias])
    ref = torch.autograd.grad(-2.5 * reference.siglip_loss_ref(*hi, negative_only=negative_only), hi)
    _, d_img, _, d_s, d_b = torch.ops.fastclip.siglip_loss_fwd(img, txt, scale, bias, negative_only, True, backend, 4)
    grads = torch.ops.fastclip.siglip_loss_bwd(torch.tensor(-2.5), img, txt, scale, bias, d_img, txt.new_empty((0, 8)),
                                               d_s, d_b, negative_only, backend, 4)
    for name, g, r in zip(GRAD_NAMES, grads, ref):
        assert g.dtype == torch.float32
        assert_close(name, g, r, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_forward(backend):
    leaves = siglip_inputs(19, 8, torch.float32, scale=12.0, bias=-6.0)
    with torch.no_grad():
        a = fastclip.siglip_loss(*leaves, backend=backend)
    b = fastclip.siglip_loss(*[t.detach() for t in leaves], backend=backend)
    c = reference.siglip_loss_ref(*upcast(leaves))
    assert not a.requires_grad and not b.requires_grad
    assert_close("no_grad", a, c.detach(), rtol=2e-6, atol=1e-6)
    assert_close("detached", b, c.detach(), rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Module, bad input, NaN, and backend selection


def test_output_dict_and_module_args():
    leaves = siglip_inputs(9, 8)
    out = fastclip.SigLIPLoss(cache_labels=True)(*leaves, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0
    ref = open_clip_loss.SigLipLoss(cache_labels=True)(*upcast(leaves), output_dict=True)
    assert_close("loss", out["contrastive_loss"].detach(), ref["contrastive_loss"].detach(), rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="world_size=2 needs torch.distributed initialized"):
        fastclip.SigLIPLoss(rank=1, world_size=2)(*leaves)
    with pytest.raises(ValueError, match="rank"):
        fastclip.SigLIPLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="dist_impl='allgather'"):
        fastclip.SigLIPLoss(dist_impl="allgather")
    assert fastclip.SigLIPLoss().dist_impl == "bidir"
    with pytest.raises(ValueError, match="local_loss=False"):
        fastclip.ContrastiveLoss(local_loss=True, dist_impl="ring")


@pytest.mark.parametrize("args,kwargs", [((), {}), ((True, 1, 2, "shift"), {}),
                                         ((), {"rank": 2, "world_size": 3, "dist_impl": "gather"})])
def test_module_holds_what_siglip_loss_holds(args, kwargs):
    # open_clip_train builds SigLipLoss(rank=, world_size=, dist_impl=): the same arguments mean the same, defaults
    # included (dist_impl None is 'bidir')
    ours, theirs = fastclip.SigLIPLoss(*args, **kwargs), open_clip_loss.SigLipLoss(*args, **kwargs)
    for name in ("cache_labels", "rank", "world_size", "dist_impl"):
        assert getattr(ours, name) == getattr(theirs, name), name
    group = object()
    assert fastclip.SigLIPLoss(group=group).group is group


def test_module_passes_its_arguments(monkeypatch):
    # backend and chunk_size reach the loss (chunk_size bounds memory, so the values cannot show it: count chunks)
    from fastclip.ops.siglip import pytorch

    leaves = siglip_inputs(23, 8)
    with pytest.raises(BackendError, match="triton.*dtype float64 is not supported"):
        fastclip.SigLIPLoss(backend="triton")(*leaves)
    chunks, siglip_fwd = [], pytorch.siglip_fwd
    monkeypatch.setattr(pytorch, "siglip_fwd", lambda *args: chunks.append(args[-1]) or siglip_fwd(*args))
    fastclip.SigLIPLoss(backend="torch", chunk_size=10)(*leaves)
    assert chunks == [10]
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive integer or None, got 0$"):
        fastclip.SigLIPLoss(chunk_size=0)


def test_python_number_scale_and_bias():
    img, txt, scale, bias = siglip_inputs(11, 7)
    a = fastclip.siglip_loss(img, txt, 14.3, -4.0)
    b = reference.siglip_loss_ref(img, txt, torch.tensor(14.3, dtype=torch.float64),
                                  torch.tensor(-4.0, dtype=torch.float64))
    assert_close("loss", a.detach(), b.detach(), rtol=1e-6, atol=0)


def test_bad_inputs_raise_clear_errors():
    img, txt, scale, bias = [t.detach() for t in siglip_inputs(8, 4, torch.float32)]
    cases = [
        ((img, txt[:5], scale, bias), ValueError, "batch sizes.*\\(8, 4\\).*\\(5, 4\\)"),
        ((img, txt[:, :3], scale, bias), ValueError, "feature dims"),
        ((img[0], txt[0], scale, bias), ValueError, "image_features must be 2-D"),
        ((img.long(), txt.long(), scale, bias), TypeError, "image_features must be a floating"),
        ((img, txt.double(), scale, bias), TypeError, "different dtypes"),
        ((img, txt.to("meta"), scale, bias), ValueError, "different devices"),
        ((img[:0], txt[:0], scale, bias), ValueError, "empty"),
        ((img, txt, torch.ones(2), bias), ValueError, "logit_scale must have exactly one element"),
        ((img, txt, scale, torch.ones(3)), ValueError, "logit_bias must have exactly one element"),
        ((img, txt, scale, torch.ones(1, dtype=torch.long)), TypeError, "logit_bias must be a floating"),
        ((img, txt, None, bias), ValueError, "logit_scale is required"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fastclip.siglip_loss(*args)
    with pytest.raises(ValueError, match="chunk_size"):
        fastclip.siglip_loss(img, txt, scale, bias, backend="torch", chunk_size=0)
    with pytest.raises(ValueError, match="backend='bogus'"):
        fastclip.siglip_loss(img, txt, scale, bias, backend="bogus")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_nan_in_nan_out(backend):
    leaves = siglip_inputs(20, 8, torch.float32)
    with torch.no_grad():
        leaves[0][3, 2] = float("nan")
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend=backend), leaves)
    assert torch.isnan(loss)
    assert torch.isnan(grads[2]) and torch.isnan(grads[0][3]).all()
    leaves = siglip_inputs(20, 8, torch.float32)
    assert torch.isnan(fastclip.siglip_loss(*leaves[:3], torch.tensor(float("nan")), backend=backend))


def test_explicit_backend_that_cannot_run_raises():
    img, txt, scale, bias = [t.detach() for t in siglip_inputs(8, 4)]
    with pytest.raises(BackendError, match="'cuda' has no implementation of this op.*besides, "
                       + re.escape(cuda_ext_unavailable())):
        fastclip.siglip_loss(img.float(), txt.float(), scale.float(), bias.float(), backend="cuda")
    with pytest.raises(BackendError, match="triton.*dtype float64 is not supported"):
        fastclip.siglip_loss(img, txt, scale, bias, backend="triton")
    with pytest.raises(BackendError, match="bfloat16 does not run in the Triton interpreter"):
        fastclip.siglip_loss(img.bfloat16(), txt.bfloat16(), scale, bias, backend="triton")
    with pytest.raises(BackendError, match="feature dim 4096 > 2048"):
        select("siglip_loss", "triton", device=torch.device("cuda"), dtype=torch.float16, dim=4096)


def test_auto_selection_and_bf16_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    assert select("siglip_loss", "auto", device=torch.device("cpu"), dtype=torch.float32, dim=512).backend == "torch"
    leaves = siglip_inputs(33, 16, torch.bfloat16, scale=30.0, bias=-5.0)
    loss, grads = loss_and_grads(fastclip.siglip_loss, leaves)
    ref_loss, _ = loss_and_grads(reference.siglip_loss_ref, upcast(leaves))
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_close("loss", loss, ref_loss, rtol=1e-2, atol=1e-2)


def test_info_lists_siglip():
    from fastclip.info import report

    assert "siglip_loss" in report()


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and the custom-op contract


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    img, txt, scale, bias = siglip_inputs(19, 16, torch.float32, scale=5.0, bias=-1.0)
    for b, neg in ((None, False), (bias, False), (bias, True)):
        torch.library.opcheck(torch.ops.fastclip.siglip_loss_fwd.default,
                              (img, txt, scale, b, neg, True, backend, 0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    leaves = siglip_inputs(21, 8, torch.float32, scale=12.0, bias=-3.0)

    def step(img, txt, scale, bias):
        return fastclip.siglip_loss(img, txt, scale, bias, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grads = loss_and_grads(compiled, leaves)
    ref_loss, ref_grads = loss_and_grads(step, leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: bf16 (not in the interpreter), large N, and the memory claim


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(1000, 512), (4097, 768), (2049, 1152)])
def test_triton_gpu(dtype, n, d):
    leaves = [t.cuda().detach().requires_grad_() for t in siglip_inputs(n, d, dtype, scale=10.0, bias=-10.0)]
    hi_loss, hi_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves, dtype))
    loss, grads = loss_and_grads(lambda *x: fastclip.siglip_loss(*x, backend="triton"), leaves)
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=1e-3 * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-3 * h.abs().max().item())


@pytest.mark.gpu
def test_triton_gpu_memory_is_linear():
    # beyond the inputs and their gradients: the unit dI held from forward to backward (N x D) plus O(N) partials
    n, d = 65536, 512
    leaves = [t.cuda().detach().requires_grad_() for t in siglip_inputs(n, d, torch.bfloat16)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastclip.siglip_loss(*leaves, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 2 * n * d * 2  # minus the two feature gradients
    assert extra <= n * d * 2 + (16 << 20), f"{extra / 2**20:.1f} MB beyond inputs and gradients"


@pytest.mark.parametrize("n,d", [(2, 64), (5, 64), (40, 64), (3, 128), (5, 16)])
def test_triton_loss_without_gradient_over_every_feature(n, d):
    """The loss-only sweep (no tensor needs a gradient) reads all of D: a tile config whose K step equals its unused
    D slice must not be taken for "D in one slice" (it summed only the first 16 features)."""
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    a = fastclip.siglip_loss(img, txt, 10.0, -5.0, backend="triton")
    b = fastclip.siglip_loss(img.double(), txt.double(), 10.0, -5.0, backend="reference")
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()), (a.item(), b.item())


def test_op_called_without_gradient_refuses_a_backward():
    # the forward op keeps a gradient only when asked (siglip_loss asks when an input requires one): called directly
    # with compute_grad=False, a backward through it says what happened and what to call instead
    img, txt, scale, bias = siglip_inputs(5, 4, torch.float32)
    loss = torch.ops.fastclip.siglip_loss_fwd(img, txt, scale, bias, False, False, "torch", 0)[0]
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "fastclip::siglip_loss_fwd was called with compute_grad=False, so it kept no gradient; call "
            "fastclip.siglip_loss (it decides from requires_grad) rather than the op directly") + "$"):
        loss.backward()


def test_op_outputs_its_gradients_as_non_differentiable():
    # the forward op's gradient outputs are values, not functions of the inputs autograd could differentiate: a
    # backward through them would silently use the loss's formula
    img, txt, scale, bias = siglip_inputs(5, 4, torch.float32)
    out = torch.ops.fastclip.siglip_loss_fwd(img, txt, scale, bias, False, True, "torch", 0)
    assert out[0].requires_grad
    assert [t.requires_grad for t in out[1:]] == [False] * 4


def test_forward_makes_gradients_only_when_one_is_wanted(monkeypatch):
    """The op computes the gradients in its forward sweep (memory: two (N, D) buffers) only when autograd will ask:
    grad mode on and some input (either features, scale or bias) requiring a gradient; then each input's gradient
    is right when it alone requires one. The backend gets chunk_size as given (None: its default)."""
    from fastclip.ops.siglip import pytorch

    calls, siglip_fwd = [], pytorch.siglip_fwd
    monkeypatch.setattr(pytorch, "siglip_fwd", lambda *args: calls.append(args[5:]) or siglip_fwd(*args))
    leaves = siglip_inputs(6, 4)
    detached = [t.detach() for t in leaves]
    ref_grads = loss_and_grads(reference.siglip_loss_ref, upcast(leaves))[1]
    for i, name in enumerate(GRAD_NAMES):
        calls.clear()
        args = detached[:i] + [leaves[i]] + detached[i + 1:]
        (grad,) = torch.autograd.grad(fastclip.siglip_loss(*args, backend="torch"), leaves[i])
        assert calls == [(True, None)], name
        assert_close(name, grad, ref_grads[i], rtol=1e-10, atol=1e-13)
    for args, grad_mode, chunk_size in [(leaves, False, 5), (detached, True, 5), (detached[:3] + [None], True, None)]:
        calls.clear()
        with torch.set_grad_enabled(grad_mode):
            fastclip.siglip_loss(*args, backend="torch", chunk_size=chunk_size)
        assert calls == [(False, chunk_size)], (grad_mode, [t is not None and t.requires_grad for t in args])
