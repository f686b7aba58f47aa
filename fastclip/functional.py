"""The functional API: fastclip's ops as plain functions (each defined in its package under ``fastclip/ops/``)."""
from fastclip.ops.attention import flash_attention
from fastclip.ops.contrastive import contrastive_loss
from fastclip.ops.siglip import siglip_loss
from fastclip.ops.topk import topk_similarity

__all__ = ["contrastive_loss", "siglip_loss", "flash_attention", "topk_similarity"]
