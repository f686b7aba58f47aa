"""ContrastiveLoss / contrastive_loss against open_clip's ClipLoss and the fp64 reference, every backend."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.ops.contrastive import reference
from fastclip.dispatch import BackendError, cuda_ext_unavailable, select

from .helpers import assert_close, assert_close_to_ref, unit_roundoff

open_clip_loss = pytest.importorskip("open_clip.loss")


def make_inputs(n, d, dtype=torch.float64, *, scale=14.3, bias=None, normalize=True, device="cpu"):
    img = torch.randn(n, d, dtype=torch.float64, device=device)
    txt = torch.randn(n, d, dtype=torch.float64, device=device)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    else:
        img, txt = img * 0.3, txt * 0.3
    leaves = [img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_(),
              torch.tensor(scale, dtype=torch.float64, device=device).to(dtype).requires_grad_()]
    if bias is not None:
        leaves.append(torch.tensor(bias, dtype=torch.float64, device=device).to(dtype).requires_grad_())
    return leaves


def upcast(leaves, dtype=torch.float64):
    return [t.detach().to(dtype).requires_grad_() for t in leaves]


def loss_and_grads(fn, leaves):
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


GRAD_NAMES = ("d_image", "d_text", "d_logit_scale", "d_logit_bias")


# ---------------------------------------------------------------------------------------------------------------
# Against open_clip (the contract): reference and torch backends in fp64 and fp32


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("n,d", [(1, 5), (3, 16), (77, 48), (257, 96), (1000, 32)])
@pytest.mark.parametrize("scale,bias,normalize", [(1.0, None, True), (14.3, -2.5, True), (100.0, None, True),
                                                  (30.0, 1.0, False)])
def test_matches_open_clip_fp64(backend, n, d, scale, bias, normalize):
    leaves = make_inputs(n, d, scale=scale, bias=bias, normalize=normalize)
    ref_loss, ref_grads = loss_and_grads(open_clip_loss.ClipLoss(), upcast(leaves))
    loss, grads = loss_and_grads(
        lambda *x: fastclip.ContrastiveLoss(backend=backend, chunk_size=7 if n > 7 else None)(*x), leaves)
    assert loss.dtype == torch.float64
    assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("n,d", [(3, 16), (77, 48), (197, 512)])
@pytest.mark.parametrize("scale,bias", [(1.0, None), (100.0, -10.0)])
def test_matches_open_clip_fp32(backend, n, d, scale, bias):
    leaves = make_inputs(n, d, torch.float32, scale=scale, bias=bias)
    hi_loss, hi_grads = loss_and_grads(open_clip_loss.ClipLoss(), upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(open_clip_loss.ClipLoss(), upcast(leaves, torch.float32))
    loss, grads = loss_and_grads(fastclip.ContrastiveLoss(backend=backend), leaves)
    assert loss.dtype == torch.float32
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=1e-5)
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert g.dtype == torch.float32
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-6 * (1 + h.abs().max().item()))


def test_output_dict_and_module_args():
    leaves = make_inputs(9, 8)
    out = fastclip.ContrastiveLoss(cache_labels=True)(*leaves, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0
    ref = open_clip_loss.ClipLoss(cache_labels=True)(*upcast(leaves), output_dict=True)
    assert_close("loss", out["contrastive_loss"].detach(), ref["contrastive_loss"].detach(), rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="world_size=2 needs torch.distributed initialized"):
        fastclip.ContrastiveLoss(rank=1, world_size=2)(*leaves)
    with pytest.raises(ValueError, match="rank"):
        fastclip.ContrastiveLoss(rank=2, world_size=2)


@pytest.mark.parametrize("args,kwargs", [((), {}), ((True, True, True, 1, 2, False), {}),
                                         ((), {"local_loss": True, "rank": 2, "world_size": 3})])
def test_module_holds_what_clip_loss_holds(args, kwargs):
    # open_clip_train builds ClipLoss positionally and by keyword: the same arguments mean the same, defaults included
    ours, theirs = fastclip.ContrastiveLoss(*args, **kwargs), open_clip_loss.ClipLoss(*args, **kwargs)
    for name in ("local_loss", "gather_with_grad", "cache_labels", "rank", "world_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    group = object()
    assert fastclip.ContrastiveLoss(group=group).group is group


def test_module_passes_its_arguments(monkeypatch):
    # label_smoothing, backend and chunk_size reach the loss: the module is the function with its arguments (no
    # bias: label smoothing's mean logit then has none either)
    leaves = make_inputs(23, 8, scale=20.0)
    ref_loss, ref_grads = loss_and_grads(lambda *x: reference.contrastive_loss_ref(*x, label_smoothing=0.1),
                                         upcast(leaves))
    for backend in ("auto", "reference"):
        loss, grads = loss_and_grads(fastclip.ContrastiveLoss(label_smoothing=0.1, backend=backend), leaves)
        assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
        for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
            assert_close(name, g, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(BackendError, match="triton.*dtype float64 is not supported"):
        fastclip.ContrastiveLoss(backend="triton")(*leaves)
    # chunk_size reaches the torch backend (it bounds memory, so the values cannot show it: count the chunks)
    from fastclip.ops.contrastive import pytorch

    chunks, logits = [], pytorch._logits
    monkeypatch.setattr(pytorch, "_logits", lambda a, *args: chunks.append(a.shape[0]) or logits(a, *args))
    fastclip.ContrastiveLoss(backend="torch", chunk_size=10)(*leaves).backward()
    assert chunks == [10, 10, 3] * 2  # forward, backward


def test_module_refuses_bad_arguments():
    # each message in full: it names the argument and what to do
    cases = [
        ({"rank": 2, "world_size": 2}, "need 0 <= rank < world_size, got rank=2, world_size=2"),
        ({"rank": -1, "world_size": 2}, "need 0 <= rank < world_size, got rank=-1, world_size=2"),
        ({"rank": 0, "world_size": 0}, "need 0 <= rank < world_size, got rank=0, world_size=0"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer or None, got 0"),
        ({"use_horovod": True}, "use_horovod=True: fastclip's losses communicate through torch.distributed only; "
                                "launch with torchrun (open_clip_train without --horovod)"),
        ({"dist_impl": "allgather"}, "dist_impl='allgather': expected None (open_clip's all_gather) or 'ring'"),
        ({"dist_impl": "ring", "local_loss": True},
         "dist_impl='ring' computes the global loss (local_loss=False); its gradients under DDP equal "
         "local_loss=True, gather_with_grad=True's. Set local_loss=False"),
        ({"dist_impl": "ring", "label_smoothing": 0.1}, "label_smoothing is not supported with dist_impl='ring'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            fastclip.ContrastiveLoss(**kwargs)
    for dist_impl in (None, "gather", "ring"):
        assert fastclip.ContrastiveLoss(dist_impl=dist_impl).dist_impl == dist_impl


def test_module_repr():
    assert repr(fastclip.ContrastiveLoss()) == ("ContrastiveLoss(local_loss=False, gather_with_grad=False, rank=0, "
                                                "world_size=1, backend='auto', label_smoothing=0.0)")
    assert repr(fastclip.ContrastiveLoss(True, True, rank=1, world_size=2, backend="torch", dist_impl="gather")) == (
        "ContrastiveLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2, backend='torch', "
        "label_smoothing=0.0, dist_impl='gather')")


def test_python_number_scale():
    img, txt, scale = make_inputs(11, 7)
    a = fastclip.contrastive_loss(img, txt, 14.3)
    b = reference.contrastive_loss_ref(img, txt, torch.tensor(14.3, dtype=torch.float64))
    assert_close("loss", a.detach(), b.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ls", [0.1, 0.5, 1.0])
def test_label_smoothing(backend, ls):
    dtype = torch.float64 if backend == "torch" else torch.float32
    leaves = make_inputs(45, 24, dtype, scale=20.0, bias=0.5)
    ref_loss, ref_grads = loss_and_grads(
        lambda *x: reference.contrastive_loss_ref(*x, label_smoothing=ls), upcast(leaves))
    # sanity: our reference's smoothing is F.cross_entropy's
    s = 20.0 * leaves[0].detach().double() @ leaves[1].detach().double().T + 0.5
    lab = torch.arange(45)
    direct = (F.cross_entropy(s, lab, label_smoothing=ls) + F.cross_entropy(s.T, lab, label_smoothing=ls)) / 2
    assert_close("reference", ref_loss, direct, rtol=1e-12, atol=0)
    loss, grads = loss_and_grads(
        lambda *x: fastclip.contrastive_loss(*x, label_smoothing=ls, backend=backend), leaves)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close("loss", loss, ref_loss, rtol=tol, atol=tol)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("chunk", [1, 2, 13, 64, 1000])
def test_torch_chunk_sizes(chunk):
    leaves = make_inputs(64, 12, scale=50.0)
    ref_loss, ref_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves))
    loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, backend="torch", chunk_size=chunk),
                                 leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-10, atol=1e-13)


def test_torch_backend_chunks(monkeypatch):
    """The torch backend works on row chunks, forward and backward alike: chunk_size rows (the last one the rest),
    or by default as many rows as keep a chunk x N tile within DEFAULT_TILE_ELEMENTS, and at least one."""
    from fastclip.ops.contrastive import pytorch

    chunks, logits = [], pytorch._logits
    monkeypatch.setattr(pytorch, "_logits", lambda a, *args: chunks.append(a.shape[0]) or logits(a, *args))
    leaves = make_inputs(23, 8, scale=30.0)
    ref_loss, ref_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves))
    for chunk_size, tile, expected in [(1, 1 << 22, [1] * 23), (10, 1 << 22, [10, 10, 3]), (None, 1 << 22, [23]),
                                       (None, 100, [4] * 5 + [3]), (None, 10, [1] * 23)]:
        monkeypatch.setattr(pytorch, "DEFAULT_TILE_ELEMENTS", tile)
        chunks.clear()
        loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, backend="torch", chunk_size=chunk_size),
                                     leaves)
        assert chunks == expected * 2, (chunk_size, tile)
        assert_close("loss", loss, ref_loss, rtol=1e-12, atol=1e-12)
        for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
            assert_close(name, g, r, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_without_targets(backend):
    """A block backward with ``targets=False`` (the distributed ring's off-diagonal blocks) differs from the full
    one by exactly the one-hot targets' terms, -2 g s / 2N T_i for d_image, -2 g s / 2N I_i for d_text and
    -2 g / 2N sum_i <I_i, T_i> for d(logit_scale); label smoothing's uniform term stays in both."""
    from fastclip.dispatch import supports

    fwd, bwd = supports("contrastive_loss")[backend].impl
    dtype = torch.float64 if backend == "torch" else torch.float32
    n, s, g, eps = 9, 7.0, 0.7, 0.1
    img, txt = F.normalize(torch.randn(n, 16, dtype=dtype), dim=-1), F.normalize(torch.randn(n, 16, dtype=dtype),
                                                                                 dim=-1)
    scale, grad = torch.tensor(s, dtype=dtype), torch.tensor(g, dtype=dtype)
    _, row, col = fwd(img, txt, scale, None, eps, None)
    full = bwd(grad, img, txt, scale, None, row, col, eps, None)
    none = bwd(grad, img, txt, scale, None, row, col, eps, None, targets=False)
    c = -2 * (1 - eps) * g / (2 * n)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(full[0] - none[0], c * s * txt, **tol)
    torch.testing.assert_close(full[1] - none[1], c * s * img, **tol)
    torch.testing.assert_close(full[2] - none[2], c * (img * txt).sum(), **tol)
    # and at scale 0, where the Triton launcher forms d(logit_scale) in closed form
    zero = torch.zeros((), dtype=dtype)
    _, row, col = fwd(img, txt, zero, None, eps, None)
    full = bwd(grad, img, txt, zero, None, row, col, eps, None)
    none = bwd(grad, img, txt, zero, None, row, col, eps, None, targets=False)
    torch.testing.assert_close(full[2] - none[2], c * (img * txt).sum(), **tol)


def test_rowdot_in_chunks():
    # the rows' dot products in chunks (the distributed modes' diagonal), chunks that do not divide N included
    from fastclip.ops.contrastive.pytorch import _rowdot

    a, b = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    for chunk in (1, 4, 11, 20):
        assert_close("rowdot", _rowdot(a, b, chunk), (a * b).sum(dim=1), rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend,dtype,scalar_dtype", [("torch", torch.bfloat16, torch.float32),
                                                        ("torch", torch.float32, torch.float64),
                                                        ("triton", torch.float16, torch.float32),
                                                        ("torch", torch.float64, torch.float64)])
