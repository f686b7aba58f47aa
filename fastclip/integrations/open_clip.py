"""fastclip inside open_clip: its ``create_loss`` builds fastclip's losses, its models run fastclip's attention.

    from fastclip.integrations import open_clip as fc_open_clip

    fc_open_clip.patch()                          # create_loss -> fastclip.ContrastiveLoss / SigLIPLoss
    ...
    fc_open_clip.unpatch()

    with fc_open_clip.patch(attention=True, dist_impl="ring"):   # and every model open_clip creates
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")

    fc_open_clip.replace_attention(model)         # a model you already have, in place

The losses take ``ClipLoss`` / ``SigLipLoss``'s arguments as ``create_loss`` passes them, so values and gradients
are open_clip's (see ``fastclip.ContrastiveLoss``). Distillation and CoCa keep open_clip's own losses.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch import nn

from fastclip.losses import ContrastiveLoss, SigLIPLoss
from fastclip.nn import MultiheadAttention

__all__ = ["patch", "unpatch", "replace_attention"]

# (namespace, attribute, original value) for every attribute patch() replaced
_replaced: list = []


class _Patched:
    """What ``patch()`` returns: the patch is already applied; ``with`` undoes it on exit."""

    def __enter__(self) -> "_Patched":
        return self

    def __exit__(self, *exc) -> None:
        unpatch()


def _set(namespace, name: str, value) -> None:
    _replaced.append((namespace, name, getattr(namespace, name)))
    setattr(namespace, name, value)


def patch(*, attention: bool = False, backend: str = "auto", dist_impl: Optional[str] = None,
          chunk_size: Optional[int] = None) -> _Patched:
    """Make ``open_clip.create_loss`` build ``fastclip.ContrastiveLoss`` (for ``ClipLoss``) and
    ``fastclip.SigLIPLoss`` (for ``SigLipLoss``) with the arguments it passes, plus these:

    Args:
        attention: also run fastclip's attention in every model ``open_clip.create_model`` (and so
            ``create_model_and_transforms`` / ``create_model_from_pretrained``) returns: ``replace_attention``.
        backend: fastclip's backend for the losses and the attention ("auto", "torch", "triton", ...).
        dist_impl: the losses' exchange across processes: "ring" (both losses), or SigLIP's "bidir", "shift",
            "reduce", "gather"; None keeps what open_clip asks for. It replaces open_clip's ``--loss-dist-impl``.
        chunk_size: rows per chunk on the "torch" backend.

    Returns an object usable as a context manager that calls ``unpatch()`` on exit. Patching twice without
    ``unpatch()`` raises RuntimeError.
    """
    import open_clip
    import open_clip.factory as factory

    if _replaced:
        raise RuntimeError("open_clip is already patched by fastclip; call fastclip.integrations.open_clip.unpatch() "
                           "first")
    options = dict(backend=backend, chunk_size=chunk_size)

    def clip_loss(*args, **kwargs):
        return ContrastiveLoss(*args, **kwargs, dist_impl=dist_impl, **options)

    def siglip_loss(*args, **kwargs):
        if dist_impl is not None:
            kwargs["dist_impl"] = dist_impl
        return SigLIPLoss(*args, **kwargs, **options)

    _set(factory, "ClipLoss", clip_loss)
    _set(factory, "SigLipLoss", siglip_loss)
    if attention:
        create_model = factory.create_model

        @functools.wraps(create_model)
        def create_model_with_fastclip_attention(*args, **kwargs):
            model = create_model(*args, **kwargs)
            replace_attention(model, backend=backend)
            return model

        _set(factory, "create_model", create_model_with_fastclip_attention)
        if open_clip.create_model is create_model:
            _set(open_clip, "create_model", create_model_with_fastclip_attention)
    return _Patched()


def unpatch() -> None:
    """Undo ``patch()`` (nothing to do if not patched)."""
    while _replaced:
        namespace, name, original = _replaced.pop()
        setattr(namespace, name, original)


def replace_attention(model: nn.Module, *, backend: str = "auto") -> List[str]:
    """Replace every ``torch.nn.MultiheadAttention`` in ``model`` by ``fastclip.nn.MultiheadAttention``, in place.

    Works for any model (open_clip's CLIP, CustomTextCLIP, CoCa...): the new layers hold the same Parameter objects,
    so state-dict keys, checkpoints and an optimizer built before stay valid, and they compute what torch's layers
    compute (fused where the kernel covers the call, torch's own path otherwise: see ``fastclip.nn``). Layers of
    other classes (open_clip's ``Attention`` with scaled cosine attention, timm or Hugging Face towers, the
    ModifiedResNet's attention pool) are left as they are.

    Returns the qualified names of the replaced layers.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("replace_attention cannot change a TorchScript model; create it without jit/--torchscript")
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                setattr(parent, name, MultiheadAttention.from_torch(child, backend=backend))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced
