"""Both losses across 2 and 3 ranks, every mode: values and gradients against open_clip on every rank, and against
the single-process loss of the global batch in fp64 (what data-parallel training must reproduce).

The ranks are threads of the test process, each with its own gloo process group (``tests/threaded_ranks.py``):
the same collectives and point-to-point sends as between processes, without an interpreter start-up per rank, and
one test per (world size, check). One slow test runs every check again in spawned processes, as training does.
The upstream gradient is G (not 1), the same on every rank, as in a data-parallel step.
"""
import os
import pickle
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers import assert_close
from tests.threaded_ranks import run_ranks

pytest.importorskip("open_clip.loss")

WORLD_SIZES = (2, 3)
N_LOCAL, DIM = 5, 7  # odd sizes; fp64 on the torch/reference backends
G = 0.75  # the upstream gradient of every rank's loss
CHECKS = {}  # name -> check(rank, world), run on every rank


def check(name):
    def register(fn):
        assert name not in CHECKS, name
        CHECKS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------------------------
# Inputs, runs, comparisons


def _global_inputs(world, dtype=torch.float64, *, seed=1234, bias=-2.0, scale=10.0):
    # the same global batch on every rank (a seeded generator), never zeros
    g = torch.Generator().manual_seed(seed)
    n = N_LOCAL * world
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(scale, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64) if bias is not None else None
    return [t.to(dtype) if t is not None else None for t in (img, txt, s, b)]


def _rows(rank):
    return slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)


def _local_leaves(glob, rank, dtype=None):
    img, txt, s, b = glob
    out = [img[_rows(rank)], txt[_rows(rank)], s, b]
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in out]


def _run(fn, leaves):
    """(loss, gradients of G * loss w.r.t. every leaf given)."""
    loss = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wrt, torch.full_like(loss, G))
    return loss.detach(), grads


def _compare(name, out, ref, rtol, atol):
    assert_close(name, out.double(), ref.double(), rtol=rtol, atol=atol)


def _compare_runs(ours, ref, rtol=1e-10, atol=1e-12):
    (l1, g1), (l2, g2) = ours, ref
    assert len(g1) == len(g2), (len(g1), len(g2))
    _compare("loss", l1, l2, rtol, atol)
    for name, a, b in zip(("d_image", "d_text", "d_logit_scale", "d_logit_bias"), g1, g2):
        _compare(name, a, b, rtol, atol)


# ---------------------------------------------------------------------------------------------------------------
# The single-process loss of the global batch, fp64, plain PyTorch


def _logits(img, txt, s, b):
    return s * img @ txt.T + (b if b is not None else 0.0)


def _clip_halves(img, txt, s, b):
    """CLIP's loss as its two halves: CE over the rows of S = s I T^T + b (image -> text) / 2, over its columns / 2."""
    logits = _logits(img, txt, s, b)
    labels = torch.arange(img.shape[0])
    return F.cross_entropy(logits, labels) / 2, F.cross_entropy(logits.T, labels) / 2


def _siglip(img, txt, s, b):
    """-sum_ij log sigmoid(z_ij S_ij) / N, z = +1 on the diagonal, -1 elsewhere."""
    n = img.shape[0]
    z = 2 * torch.eye(n, dtype=img.dtype) - 1
    return (-F.logsigmoid(z * _logits(img, txt, s, b)).sum() / n,)


def _check_single_process(run, glob, rank, world, parts, *, loss_everywhere, feature_factor, own_half=False,
                          group=None, rtol=1e-10, atol=1e-12):
    """This rank's run against L, the global batch's loss in one process (fp64), as ``parts`` (its halves) gives it.

    - loss: L on every rank (``loss_everywhere``: open_clip's global ClipLoss), else the ranks' mean is L;
    - features: G * feature_factor * dL/d(this rank's rows); with ``own_half`` (local_loss without gather_with_grad:
      a rank differentiates only the terms of its own rows) dI from the image->text half, dT from the other;
    - logit_scale, logit_bias: G dL/ds on every rank with ``loss_everywhere``, else the ranks' mean is G dL/ds.
    """
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in glob]
    wrt = [t for t in leaves if t is not None]
    halves = parts(*leaves)
    per_half = [torch.autograd.grad(h, wrt, retain_graph=True) for h in halves]
    total = [sum(g[i] for g in per_half) for i in range(len(wrt))]
    single = sum(h.detach() for h in halves)
    d_img, d_txt = (per_half[0][0], per_half[1][1]) if own_half else total[:2]
    loss, grads = run
    _compare("d_image", grads[0], G * feature_factor * d_img[_rows(rank)], rtol, atol)
    _compare("d_text", grads[1], G * feature_factor * d_txt[_rows(rank)], rtol, atol)
    # the loss and the scalars' gradients of every rank
    mine = torch.stack([loss.double().reshape(())] + [g.double().reshape(()) for g in grads[2:]])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every)  # (W, 1 + number of scalars)
    want = torch.stack([single] + [G * g for g in total[2:]])
    if loss_everywhere:
        for r in range(world):
            _compare(f"rank {r}'s loss, d_logit_scale, d_logit_bias", every[r], want, rtol, atol)
    else:
        _compare("mean over ranks of loss, d_logit_scale, d_logit_bias", every.mean(0), want, rtol, atol)


