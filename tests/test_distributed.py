"""Both losses across 2 and 3 gloo processes, every mode against open_clip on every rank, values and gradients.

Process start-up is the expensive part on a small CPU, so each world size is spawned once (a module fixture) and
every check runs inside the workers; each check's outcome (None or a traceback) comes back per rank, and one test
per (world size, check) reports it.
"""
import os
import pickle
import tempfile
import traceback

import pytest
import torch

pytest.importorskip("open_clip.loss")

WORLD_SIZES = (2, 3)
N_LOCAL, DIM = 5, 7  # odd sizes; fp64 on the torch/reference backends

CLIP_CHECKS = [f"clip_local{int(lo)}_gwg{int(g)}{'_bias' if b else ''}" for lo in (0, 1) for g in (0, 1)
               for b in (False, True)]
RING_CHECKS = ["clip_ring_gwg1", "clip_ring_gwg0_bias", "clip_ring_reference", "clip_ring_triton_fp32",
               "clip_ring_mean_equals_global", "clip_local_mean_equals_global"]
SIGLIP_CHECKS = [f"siglip_{m}" for m in ("bidir", "shift", "reduce", "gather", "ring")] + [
    "siglip_ring_nobias", "siglip_ring_triton_fp32", "siglip_ring_reference", "siglip_ring_mean_equals_global",
    "siglip_ring_no_grad", "siglip_bidir_triton_fp16"]
AUTOCAST_CHECKS = [f"autocast_bf16_{m}" for m in ("clip_gather", "clip_ring", "siglip_bidir", "siglip_ring")]
ERROR_CHECKS = ["shape_mismatch_every_rank_raises", "bad_input_on_one_rank", "group_subset"]
CHECKS = CLIP_CHECKS + RING_CHECKS + SIGLIP_CHECKS + AUTOCAST_CHECKS + ERROR_CHECKS


# ---------------------------------------------------------------------------------------------------------------
# What runs inside each process


def _global_inputs(world, dtype=torch.float64, *, seed=1234, bias=-2.0, scale=10.0):
    # the same global batch on every rank (a seeded generator), never zeros
    g = torch.Generator().manual_seed(seed)
    n = N_LOCAL * world
    img = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(scale, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64) if bias is not None else None
    return [t.to(dtype) if t is not None else None for t in (img, txt, s, b)]


def _local_leaves(glob, rank, dtype=None):
    img, txt, s, b = glob
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    out = [img[sl], txt[sl], s, b]
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in out]


def _run(fn, leaves):
    leaves = [t for t in leaves]
    loss = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), grads


def _compare(name, out, ref, rtol, atol):
    from tests.helpers import assert_close

    assert_close(name, out.double(), ref.double(), rtol=rtol, atol=atol)


def _compare_runs(ours, ref, rtol=1e-10, atol=1e-12):
    (l1, g1), (l2, g2) = ours, ref
    _compare("loss", l1, l2, rtol, atol)
    for name, a, b in zip(("d_image", "d_text", "d_logit_scale", "d_logit_bias"), g1, g2):
        _compare(name, a, b, rtol, atol)


