"""``nn.Module`` layers over fastclip's ops. They hold parameters and arguments and call ``fastclip.flash_attention``."""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastclip.ops.attention import flash_attention

__all__ = ["MultiheadAttention"]


class _MaskFacts:
    """What a mask's values say (causal? padding as bool?), remembered while that very tensor lives unmodified.

    Reading a mask's values syncs with the device. A tower passes one mask object to every layer, so with this
    memo the values are read once per forward, not once per layer. An entry holds a weak reference: it answers
    only for the same live tensor at the same version counter (any in-place write bumps it).
    """

    def __init__(self, size: int = 16):
        self._size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, t: Tensor, question: tuple, answer: Callable[[], object]):
        if t.is_inference() or torch.compiler.is_compiling():  # no version counter / nothing to remember
            return answer()
        k = (id(t), question)
        entry = self._entries.get(k)
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
        value = answer()
        self._entries[k] = (weakref.ref(t), t._version, value)
        self._entries.move_to_end(k)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return value


MASK_FACTS = _MaskFacts()


def causal_pattern(n_q: int, n_k: int, device) -> Tensor:
    """(n_q, n_k) bool, True above the diagonal: the keys query i may not see (j > i), torch's bool convention."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu(1)


def _is_causal_mask(attn_mask: Tensor, n_q: int, n_k: int, dtype: torch.dtype) -> bool:
    """attn_mask is exactly the causal mask in one of torch's two forms: bool (True above the diagonal) or float
    of the query's dtype (-inf above the diagonal, 0 elsewhere, as open_clip's text tower builds it)."""
    if attn_mask.shape != (n_q, n_k) or attn_mask.dtype not in (torch.bool, dtype):
        return False
    if torch.compiler.is_compiling():  # reading values would break the graph: torch's path
        return False

    def answer():
        above = causal_pattern(n_q, n_k, attn_mask.device)
        if attn_mask.dtype == torch.bool:
            return torch.equal(attn_mask, above)
        return torch.equal(attn_mask, torch.zeros_like(attn_mask).masked_fill_(above, float("-inf")))

    return MASK_FACTS.get(attn_mask, ("causal", n_q, n_k), answer)


def _padding_as_bool(key_padding_mask: Tensor, dtype: torch.dtype, causal: bool,
                     blind_differs: bool) -> Optional[Tensor]:
    """key_padding_mask (B, S_k) as bool (True = padding), or None where the kernel would differ from torch: a float
    mask with values other than 0 and -inf (an additive bias), or, with ``blind_differs``, a query that sees no key
    at all (the kernel gives it zeros, torch's native inference path NaN)."""
    m = key_padding_mask
    if m.dtype not in (torch.bool, dtype):
        return None
    if m.dtype == torch.bool and not blind_differs:
        return m
    if torch.compiler.is_compiling():  # reading values would break the graph: torch's path
        return None

    def answer():
        pad = m if m.dtype == torch.bool else m == float("-inf")
        if m.dtype != torch.bool and not torch.equal(m, torch.zeros_like(m).masked_fill_(pad, float("-inf"))):
            return None
        if not blind_differs:
            return pad
        # causal: query i sees keys 0..i, so some query is blind iff key 0 is padding; else iff a row is all padding
        blind = pad[:, 0].any() if causal else pad.all(-1).any()
        return None if blind.item() else pad

    return MASK_FACTS.get(m, ("padding", dtype, causal, blind_differs), answer)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose common case runs ``fastclip.flash_attention``.

    A subclass of torch's module: the same constructor arguments and defaults (``batch_first=False``), the same
    parameters and state-dict keys (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``,
    ``bias_v``, ``out_proj``), the same ``forward`` signature and defaults (``need_weights=True``), the same
    results. One keyword-only extra: ``backend`` (``fastclip.flash_attention``'s). ``isinstance(m,
    torch.nn.MultiheadAttention)`` holds, and ``MultiheadAttention.from_torch(m)`` converts a live layer.

    ``forward`` runs the fused kernel when all of these hold, and torch's own ``forward`` (so identical results,
    including NaN rows and errors) otherwise:
      - ``need_weights=False`` (the kernel never forms the attention weights);
      - no attention dropout (``dropout=0`` or eval mode), no ``add_bias_kv``/``add_zero_attn``,
        ``kdim == vdim == embed_dim``; batched 3-D inputs of one floating dtype;
      - ``attn_mask`` None or the causal mask, (L, S) bool with True above the diagonal or float of the query's
        dtype with -inf above the diagonal and 0 elsewhere (open_clip's text mask). With ``is_causal=True`` and no
        ``key_padding_mask`` the mask is not read, as torch does with the hint;
      - ``key_padding_mask`` None, bool (B, S) (True = padding), or float with only 0 and -inf. A query left
        without any key gets zeros, as from torch's SDPA path; torch's native inference path (autograd off) gives
        it NaN, so with autograd off such masks go to torch.
    Mask values (float masks; bool padding with autograd off) are read once per mask tensor (a device sync), then
    remembered while that tensor lives unmodified: a tower that passes one mask to every layer syncs once per
    forward. Under ``torch.compile`` values are not read: to stay fused pass ``is_causal=True`` (with the causal
    ``attn_mask`` or, with a ``key_padding_mask``, none: torch reads the mask's values when there is padding) and a
    bool ``key_padding_mask``.

    Beyond torch: ``is_causal=True`` without ``attn_mask`` means causal attention (torch raises). Earlier
    versions of this class defaulted to ``batch_first=True`` and ``need_weights=False`` and made ``key``/``value``
    optional: pass ``batch_first=True``, ``need_weights=False`` and ``key``, ``value`` explicitly for that.

    Self-attention (``query is key is value``) runs one packed projection x W^T + b (B, S, 3E), whose q, k, v are
    strided (B, S, H, D) views of its (B, S, 3, H, D) reshape: the kernel reads them in place. The kernel writes
    (B, S, H, D) contiguous, which is (B, S, E) for out_proj as it is.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str = "auto"):
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, backend: str = "auto") -> "MultiheadAttention":
        """A fastclip layer holding ``module``'s own parameters (the same Parameter objects: an optimizer that
        holds them keeps working), configuration and train/eval mode. No random numbers are drawn."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__name__}")
        # built on "meta" (no memory, no random draws), then handed module's own parameters: their dtype and device
        new = cls(module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device="meta", backend=backend)
        new.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
        return new.train(module.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        plan = self._fused_plan(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if plan is None:
            if is_causal and attn_mask is None:  # torch needs the mask with the hint; give it the causal one
                seq = 1 if self.batch_first and query.dim() == 3 else 0
                attn_mask = causal_pattern(query.shape[seq], key.shape[seq], query.device)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        causal, padding = plan
        return self._fused(query, key, value, causal, padding), None

    def _fused_plan(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                    is_causal) -> Optional[Tuple[bool, Optional[Tensor]]]:
        """(causal, bool padding mask) when the kernel computes what torch's forward would, else None."""
        if (need_weights or (self.training and self.dropout > 0) or not self._qkv_same_embed_dim
                or self.bias_k is not None or self.add_zero_attn):
            return None
        tensors = (query, key, value)
        if not all(isinstance(t, Tensor) and t.dim() == 3 and t.shape[-1] == self.embed_dim for t in tensors):
            return None
        if key.shape != value.shape or not query.is_floating_point() or not query.dtype == key.dtype == value.dtype:
            return None
        batch, seq = (0, 1) if self.batch_first else (1, 0)
        if query.shape[batch] != key.shape[batch]:
            return None
        n_q, n_k = query.shape[seq], key.shape[seq]
        if attn_mask is None:
            causal = bool(is_causal)
        elif not isinstance(attn_mask, Tensor) or attn_mask.device != query.device:
            return None
        elif is_causal and key_padding_mask is None:
            causal = True  # torch trusts the hint and never reads the mask
        elif _is_causal_mask(attn_mask, n_q, n_k, query.dtype):
            causal = True
        else:
            return None
        padding = None
        if key_padding_mask is not None:
            if (not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (key.shape[batch], n_k)
                    or key_padding_mask.device != query.device):
                return None
            padding = _padding_as_bool(key_padding_mask, query.dtype, causal, self._torch_may_run_native(query))
            if padding is None:
                return None
        return causal, padding

    def _torch_may_run_native(self, query: Tensor) -> bool:
        """Whether torch's forward may take its native inference path, which gives NaN (not zeros, as its SDPA path
        and the kernel do) to a query that sees no key. That path needs autograd off for the inputs and the
        projections; the inputs here have passed _fused_plan's checks."""
        tensors = (query, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))

    def _heads(self, x: Tensor) -> Tensor:
        """(B, S, E) or (S, B, E) -> a (B, S, H, D) view."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, H, D) or (S, B, H, D)
        return x if self.batch_first else x.transpose(0, 1)

    def _fused(self, query: Tensor, key: Tensor, value: Tensor, causal: bool, padding: Optional[Tensor]) -> Tensor:
        e = self.embed_dim
        if query is key and key is value:
            # one GEMM; q, k, v are strided views of its (..., 3, H, D) reshape
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3E) or (S, B, 3E)
            q, k, v = (self._heads(t) for t in qkv.unflatten(-1, (3, e)).unbind(-2))
        else:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
            b_q, b_k, b_v = self.in_proj_bias.split(e) if self.in_proj_bias is not None else (None, None, None)
            q = self._heads(F.linear(query, w_q, b_q))
            k = self._heads(F.linear(key, w_k, b_k))
            v = self._heads(F.linear(value, w_v, b_v))
        out = flash_attention(q, k, v, causal=causal, key_padding_mask=padding, backend=self.backend)  # (B, S, H, D)
        out = out.flatten(2)  # (B, S, E): a view when the backend returns (B, S, H, D) contiguous
        if not self.batch_first:
            out = out.transpose(0, 1)  # (S, B, E)
        return self.out_proj(out)