# ---------------------------------------------------------------------------------------------------------------
# ContrastiveLoss: open_clip's four gather modes and the ring


def _clip_pair(rank, world, **kw):
    import fastclip
    from open_clip.loss import ClipLoss

    local, gwg = kw.pop("local_loss", False), kw.pop("gather_with_grad", False)
    return (fastclip.ContrastiveLoss(local, gwg, rank=rank, world_size=world, **kw),
            ClipLoss(local, gwg, rank=rank, world_size=world))


for _lo in (False, True):
    for _g in (False, True):
        for _bias in (None, 0.5):
            @check(f"clip_local{int(_lo)}_gwg{int(_g)}{'_bias' if _bias is not None else ''}")
            def _(rank, world, lo=_lo, g=_g, bias=_bias):
                glob = _global_inputs(world, bias=bias, scale=20.0)
                ours_fn, ref_fn = _clip_pair(rank, world, local_loss=lo, gather_with_grad=g, backend="torch",
                                             chunk_size=3)
                ours = _run(ours_fn, _local_leaves(glob, rank))
                _compare_runs(ours, _run(ref_fn, _local_leaves(glob, rank)))
                # open_clip's gradients: summed over ranks' copies with gather_with_grad, else this rank's own terms
                _check_single_process(ours, glob, rank, world, _clip_halves, loss_everywhere=not lo,
                                      feature_factor=world if lo or g else 1,
                                      own_half=lo and not g)

for _name, _gwg, _bias, _backend, _dtype in [("clip_ring_gwg1", True, -1.0, "torch", torch.float64),
                                             ("clip_ring_gwg0_bias", False, 3.0, "torch", torch.float64),
                                             ("clip_ring_reference", True, None, "reference", torch.float64),
                                             ("clip_ring_triton_fp32", True, -1.0, "triton", torch.float32)]:
    @check(_name)
    def _(rank, world, gwg=_gwg, bias=_bias, backend=_backend, dtype=_dtype):
        glob = _global_inputs(world, bias=bias, scale=30.0)
        ours_fn, ref_fn = _clip_pair(rank, world, gather_with_grad=gwg, backend=backend, dist_impl="ring",
                                     chunk_size=2)
        ours = _run(ours_fn, _local_leaves(glob, rank, dtype))
        ref = _run(ref_fn, _local_leaves(glob, rank))
        if dtype == torch.float64:
            _compare_runs(ours, ref)
            _check_single_process(ours, glob, rank, world, _clip_halves, loss_everywhere=True,
                                  feature_factor=world if gwg else 1)
        else:
            _compare_runs(ours, ref, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# SigLIPLoss: open_clip's four modes and the ring


def _siglip_pair(rank, world, mode, **kw):
    import fastclip
    from open_clip.loss import SigLipLoss

    return (fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl=mode, **kw),
            SigLipLoss(rank=rank, world_size=world, dist_impl="bidir" if mode == "ring" else mode))


for _mode in ("bidir", "shift", "reduce", "gather", "ring"):
    @check(f"siglip_{_mode}")
    def _(rank, world, mode=_mode):
        glob = _global_inputs(world, bias=-3.0, scale=10.0)
        ours_fn, ref_fn = _siglip_pair(rank, world, mode, backend="torch", chunk_size=2)
        ours = _run(ours_fn, _local_leaves(glob, rank))
        _compare_runs(ours, _run(ref_fn, _local_leaves(glob, rank)))
        # dI_r = dL_r/dI_r, dT_r = d(sum_k L_k)/dT_r: W times the global loss's, whose mean over ranks is L
        _check_single_process(ours, glob, rank, world, _siglip, loss_everywhere=False, feature_factor=world)

