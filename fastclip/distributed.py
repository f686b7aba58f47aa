"""Both losses across ranks through torch.distributed: gather-with-grad, neighbour exchanges, and the ring.

Everything here runs on any process group (``group=None``: the default one), NCCL on GPUs or gloo on CPUs.

Collectives with a gradient (``all_gather_with_grad``, ``all_reduce_with_grad``, ``neighbour_exchange*``) are
autograd Functions whose backward is the transposed communication, as in open_clip (and as there, every rank must
run the backward, since the backward communicates).

The rings (``siglip_ring``, ``contrastive_ring``) pass the ranks' text blocks around by point-to-point sends
(``batch_isend_irecv``), each posted before the block in hand is computed, so on a GPU the transfer overlaps the
kernel (NCCL runs on its own stream). Per-rank memory is O(N_local * D) for the blocks in flight plus what one
block's loss needs; no rank ever holds N_local x N_global of anything. See each ring's docstring for exactly what
its returned loss and gradients are.

Before any collective the ranks exchange their feature shapes with one small all_gather (``check_same_shapes``),
so a rank with a different batch size or dim makes every rank raise the same clear error instead of hanging.
"""
from __future__ import annotations

import math

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from fastclip._checks import as_scalar, check_feature_pair
from fastclip.dispatch import select, supports
from fastclip.ops.contrastive.pytorch import _logits, _rowdot, acc_dtype
from fastclip.ops.siglip import _needs_grad

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


# ---------------------------------------------------------------------------------------------------------------
# Set-up and checks


def resolve(rank: int, world_size: int, group=None) -> Tuple[object, int, int]:
    """(group, rank, world_size) after checking that torch.distributed agrees with the loss's arguments."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs torch.distributed initialized "
                           f"(torch.distributed.init_process_group) before the loss is called")
    actual_world = dist.get_world_size(group)
    if actual_world != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {actual_world} ranks")
    return group, dist.get_rank(group), actual_world


def _comm_device(group, like: Optional[Tensor]) -> torch.device:
    # NCCL only moves CUDA tensors; gloo's all_gather wants CPU ones
    if dist.get_backend(group) == "nccl":
        if like is not None and like.device.type == "cuda":
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def prepare(rank: int, world_size: int, group, image: Tensor, text: Tensor, logit_scale, logit_bias):
    """A distributed loss's prologue: the group, every rank's shapes checked to agree, the scalars as tensors.

    The scalars are checked with the features, before the ranks exchange their shapes: a bad ``logit_scale`` on one
    rank makes every rank raise, instead of leaving the others waiting in the loss's first collective.
    Returns (group, rank, world, scale, bias).
    """
    group, rank_in_group, world = resolve(rank, world_size, group)
    scalars = []

    def local_check(image, text):
        check_feature_pair(image, text)
        scalars.append(as_scalar(logit_scale, "logit_scale", image, required=True))
        scalars.append(as_scalar(logit_bias, "logit_bias", image, required=False))

    check_same_shapes(image, text, rank=rank, group=group, local_check=local_check)
    scale, bias = scalars
    return group, rank_in_group, world, scale, bias


def check_same_shapes(image_features, text_features, *, rank: int, group=None, local_check=None) -> None:
    """Raise the same ValueError on every rank unless all ranks hold features of one shape and dtype.

    ``local_check(image, text)`` (optional) validates this rank's inputs; its exception is re-raised here, after the
    exchange, and the other ranks raise a ValueError naming this rank, so nobody waits for a collective that one
    rank will never join.
    """
    local_error = None
    if local_check is not None:
        try:
            local_check(image_features, text_features)
        except (TypeError, ValueError) as e:
            local_error = e
    actual_rank = dist.get_rank(group)
    if local_error is None and rank != actual_rank:
        local_error = ValueError(f"rank={rank} but this process is rank {actual_rank} of the process group")
    world = dist.get_world_size(group)

    def dims(t):
        return list(t.shape) + [0] * (2 - t.dim()) if isinstance(t, Tensor) and t.dim() <= 2 else [-1, -1]

    code = _DTYPE_CODES.get(getattr(image_features, "dtype", None), 0)
    like = image_features if isinstance(image_features, Tensor) else None
    mine = torch.tensor(dims(image_features) + dims(text_features) + [code, int(local_error is not None)],
                        dtype=torch.int64, device=_comm_device(group, like))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows = [t.tolist() for t in every]
    if local_error is not None:
        raise local_error
    bad = [r for r, row in enumerate(rows) if row[5]]
    if bad:
        raise ValueError(f"rank(s) {bad} of the process group got invalid inputs (their own error says why); "
                         f"every rank stops here rather than wait for them")
    if any(row != rows[0] for row in rows):
        names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
        desc = "; ".join(f"rank {r}: image_features {tuple(row[0:2])}, text_features {tuple(row[2:4])}, "
                         f"{names.get(row[4], '?')}" for r, row in enumerate(rows))
        raise ValueError(f"the ranks' features differ in shape or dtype ({desc}); every rank needs the same batch "
                         f"size, feature dim and dtype (drop or pad the last, smaller batch)")


# ---------------------------------------------------------------------------------------------------------------
# Collectives with a gradient


class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's (N, D) block; backward: the sum over ranks of the gradient of this rank's block."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather(list(out.chunk(world)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        # gloo has no reduce_scatter: all-reduce the whole (W N, D) gradient and keep this rank's rows
        dist.all_reduce(grad, group=group)
        return grad.chunk(world)[rank].clone(), None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """(W * N, D): every rank's ``x`` in rank order, differentiable (as ``torch.distributed.nn.all_gather``)."""
    return _AllGather.apply(x, group)


