"""CLIP's LayerNorm bit for bit, and checkpoints saved from wrapped models (torch.compile, DDP, both nested).

LayerNorm: under fp16/bf16 with fp32 weights, OpenAI's CLIP normalizes in fp32 and casts the result back, i.e.
exactly ``F.layer_norm(x.float(), ..., w.float(), b.float()).to(dtype)``: one rounding of an fp32 result. The check
is equality, so normalizing in half precision (no upcast) fails it by many units of roundoff.

Checkpoints: ``clean_state_dict`` must strip ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes in any
order and any number: ``torch.compile(DDP(m))`` saves ``_orig_mod.module.*``, ``DDP(torch.compile(m))`` saves
``module._orig_mod.*``. The keys come from real wrappers (DDP over a one-process gloo group), not typed by hand.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastclip.models.factory import clean_state_dict
from fastclip.models.transformer import LayerNorm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 64), (2, 50, 768)])
def test_layer_norm_upcasts_bit_for_bit(dtype, shape):
    ln = LayerNorm(shape[-1])
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.3)
        ln.bias.normal_(0.0, 0.3)
    # activations of a residual stream: a large common offset and a spread of scales stress the variance
    x = (torch.randn(shape) * torch.logspace(-1, 1, shape[-1]) + 3.0).to(dtype)
    out = ln(x)
    want = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, want), f"max diff {(out.float() - want.float()).abs().max().item():.3e}"
    # and the check has teeth: normalizing in the low precision itself is not equal
    lowp = F.layer_norm(x, ln.normalized_shape, ln.weight.to(dtype), ln.bias.to(dtype), ln.eps)
    assert not torch.equal(lowp, want)


def test_layer_norm_low_precision_weights_stay_in_their_dtype():
    ln = LayerNorm(32).to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert torch.equal(ln(x), F.layer_norm(x, (32,), ln.weight, ln.bias, ln.eps))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("logit_scale", torch.tensor(4.6))


@pytest.fixture(scope="module")
def one_process_group():
    """A world of one gloo process, so DDP can wrap a module in this process."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


WRAPS = {
    "plain": lambda m: m,
    "compile": lambda m: torch.compile(m),
    "ddp": lambda m: torch.nn.parallel.DistributedDataParallel(m),
    "ddp(compile)": lambda m: torch.nn.parallel.DistributedDataParallel(torch.compile(m)),
    "compile(ddp)": lambda m: torch.compile(torch.nn.parallel.DistributedDataParallel(m)),
    "compile(ddp(compile))": lambda m: torch.compile(torch.nn.parallel.DistributedDataParallel(torch.compile(m))),
}
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_clean_state_dict_of_wrapped_models(one_process_group, wrap):
    model = _Tiny()
    saved = WRAPS[wrap](model).state_dict()
    assert set(clean_state_dict(saved)) == set(model.state_dict()), sorted(saved)
    for k, v in clean_state_dict(saved).items():
        assert torch.equal(v, model.state_dict()[k])


def test_clean_state_dict_keeps_inner_names():
    """Only leading prefixes go: a parameter whose own name contains 'module.' keeps it."""
    sd = {"module.visual.module.weight": torch.zeros(1), "_orig_mod.text_module.bias": torch.zeros(1)}
    assert set(clean_state_dict(sd)) == {"visual.module.weight", "text_module.bias"}