for _name, _backend, _dtype, _bias, _mode in [("siglip_ring_nobias", "torch", torch.float64, None, "ring"),
                                              ("siglip_ring_triton_fp32", "triton", torch.float32, -4.0, "ring"),
                                              ("siglip_ring_reference", "reference", torch.float64, 1.0, "ring"),
                                              ("siglip_bidir_triton_fp16", "triton", torch.float16, -4.0, "bidir")]:
    @check(_name)
    def _(rank, world, backend=_backend, dtype=_dtype, bias=_bias, mode=_mode):
        glob = _global_inputs(world, bias=bias, scale=10.0)
        ours_fn, ref_fn = _siglip_pair(rank, world, mode, backend=backend)
        ours = _run(ours_fn, _local_leaves(glob, rank, dtype))
        ref = _run(ref_fn, _local_leaves(glob, rank))
        if dtype == torch.float64:
            _compare_runs(ours, ref)
            _check_single_process(ours, glob, rank, world, _siglip, loss_everywhere=False, feature_factor=world)
        elif dtype == torch.float32:
            _compare_runs(ours, ref, rtol=2e-5, atol=2e-6)
        else:
            _compare_runs(ours, ref, rtol=5e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Under CPU autocast (bf16) with fp32 features, as AMP training hands them over: open_clip's dtype for the loss,
# fp32 gradients, values as open_clip's within its own bf16-logit rounding

for _mode, _pair in [("clip_gather", lambda r, w: _clip_pair(r, w)),
                     ("clip_ring", lambda r, w: _clip_pair(r, w, gather_with_grad=True, dist_impl="ring")),
                     ("siglip_bidir", lambda r, w: _siglip_pair(r, w, None)),
                     ("siglip_ring", lambda r, w: _siglip_pair(r, w, "ring"))]:
    @check(f"autocast_bf16_{_mode}")
    def _(rank, world, mode=_mode, pair=_pair):
        glob = _global_inputs(world, torch.float32, bias=-2.0 if "siglip" in mode else None, scale=10.0)
        ours_fn, ref_fn = pair(rank, world)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = _run(ours_fn, _local_leaves(glob, rank))
            ref = _run(ref_fn, _local_leaves(glob, rank))
        assert ours[0].dtype == ref[0].dtype == torch.float32, (ours[0].dtype, ref[0].dtype)
        assert all(g.dtype == torch.float32 for g in ours[1]), [g.dtype for g in ours[1]]
        _compare_runs(ours, ref, rtol=3e-2, atol=3e-3)


@check("ring_python_scalars")
def _(rank, world):
    # logit_scale or logit_bias a Python number (a float32 0-d tensor inside) with fp64 features and the other
    # scalar: no fp64 gradient is rounded through the float32 one's dtype
    for scale, bias in [(8.0, None), (None, -1.25)]:
        glob = _global_inputs(world, bias=-1.25 if scale else None, scale=8.0)
        img, txt, s, b = _local_leaves(glob, rank)

        def call(fn, i, t, x):  # x: the scalar given as a tensor
            return fn(i, t, scale, x) if scale else fn(i, t, x, bias)

        for fn, parts, expect in [
                (_siglip_pair(rank, world, "ring", backend="torch")[0], _siglip,
                 dict(loss_everywhere=False, feature_factor=world)),
                (_clip_pair(rank, world, gather_with_grad=True, dist_impl="ring", backend="torch")[0], _clip_halves,
                 dict(loss_everywhere=True, feature_factor=world))]:
            ours = _run(lambda i, t, x: call(fn, i, t, x), [img, txt, b if scale else s])
            ref_glob = [glob[0], glob[1], glob[3] if scale else glob[2], None]
            _check_single_process(ours, ref_glob, rank, world, lambda i, t, x, _: call(parts, i, t, x), **expect)


@check("siglip_ring_one_input_with_grad")
def _(rank, world):
    # a frozen text tower (LiT), a fixed temperature...: the ring forms the gradients when any one input needs one
    glob = _global_inputs(world, bias=-2.0, scale=10.0)
    loss_fn = _siglip_pair(rank, world, "ring", backend="torch")[0]
    every = _run(loss_fn, _local_leaves(glob, rank))[1]
    for i, name in enumerate(("image", "text", "logit_scale", "logit_bias")):
        leaves = [t.detach() for t in _local_leaves(glob, rank)]
        leaves[i].requires_grad_()
        loss = loss_fn(*leaves)
        (grad,) = torch.autograd.grad(loss, leaves[i], torch.full_like(loss, G))
        _compare(f"d_{name} alone", grad, every[i], 1e-12, 1e-14)


@check("ring_no_grad")
def _(rank, world):
    glob = _global_inputs(world, bias=-1.5, scale=7.0)
    leaves = _local_leaves(glob, rank)
    for ours_fn, ref_fn in [_siglip_pair(rank, world, "ring"), _clip_pair(rank, world, dist_impl="ring")]:
        with torch.no_grad():
            a = ours_fn(*leaves)
        assert not a.requires_grad
        b = ref_fn(*[t.detach() for t in leaves])
        _compare(f"{type(ours_fn).__name__} loss", a, b, 1e-12, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Errors: every rank raises, nobody hangs


@check("shape_mismatch_every_rank_raises")
def _(rank, world):
    import fastclip

    glob = _global_inputs(world)
    for cls, kw in [(fastclip.SigLIPLoss, dict(dist_impl="ring")), (fastclip.SigLIPLoss, {}),
                    (fastclip.ContrastiveLoss, {}), (fastclip.ContrastiveLoss, dict(dist_impl="ring"))]:
        img, txt, s, b = _local_leaves(glob, rank)
        if rank == world - 1:
            img, txt = img[:-1], txt[:-1]  # the last batch of an epoch, smaller on one rank
        with pytest.raises(ValueError, match="differ in shape") as e:
            cls(rank=rank, world_size=world, **kw)(img, txt, s, b)
        assert f"rank {world - 1}: image_features ({N_LOCAL - 1}, {DIM}), text_features ({N_LOCAL - 1}, {DIM})" \
            in str(e.value) and f"rank 0: image_features ({N_LOCAL}, {DIM})" in str(e.value), str(e.value)


@check("bad_input_on_one_rank")
def _(rank, world):
    import fastclip

    glob = _global_inputs(world)
    img, txt, s, b = _local_leaves(glob, rank)
    if rank == 0:
        txt = txt[:, :-1]  # a dim mismatch between this rank's own image and text features
    want = "different feature dims" if rank == 0 else r"rank\(s\) \[0\] of the process group got invalid"
    with pytest.raises(ValueError, match=want):
        fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring")(img, txt, s, b)


def _modes(rank, world, group=None, **kw):
    """Every distributed mode as (name, loss, single-process parts, its expectations for _check_single_process)."""
    import fastclip

    for mode in ("bidir", "shift", "reduce", "gather", "ring"):
        yield (f"siglip {mode}", fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl=mode, group=group, **kw),
               _siglip, dict(loss_everywhere=False, feature_factor=world))
    for lo, g, impl in [(False, False, None), (False, True, None), (True, False, None), (True, True, None),
                        (False, False, "ring"), (False, True, "ring")]:
        yield (f"clip local_loss={lo} gather_with_grad={g} dist_impl={impl}",
               fastclip.ContrastiveLoss(lo, g, rank=rank, world_size=world, dist_impl=impl, group=group, **kw),
               _clip_halves, dict(loss_everywhere=not lo, feature_factor=world if lo or g else 1, own_half=lo and not g))


@check("group_subset")
def _(rank, world):
    # a process group of the last two ranks (in a world of 3, ranks 1 and 2: group ranks differ from global ones)
    members = list(range(world))[-2:]
    group = dist.new_group(members)
    if rank not in members:
        return
    sub_rank, sub_world = members.index(rank), len(members)
    glob = _global_inputs(sub_world, bias=-2.0, scale=12.0)
    for name, loss_fn, parts, expect in _modes(sub_rank, sub_world, group, backend="torch"):
        try:
            _check_single_process(_run(loss_fn, _local_leaves(glob, sub_rank)), glob, sub_rank, sub_world, parts,
                                  group=group, **expect)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@check("bf16_features")
def _(rank, world):
    # bf16 features (no autocast): every block computes in fp32, so values and gradients are those of the
    # bf16-rounded inputs up to the rounding of bf16 results: the loss, and the features' gradients, which open_clip's
    # exchanges sum over W ranks in bf16 (each term rounded to 2^-9 of its size, the terms up to twice the sum)
    glob = [t.to(torch.bfloat16).double() if t is not None else None for t in _global_inputs(world, bias=-1.0)]
    for name, loss_fn, parts, expect in _modes(rank, world, backend="torch"):
        try:
            run = _run(loss_fn, _local_leaves(glob, rank, torch.bfloat16))
            # the loss and every gradient in the inputs' dtype, as open_clip's
            assert run[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in run[1]), run
            _check_single_process(run, glob, rank, world, parts, rtol=world * 2 ** -8, atol=1e-6, **expect)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def _siglip_bidir_subgroup(rank, world):
    # 3 of 4 ranks: the first subgroup where 'bidir' makes a two-way exchange, with group ranks not the global ones
    import fastclip

    members = [1, 2, 3]
    group = dist.new_group(members)
    if rank not in members:
        return
    sub_rank, sub_world = members.index(rank), len(members)
    glob = _global_inputs(sub_world, bias=-2.0, scale=12.0)
    loss_fn = fastclip.SigLIPLoss(rank=sub_rank, world_size=sub_world, dist_impl="bidir", group=group, backend="torch")
    _check_single_process(_run(loss_fn, _local_leaves(glob, sub_rank)), glob, sub_rank, sub_world, _siglip,
                          group=group, loss_everywhere=False, feature_factor=sub_world)


def test_siglip_bidir_on_a_subgroup():
    run_ranks(4, _siglip_bidir_subgroup)


def _raises_exactly(exc, message, fn, *args, **kwargs):
    with pytest.raises(exc) as e:
        fn(*args, **kwargs)
    assert str(e.value) == message, f"{e.value!s}\n!=\n{message}"


@check("check_same_shapes_messages")
def _(rank, world):
    """Every rank raises, with the same words on every rank; what each rank holds, as each rank reports it."""
    from fastclip import distributed as D
    from fastclip._checks import check_feature_pair

    ok = torch.zeros(N_LOCAL, DIM)
    D.check_same_shapes(ok, ok, rank=rank)  # agreeing ranks pass, with or without a local check
    D.check_same_shapes(ok, ok, rank=rank, local_check=check_feature_pair)
    others = "; ".join(f"rank {r}: image_features ({N_LOCAL}, {DIM}), text_features ({N_LOCAL}, {DIM}), float32"
                       for r in range(1, world))
    tail = ("; every rank needs the same batch size, feature dim and dtype (drop or pad the last, smaller batch)")
    # rank 0 holds something else; no local check, so every rank compares what each holds
    for odd, desc in [(torch.zeros(N_LOCAL, DIM, 2), "(-1, -1), text_features (5, 7), float32"),
                      (torch.zeros(N_LOCAL), "(5, 0), text_features (5, 7), float32"),
                      (None, "(-1, -1), text_features (5, 7), ?"),
                      (torch.zeros(N_LOCAL, DIM, dtype=torch.float64), "(5, 7), text_features (5, 7), float64"),
                      (torch.zeros(N_LOCAL, DIM, dtype=torch.bfloat16), "(5, 7), text_features (5, 7), bfloat16"),
                      (torch.zeros(N_LOCAL, DIM, dtype=torch.float16), "(5, 7), text_features (5, 7), float16"),
                      (torch.zeros(N_LOCAL, DIM, dtype=torch.int64), "(5, 7), text_features (5, 7), ?")]:
        msg = f"the ranks' features differ in shape or dtype (rank 0: image_features {desc}; {others}){tail}"
        _raises_exactly(ValueError, msg, D.check_same_shapes, odd if rank == 0 else ok, ok, rank=rank)
    # a local check fails on rank 0: its own error there, the others name it
    bad = torch.zeros(N_LOCAL, DIM + 1)
    if rank == 0:
        with pytest.raises(ValueError, match="different feature dims"):
            D.check_same_shapes(bad, ok, rank=rank, local_check=check_feature_pair)
    else:
        _raises_exactly(ValueError, "rank(s) [0] of the process group got invalid features (their own error says "
                        "why); every rank stops here rather than wait for them", D.check_same_shapes, ok, ok,
                        rank=rank, local_check=check_feature_pair)
    # rank 0 passes the wrong rank: its own error there, the others name it
    if rank == 0:
        _raises_exactly(ValueError, "rank=1 but this process is rank 0 of the process group", D.check_same_shapes,
                        ok, ok, rank=1)
    else:
        with pytest.raises(ValueError, match=r"^rank\(s\) \[0\] of the process group got invalid"):
            D.check_same_shapes(ok, ok, rank=rank)


@check("world_size_mismatch")
def _(rank, world):
    import fastclip

    img, txt, s, b = _local_leaves(_global_inputs(world), rank)
    for cls in (fastclip.ContrastiveLoss, fastclip.SigLIPLoss):
        _raises_exactly(ValueError, f"world_size={world + 1} but the process group has {world} ranks",
                        cls(rank=rank, world_size=world + 1), img, txt, s, b)


@check("rank_mismatch")
def _(rank, world):
    import fastclip

    img, txt, s, b = _local_leaves(_global_inputs(world), rank)
    # every rank passes the next one's rank: each names its own mistake
    with pytest.raises(ValueError, match=f"rank={(rank + 1) % world} but this process is rank {rank} of the "):
        fastclip.ContrastiveLoss(rank=(rank + 1) % world, world_size=world)(img, txt, s, b)
    # only rank 0 is wrong: the others name it
    claimed = 1 if rank == 0 else rank
    want = "rank=1 but this process is rank 0" if rank == 0 else r"rank\(s\) \[0\] of the process group"
    with pytest.raises(ValueError, match=want):
        fastclip.SigLIPLoss(rank=claimed, world_size=world, dist_impl="ring")(img, txt, s, b)


def _gather_rows(rank, world, members):
    """all_gather_with_grad over the ranks ``members``: every member's block in order; backward: this member's rows
    of the sum over members of the upstream gradients (each weights the gathered tensor differently)."""
    from fastclip import distributed as D

    group = dist.new_group(members) if members else None
    if members:
        if rank not in members:
            return
        rank, world = members.index(rank), len(members)
    blocks = [torch.randn(N_LOCAL, DIM, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in range(world)]
    weights = [torch.randn(world * N_LOCAL, DIM, generator=torch.Generator().manual_seed(100 + k),
                           dtype=torch.float64) for k in range(world)]
    x = blocks[rank].clone().requires_grad_()
    y = D.all_gather_with_grad(x, group)
    _compare("gathered", y, torch.cat(blocks), 0, 0)
    (grad,) = torch.autograd.grad((y * weights[rank]).sum(), x)
    _compare("d_x", grad, sum(weights)[_rows(rank)], 1e-15, 0)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("world, members", [(2, None), (3, None), (3, [1, 2])], ids=["world2", "world3", "group12"])
def test_all_gather_with_grad(world, members, backend, monkeypatch):
    if backend == "nccl":
        # NCCL's branch (a reduce-scatter) run by gloo, which has reduce_scatter_tensor too. The backward asks the
        # group it gathered over: with a subgroup, that one is NCCL and the default group gloo
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if (group is None) == (members is None)
                            else "gloo")
    calls = []
    for name in ("all_reduce", "reduce_scatter_tensor"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    run_ranks(world, _gather_rows, members)
    # NCCL's backward moves 1/W of the gradient per rank; gloo's all-reduces it whole
    assert set(calls) == {"reduce_scatter_tensor" if backend == "nccl" else "all_reduce"}, calls


def _ring_traffic(rank, world, sends):
    """What each ring sends, as its docstring says: SigLIP, W - 1 hops of the text block (input dtype) and, with a
    gradient, W hops of its fp32 gradient; CLIP, the same for the block and its column lse (n,) forward, and again
    for the block with its column statistics (2, n) and the gradient's W hops backward. Nothing else travels."""
    import threading

    import fastclip

    glob = _global_inputs(world, torch.bfloat16, bias=-1.0)
    me = threading.get_ident()
    n, d, f32 = N_LOCAL, DIM, torch.float32
    # bf16 features; the CLIP ring's torch blocks compute in fp32, so its text blocks travel in fp32
    text, block, lse, stats = ((n, d), torch.bfloat16), ((n, d), f32), ((n,), f32), ((2, n), f32)
    for loss_fn, grad, want in [
        (fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring", backend="torch"), False,
         [[text]] * (world - 1)),
        (fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring", backend="torch"), True,
         [[text]] * (world - 1) + [[block]] * world),
        (fastclip.ContrastiveLoss(rank=rank, world_size=world, dist_impl="ring", backend="torch"), True,
         [[block]] * (world - 1) + [[lse]] * world + [[block, stats]] * (world - 1) + [[block]] * world),
    ]:
        sends[me] = []
        leaves = _local_leaves(glob, rank)
        if grad:
            _run(loss_fn, leaves)
        else:
            with torch.no_grad():
                loss_fn(*leaves)
        got = sorted(sends[me], key=repr)
        assert got == sorted(want, key=repr), (type(loss_fn).__name__, grad, got)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"world{w}")
def test_ring_traffic(world, monkeypatch):
    import threading

    from fastclip import distributed as D

    sends, p2p = {}, D._p2p

    def recorded(to_send, to_recv, group):
        sends[threading.get_ident()].append([(tuple(t.shape), t.dtype) for t, _ in to_send])
        return p2p(to_send, to_recv, group)

    monkeypatch.setattr(D, "_p2p", recorded)
    run_ranks(world, _ring_traffic, sends)


def test_comm_device(monkeypatch):
    """The tensors of the shape exchange live where the backend moves them: NCCL, the features' GPU or else the
    current one; gloo, the CPU."""
    from types import SimpleNamespace

    from fastclip.distributed import _comm_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _comm_device(None, SimpleNamespace(device=torch.device("cuda", 1))) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert _comm_device(None, SimpleNamespace(device=torch.device("cuda", 1))) == torch.device("cuda", 1)
    assert _comm_device(None, torch.zeros(1)) == torch.device("cuda", 2)
    assert _comm_device(None, None) == torch.device("cuda", 2)


@pytest.mark.parametrize("chunk_size, dim", [(1, DIM), (2, DIM), (3, DIM), (None, DIM), (2, 3)])
def test_local_contrastive_loss(chunk_size, dim, monkeypatch):
    """open_clip's local_loss on one rank's rows (no communication): (CE(s I_r all_T^T + b) + CE(s T_r all_I^T + b))
    / 2 with row i's target at column rank * N_local + i, against fp64 PyTorch, every gradient, upstream G; each
    row's logits computed once, in chunks of chunk_size rows."""
    from fastclip import distributed as D

    world, rank, n = 3, 1, N_LOCAL
    img, txt, s, b = _global_inputs(world, bias=-0.5, scale=9.0)
    img, txt = img[:, :dim], txt[:, :dim]  # dim < N_LOCAL too: nothing mistakes one for the other
    leaves = [img[_rows(rank)], txt[_rows(rank)], img, txt, s, b]
    ours_in = [t.detach().clone().requires_grad_() for t in leaves]
    rows_done = []
    logits = D._logits
    monkeypatch.setattr(D, "_logits", lambda a, *args: rows_done.append(a.shape[0]) or logits(a, *args))
    ours = D.local_contrastive_loss(*ours_in[:4], ours_in[4], ours_in[5], rank=rank, chunk_size=chunk_size)
    assert rows_done == [min(chunk_size or n, n - i) for i in range(0, n, chunk_size or n)] * 2, rows_done
    ref_in = [t.detach().clone().requires_grad_() for t in leaves]
    i_r, t_r, all_i, all_t, sr, br = ref_in
    target = torch.arange(n) + rank * n
    ref = (F.cross_entropy(sr * i_r @ all_t.T + br, target) + F.cross_entropy(sr * t_r @ all_i.T + br, target)) / 2
    _compare("loss", ours, ref, 1e-12, 1e-14)
    for name, a, r in zip(("d_image", "d_text", "d_all_image", "d_all_text", "d_scale", "d_bias"),
                          torch.autograd.grad(ours, ours_in, torch.tensor(G, dtype=torch.float64)),
                          torch.autograd.grad(ref, ref_in, torch.tensor(G, dtype=torch.float64))):
        _compare(name, a, r, 1e-10, 1e-13)


def test_local_contrastive_loss_default_chunk_bounds_the_logits(monkeypatch):
    """Without chunk_size a chunk of rows holds at most 2^22 logits: rows = 2^22 // N_global (the meta device: no
    memory, no arithmetic). The loss comes back in the features' dtype (bf16 here; fp32 inside)."""
    from fastclip import distributed as D

    n, m = 5, 1 << 20  # 4 rows per chunk
    img, txt, all_img, all_txt = (torch.randn(k, 3, device="meta", dtype=torch.bfloat16) for k in (n, n, m, m))
    rows_done = []
    logits = D._logits
    monkeypatch.setattr(D, "_logits", lambda a, *args: rows_done.append(a.shape[0]) or logits(a, *args))
    loss = D.local_contrastive_loss(img, txt, all_img, all_txt, torch.tensor(10.0), None, rank=0)
    assert rows_done == [4, 1, 4, 1], rows_done
    assert loss.dtype == torch.bfloat16, loss.dtype


def test_local_contrastive_loss_zero_upstream_gradient():
    """A loss weighted by 0 has zero gradients, all finite (the bias's, sum_ij dL/dS_ij, is 0 up to rounding)."""
    from fastclip import distributed as D

    img, txt, s, b = [t.requires_grad_() for t in _global_inputs(2, bias=-0.5, scale=9.0)]
    loss = D.local_contrastive_loss(img[:N_LOCAL], txt[:N_LOCAL], img, txt, s, b, rank=0, chunk_size=2)
    for g in torch.autograd.grad(loss, [img, txt, s, b], torch.zeros_like(loss)):
        assert torch.equal(g, torch.zeros_like(g)), g


def test_local_contrastive_loss_stays_on_the_features_device():
    """Every intermediate lives on the inputs' device (the meta device stands in for a GPU)."""
    from fastclip import distributed as D

    img, txt, s, b = [t.to("meta").requires_grad_() for t in _global_inputs(2, torch.float32)]
    loss = D.local_contrastive_loss(img[:N_LOCAL], txt[:N_LOCAL], img, txt, s, b, rank=0, chunk_size=2)
    grads = torch.autograd.grad(loss, [img, txt, s, b])
    assert loss.device.type == "meta" and all(g.device.type == "meta" for g in grads)


@pytest.mark.gpu
def test_local_contrastive_loss_on_the_gpu():
    """On a GPU every accumulator lives on the features' device (the meta device above lets a CPU 0-d accumulator
    through; CUDA refuses it): values and gradients as on the CPU, every gradient on the GPU."""
    from fastclip import distributed as D

    glob = _global_inputs(2, bias=-0.5, scale=9.0)
    runs = []
    for device in ("cpu", "cuda"):
        img, txt, s, b = [t.to(device).requires_grad_() for t in glob]
        loss = D.local_contrastive_loss(img[:N_LOCAL], txt[:N_LOCAL], img, txt, s, b, rank=0, chunk_size=2)
        runs.append([loss, *torch.autograd.grad(loss, [img, txt, s, b])])
    for name, cpu, gpu in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), *runs):
        assert gpu.device.type == "cuda", name
        _compare(name, gpu.cpu(), cpu, 1e-10, 1e-13)


