"""The contrastive ring (``dist_impl="ring"``) in the trained regime (cos(i_i, t_i) in 0.45 .. 0.6 at scale 100:
p_ii from ~0.999 to 1 - 1e-12), fp32 features, against the fp64 loss of the global batch: the loss and every
gradient within flash-attn's rule (a small multiple of the same maths' naive fp32 error), as the single-process
losses are held.

The ring once formed the loss as sum(lse) - 2 sum(S_ii) from merged fp32 lses of ~50, which cancels to nothing for
a loss of ~1e-7 (it returned 0), and gave its backward (lse, 0) statistics, whose rounding (4e-6) swamps
P_ii - 1; its off-diagonal blocks subtracted the one-hot targets and added them back. Ranks are threads of the test
process over gloo (tests/threaded_ranks.py).
"""
import pytest
import torch

from tests.helpers import assert_within_naive, naive_error
from tests.regimes import contrastive_spec, trained_features
from tests.threaded_ranks import run_ranks

N_LOCAL, D = 6, 64
UPSTREAM = 0.7


def _rank(rank, world, img, txt, backend, bias, gather_with_grad):
    import fastclip

    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    leaves = [img[rows].float().requires_grad_(), txt[rows].float().requires_grad_(),
              torch.tensor(100.0, requires_grad=True)]
    if bias is not None:
        leaves.append(torch.tensor(bias, requires_grad=True))
    loss_fn = fastclip.ContrastiveLoss(rank=rank, world_size=world, dist_impl="ring", backend=backend,
                                       gather_with_grad=gather_with_grad)
    loss = loss_fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves, torch.full_like(loss, UPSTREAM)))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend,bias,gather_with_grad", [("torch", None, False), ("torch", -3.0, True),
                                                          ("triton", None, True)])
def test_contrastive_ring_fp32_trained_regime(world, backend, bias, gather_with_grad):
    img, txt = (t.detach().double() for t in trained_features(world * N_LOCAL, D))
    runs = run_ranks(world, _rank, img, txt, backend, bias, gather_with_grad)
    # the features' gradients: the global loss's (times W with gather_with_grad, as open_clip's); logit_scale's and
    # the loss the same on every rank
    factor = world if gather_with_grad else 1
    scalars = [torch.tensor(100.0, dtype=torch.float64)] + ([] if bias is None else [torch.tensor(bias).double()])

    def spec(k):
        def f(i, t, *s):
            i, t, *s = (x.detach().requires_grad_() for x in (i, t, *s))
            loss = contrastive_spec(i, t, *s)
            if k == 0:
                return loss.detach()
            grads = torch.autograd.grad(loss, (i, t, *s), torch.tensor(UPSTREAM, dtype=loss.dtype))
            return grads[k - 1] * (factor if k < 3 else 1)
        return f

    ours = [runs[0][0], torch.cat([r[1] for r in runs]), torch.cat([r[2] for r in runs]), runs[0][3]]
    for k, name in enumerate(("loss", "d_image", "d_text", "d_logit_scale")):
        ref = spec(k)(img, txt, *scalars)
        assert_within_naive(name, ours[k], ref, naive_error(spec(k), (img, txt, *scalars), torch.float32),
                            factor=2 if k == 0 else 3)
    for r in runs[1:]:  # every rank returns the same loss and d(logit_scale)
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[3], runs[0][3])
    if bias is not None:
        assert all(torch.equal(r[4], torch.zeros(())) for r in runs)  # sum_ij dL/dS_ij = 0