def test_ops_outputs_have_their_fakes_dtypes(backend, dtype, scalar_dtype):
    # what torch.compile traces with (the fake implementations) is what runs: the accumulation dtype for the loss and
    # statistics, the features' and the scale's dtypes for the gradients, also with half features and fp32 scalars
    # (autocast's inputs) and fp32 features with fp64 scalars, label smoothing on; the statistics the forward
    # keeps for its backward are non-differentiable outputs (a backward through them would use the loss's formula)
    img, txt = [t.detach() for t in make_inputs(19, 16, dtype)[:2]]
    scale, bias = torch.tensor(5.0, dtype=scalar_dtype), torch.tensor(0.25, dtype=scalar_dtype)
    fwd = (img, txt, scale, bias, 0.1, backend, 0)
    torch.library.opcheck(torch.ops.fastclip.contrastive_loss_fwd.default, fwd, test_utils="test_faketensor")
    loss, row, col = torch.ops.fastclip.contrastive_loss_fwd(img.clone().requires_grad_(), *fwd[1:])
    assert loss.requires_grad and not row.requires_grad and not col.requires_grad
    torch.library.opcheck(torch.ops.fastclip.contrastive_loss_bwd.default,
                          (torch.ones_like(loss), img, txt, scale, bias, row, col, 0.1, backend, 0),
                          test_utils="test_faketensor")


