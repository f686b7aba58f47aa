"""The distributed losses at their edges: what the rings pass their blocks (chunk size, the backend asked for), the
rings' own defaults, one-rank groups, bf16 features of a trained model, and bad input on one rank or all.

The ranks are threads of the test process over gloo (``tests/threaded_ranks.py``), as in test_distributed.py,
whose inputs and single-process fp64 checks these tests reuse.
"""
import contextlib
import importlib
import threading

import pytest
import torch
import torch.distributed as dist

from tests.regimes import trained_features
from tests.test_distributed import (DIM, G, N_LOCAL, _check_single_process, _clip_halves, _global_inputs,
                                    _local_leaves, _run, _siglip)
from tests.threaded_ranks import run_ranks

# the block functions of each op's backends and the position of their chunk_size argument
BLOCKS = {"contrastive": {"contrastive_fwd": 5, "contrastive_bwd": 8},
          "siglip": {"siglip_fwd": 6, "siglip_bwd_text": 6}}
NOT_PASSED = "not passed"


def _spy_blocks(monkeypatch):
    """Record (backend module, function, chunk_size, dtype of the features) of every block call, from every rank's
    thread. The Support rows call their functions through ``Lazy`` (looked up at call time), so patching the module
    is enough."""
    calls = []
    for op, functions in BLOCKS.items():
        for backend in ("pytorch", "triton"):
            module = importlib.import_module(f"fastclip.ops.{op}.{backend}")
            for name, pos in functions.items():
                def spy(*args, _real=getattr(module, name), _key=(backend, name), _pos=pos, **kwargs):
                    chunk = args[_pos] if len(args) > _pos else kwargs.get("chunk_size", NOT_PASSED)
                    features = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
                    calls.append(_key + (chunk, features.dtype))
                    return _real(*args, **kwargs)
                monkeypatch.setattr(module, name, spy)
    return calls


def _ring_losses(rank, world, backend, chunk_size, dtype):
    import fastclip

    leaves = _local_leaves(_global_inputs(world, dtype, bias=-1.0), rank)
    for cls in (fastclip.ContrastiveLoss, fastclip.SigLIPLoss):
        loss_fn = cls(rank=rank, world_size=world, dist_impl="ring", backend=backend, chunk_size=chunk_size)
        _run(loss_fn, leaves)


# backend asked for, chunk_size given, features' dtype -> the block module that must run, the chunk size its blocks
# must get ("reference" runs the torch blocks as one chunk of N_local rows; N_local != DIM, so neither is taken for
# the other). The blocks get the features in their dtype (the Triton kernels' GEMMs run in fp16 for fp16 features)
RING_BLOCKS = [("torch", 2, torch.float64, "pytorch", 2), ("torch", None, torch.float64, "pytorch", None),
               ("reference", 2, torch.float64, "pytorch", N_LOCAL), ("triton", 3, torch.float32, "triton", 3),
               ("triton", None, torch.float16, "triton", None)]


@pytest.mark.parametrize("backend, chunk_size, dtype, module, chunk", RING_BLOCKS,
                         ids=[f"{b}-chunk{c}-{str(d)[6:]}" for b, c, d, *_ in RING_BLOCKS])
def test_rings_run_the_backend_asked_for_with_its_chunk_size(backend, chunk_size, dtype, module, chunk, monkeypatch):
    """Both rings run every block (forward, backward, SigLIP's deferred text gradient) on the backend named, with
    the chunk_size given and the features in their dtype, and no other backend's blocks (auto takes torch on the
    CPU: triton must still be triton)."""
    calls = _spy_blocks(monkeypatch)
    run_ranks(2, _ring_losses, backend, chunk_size, dtype)
    functions = {name for _, name, _, _ in calls}
    want = {"contrastive_fwd", "contrastive_bwd", "siglip_fwd"} | ({"siglip_bwd_text"} if module == "triton" else set())
    assert functions == want, sorted(functions)
    assert {(m, c, d) for m, _, c, d in calls} == {(module, chunk, dtype)}, sorted(set(calls), key=repr)


