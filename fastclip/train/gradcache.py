"""One training step's gradients, on the whole batch at once or by gradient caching (GradCache, Gao et al. 2021).

Gradient caching with micro-batches of M samples (``--micro-batch M``), for a model f_theta that maps a batch to
normalized features I, T and the loss L(I, T, s, b):

1. without gradients, run the towers M samples at a time and keep only the features I, T (N x E each);
2. compute L on the whole batch with the features as leaves: dL/dI, dL/dT, dL/ds, dL/db (the memory-linear loss
   adds O(N) beyond them);
3. re-run each micro-batch with gradients and back-propagate its slice:
   d/dtheta <f_theta(x_m), dL/dI_m> summed over m is dL/dtheta by the chain rule, since L depends on theta only
   through the features (and s, b, whose gradients join in the last micro-batch's backward).

The gradients equal the full-batch step's up to the order of summation; peak memory is one micro-batch's
activations plus O(N * E) features and their gradients, independent of N otherwise. Under DDP only the last
backward synchronizes (``no_sync`` before it), so every parameter, the logit scale included, is reduced once.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor


def _loss(loss_fn: Callable, out) -> Tensor:
    image, text, scale = out[:3]
    bias = out[3] if len(out) > 3 else None
    return loss_fn(image, text, scale, bias)


def backward_step(model: Callable, loss_fn: Callable, images: Tensor, texts: Tensor, *,
                  micro_batch: Optional[int] = None, autocast: Callable[[], ContextManager] = nullcontext,
                  no_sync: Optional[Callable[[], ContextManager]] = None) -> Tensor:
    """Accumulate dL/dtheta of the batch (images (N, 3, H, W), texts (N, S)) into the parameters' ``.grad``; return
    the loss (detached).

    ``model(images, texts)`` returns (image_features, text_features, logit_scale[, logit_bias]) as
    ``fastclip.models.CLIP``; ``loss_fn(image, text, scale, bias)`` the loss. ``micro_batch`` None (or >= N): one
    forward and backward on the whole batch; else gradient caching as above. ``no_sync``: DDP's ``model.no_sync``.
    """
    n = images.shape[0]
    if texts.shape[0] != n:
        raise ValueError(f"images ({tuple(images.shape)}) and texts ({tuple(texts.shape)}) differ in batch size")
    if micro_batch is None or micro_batch >= n:
        with autocast():
            loss = _loss(loss_fn, model(images, texts))
        loss.backward()
        return loss.detach()
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    starts = range(0, n, micro_batch)
    # 1. features without gradients
    with torch.no_grad(), autocast():
        outs = [model(images[i:i + micro_batch], texts[i:i + micro_batch]) for i in starts]
    leaves = [torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])] + list(outs[0][2:])
    leaves = [t.detach().requires_grad_() for t in leaves]
    del outs
    # 2. the loss of the whole batch and its gradients with respect to the features, scale and bias
    with autocast():
        loss = _loss(loss_fn, leaves)
    loss.backward()
    grads = [t.grad for t in leaves]
    # 3. each micro-batch again, with gradients; the scale's and bias's gradients ride on the last one
    for k, i in enumerate(starts):
        last = k == len(starts) - 1
        with (nullcontext() if last or no_sync is None else no_sync()):
            with autocast():
                out = model(images[i:i + micro_batch], texts[i:i + micro_batch])
            surrogate = sum((o.float() * g[i:i + micro_batch].float()).sum() for o, g in zip(out[:2], grads[:2]))
            if last:
                surrogate = surrogate + sum((o.float() * g.float()).sum() for o, g in zip(out[2:], grads[2:]))
            surrogate.backward()
    return loss.detach()


__all__ = ["backward_step"]