def test_torch_backend_on_the_features_device_and_dtype():
    # every buffer is made on the features' device (meta here: any other device than the CPU would do) and in the
    # accumulation dtype, whatever torch's default dtype
    from fastclip.ops.contrastive import pytorch

    img, txt = torch.randn(7, 4, device="meta"), torch.randn(7, 4, device="meta")
    scale, bias = torch.tensor(3.0, device="meta"), torch.tensor(1.0, device="meta")
    loss, row, col = pytorch.contrastive_fwd(img, txt, scale, bias, 0.1, 3)
    grads = pytorch.contrastive_bwd(torch.ones((), device="meta"), img, txt, scale, bias, row, col, 0.1, 3)
    assert all(t.device.type == "meta" for t in (loss, row, col, *grads))
    leaves = make_inputs(9, 8, torch.float32, scale=10.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, backend="torch", chunk_size=4), leaves)
        _, row, col = torch.ops.fastclip.contrastive_loss_fwd(*[t.detach() for t in leaves], None, 0.0, "torch", 4)
    finally:
        torch.set_default_dtype(default)
    assert loss.dtype == row.dtype == col.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    ref_loss, ref_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves))
    assert_close("loss", loss, ref_loss, rtol=1e-6, atol=1e-6)


def test_merge_partials_on_the_partials_device():
    # the merge builds its index on the partials' device (meta here; CUDA after the Triton kernels on a GPU)
    from fastclip.ops.contrastive.pytorch import merge_partials

    m, rest = merge_partials(torch.randn(3, 5, device="meta"), torch.rand(3, 5, device="meta"))
    assert m.device.type == rest.device.type == "meta" and m.shape == rest.shape == (5,)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU): fp32 and fp16 against the fp64 reference, odd shapes, strides