def _explicit_backend_refused(rank, world):
    import fastclip
    from fastclip.dispatch import BackendError

    leaves = _local_leaves(_global_inputs(world, torch.float64), rank)
    for cls in (fastclip.ContrastiveLoss, fastclip.SigLIPLoss):
        loss_fn = cls(rank=rank, world_size=world, dist_impl="ring", backend="triton")
        with pytest.raises(BackendError, match=r"backend 'triton' cannot run these inputs .*float64"):
            loss_fn(*leaves)


def test_ring_with_an_explicit_backend_that_cannot_run_raises_on_every_rank():
    """backend='triton' with fp64 features (triton takes fp16, bf16, fp32): every rank raises the dispatcher's
    BackendError, none falls back to another backend."""
    run_ranks(2, _explicit_backend_refused)


def _ring_functions_defaults(rank, world):
    from fastclip import distributed as D

    glob = _global_inputs(world, bias=-1.5, scale=12.0)
    # contrastive_ring's defaults: the auto backend, the default chunk, the default group, gather_with_grad=True
    _check_single_process(_run(D.contrastive_ring, _local_leaves(glob, rank)), glob, rank, world, _clip_halves,
                          loss_everywhere=True, feature_factor=world)
    _check_single_process(_run(D.siglip_ring, _local_leaves(glob, rank)), glob, rank, world, _siglip,
                          loss_everywhere=False, feature_factor=world)


def test_ring_functions_defaults():
    """fastclip.distributed's ring functions called with only the features and scalars (the losses always pass
    every argument): the global loss, and the gradients their docstrings give."""
    run_ranks(2, _ring_functions_defaults)


def _one_rank(rank, world):
    from fastclip import distributed as D

    # in a world of several ranks, each rank alone in its own group (every rank creates every group)
    groups = [dist.new_group([r]) for r in range(world)] if world > 1 else [None]
    group = groups[rank] if world > 1 else None
    glob = _global_inputs(1, bias=-2.0, scale=12.0)
    img, txt, s, b = _local_leaves(glob, 0)
    D.check_same_shapes(img, txt, rank=0, group=group)  # one rank always agrees with itself
    assert D.prepare(0, 1, group, img, txt, s, b) == (group, 0, 1, s, b)
    for name, ring, parts, expect in [
            ("contrastive_ring", lambda *a: D.contrastive_ring(*a, backend="torch", chunk_size=2, group=group),
             _clip_halves, dict(loss_everywhere=True, feature_factor=1)),
            ("contrastive_ring gather_with_grad=False",
             lambda *a: D.contrastive_ring(*a, gather_with_grad=False, group=group), _clip_halves,
             dict(loss_everywhere=True, feature_factor=1)),
            ("siglip_ring", lambda *a: D.siglip_ring(*a, backend="torch", chunk_size=2, group=group), _siglip,
             dict(loss_everywhere=False, feature_factor=1))]:
        try:
            _check_single_process(_run(ring, _local_leaves(glob, 0)), glob, 0, 1, parts, group=group, **expect)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("world", [1, 2], ids=["world1", "world2_singleton_groups"])
def test_rings_on_a_one_rank_group(world):
    """The ring functions on a group of one rank, alone in the world or in a world of two (the loss modules take
    the single-process path at world_size=1; the functions take any group): the single-process loss; nothing is
    sent to the rank itself (gloo cannot) nor to a rank outside the group."""
    run_ranks(world, _one_rank)


# ---------------------------------------------------------------------------------------------------------------
# bf16 features of a trained model


W_BF16, N_BF16, D_BF16 = 2, 6, 64


def _contrastive_ring_run(rank, world, img, txt, dtype, scale_dtype, grad):
    import fastclip

    rows = slice(rank * N_BF16, (rank + 1) * N_BF16)
    leaves = [img[rows].to(dtype).requires_grad_(), txt[rows].to(dtype).requires_grad_(),
              torch.tensor(100.0, dtype=scale_dtype, requires_grad=True)]
    loss = fastclip.ContrastiveLoss(rank=rank, world_size=world, dist_impl="ring", backend="torch")(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, torch.full_like(loss, grad)))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32_scale", "bf16_scale"])