def all_gather_no_grad(x: Tensor, *, rank: int, group=None, keep_local: bool) -> Tensor:
    """(W * N, D) without a gradient through the other ranks' blocks; with ``keep_local`` this rank's block is ``x``
    itself, so the gradient reaches it (open_clip's ``gather_features`` for ``local_loss=False``)."""
    world = dist.get_world_size(group)
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
    if keep_local:
        parts[rank] = x
    return torch.cat(parts, dim=0)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_with_grad(x: Tensor, group=None) -> Tensor:
    """Sum over ranks; backward: the sum over ranks of the gradients (``torch.distributed.nn.all_reduce``)."""
    return _AllReduce.apply(x, group)


def _p2p(sends: Sequence[Tuple[Tensor, int]], recvs: Sequence[Tuple[Tensor, int]], group) -> List:
    """Post sends and receives (peers are ranks within ``group``) as one batch; returns the requests.

    In a group of one rank every peer is the rank itself, which gloo cannot send to: each send is copied into the
    receive of the same position, and nothing is posted."""
    if dist.get_world_size(group) == 1:
        for (t, _), (out, _) in zip(sends, recvs):
            out.copy_(t)
        return []
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=p) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for t, p in recvs]
    return dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def neighbour_exchange(from_rank: int, to_rank: int, x: Tensor, group=None) -> Tensor:
    """Send ``x`` to ``to_rank``, receive the same shape from ``from_rank``."""
    out = torch.empty_like(x)
    _wait(_p2p([(x.contiguous(), to_rank)], [(out, from_rank)], group))
    return out


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, from_rank, to_rank, group, x):
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        return neighbour_exchange(from_rank, to_rank, x, group)

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, ctx.group, grad)


def neighbour_exchange_with_grad(from_rank: int, to_rank: int, x: Tensor, group=None) -> Tensor:
    return _NeighbourExchange.apply(from_rank, to_rank, group, x)


def neighbour_exchange_bidir(left: int, right: int, to_left: Tensor, to_right: Tensor, group=None):
    """Send ``to_left`` left and ``to_right`` right; returns (from the right, from the left)."""
    from_right, from_left = torch.empty_like(to_left), torch.empty_like(to_right)
    _wait(_p2p([(to_right.contiguous(), right), (to_left.contiguous(), left)],
               [(from_right, right), (from_left, left)], group))
    return from_right, from_left


