"""fastclip's ops, one package each: ``contrastive``, ``siglip``, ``attention``.

Each package registers its backends' rows with ``fastclip.dispatch`` on import and exposes its public function;
importing this package loads every op (triton and the compiled extension's kernels stay unimported until used).
"""
from fastclip.ops.attention import flash_attention
from fastclip.ops.contrastive import contrastive_loss
from fastclip.ops.siglip import siglip_loss

__all__ = ["contrastive_loss", "siglip_loss", "flash_attention"]
