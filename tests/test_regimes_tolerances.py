"""The bounds have teeth: planted mutants, each an intermediate computed in a lower precision than the
inputs', must fail the very checks the regime tests apply to fastclip's backends.

If one of these passes, the bound it exercises has become loose enough to hide a real precision bug.
"""
import pytest
import torch
import torch.nn.functional as F

from .regimes import contrastive_spec, cross_attention_inputs, extreme_siglip_inputs, padding_mask, siglip_spec, \
    trained_features
from .test_regimes_attention import check_cross_attention
from .test_regimes_losses import _check

N, D = 33, 64


def _attention(q, k, v, scale, causal, mask, *, score_dtype=None, p_dtype=None):
    """fp32-accumulated attention with a planted rounding of the scores or of P (the mutants)."""
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * scale  # (B, H, S_q, S_k)
    if score_dtype is not None:
        s = s.to(score_dtype).float()
    see = torch.arange(k.shape[1])[None, :] <= torch.arange(q.shape[1])[:, None] if causal else \
        torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
    see = see[None, None] & ~mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~see, float("-inf")), -1).nan_to_num(0.0)
    if p_dtype is not None:
        p = p.to(p_dtype).float()
    return torch.einsum("bhij,bjhd->bihd", p, v.float()).to(q.dtype)


# fp16 inputs with bf16 scores are not listed: flash-attn's 2x rule misses that mutant in about 1 draw in 8 at
# these sizes (the naive fp16 computation's own error is within a few x of it); a max-error criterion cannot
# separate roundings that close.
@pytest.mark.parametrize("dtype,mutant", [(torch.float32, dict(score_dtype=torch.float16)),
                                          (torch.float32, dict(p_dtype=torch.bfloat16))],
                         ids=["fp32-scores-in-fp16", "fp32-P-in-bf16"])
def test_attention_bound_catches_low_precision_intermediates(dtype, mutant):
    # fixed inputs: a short padding can leave too few visible keys for a planted rounding to show in the max error
    # (FASTCLIP_TEST_SEED=1454575621 drew such a mask for P in bf16)
    torch.manual_seed(0)
    _, _, _, leaves = cross_attention_inputs(2, 13, 17, 2, 16, dtype)
    mask = padding_mask(2, 17, empty_row=False)

    def fast(q, k, v, scale):
        return _attention(q, k, v, scale, True, mask, **mutant)

    with pytest.raises(AssertionError, match="naive same-dtype err"):
        check_cross_attention(fast, leaves, True, mask, scale=1.3)
    # the same code without the planted rounding passes
    check_cross_attention(lambda q, k, v, scale: _attention(q, k, v, scale, True, mask), leaves, True, mask,
                          scale=1.3)


def test_contrastive_bound_catches_fp16_logits():
    """fp32 inputs, trained regime, logits rounded to fp16 (an fp16 GEMM output): the bound rejects it."""
    # fixed inputs: the rounding moves each p_ij by ~1.6%, but the loss and gradients move only by (1 - p_ii), so on
    # a draw whose rows are all confident enough the mutant's error sinks under the atol (about 1 draw in 5 since
    # trained_features guarantees a 0.1 lead; CI drew one)
    torch.manual_seed(0)
    img, txt = trained_features(N, D, torch.float32)
    scale = torch.tensor(100.0, requires_grad=True)

    def mutant(i, t, s):
        logits = (s * (i @ t.T)).half().float()
        labels = torch.arange(i.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    with pytest.raises(AssertionError, match="naive same-dtype err"):
        _check("mutant", mutant, contrastive_spec, [img, txt, scale], torch.float32, logit_size=100.0)
    _check("fp32", contrastive_spec, contrastive_spec, [img, txt, scale], torch.float32, logit_size=100.0)


def test_siglip_bound_catches_naive_softplus():
    """log(1 + exp(-z S)) instead of a softplus: overflows at |S| ~ 1e3; the check rejects it."""
    img, txt = extreme_siglip_inputs(N, D, torch.float32)
    scale, bias = torch.tensor(1000.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    def mutant(i, t, s, b):
        logits = s * (i @ t.T) + b
        z = 2 * torch.eye(*logits.shape) - 1
        return torch.log(1 + torch.exp(-z * logits)).sum() / logits.shape[0]

    with pytest.raises(AssertionError):
        _check("mutant", mutant, siglip_spec, [img, txt, scale, bias], torch.float32, logit_size=1000.0)