class _NeighbourExchangeBidir(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, right, group, to_left, to_right):
        ctx.left, ctx.right, ctx.group = left, right, group
        return neighbour_exchange_bidir(left, right, to_left, to_right, group)

    @staticmethod
    def backward(ctx, grad_from_right, grad_from_left):
        # what came from the right goes back right, i.e. is "to_left" seen from the swapped pair
        return (None, None, None) + _NeighbourExchangeBidir.apply(ctx.right, ctx.left, ctx.group, grad_from_right,
                                                                   grad_from_left)


def neighbour_exchange_bidir_with_grad(left: int, right: int, to_left: Tensor, to_right: Tensor, group=None):
    return _NeighbourExchangeBidir.apply(left, right, group, to_left, to_right)


# ---------------------------------------------------------------------------------------------------------------
# SigLIP ring


class _SigLIPRing(torch.autograd.Function):
    """Each text block visits every rank once; the gradients ride along, so nothing is recomputed or resent.

    Rank r holds I_r, T_r (N_local rows). Step k = 0 .. W-1 it holds T_(r-k) (its own first, then the one from its
    left neighbour) and adds block_k = sum_ij softplus(-z_ij S_ij) / N_local with S = s I_r T_(r-k)^T + b (positives
    on the diagonal for k = 0 only). When a gradient is wanted the block's gradients for g = 1 are formed in the
    same sweep: dI_r accumulates locally; dT for the visiting block is added to the partial sum that travels with
    it, one hop behind the block, and after W hops arrives back at the block's owner, complete. Communication:
    W - 1 hops of the text block (input dtype) and W hops of its gradient (fp32), each overlapped with a block.
    """

    @staticmethod
    def forward(ctx, image, text, scale, bias, group, fwd, bwd_text, chunk_size, compute_grad):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        left, right = (rank - 1) % world, (rank + 1) % world
        dt = acc_dtype(image.dtype)
        one = torch.ones((), dtype=torch.float32, device=image.device)
        loss = torch.zeros((), dtype=dt, device=image.device)
        d_image = torch.zeros(image.shape, dtype=dt, device=image.device) if compute_grad else None
        d_scale = torch.zeros((), dtype=dt, device=image.device)
        d_bias = torch.zeros((), dtype=dt, device=image.device)
        t = text.detach().contiguous()
        dt_reqs, dt_in, dt_sent = None, None, None
        for k in range(world):
            if k < world - 1:  # the next block is on its way while this one is computed
                t_next = torch.empty_like(t)
                t_reqs = _p2p([(t, right)], [(t_next, left)], group)
            neg = k > 0
            l_k, di_k, dt_k, ds_k, db_k = fwd(image, t, scale, bias, neg, compute_grad, chunk_size)
            loss += l_k
            if compute_grad:
                d_image += di_k
                d_scale += ds_k
                d_bias += db_k
                if dt_k is None:  # the backend leaves dT to a second (transposed) pass: run it now, for g = 1
                    dt_k = bwd_text(one, image, t, scale, bias, neg, chunk_size)
                dt_k = dt_k.to(dt)
                if dt_reqs is not None:
                    _wait(dt_reqs)  # the partial sum of this block's gradient, from the ranks it visited before
                    dt_k += dt_in
                dt_in, dt_sent = torch.empty_like(dt_k), dt_k
                dt_reqs = _p2p([(dt_sent, right)], [(dt_in, left)], group)
            if k < world - 1:
                _wait(t_reqs)
                t = t_next
        if compute_grad:
            _wait(dt_reqs)  # this rank's own text block, back home with every rank's contribution
            ctx.save_for_backward(d_image, dt_in, d_scale, d_bias)
        ctx.has_bias = bias is not None
        ctx.dtypes = (image.dtype, text.dtype, scale.dtype, bias.dtype if bias is not None else None)
        ctx.shapes = (scale.shape, bias.shape if bias is not None else None)
        ctx.compute_grad = compute_grad
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.compute_grad:
            raise RuntimeError("siglip ring: the forward ran without a gradient")
        d_image, d_text, d_scale, d_bias = ctx.saved_tensors
        g = grad.to(d_image.dtype)
        gi = (d_image * g).to(ctx.dtypes[0])
        gt = (d_text * g).to(ctx.dtypes[1])
        gs = (d_scale * g).reshape(ctx.shapes[0]).to(ctx.dtypes[2])
        gb = (d_bias * g).reshape(ctx.shapes[1]).to(ctx.dtypes[3]) if ctx.has_bias else None
        return gi, gt, gs, gb, None, None, None, None, None