def _worker(rank, world, store, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import fastclip
    from open_clip.loss import ClipLoss, SigLipLoss

    from fastclip.ops.contrastive.reference import contrastive_loss_ref
    from fastclip.ops.siglip.reference import siglip_loss_ref

    results = {}

    def check(name):
        def deco(fn):
            try:
                fn()
                results[name] = None
            except Exception:  # noqa: BLE001
                results[name] = traceback.format_exc()
            dist.barrier()  # keep the ranks in step even when a check failed on one of them
            return fn
        return deco

    # ---- ContrastiveLoss, open_clip's four gather modes
    for lo in (0, 1):
        for g in (0, 1):
            for with_bias in (False, True):
                @check(f"clip_local{lo}_gwg{g}{'_bias' if with_bias else ''}")
                def _(lo=lo, g=g, with_bias=with_bias):
                    glob = _global_inputs(world, bias=0.5 if with_bias else None, scale=20.0)
                    ours = _run(fastclip.ContrastiveLoss(bool(lo), bool(g), rank=rank, world_size=world,
                                                         backend="torch", chunk_size=3), _local_leaves(glob, rank))
                    ref = _run(ClipLoss(bool(lo), bool(g), rank=rank, world_size=world), _local_leaves(glob, rank))
                    _compare_runs(ours, ref)

    # ---- the contrastive ring
    for name, gwg, bias, backend, dtype in [("clip_ring_gwg1", True, -1.0, "torch", torch.float64),
                                            ("clip_ring_gwg0_bias", False, 3.0, "torch", torch.float64),
                                            ("clip_ring_reference", True, None, "reference", torch.float64),
                                            ("clip_ring_triton_fp32", True, -1.0, "triton", torch.float32)]:
        @check(name)
        def _(gwg=gwg, bias=bias, backend=backend, dtype=dtype):
            glob = _global_inputs(world, bias=bias, scale=30.0)
            ours = _run(fastclip.ContrastiveLoss(gather_with_grad=gwg, rank=rank, world_size=world, backend=backend,
                                                 dist_impl="ring", chunk_size=2), _local_leaves(glob, rank, dtype))
            ref = _run(ClipLoss(False, gwg, rank=rank, world_size=world), _local_leaves(glob, rank))
            if dtype == torch.float64:
                _compare_runs(ours, ref)
            else:
                _compare_runs(ours, ref, rtol=2e-5, atol=2e-6)

    def mean_equals_global(loss_fn, ref_fn, glob):
        """mean_r L_r == the single-process loss; the ranks' gradients match its gradient under DDP's averaging:
        dI_r / W == dL/dI (rows of rank r), mean_r dlogit_scale_r == dL/ds."""
        loss, grads = _run(loss_fn, _local_leaves(glob, rank))
        single, sgrads = _run(ref_fn, [t.detach().clone().requires_grad_() if t is not None else None for t in glob])
        stacked = torch.cat([loss.reshape(1)] + [g.reshape(-1) for g in grads])
        every = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(every, stacked)
        losses = torch.stack([e[0] for e in every])
        _compare("mean loss", losses.mean(), single, 1e-12, 1e-12)
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        _compare("d_image / W", grads[0] / world, sgrads[0][sl], 1e-10, 1e-12)
        _compare("d_text / W", grads[1] / world, sgrads[1][sl], 1e-10, 1e-12)
        k = 1 + grads[0].numel() + grads[1].numel()
        scale_grads = torch.stack([e[k] for e in every])
        _compare("mean d_logit_scale", scale_grads.mean(), sgrads[2], 1e-10, 1e-12)
        if len(grads) > 3:
            _compare("mean d_logit_bias", torch.stack([e[k + 1] for e in every]).mean(), sgrads[3], 1e-10, 1e-12)

    @check("clip_ring_mean_equals_global")
    def _():
        glob = _global_inputs(world, bias=None, scale=15.0)
        mean_equals_global(fastclip.ContrastiveLoss(gather_with_grad=True, rank=rank, world_size=world,
                                                    dist_impl="ring", backend="torch"),
                           contrastive_loss_ref, glob)

    @check("clip_local_mean_equals_global")
    def _():
        glob = _global_inputs(world, bias=None, scale=15.0)
        mean_equals_global(fastclip.ContrastiveLoss(True, True, rank=rank, world_size=world, backend="torch"),
                           contrastive_loss_ref, glob)

    # ---- SigLIPLoss: open_clip's four modes and the ring
    for mode in ("bidir", "shift", "reduce", "gather", "ring"):
        @check(f"siglip_{mode}")
        def _(mode=mode):
            glob = _global_inputs(world, bias=-3.0, scale=10.0)
            ours = _run(fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl=mode, backend="torch",
                                            chunk_size=2), _local_leaves(glob, rank))
            ref = _run(SigLipLoss(rank=rank, world_size=world, dist_impl="bidir" if mode == "ring" else mode),
                       _local_leaves(glob, rank))
            _compare_runs(ours, ref)

    for name, backend, dtype, bias, mode in [("siglip_ring_nobias", "torch", torch.float64, None, "ring"),
                                             ("siglip_ring_triton_fp32", "triton", torch.float32, -4.0, "ring"),
                                             ("siglip_ring_reference", "reference", torch.float64, 1.0, "ring"),
                                             ("siglip_bidir_triton_fp16", "triton", torch.float16, -4.0, "bidir")]:
        @check(name)
        def _(backend=backend, dtype=dtype, bias=bias, mode=mode):
            glob = _global_inputs(world, bias=bias, scale=10.0)
            ours = _run(fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl=mode, backend=backend),
                        _local_leaves(glob, rank, dtype))
            ref = _run(SigLipLoss(rank=rank, world_size=world), _local_leaves(glob, rank))
            if dtype == torch.float64:
                _compare_runs(ours, ref)
            elif dtype == torch.float32:
                _compare_runs(ours, ref, rtol=2e-5, atol=2e-6)
            else:
                _compare_runs(ours, ref, rtol=5e-3, atol=1e-3)

    @check("siglip_ring_mean_equals_global")
    def _():
        glob = _global_inputs(world, bias=-1.5, scale=7.0)
        mean_equals_global(fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring", backend="torch"),
                           siglip_loss_ref, glob)

    # ---- under CPU autocast (bf16) with fp32 features, as AMP training hands them over: open_clip's dtype for the
    # loss, fp32 gradients, values as open_clip's within its own bf16-logit rounding
    for mode, ours_fn, ref_fn in [
            ("clip_gather", lambda: fastclip.ContrastiveLoss(rank=rank, world_size=world),
             lambda: ClipLoss(rank=rank, world_size=world)),
            ("clip_ring", lambda: fastclip.ContrastiveLoss(gather_with_grad=True, rank=rank, world_size=world,
                                                           dist_impl="ring"),
             lambda: ClipLoss(gather_with_grad=True, rank=rank, world_size=world)),
            ("siglip_bidir", lambda: fastclip.SigLIPLoss(rank=rank, world_size=world),
             lambda: SigLipLoss(rank=rank, world_size=world)),
            ("siglip_ring", lambda: fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring"),
             lambda: SigLipLoss(rank=rank, world_size=world))]:
        @check(f"autocast_bf16_{mode}")
        def _(ours_fn=ours_fn, ref_fn=ref_fn, mode=mode):
            glob = _global_inputs(world, torch.float32, bias=-2.0 if "siglip" in mode else None, scale=10.0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours = _run(ours_fn(), _local_leaves(glob, rank))
                ref = _run(ref_fn(), _local_leaves(glob, rank))
            assert ours[0].dtype == ref[0].dtype == torch.float32, (ours[0].dtype, ref[0].dtype)
            assert all(g.dtype == torch.float32 for g in ours[1]), [g.dtype for g in ours[1]]
            _compare_runs(ours, ref, rtol=3e-2, atol=3e-3)

    @check("siglip_ring_no_grad")
    def _():
        glob = _global_inputs(world, bias=-1.5, scale=7.0)
        leaves = _local_leaves(glob, rank)
        fn = fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring")
        with torch.no_grad():
            a = fn(*leaves)
        b = SigLipLoss(rank=rank, world_size=world)(*[t.detach() for t in leaves])
        _compare("loss", a, b, 1e-12, 1e-12)
        c = fastclip.ContrastiveLoss(rank=rank, world_size=world, dist_impl="ring")(*[t.detach() for t in leaves])
        d = ClipLoss(rank=rank, world_size=world)(*[t.detach() for t in leaves])
        _compare("clip loss", c, d, 1e-12, 1e-12)

    # ---- errors: every rank raises, nobody hangs
    @check("shape_mismatch_every_rank_raises")
    def _():
        glob = _global_inputs(world)
        for cls, kw in [(fastclip.SigLIPLoss, dict(dist_impl="ring")), (fastclip.SigLIPLoss, {}),
                        (fastclip.ContrastiveLoss, {}), (fastclip.ContrastiveLoss, dict(dist_impl="ring"))]:
            img, txt, s, b = _local_leaves(glob, rank)
            if rank == world - 1:
                img, txt = img[:-1], txt[:-1]  # the last batch of an epoch, smaller on one rank
            try:
                cls(rank=rank, world_size=world, **kw)(img, txt, s, b)
            except ValueError as e:
                assert "differ in shape" in str(e) and f"rank {world - 1}: image_features ({N_LOCAL - 1}, {DIM})" \
                    in str(e), str(e)
            else:
                raise AssertionError(f"{cls.__name__}({kw}) did not raise")

    @check("bad_input_on_one_rank")
    def _():
        glob = _global_inputs(world)
        img, txt, s, b = _local_leaves(glob, rank)
        if rank == 0:
            txt = txt[:, :-1]  # a dim mismatch between this rank's own image and text features
        try:
            fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl="ring")(img, txt, s, b)
        except ValueError as e:
            want = "different feature dims" if rank == 0 else "rank(s) [0]"
            assert want in str(e), str(e)
        else:
            raise AssertionError("did not raise")

    @check("group_subset")
    def _():
        # a process group of two ranks (the first and the last); the others sit out
        members = [0, world - 1]
        group = dist.new_group(members)
        if rank not in members:
            return
        sub_rank, sub_world = members.index(rank), len(members)
        glob = _global_inputs(sub_world, bias=-2.0, scale=12.0)
        for loss_fn, ref_fn in [
            (fastclip.SigLIPLoss(rank=sub_rank, world_size=sub_world, dist_impl="ring", group=group),
             siglip_loss_ref),
            (fastclip.SigLIPLoss(rank=sub_rank, world_size=sub_world, dist_impl="shift", group=group),
             siglip_loss_ref),
            (fastclip.ContrastiveLoss(gather_with_grad=True, rank=sub_rank, world_size=sub_world, dist_impl="ring",
                                      group=group), contrastive_loss_ref),
            (fastclip.ContrastiveLoss(True, True, rank=sub_rank, world_size=sub_world, group=group),
             contrastive_loss_ref),
        ]:
            loss, grads = _run(loss_fn, _local_leaves(glob, sub_rank))
            single, sgrads = _run(ref_fn, [t.detach().clone().requires_grad_() for t in glob])
            total = loss.reshape(1).clone()
            dist.all_reduce(total, group=group)
            _compare("mean loss", total[0] / sub_world, single, 1e-12, 1e-12)
            sl = slice(sub_rank * N_LOCAL, (sub_rank + 1) * N_LOCAL)
            _compare("d_image / W", grads[0] / sub_world, sgrads[0][sl], 1e-10, 1e-12)

    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world_results(request):
    import torch.multiprocessing as mp

    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        per_rank = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    return world, per_rank


@pytest.mark.parametrize("check", CHECKS)
def test_distributed(world_results, check):
    world, per_rank = world_results
    failures = [f"--- rank {r} of {world}:\n{res[check]}" for r, res in enumerate(per_rank)
                if res.get(check, "did not run") is not None]
    assert not failures, "\n".join(failures)
