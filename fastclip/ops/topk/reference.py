"""The specification of ``topk_similarity``: materialize the (Q, G) scores and sort them.

Order: scores descending, NaN above everything (torch.topk's and torch.sort's order), ties (NaNs included) broken by
the lower gallery index. Scores are accumulated in fp32 (fp64 for fp64 inputs); values come back in that dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch

from fastclip.ops.contrastive.pytorch import acc_dtype


def topk_similarity_ref(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (Q, k): a stable descending sort of ``queries @ gallery.T``, cut at k. O(Q * G)."""
    dt = acc_dtype(queries.dtype)
    scores = queries.to(dt) @ gallery.to(dt).T  # (Q, G)
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), indices[:, :k].contiguous()