def siglip_ring(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], *, backend: str = "auto",
                chunk_size: Optional[int] = None, group=None) -> Tensor:
    """SigLIP's loss over all ranks' texts by the ring (checked, same-shaped features assumed).

    Returns rank r's loss L_r = sum_k block(I_r, T_k) / N_local, exactly what open_clip's ``SigLipLoss`` returns
    on rank r in any of its modes ('bidir', 'shift', 'reduce', 'gather'). Gradients, for upstream gradient g (the
    same on every rank, as in any data-parallel step):
        dI_r = g dL_r/dI_r;  dT_r = g d(sum_k L_k)/dT_r;  dlogit_scale, dlogit_bias = g dL_r/ds, g dL_r/db.
    These too are open_clip's. So mean_r L_r is the single-process loss of the global batch and, after DDP averages
    the parameters' gradients over ranks, every parameter (towers, logit_scale, logit_bias) has the gradient of
    that global loss: nothing is multiplied by world_size.
    """
    fwd, bwd_text, chunk = _siglip_block_impls(image, backend, chunk_size)
    compute_grad = _needs_grad(image, text, scale, bias)
    return _SigLIPRing.apply(image, text, scale, bias, group, fwd, bwd_text, chunk, compute_grad)


def _siglip_block_impls(image: Tensor, backend: str, chunk_size: Optional[int]):
    row = select("siglip_loss", backend, device=image.device, dtype=image.dtype, dim=image.shape[1])
    if row.backend == "reference":
        # the naive maths as one chunk: the torch path with chunk = N materializes the N_local^2 block, no more
        fwd, bwd_text = supports("siglip_loss")["torch"].impl
        return fwd, bwd_text, image.shape[0]
    fwd, bwd_text = row.impl
    return fwd, bwd_text, chunk_size


# ---------------------------------------------------------------------------------------------------------------
# Contrastive ring


def _lse_merge(a: Optional[Tensor], b: Tensor) -> Tensor:
    return b if a is None else torch.logaddexp(a, b)


# A block forward saves its row/column statistics as (2, n) = (max, log-sum) in its backend's log base; one unit
# of it is this many natural-log units (see fastclip/ops/contrastive/pytorch.py and triton.py).
_STATS_UNIT = {"torch": 1.0, "triton": math.log(2.0)}


def _lse_from_stats(stats: Tensor, unit: float) -> Tensor:
    return stats.sum(0) * unit  # (n,) natural-log lse


def _others_term(stats: Tensor, others: Optional[Tensor], unit: float) -> Tensor:
    """log(1 + sum_others / sum_0) = softplus(others - lse_0), (n,) natural log: what the other blocks, of
    natural-log lse ``others`` (None: there are none), add to the diagonal block's lse (its statistics (2, n) =
    (max m, log-sum l) in ``unit``). Extending (m, l) by it keeps the diagonal block's max, so a confident row keeps
    S_ii - m = 0 and its small log-sum exact, where a merged (lse, 0) would carry the rounding of an lse of ~50
    (4e-6 in fp32) into P_ii - 1 ~ 1e-7."""
    if others is None:
        return torch.zeros_like(stats[1])
    x = others - _lse_from_stats(stats, unit)
    return torch.logaddexp(torch.zeros_like(x), x)  # softplus without F.softplus's cut to x above x = 20