def test_contrastive_ring_bf16_is_the_fp32_ring_rounded_once(scale_dtype):
    """bf16 features at cos 0.45 .. 0.6, scale 100 (p_ii -> 1: every gradient is a small difference of large
    terms, which the ring's off-diagonal corrections cancel). The torch blocks compute in fp32, so the bf16 ring is
    the fp32 ring of the same (bf16-rounded) values, rounded once to bf16 at the end, bit for bit: any intermediate
    rounded to bf16 (a block's input or gradient, the upstream coefficient, a block's d(logit_scale) for a bf16
    logit_scale) shows."""
    img, txt = (t.detach().to(torch.bfloat16).double() for t in trained_features(W_BF16 * N_BF16, D_BF16))
    grad = float(torch.tensor(0.7, dtype=torch.bfloat16))  # the upstream gradient as autograd hands it to bf16
    runs = {dtype: run_ranks(W_BF16, _contrastive_ring_run, img, txt, dtype,
                             scale_dtype if dtype == torch.bfloat16 else torch.float32, grad)
            for dtype in (torch.bfloat16, torch.float32)}
    for rank in range(W_BF16):
        for name, ours, fp32 in zip(("loss", "d_image", "d_text", "d_logit_scale"), runs[torch.bfloat16][rank],
                                    runs[torch.float32][rank]):
            want = fp32.to(ours.dtype)
            assert torch.equal(ours, want), f"rank {rank} {name}: {(ours.double() - want.double()).abs().max()}"


