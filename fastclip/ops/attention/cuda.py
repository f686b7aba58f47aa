"""Flash attention's ``cuda`` backend: the (forward, backward) pair over the compiled extension's kernels
(``csrc/attention/``). Loading the extension: ``fastclip/ops/_extension.py``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                  softmax_scale: float):
    return torch.ops.fastclip.flash_attn_fwd_cuda(q, k, v, key_padding_mask, causal, softmax_scale)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float):
    return torch.ops.fastclip.flash_attn_bwd_cuda(dout.contiguous(), q, k, v, out, lse, key_padding_mask, causal,
                                                  softmax_scale)