class _ContrastiveRing(torch.autograd.Function):
    """Global CLIP loss with text blocks (and their statistics) travelling around the ring, twice.

    Forward, step k: rank r holds T_(r-k) and the partial column log-sum-exp of T_(r-k) over the off-diagonal image
    blocks it has visited. The square block S = s I_r T_(r-k)^T + b gives (contrastive fwd of one block, any
    backend) a row lse over its columns and a column lse over I_r's rows. The diagonal block (k = 0) keeps its own
    loss L_0 and statistics; the others' row lses are merged locally, their column lses into the travelling one,
    which goes right one hop behind the block: after W hops it is home, holding every other block's column lse.
    Each row's -log P_ii is then the diagonal block's plus log(1 + sum_others / sum_0) = softplus(lse_others -
    lse_0), so no lse of ~50 is ever subtracted from S_ii (which cancels to nothing in a confident fp32 row):
        local_r = 2 n L_0 + sum_i softplus(row_others_i - row_0_i) + sum_j softplus(col_others_j - col_0_j);
        L = sum_r local_r / (2 N_global)  (all_reduce).
    Backward: the text blocks travel again with their global column statistics, (the diagonal block's max, log-sum
    extended by the others); each block's gradients are the contrastive backward of one block with the global
    statistics: P + Q - 2 delta for the diagonal block, P + Q (``targets=False``) for the others, which hold no
    positive pair. dI accumulates locally, dT rides along as in the SigLIP ring. d(logit_scale) is all-reduced.
    """

    @staticmethod
    def forward(ctx, image, text, scale, bias, group, fwd, bwd, chunk_size, block_dtype, feature_factor, unit):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        left, right = (rank - 1) % world, (rank + 1) % world
        n = image.shape[0]
        dt = acc_dtype(image.dtype)
        a = image.detach().to(block_dtype).contiguous()
        t = text.detach().to(block_dtype).contiguous()
        t_own = t
        row_others, col_reqs, col_in = None, None, None
        for k in range(world):
            if k < world - 1:
                t_next = torch.empty_like(t)
                t_reqs = _p2p([(t, right)], [(t_next, left)], group)
            loss_k, r_k, c_k = fwd(a, t, scale, bias, 0.0, chunk_size)
            if k == 0:  # the diagonal block: its loss and statistics stay here
                loss_0, row_0, col_0 = loss_k.to(dt), r_k.to(dt), c_k.to(dt)
                c_k = torch.full((n,), float("-inf"), dtype=dt, device=a.device)  # no other block's columns yet
            else:
                row_others = _lse_merge(row_others, _lse_from_stats(r_k.to(dt), unit))
                c_k = _lse_from_stats(c_k.to(dt), unit)
            if col_reqs is not None:
                _wait(col_reqs)
                c_k = torch.logaddexp(c_k, col_in)
            col_in, col_sent = torch.empty_like(c_k), c_k
            col_reqs = _p2p([(col_sent, right)], [(col_in, left)], group)
            if k < world - 1:
                _wait(t_reqs)
                t = t_next
        _wait(col_reqs)
        col_others = col_in if world > 1 else None  # every other image block's column lse of T_r
        row_more, col_more = _others_term(row_0, row_others, unit), _others_term(col_0, col_others, unit)
        total = (2 * n * loss_0 + row_more.sum() + col_more.sum()).reshape(1)
        row_stats = torch.stack([row_0[0], row_0[1] + row_more / unit])  # the global statistics, (2, n)
        col_stats = torch.stack([col_0[0], col_0[1] + col_more / unit])
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(a, t_own, scale, bias, row_stats, col_stats)
        ctx.group, ctx.bwd, ctx.chunk_size, ctx.feature_factor = group, bwd, chunk_size, feature_factor
        ctx.dtypes = (image.dtype, text.dtype)
        return (total[0] / (2 * n * world)).to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, t, scale, bias, row_stats, tc = ctx.saved_tensors
        group, bwd = ctx.group, ctx.bwd
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        left, right = (rank - 1) % world, (rank + 1) % world
        dt = row_stats.dtype
        # the block backward's coefficient is g / (2 N_local) = W g / (2 N_global): W times dL/dS of the global
        # loss. Features keep feature_factor / W of that, logit_scale 1 / W (then summed over ranks).
        # the blocks return d(logit_scale) in the scale's dtype: given the scale in dt, a bf16 logit_scale's
        # per-block values are summed unrounded and rounded once, at the end (as the features' gradients are)
        s_block = scale.detach().to(dt)
        d_image = torch.zeros(a.shape, dtype=dt, device=a.device)
        d_scale = torch.zeros((), dtype=dt, device=a.device)
        dt_reqs, dt_in = None, None
        for k in range(world):
            if k < world - 1:
                t_next, tc_next = torch.empty_like(t), torch.empty_like(tc)
                t_reqs = _p2p([(t, right), (tc, right)], [(t_next, left), (tc_next, left)], group)
            # no positive pair in another rank's block: its backward runs without the targets (undoing them after
            # would cancel a confident row's small gradient against the rounding of -2 s T_i)
            da, db, ds = bwd(grad.reshape(()), a, t, s_block, bias, row_stats, tc, 0.0, ctx.chunk_size,
                             targets=k == 0)
            da, db, ds = da.to(dt), db.to(dt), ds.to(dt).reshape(())
            d_image += da
            d_scale += ds
            if dt_reqs is not None:
                _wait(dt_reqs)
                db += dt_in
            dt_in, dt_sent = torch.empty_like(db), db
            dt_reqs = _p2p([(dt_sent, right)], [(dt_in, left)], group)
            if k < world - 1:
                _wait(t_reqs)
                t, tc = t_next, tc_next
        _wait(dt_reqs)
        d_text = dt_in
        d_scale = d_scale.reshape(1)
        dist.all_reduce(d_scale, group=group)
        f = ctx.feature_factor / world
        gi = (d_image * f).to(ctx.dtypes[0])
        gt = (d_text * f).to(ctx.dtypes[1])
        gs = (d_scale[0] / world).reshape(scale.shape).to(scale.dtype)
        # sum_ij dL/dS_ij = 0: the bias has no gradient (as in the single-process loss)
        gb = torch.zeros_like(bias) if bias is not None else None
        return gi, gt, gs, gb, None, None, None, None, None, None, None


