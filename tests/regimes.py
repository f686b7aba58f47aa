"""Input regimes the rest of the suite does not visit, shared by the ``test_regimes_*`` files.

Each regime is a small function returning fresh inputs, plus an independent fp64 specification written here
(not imported from ``fastclip.ops.*.reference``, so a bug there cannot hide a bug elsewhere):

- cross-attention: q, k, v distinct tensors, S_q != S_k, k and v with different strides (k a strided slice of a
  packed projection, v a transposed view of a (B, H, S, D) buffer), causal + padding;
- a trained model's features: matching pairs at cos 0.45 .. 0.6, unrelated pairs near 0, so at
  ``logit_scale = 100`` the diagonal probabilities p_ii are within 1e-3 .. 1e-12 of 1 (the softmax cancels);
- extreme SigLIP logits: |logit_scale * cos + bias| up to ~1e3, where a naive sigmoid or log(1 + e) overflows.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastclip.dispatch import supports

HALF = (torch.float16, torch.bfloat16)


def runnable_backends(op: str, dtype: torch.dtype, dim: int, device: str = "cpu") -> List[str]:
    """The backends of ``op`` that can run these inputs here (the Support rows' own verdict)."""
    return [name for name, row in supports(op).items() if not row.not_supported_reasons(device, dtype, dim)]


# ---------------------------------------------------------------------------------------------------------------
# attention


def cross_attention_inputs(b: int, s_q: int, s_k: int, h: int, d: int, dtype=torch.float32):
    """Leaves q (B, S_q, H, D), k, v (B, S_k, H, D), three different tensors with three different layouts.

    k is the second of three (H, D) slots of a packed (B, S_k, 3, H, D) buffer (row stride 3 H D), v the transpose
    of a contiguous (B, H, S_k, D) buffer (seq stride D, head stride S_k D): a kernel that reads v with k's
    strides (or k with q's) reads the wrong numbers. Returns (q, k, v) as leaves requiring grad.
    """
    q = torch.randn(b, s_q, h, d, dtype=torch.float64).to(dtype).requires_grad_()
    packed = torch.randn(b, s_k, 3, h, d, dtype=torch.float64).to(dtype).requires_grad_()
    v_bhsd = (torch.randn(b, h, s_k, d, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    k, v = packed[:, :, 1], v_bhsd.transpose(1, 2)  # (B, S_k, H, D) views
    assert k.stride() != v.stride() != q.stride()
    return q, k, v, (q, packed, v_bhsd)


def padding_mask(b: int, s_k: int, *, empty_row: bool = True) -> torch.Tensor:
    """(B, S_k) bool, True = padding: ragged ends (as padded text), batch 0 padded from its first key when
    ``empty_row`` so that, under the causal mask, its first queries see no key."""
    lengths = torch.randint(1, s_k + 1, (b,))
    mask = torch.arange(s_k)[None, :] >= lengths[:, None]
    if empty_row and s_k > 2:
        mask[0, :2] = True
    return mask


def attention_spec(q, k, v, causal: bool, key_padding_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Attention by the definition, in q's dtype (pass fp64 tensors for the specification): query i sees key j iff
    j <= i (causal, top-left) and key j is not padding; a query that sees no key outputs zeros. (B, S_q, H, D)."""
    s_q, s_k = q.shape[1], k.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # (B, H, S_q, S_k)
    see = torch.ones(s_q, s_k, dtype=torch.bool)
    if causal:
        see = torch.arange(s_k)[None, :] <= torch.arange(s_q)[:, None]
    see = see[None, None].expand(q.shape[0], 1, s_q, s_k)
    if key_padding_mask is not None:
        see = see & ~key_padding_mask[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~see, -math.inf), -1).nan_to_num(0.0)  # empty rows: NaN -> 0
    return torch.einsum("bhij,bjhd->bihd", p, v)


def peaked_attention_inputs(b: int, s: int, h: int, d: int, peak: float, dtype=torch.float32):
    """Near one-hot self-attention: q, k, v (B, S, H, D) leaves requiring grad, S <= D. The keys of a head are
    orthogonal with |k_j| = sqrt(D), and q_i = peak k_i / sqrt(D) + N(0, 0.5^2), so at softmax_scale 1/sqrt(D) query i
    scores its own key at ``peak`` and the others at ~N(0, 0.5^2): 1 - p_ii ~ S e^-peak (peak 8: ~1e-2; 12: ~3e-4,
    fp16's rounding of 1; 24: ~1e-9). There dS = P (dP - delta) cancels and delta must agree with dP."""
    assert s <= d
    keys = torch.linalg.qr(torch.randn(b, h, d, s, dtype=torch.float64)).Q  # (B, H, D, S), orthonormal columns
    k = keys.permute(0, 3, 1, 2) * math.sqrt(d)  # (B, S, H, D)
    q = k * (peak / math.sqrt(d)) + 0.5 * torch.randn(b, s, h, d, dtype=torch.float64)
    v = torch.randn(b, s, h, d, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v))


# ---------------------------------------------------------------------------------------------------------------
# losses


def trained_features(n: int, d: int, dtype=torch.float32, *, cos: Tuple[float, float] = (0.45, 0.6),
                     margin: Optional[float] = 0.1):
    """Unit image/text features of a trained model: cos(i_i, t_i) = c_i, spread uniformly over ``cos``, with the
    text's other component random. At D = 64 the unrelated pairs have cos ~ N(0, 1/D), so at scale 100 the
    diagonal leads its row by 10 to 35 logits: p_ii from ~0.999 to 1 - 1e-12, where softmax - 1 cancels and a
    loss of ~1e-6 sits next to logits of ~50. The lead is guaranteed, not likely: draws are repeated until every
    diagonal cosine beats the rest of its row and of its column by ``margin`` (None: any draw). Leaves (N, D)
    requiring grad."""
    for _ in range(1000):
        img = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
        other = torch.randn(n, d, dtype=torch.float64)
        other = F.normalize(other - (other * img).sum(-1, keepdim=True) * img, dim=-1)  # orthogonal to img
        c = torch.empty(n, 1, dtype=torch.float64).uniform_(*cos)
        txt = c * img + (1 - c ** 2).sqrt() * other
        cosines = img @ txt.T
        off = cosines.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)  # (N, N), the diagonal left out
        lead = torch.minimum(c[:, 0] - off.amax(1), c[:, 0] - off.amax(0))  # (N,): row i's and column i's lead
        if margin is None or n == 1 or lead.min() >= margin:
            break
    else:
        raise ValueError(f"trained_features: no draw of {n} pairs in dimension {d} with cos in {cos} leads by "
                         f"{margin}; widen cos or lower margin")
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()


def contrastive_spec(img, txt, scale, bias=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """CLIP loss by the definition, in img's dtype (fp64 tensors: the specification; fp16: the naive fp16
    computation): S = scale I T^T (+ bias); (CE(S, diag) + CE(S^T, diag)) / 2."""
    s = scale * (img @ txt.T)
    if bias is not None:
        s = s + bias
    labels = torch.arange(s.shape[0])
    return (F.cross_entropy(s, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(s.T, labels, label_smoothing=label_smoothing)) / 2


def siglip_spec(img, txt, scale, bias) -> torch.Tensor:
    """SigLIP loss by the definition, in img's dtype: -sum_ij log sigmoid(z_ij (scale <i_i, t_j> + bias)) / N,
    z = +1 on the diagonal, -1 elsewhere."""
    s = scale * (img @ txt.T) + bias
    z = 2 * torch.eye(*s.shape, dtype=s.dtype) - 1
    return -F.logsigmoid(z * s).sum() / s.shape[0]


def extreme_siglip_inputs(n: int, d: int, dtype=torch.float32):
    """Features whose logits reach |S| ~ 1e3 at scale 1000 (beyond SigLIP's init of 10, as a diverged or
    over-trained run reaches): matching pairs nearly parallel, a few anti-parallel, plus near-zero logits."""
    img, txt = trained_features(n, d, torch.float64, cos=(0.1, 1.0), margin=None)
    img, txt = img.detach().clone(), txt.detach().clone()
    txt[1::3] = -txt[1::3]  # some positives at logit -scale: loss ~ scale, gradient saturated
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()