def test_not_initialized():
    import fastclip
    from fastclip import distributed as D

    assert not dist.is_initialized()
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    for loss in (fastclip.ContrastiveLoss(rank=1, world_size=2), fastclip.SigLIPLoss(rank=1, world_size=2)):
        _raises_exactly(RuntimeError, "world_size=2 needs torch.distributed initialized "
                        "(torch.distributed.init_process_group) before the loss is called", loss, img, txt, 10.0, -1.0)
    with pytest.raises(RuntimeError, match="world_size=3 needs"):
        D.resolve(0, 3)


# ---------------------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("check_name", CHECKS)
@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"world{w}")
def test_distributed(world, check_name):
    run_ranks(world, CHECKS[check_name])


def _process_worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn(rank, world)
            results[name] = None
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc()
        dist.barrier()  # keep the ranks in step even when a check failed on one of them
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.slow  # three processes importing torch and open_clip
def test_distributed_in_processes():
    """Every check with the ranks as spawned processes (a file store), as a training script runs them."""
    import torch.multiprocessing as mp

    world = 3
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_process_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        per_rank = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    failures = [f"--- {name}, rank {r} of {world}:\n{res[name]}" for name in CHECKS for r, res in
                enumerate(per_rank) if res.get(name, "did not run") is not None]
    assert not failures, "\n".join(failures)