def _ring_backend(backend: str, image: Tensor):
    """The Support row the ring runs. The ring merges its blocks' (max, log-sum) statistics, so it takes only the
    backends whose statistics' log base it knows (``_STATS_UNIT``, and "reference", run as "torch"). The ``cuda``
    backend is not one of them yet (nothing has run it inside the ring): asked for by name or by
    ``FASTCLIP_BACKEND`` it is refused; "auto" skips it."""
    return select("contrastive_loss", backend, device=image.device, dtype=image.dtype, dim=image.shape[1],
                  among=(*_STATS_UNIT, "reference"), caller="contrastive_loss with dist_impl='ring'")


def contrastive_ring(image: Tensor, text: Tensor, scale: Tensor, bias: Optional[Tensor], *, backend: str = "auto",
                     chunk_size: Optional[int] = None, group=None, gather_with_grad: bool = True) -> Tensor:
    """The global CLIP loss by the ring (checked, same-shaped features assumed).

    Every rank returns the same value L, the loss of the global batch: what open_clip's ``ClipLoss(local_loss=False)``
    returns on every rank (and the mean of ``ClipLoss(local_loss=True)``'s per-rank values). Gradients, for
    upstream gradient g (the same on every rank):
        dI_r, dT_r = W g dL/dI_r, W g dL/dT_r  with ``gather_with_grad=True`` (open_clip's gather_with_grad=True);
                     g dL/dI_r, g dL/dT_r     with ``gather_with_grad=False`` (open_clip's default);
        dlogit_scale = g dL/ds on every rank;  dlogit_bias = 0 (L does not depend on the bias).
    So with gather_with_grad=True, after DDP averages the parameters' gradients over ranks, every parameter has the
    gradient of L; logit_scale is not multiplied by world_size. Per-rank values and gradients equal open_clip's
    non-local ClipLoss with the same gather_with_grad. Label smoothing is not supported here.
    """
    row = _ring_backend(backend, image)
    name = "torch" if row.backend == "reference" else row.backend
    chunk = image.shape[0] if row.backend == "reference" else chunk_size
    fwd, bwd = supports("contrastive_loss")[name].impl
    # the torch path computes in the accumulation dtype anyway: giving it that dtype keeps the per-block
    # gradients unrounded until the end; kernels take the input dtype
    block_dtype = acc_dtype(image.dtype) if name == "torch" else image.dtype
    world = dist.get_world_size(group)
    return _ContrastiveRing.apply(image, text, scale, bias, group, fwd, bwd, chunk, block_dtype,
                                  float(world) if gather_with_grad else 1.0, _STATS_UNIT[name])