TRITON_SHAPES = [(1, 5), (3, 16), (17, 5), (77, 48), (100, 96), (33, 130)]


@pytest.mark.parametrize("n,d", TRITON_SHAPES)
@pytest.mark.parametrize("scale,bias,normalize", [(1.0, None, True), (100.0, -3.0, True), (10.0, 0.7, False)])
def test_triton_fp32(n, d, scale, bias, normalize):
    leaves = make_inputs(n, d, torch.float32, scale=scale, bias=bias, normalize=normalize)
    hi_loss, hi_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves, torch.float32))
    loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, backend="triton"), leaves)
    assert loss.dtype == torch.float32
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=2e-5 * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES, grads, hi_grads, lo_grads):
        assert g.dtype == torch.float32 and g.shape == h.shape
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-5 * (1 + h.abs().max().item()))


@pytest.mark.parametrize("n,d", [(3, 16), (77, 48), (64, 80)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_triton_fp16(n, d, scale):
    leaves = make_inputs(n, d, torch.float16, scale=scale, bias=-1.0)
    hi_loss, hi_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves, torch.float16))
    loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, backend="triton"), leaves)
    assert loss.dtype == torch.float16
    assert_close_to_ref("loss", loss, hi_loss, lo_loss, factor=2, atol=1e-3 * (1 + abs(hi_loss.item())))
    for name, g, h, lo in zip(GRAD_NAMES[:3], grads, hi_grads, lo_grads):
        assert g.dtype == torch.float16
        assert_close_to_ref(name, g, h, lo, factor=3, atol=1e-3 * h.abs().max().item())