def _siglip_gradient_traffic(rank, world, sends):
    import fastclip

    sends[threading.get_ident()] = []
    leaves = _local_leaves(_global_inputs(world, torch.float16, bias=-1.0), rank)
    _run(fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring", backend="triton"), leaves)
    return sends[threading.get_ident()]


def test_siglip_ring_text_gradient_travels_in_fp32(monkeypatch):
    """With fp16 features on the Triton backend (whose deferred text gradient comes back in fp16), the partial
    sums of the text gradient travel in fp32: W hops of (N, D) fp32, one hop behind the W - 1 fp16 text blocks."""
    from fastclip import distributed as D

    p2p, sends = D._p2p, {}

    def recorded(to_send, to_recv, group):
        sends[threading.get_ident()].append([(tuple(t.shape), t.dtype) for t, _ in to_send])
        return p2p(to_send, to_recv, group)

    monkeypatch.setattr(D, "_p2p", recorded)
    world = 2
    for got in run_ranks(world, _siglip_gradient_traffic, sends):
        block = (N_LOCAL, DIM)
        want = [[(block, torch.float16)]] * (world - 1) + [[(block, torch.float32)]] * world
        assert sorted(got, key=repr) == sorted(want, key=repr), got


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every rank raises at once with a clear error, on one rank or on all


def _exchange_devices(rank, world, asked):
    from fastclip import distributed as D

    group = dist.new_group(list(range(world)))  # not the default group: the exchange must ask about this one
    ok = torch.zeros(N_LOCAL, DIM)
    for image in (ok, None, [[0.0] * DIM] * N_LOCAL):  # a tensor, None, a nested list (not a tensor)
        mine = image if rank == 0 else ok
        with contextlib.nullcontext() if image is ok else pytest.raises(ValueError):
            D.check_same_shapes(mine, ok, rank=rank, group=group)
        (got_group, like), = asked.pop(threading.get_ident())
        assert got_group is group, got_group
        assert like is (mine if isinstance(mine, torch.Tensor) else None), like


def test_shape_exchange_asks_where_its_group_moves_tensors(monkeypatch):
    """The shapes travel on the device the group's backend moves (NCCL: the features' GPU; gloo: the CPU, which
    _comm_device decides, test_distributed.py::test_comm_device): check_same_shapes asks _comm_device with the group
    it exchanges on and the image features when they are a tensor (else None, and the current GPU)."""
    from fastclip import distributed as D

    asked, real = {}, D._comm_device

    def recorded(group, like):
        asked.setdefault(threading.get_ident(), []).append((group, like))
        return real(group, like)

    monkeypatch.setattr(D, "_comm_device", recorded)
    run_ranks(2, _exchange_devices, asked)


def _raises_exactly(exc, message, fn, *args):
    with pytest.raises(exc) as e:
        fn(*args)
    assert str(e.value) == message, f"{e.value!s}\n!=\n{message}"


def _bad_scalars_everywhere(rank, world):
    from fastclip import distributed as D

    img, txt, s, b = _local_leaves(_global_inputs(world, bias=-1.0), rank)
    two = torch.ones(2)
    for exc, message, scale, bias in [
            (ValueError, "logit_scale is required", None, b),
            (ValueError, "logit_scale must have exactly one element, got shape (2,), dtype float32, device cpu", two, b),
            (TypeError, "logit_scale must be a tensor or a number, got str", "10", None),
            (ValueError, "logit_bias must have exactly one element, got shape (2,), dtype float32, device cpu", s, two),
            (TypeError, "logit_bias must be a tensor or a number, got str", s, "-1")]:
        _raises_exactly(exc, message, D.prepare, rank, world, None, img, txt, scale, bias)
    # valid scalars come back as tensors on the features' device; a missing bias stays None
    *_, scale, bias = D.prepare(rank, world, None, img, txt, 10.0, None)
    assert bias is None and scale.dtype == torch.float32 and float(scale) == 10.0, (scale, bias)


def test_prepare_names_the_bad_scalar():
    """The distributed prologue refuses logit_scale=None (it is required) and names the argument that is wrong."""
    run_ranks(2, _bad_scalars_everywhere)


def _bad_on_rank0(rank, world):
    import fastclip
    from fastclip import distributed as D

    others = r"^rank\(s\) \[0\] of the process group got invalid inputs"
    img, txt, s, b = _local_leaves(_global_inputs(world, bias=-1.0), rank)
    # a bad scalar on rank 0 only: before the fix, rank 0 raised after the shape exchange and the others waited for
    # it in the loss's first collective
    for cls, kw in [(fastclip.ContrastiveLoss, dict(dist_impl="ring")), (fastclip.ContrastiveLoss, {}),
                    (fastclip.SigLIPLoss, dict(dist_impl="ring")), (fastclip.SigLIPLoss, {})]:
        loss_fn = cls(rank=rank, world_size=world, backend="torch", **kw)
        with pytest.raises(ValueError, match="^logit_scale is required$" if rank == 0 else others):
            loss_fn(img, txt, None if rank == 0 else s, b)
    # odd features on rank 0, with no local check: every rank compares what each holds
    ok = torch.zeros(N_LOCAL, DIM)
    for odd in (None, torch.zeros(N_LOCAL), torch.zeros(N_LOCAL, DIM, 1), torch.zeros(1, N_LOCAL, DIM, 1)):
        with pytest.raises(ValueError, match="^the ranks' features differ in shape or dtype"):
            D.check_same_shapes(odd if rank == 0 else ok, ok, rank=rank)


def test_bad_input_on_one_rank_fails_fast_everywhere():
    """One rank with a bad logit_scale, or features of another rank (None, 1-D, 3-D, 4-D): every rank raises a
    ValueError within seconds (a rank that skipped or resized the shape exchange would leave the others waiting
    in it until gloo's timeout, here 10 s)."""
    run_ranks(2, _bad_on_rank0, timeout=10.0)


def _rings_on_the_gpu(rank, world, backend):
    from fastclip import distributed as D

    glob = _global_inputs(1, torch.float32, bias=-2.0, scale=12.0)
    for ring, parts, expect in [(D.contrastive_ring, _clip_halves, dict(loss_everywhere=True, feature_factor=1)),
                                (D.siglip_ring, _siglip, dict(loss_everywhere=False, feature_factor=1))]:
        leaves = [t.detach().cuda().requires_grad_() for t in glob]
        loss, grads = _run(lambda *a: ring(*a, backend=backend), leaves)
        assert loss.device.type == "cuda" and all(g.device.type == "cuda" for g in grads), ring.__name__
        _check_single_process((loss.cpu(), [g.cpu() for g in grads]), glob, rank, world, parts, rtol=1e-5,
                              atol=1e-6, **expect)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rings_keep_every_accumulator_on_the_gpu(backend):
    """Both rings with CUDA features (one rank: the rings send nothing, the contrastive ring's all-reduces go
    through gloo's CUDA path): every accumulator (the loss, dI, d_logit_scale, d_logit_bias, the upstream 1 of
    SigLIP's deferred text gradient) on the features' device, which CUDA enforces, values as the fp32 global loss."""
    run_ranks(1, _rings_on_the_gpu, backend)