# ---------------------------------------------------------------------------------------------------------------
# open_clip's local_loss: each rank's rows against all columns, memory O(chunk * N_global)


class _RowCrossEntropy(torch.autograd.Function):
    """sum_i (logsumexp_j S_ij - S_{i, offset + i}) for S = s A B^T + b, A (n, D), B (m, D), by row chunks.

    The backward recomputes each chunk: dL/dS = g (softmax(S) - onehot).
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, offset, chunk):
        dt = acc_dtype(a.dtype)
        aa, bb = a.detach().to(dt), b.detach().to(dt)
        s_val = scale.detach().to(dt).reshape(())
        b_val = bias.detach().to(dt).reshape(()) if bias is not None else None
        n = aa.shape[0]
        lse = torch.empty(n, dtype=dt, device=a.device)
        for i0 in range(0, n, chunk):
            lse[i0:i0 + chunk] = torch.logsumexp(_logits(aa[i0:i0 + chunk], bb, s_val, b_val), dim=1)
        pos = s_val * _rowdot(aa, bb[offset:offset + n], chunk)
        if b_val is not None:
            pos = pos + b_val
        ctx.save_for_backward(a, b, scale, bias, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - pos).sum()

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias, lse = ctx.saved_tensors
        dt = lse.dtype
        aa, bb = a.detach().to(dt), b.detach().to(dt)
        s_val = scale.detach().to(dt).reshape(())
        b_val = bias.detach().to(dt).reshape(()) if bias is not None else None
        n, off, chunk = aa.shape[0], ctx.offset, ctx.chunk
        g = grad.to(dt).reshape(())
        da = torch.empty_like(aa)
        dbb = torch.zeros_like(bb)
        ds = torch.zeros((), dtype=dt, device=a.device)
        dbias = torch.zeros((), dtype=dt, device=a.device)
        for i0 in range(0, n, chunk):
            a_c = aa[i0:i0 + chunk]
            x = a_c @ bb.T  # (C, m)
            p = torch.exp(x * s_val + (b_val if b_val is not None else 0.0) - lse[i0:i0 + chunk, None])
            p.diagonal(off + i0).sub_(1.0)  # targets at (r, offset + i0 + r)
            ds += (p * x).sum()
            dbias += p.sum()
            da[i0:i0 + chunk] = p @ bb
            dbb.addmm_(p.T, a_c)
            del x, p
        gs = g * s_val
        return ((da * gs).to(a.dtype), (dbb * gs).to(b.dtype), (ds * g).reshape(scale.shape).to(scale.dtype),
                (dbias * g).reshape(bias.shape).to(bias.dtype) if bias is not None else None, None, None)


def local_contrastive_loss(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor,
                           bias: Optional[Tensor], *, rank: int, chunk_size: Optional[int] = None) -> Tensor:
    """open_clip's ``local_loss=True``: (CE(s I_r all_T^T + b, targets) + CE(s T_r all_I^T + b, targets)) / 2, the
    targets of row i being column rank * N_local + i. Gradients flow wherever the inputs carry them."""
    n = image.shape[0]
    m = all_text.shape[0]
    chunk = max(1, min(n, int(chunk_size) if chunk_size else (1 << 22) // max(m, 1)))
    off = rank * n
    total = (_RowCrossEntropy.apply(image, all_text, scale, bias, off, chunk)
             + _RowCrossEntropy.apply(text, all_image, scale, bias, off, chunk))
    return (total / (2 * n)).to(image.dtype)