def test_ring_backend_never_runs_cuda(monkeypatch):
    """The ring merges its blocks' statistics in a log base it must know: backend="cuda" (not wired into the ring)
    is refused by name and by FASTCLIP_BACKEND, and where "auto" would pick it (a GPU with the extension built and
    a benchmark that measured it faster: cuda leads the auto order) the ring takes the next backend that runs the
    inputs, instead of failing with a KeyError. Here the cuda row is made to run the CPU inputs, as on a GPU."""
    import dataclasses

    import fastclip.dispatch as dispatch
    import fastclip.distributed as D
    from fastclip.dispatch import BackendError, supports

    image = torch.randn(6, 16)
    kw = dict(device=image.device, dtype=image.dtype, dim=16)
    before = dispatch.select("contrastive_loss", "auto", **kw).backend
    assert D._ring_backend("auto", image).backend == before
    table = supports("contrastive_loss")
    as_on_a_gpu = dataclasses.replace(table["cuda"], devices=frozenset({"cpu", "cuda"}), unavailable=lambda: None,
                                      dtypes=frozenset({image.dtype}), extra_checks=())
    monkeypatch.setitem(table, "cuda", as_on_a_gpu)
    monkeypatch.setattr(dispatch, "preferred", lambda *a: "cuda")
    assert dispatch.select("contrastive_loss", "auto", **kw) is as_on_a_gpu  # auto would take cuda here
    assert D._ring_backend("auto", image).backend == before  # the ring takes the next one
    with pytest.raises(BackendError, match=r"backend 'cuda' is not run by contrastive_loss with dist_impl='ring' "
                                           r"\(it runs torch, triton, reference\)"):
        D._ring_backend("cuda", image)
    monkeypatch.setenv("FASTCLIP_BACKEND", "cuda")
    with pytest.raises(BackendError, match=r"'cuda' \(FASTCLIP_BACKEND\) is not run by contrastive_loss with "
                                           r"dist_impl='ring'"):
        D._ring_backend("auto", image)
    monkeypatch.setenv("FASTCLIP_BACKEND", "torch")
    assert D._ring_backend("auto", image).backend == "torch"
