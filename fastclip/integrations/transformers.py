"""fastclip inside Hugging Face transformers: the loss of ``CLIPModel`` / ``SiglipModel`` from the embeddings, and
fastclip's flash attention as ``attn_implementation="fastclip"``.

    from fastclip.integrations import transformers as fc_transformers

    model = CLIPModel(config)                    # or SiglipModel, Siglip2Model, from_pretrained(...), *WithProjection
    fc_transformers.patch(model)                 # return_loss=True: fastclip's fused loss; attention: fastclip's
    out = model(input_ids=ids, pixel_values=px, return_loss=True)

    fc_transformers.register()                   # or only the attention, for any model:
    model = CLIPModel.from_pretrained(path, attn_implementation="fastclip")

transformers 5 computes these losses from the N x N logits (``cross_entropy`` both ways for CLIP, ``logsigmoid`` of
every logit for SigLIP), which autograd keeps for the backward. Patched, the loss is ``fastclip.contrastive_loss``
/ ``fastclip.siglip_loss`` of ``image_embeds``, ``text_embeds`` and the model's ``logit_scale`` (and
``logit_bias``): the same value and gradients, and the loss's memory linear in N. The output's
``logits_per_image`` and ``logits_per_text`` are still the model's own (one N x N product, which the loss does not
use).
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from fastclip.functional import contrastive_loss, siglip_loss
from fastclip.nn import MASK_FACTS, causal_pattern
from fastclip.ops.attention import flash_attention

__all__ = ["patch", "unpatch", "register", "attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "fastclip"
# keyword arguments of transformers' attention contract that the kernel does not implement
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def register() -> None:
    """Register ``attention_forward`` in transformers' ``AttentionInterface`` as "fastclip", with SDPA's mask
    format (``AttentionMaskInterface``), so that ``attn_implementation="fastclip"`` works for any model."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _mask_as_padding(mask: Tensor, batch: int, n_q: int, n_k: int) -> Optional[tuple]:
    """A bool (B or 1, 1, S_q, S_k) SDPA mask (True = attend) as (causal, (B, S_k) key padding or None), when it is
    exactly key padding, or causal attention and key padding; else None."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (n_q, n_k) \
            or mask.shape[0] not in (1, batch):
        return None
    if torch.compiler.is_compiling():
        return None

    def answer():
        m = mask[:, 0].expand(batch, n_q, n_k)
        keys = m[:, -1]  # (B, S_k): what the last query sees, every unpadded key under either pattern
        if torch.equal(m, keys[:, None, :].expand_as(m)):
            return False, ~keys
        if n_q == n_k and torch.equal(m, keys[:, None, :] & ~causal_pattern(n_q, n_k, m.device)):
            return True, ~keys
        return None

    return MASK_FACTS.get(mask, ("hf", batch, n_q, n_k), answer)


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs):
    """transformers' attention-function contract on ``fastclip.flash_attention``.

    q, k, v are (B, H, S, D); returns ((B, S_q, H, D), None) as ``sdpa_attention_forward`` does. Causal attention is
    decided as there (``is_causal`` else ``module.is_causal``, only without a mask and for S_q > 1). The fused kernel
    runs for no mask, key padding, or causal with key padding (bool masks from ``sdpa_mask``, recognised by value
    once per mask tensor), equal heads for q and k, no dropout; anything else (other masks, dropout, grouped-query
    heads, ``softcap``/``position_bias``...) runs transformers' own ``sdpa_attention_forward``, unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fallback():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    if dropout or any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS) or key.shape[1] != query.shape[1]:
        return fallback()
    batch, _, n_q, _ = query.shape
    n_k = key.shape[2]
    causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    padding = None
    if attention_mask is None:
        causal = bool(n_q > 1 and causal_flag)
        if causal and n_k != n_q:  # SDPA crops the keys there: leave it to SDPA
            return fallback()
    else:
        plan = _mask_as_padding(attention_mask, batch, n_q, n_k)
        if plan is None:
            return fallback()
        causal, padding = plan
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                          key_padding_mask=padding, softmax_scale=scaling)  # (B, S_q, H, D)
    return out, None


def _loss_kind(model) -> str:
    from transformers import CLIPModel, Siglip2Model, SiglipModel

    if isinstance(model, CLIPModel):
        return "clip"
    if isinstance(model, (SiglipModel, Siglip2Model)):
        return "siglip"
    return ""


def patch(model, *, attention: bool = True, loss: bool = True, backend: str = "auto"):
    """Make ``model`` use fastclip, in place; returns ``model``.

    Args:
        model: a transformers ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model`` (loss and attention), or any
            other transformers model (attention only: ``CLIPTextModelWithProjection``,
            ``CLIPVisionModelWithProjection``...).
        attention: ``register()`` and ``model.set_attn_implementation("fastclip")``.
        loss: ``forward(..., return_loss=True)`` computes the loss with fastclip's fused loss from
            ``image_embeds`` and ``text_embeds`` (CLIP: ``contrastive_loss`` with ``logit_scale.exp()``; SigLIP:
            ``siglip_loss`` with ``logit_scale.exp()`` and ``logit_bias``).
        backend: fastclip's backend for the loss.
    """
    kind = _loss_kind(model)
    if loss and not kind:
        raise TypeError(f"fastclip computes the loss of CLIPModel, SiglipModel and Siglip2Model, got "
                        f"{type(model).__name__}; "
                        f"pass loss=False to patch only the attention")
    if getattr(model, "_fastclip_forward", None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already patched by fastclip; call unpatch(model) first")
    if attention:
        register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if loss:
        model._fastclip_forward = model.forward
        model.forward = _forward_with_loss(model, kind, backend)
    return model


def unpatch(model):
    """Undo ``patch(model)``'s loss (the attention implementation is left as it is: ``set_attn_implementation``)."""
    if getattr(model, "_fastclip_forward", None) is not None:
        del model.forward
        model._fastclip_forward = None
    return model


def _forward_with_loss(model, kind: str, backend: str):
    original = model.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        return_loss = bound.arguments.get("return_loss")
        return_dict = bound.arguments.get("kwargs", {}).get("return_dict")
        return_dict = getattr(model.config, "return_dict", True) if return_dict is None else return_dict
        if not return_loss:
            return original(*args, **kwargs)
        bound.arguments["return_loss"] = False
        bound.arguments.setdefault("kwargs", {})["return_dict"] = True
        out = original(*bound.args, **bound.kwargs)
        image, text = out.image_embeds, out.text_embeds
        image = image.to(text.device)
        scale = model.logit_scale.to(text.device).exp()
        if kind == "clip":
            loss = contrastive_loss(image, text, scale, backend=backend)
        else:
            loss = siglip_loss(image, text, scale, model.logit_bias.to(text.device), backend=backend)
        out = type(out)(loss=loss, **out)  # the loss first, as the model's own output has it
        return out if return_dict else out.to_tuple()

    return forward