def test_triton_strided_inputs():
    # features as views into wider buffers, one transposed: strides (1, N) and (3D, 2)
    n, d = 37, 24
    base_i = torch.randn(d, n, dtype=torch.float32)
    base_t = torch.randn(n, 3 * d, dtype=torch.float32)
    img = (base_i * 0.2).T.requires_grad_()  # non-leaf views need retain; use leaves below
    img = base_i.mul(0.2).detach().T.requires_grad_()
    txt = base_t.mul(0.2).detach()[:, ::3].requires_grad_()
    assert not img.is_contiguous() and not txt.is_contiguous()
    scale = torch.tensor(9.0, requires_grad=True)
    leaves = [img, txt, scale]
    ref_loss, ref_grads = loss_and_grads(reference.contrastive_loss_ref, upcast([t.contiguous() for t in leaves]))
    loss, grads = loss_and_grads(lambda *x: fastclip.contrastive_loss(*x, backend="triton"), leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-5, atol=1e-6)


def test_triton_lse_against_logsumexp():
    # the forward's row and column log-sum-exp, checked directly (they drive the whole backward)
    from fastclip.ops.contrastive.triton import contrastive_fwd

    img, txt, scale = [t.detach() for t in make_inputs(70, 40, torch.float32, scale=60.0)]
    _, row, col = contrastive_fwd(img, txt, scale, None, 0.0)  # (2, N): max and log-sum, base 2
    s2 = 60.0 * img.double() @ txt.double().T / math.log(2)
    assert_close("row_max", row[0], s2.amax(1), rtol=1e-6, atol=1e-5)
    assert_close("col_max", col[0], s2.amax(0), rtol=1e-6, atol=1e-5)
    assert_close("row_lse", row.sum(0), torch.logsumexp(s2 * math.log(2), 1) / math.log(2), rtol=1e-6, atol=1e-5)
    assert_close("col_lse", col.sum(0), torch.logsumexp(s2 * math.log(2), 0) / math.log(2), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input, NaN, and backend selection


def test_bad_inputs_raise_clear_errors():
    img, txt, scale = [t.detach() for t in make_inputs(8, 4, torch.float32)]
    cases = [
        ((img, txt[:5], scale), ValueError, "batch sizes.*\\(8, 4\\).*\\(5, 4\\)"),
        ((img, txt[:, :3], scale), ValueError, "feature dims"),
        ((img[0], txt[0], scale), ValueError, "image_features must be 2-D"),
        ((img.long(), txt.long(), scale), TypeError, "image_features must be a floating"),
        ((img, txt.double(), scale), TypeError, "different dtypes"),
        ((img, txt.to("meta"), scale), ValueError, "different devices"),
        ((img[:0], txt[:0], scale), ValueError, "empty"),
        ((img, txt, torch.ones(2)), ValueError, "logit_scale must have exactly one element"),
        ((img, txt, torch.ones(1, dtype=torch.long)), TypeError, "logit_scale must be a floating"),
        ((img, txt, None), ValueError, "logit_scale is required"),
        ((img, txt, "7"), TypeError, "logit_scale must be a tensor or a number"),
        ((img, txt, scale, torch.ones(3)), ValueError, r"^logit_bias must have exactly one element, got shape \(3,\)"),
        ((img, txt, scale, "0.5"), TypeError, "^logit_bias must be a tensor or a number, got str$"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fastclip.contrastive_loss(*args)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastclip.contrastive_loss(img, txt, scale, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        fastclip.contrastive_loss(img, txt, scale, backend="torch", chunk_size=0)
    with pytest.raises(ValueError, match="backend='bogus'"):
        fastclip.contrastive_loss(img, txt, scale, backend="bogus")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_nan_in_nan_out(backend):
    img, txt, scale = [t.detach() for t in make_inputs(20, 8, torch.float32)]
    img[3, 2] = float("nan")
    assert torch.isnan(fastclip.contrastive_loss(img, txt, scale, backend=backend))


def test_explicit_backend_that_cannot_run_raises():
    img, txt, scale = [t.detach() for t in make_inputs(8, 4)]
    # built or not, this machine has no GPU: the message says which, then what the kernels do not take
    with pytest.raises(BackendError, match=r"'cuda' cannot run these inputs.*" + re.escape(cuda_ext_unavailable())
                       + r".*dtype float32 is not supported.*feature dim 4 < 8"):
        fastclip.contrastive_loss(img.float(), txt.float(), scale.float(), backend="cuda")
    with pytest.raises(BackendError, match="triton.*dtype float64 is not supported"):
        fastclip.contrastive_loss(img, txt, scale, backend="triton")
    with pytest.raises(BackendError, match="bfloat16 does not run in the Triton interpreter"):
        fastclip.contrastive_loss(img.bfloat16(), txt.bfloat16(), scale, backend="triton")
    with pytest.raises(BackendError, match="feature dim 4096 > 2048"):
        select("contrastive_loss", "triton", device=torch.device("cuda"), dtype=torch.float16, dim=4096)


def test_auto_selection_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    assert select("contrastive_loss", "auto", device=cpu, dtype=torch.float32, dim=512).backend == "torch"
    assert select("contrastive_loss", "auto", device=cpu, dtype=torch.bfloat16, dim=512).backend == "torch"
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    assert select("contrastive_loss", "auto", device=cpu, dtype=torch.float32, dim=512).backend == "reference"
    monkeypatch.setenv("FASTCLIP_BACKEND", "cuda")
    with pytest.raises(BackendError, match=re.escape(cuda_ext_unavailable())):
        select("contrastive_loss", "auto", device=cpu, dtype=torch.float32, dim=512)


def test_bf16_on_cpu_through_auto():
    leaves = make_inputs(33, 16, torch.bfloat16, scale=30.0)
    loss, grads = loss_and_grads(fastclip.contrastive_loss, leaves)
    ref_loss, ref_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves))
    lo_loss, lo_grads = loss_and_grads(reference.contrastive_loss_ref, upcast(leaves, torch.bfloat16))
    assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    # flash-attn's rule against naive bf16 (was rtol = atol = 1e-2 on the loss only)
    u = unit_roundoff(torch.bfloat16)
    assert_close_to_ref("loss", loss, ref_loss, lo_loss, factor=2, atol=u * abs(ref_loss.item()))
    for name, g, h, lo in zip(GRAD_NAMES, grads, ref_grads, lo_grads):
        assert_close_to_ref(name, g, h, lo, factor=3, atol=u * h.abs().max().item())


def test_info_lists_every_backend():
    from fastclip.info import report

    text = report()
    assert "contrastive_loss" in text
    for name in ("reference", "torch", "triton", "cuda"):
        assert f"  {name}" in text
    assert cuda_ext_unavailable() in text  # not built (and how to build it), or built but no GPU


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and the custom-op contract


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    img, txt, scale = make_inputs(19, 16, torch.float32, scale=5.0)
    bias = torch.tensor(0.25, requires_grad=True)
    for b in (None, bias):
        torch.library.opcheck(torch.ops.fastclip.contrastive_loss_fwd.default, (img, txt, scale, b, 0.1, backend, 0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    leaves = make_inputs(21, 8, torch.float32, scale=12.0, bias=0.5)

    def step(img, txt, scale, bias):
        return fastclip.contrastive_loss(img, txt, scale, bias, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grads = loss_and_grads(compiled, leaves)
    ref_loss, ref_grads = loss_and_grads(step, leaves)
    assert_close("loss", loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(name, g, r, rtol=1e-6, atol=1e-7)
