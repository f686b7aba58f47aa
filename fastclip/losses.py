"""``nn.Module`` losses with open_clip's signatures. They hold arguments and call ``fastclip.functional``."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from fastclip import functional as F
from fastclip._checks import amp_cast, amp_loss_dtype, autocast_dtype, check_chunk_size


def _autocast_once(loss_in_fp32: bool):
    """A distributed forward under autocast: the features cast once to the autocast dtype, then every block, chunk
    and collective run with autocast off, so all of them see one dtype (each rank casts alike). The loss is fp32
    (``loss_in_fp32``: as open_clip's cross_entropy under autocast) or, as open_clip's SigLIP, in the features'
    dtype promoted with the autocast dtype."""
    def wrap(forward):
        @functools.wraps(forward)
        def run(self, image_features, text_features, logit_scale, logit_bias):
            amp = autocast_dtype(image_features.device)
            if amp is None:
                return forward(self, image_features, text_features, logit_scale, logit_bias)
            dtype = image_features.dtype
            with torch.autocast(image_features.device.type, enabled=False):
                loss = forward(self, amp_cast(image_features, amp), amp_cast(text_features, amp), logit_scale,
                               logit_bias)
            return loss.to(amp_loss_dtype(dtype, amp, fp32_under_autocast=loss_in_fp32))
        return run
    return wrap


class _PairLoss(nn.Module):
    """What both losses hold: the process's place in the group, the backend and the chunking."""

    def __init__(self, cache_labels: bool, rank: int, world_size: int, dist_impl: Optional[str], backend: str,
                 chunk_size: Optional[int], group):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        check_chunk_size(chunk_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend
        self.chunk_size = chunk_size
        self.group = group


class ContrastiveLoss(_PairLoss):
    """Drop-in for open_clip's ``ClipLoss``: same arguments, same values and gradients, memory linear in N.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns a 0-d
    tensor, or ``{"contrastive_loss": loss}`` with ``output_dict=True``. ``logit_scale`` arrives exponentiated.

    The positional arguments are ``ClipLoss``'s, in its order: ``local_loss``, ``gather_with_grad``,
    ``cache_labels`` (accepted for compatibility; fastclip never builds labels), ``rank``, ``world_size``,
    ``use_horovod`` (only False: fastclip communicates through torch.distributed; True raises ValueError).
    Keyword-only extras: ``backend`` ("auto", "reference", "torch", "triton", "cuda"), ``chunk_size`` (rows per
    chunk on the "torch" backend), ``label_smoothing`` (``F.cross_entropy``'s meaning, both directions),
    ``dist_impl`` (None: open_clip's all_gather; "ring": see below) and ``group`` (a torch.distributed process
    group; None: the default one).

    With ``world_size > 1`` (torch.distributed initialized; every rank the same batch size, dim and dtype, else every
    rank raises ValueError), per rank r, W = world_size, L = the loss of the global batch:
      - local_loss=False (either gather_with_grad): returns L on every rank (the global logits, memory linear in
        N_global); gradients: dlogit_scale = dL/ds on every rank; features dL/dI_r with gather_with_grad=False
        (open_clip's default: after DDP's averaging the towers get 1/W of dL/dtheta, as in open_clip),
        W dL/dI_r with gather_with_grad=True (after averaging: exactly dL/dtheta).
      - local_loss=True: returns L_r, rank r's rows against all columns (mean over ranks = L); gradients as
        open_clip's: with gather_with_grad=True, dI_r = d(sum_k L_k)/dI_r and dlogit_scale = dL_r/ds, so DDP's
        average gives dL/dtheta; with gather_with_grad=False only this rank's own terms reach its features.
      - dist_impl="ring": L on every rank, gradients those of local_loss=False with the same gather_with_grad,
        computed by passing text blocks around the ring: per-rank memory O(N_local * D), never N_local x N_global.
        local_loss=True and label_smoothing are not supported with the ring.
    Values and gradients equal open_clip 3.x ``ClipLoss`` on every rank (label_smoothing=0).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 chunk_size: Optional[int] = None, label_smoothing: float = 0.0, dist_impl: Optional[str] = None,
                 group=None):
        if use_horovod:
            raise ValueError("use_horovod=True: fastclip's losses communicate through torch.distributed only; "
                             "launch with torchrun (open_clip_train without --horovod)")
        super().__init__(cache_labels, rank, world_size, dist_impl, backend, chunk_size, group)
        if dist_impl not in (None, "gather", "ring"):
            raise ValueError(f"dist_impl={dist_impl!r}: expected None (open_clip's all_gather) or 'ring'")
        if dist_impl == "ring" and local_loss:
            raise ValueError("dist_impl='ring' computes the global loss (local_loss=False); its gradients under "
                             "DDP equal local_loss=True, gather_with_grad=True's. Set local_loss=False")
        if dist_impl == "ring" and label_smoothing:
            raise ValueError("label_smoothing is not supported with dist_impl='ring'")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size == 1:
            loss = F.contrastive_loss(image_features, text_features, logit_scale, logit_bias,
                                      label_smoothing=self.label_smoothing, backend=self.backend,
                                      chunk_size=self.chunk_size)
        else:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    @_autocast_once(loss_in_fp32=True)
    def _distributed(self, image_features, text_features, logit_scale, logit_bias):
        from fastclip import distributed as D

        group, rank, world, scale, bias = D.prepare(self.rank, self.world_size, self.group, image_features,
                                                    text_features, logit_scale, logit_bias)
        if self.dist_impl == "ring":
            return D.contrastive_ring(image_features, text_features, scale, bias, backend=self.backend,
                                      chunk_size=self.chunk_size, group=group, gather_with_grad=self.gather_with_grad)
        if self.gather_with_grad:
            all_image = D.all_gather_with_grad(image_features, group)
            all_text = D.all_gather_with_grad(text_features, group)
        else:
            keep = not self.local_loss  # open_clip puts the local tensors back only for the global loss
            all_image = D.all_gather_no_grad(image_features, rank=rank, group=group, keep_local=keep)
            all_text = D.all_gather_no_grad(text_features, rank=rank, group=group, keep_local=keep)
        if self.local_loss:
            if self.label_smoothing:
                raise ValueError("label_smoothing is not supported with local_loss=True")
            return D.local_contrastive_loss(image_features, text_features, all_image, all_text, scale, bias,
                                            rank=rank, chunk_size=self.chunk_size)
        return F.contrastive_loss(all_image, all_text, scale, bias, label_smoothing=self.label_smoothing,
                                  backend=self.backend, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}, label_smoothing={self.label_smoothing}"
                + (f", dist_impl={self.dist_impl!r}" if self.dist_impl else ""))


class SigLIPLoss(_PairLoss):
    """Drop-in for open_clip's ``SigLipLoss``: same arguments, same values and gradients, memory linear in N.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)`` returns a 0-d tensor, or
    ``{"contrastive_loss": loss}`` (open_clip's key). ``logit_scale`` arrives exponentiated; ``logit_bias`` may be
    None. The positional arguments are ``SigLipLoss``'s, in its order (``cache_labels``, accepted for
    compatibility, ``rank``, ``world_size``, ``dist_impl``). Keyword-only extras: ``backend``, ``chunk_size`` (as
    ContrastiveLoss), ``group`` (process group).

    Maths, one process: S = s I T^T + b, loss = -sum_ij log sigmoid(z_ij S_ij) / N, z = +1 on the diagonal, else -1.

    With ``world_size > 1`` rank r returns L_r = sum over every rank k's text block of the block's loss, divided by
    N_local (positives only in its own block): open_clip's value in every mode, and mean_r L_r is the
    single-process loss of the global batch. Gradients (open_clip's, in every mode): dI_r = dL_r/dI_r,
    dT_r = d(sum_k L_k)/dT_r, dlogit_scale = dL_r/ds, dlogit_bias = dL_r/db; DDP's averaging then gives every
    parameter the gradient of the global loss. ``dist_impl``:
      - 'bidir' (default), 'shift', 'reduce', 'gather': open_clip's exchanges (neighbour sends both ways, one way,
        an all_reduce per rank, one all_gather), each block by fastclip's fused loss;
      - 'ring': text blocks and their gradients travel the ring by point-to-point sends overlapped with compute;
        the gradients are made in the same sweep as the loss, so nothing is recomputed and per-rank memory is
        O(N_local * D).
    Every rank needs the same batch size, dim and dtype (else every rank raises ValueError).
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather", "ring")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto", chunk_size: Optional[int] = None,
                 group=None):
        super().__init__(cache_labels, rank, world_size, dist_impl or "bidir", backend, chunk_size, group)
        if self.dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl={dist_impl!r}: expected one of {self.DIST_IMPLS}")

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        if self.world_size == 1:
            loss = F.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                                 chunk_size=self.chunk_size)
        else:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    @_autocast_once(loss_in_fp32=False)
    def _distributed(self, image_features, text_features, logit_scale, logit_bias):
        from fastclip import distributed as D
        from fastclip.ops.siglip import siglip_block

        group, rank, world, scale, bias = D.prepare(self.rank, self.world_size, self.group, image_features,
                                                    text_features, logit_scale, logit_bias)
        if self.dist_impl == "ring":
            return D.siglip_ring(image_features, text_features, scale, bias, backend=self.backend,
                                 chunk_size=self.chunk_size, group=group)

        def block(text, negative_only):
            return siglip_block(image_features, text, scale, bias, negative_only=negative_only,
                                backend=self.backend, chunk_size=self.chunk_size)

        loss = block(text_features, False)
        right, left = (rank + 1) % world, (rank - 1) % world
        # the four exchanges as open_clip's SigLipLoss.forward, with fastclip's blocks
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            num_bidir, remainder = divmod(world - 1, 2)
            for _ in range(num_bidir):
                received = D.neighbour_exchange_bidir_with_grad(left, right, to_left, to_right, group)
                for t in received:
                    loss = loss + block(t, True)
                to_left, to_right = received
            if remainder:
                loss = loss + block(D.neighbour_exchange_with_grad(left, right, to_right, group), True)
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(world - 1):
                from_left = D.neighbour_exchange_with_grad(left, right, to_right, group)
                loss = loss + block(from_left, True)
                to_right = from_left
        elif self.dist_impl == "reduce":
            for i in range(world):
                from_i = D.all_reduce_with_grad(text_features * (rank == i), group)
                if i != rank:
                    loss = loss + block(from_i, True)
                else:
                    # keep the all_reduce in the graph, as open_clip's "0 * loss" does: its backward is a
                    # collective that every rank must join
                    loss = loss + 0.0 * from_i.sum()
        else:  # gather
            all_text = D.all_gather_with_grad(text_features, group).chunk(world)
            for i in range(world):
                if i != rank:
                    loss = loss + block(all_text[i], True)
        return loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"backend={self.backend!r}")
