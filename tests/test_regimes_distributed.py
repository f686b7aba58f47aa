"""Ranks whose features differ in dtype (2 ranks, threads of the test process over gloo, tests/threaded_ranks.py):
every rank raises a ValueError naming each rank's dtype, for every loss and distributed mode; nobody waits forever
in a collective (run_ranks fails a rank still running after its timeout).
"""
import pytest
import torch

from tests.threaded_ranks import run_ranks

WORLD, N, D = 2, 3, 5
CASES = [("ContrastiveLoss", {}), ("ContrastiveLoss", {"local_loss": True, "gather_with_grad": True}),
         ("ContrastiveLoss", {"dist_impl": "ring"}), ("SigLIPLoss", {}), ("SigLIPLoss", {"dist_impl": "shift"}),
         ("SigLIPLoss", {"dist_impl": "ring"})]
DTYPE_OF_RANK = (torch.float32, torch.float64)


def _rank(rank, world, cls, kw):
    import fastclip

    dtype = DTYPE_OF_RANK[rank]
    img, txt = torch.randn(N, D, dtype=dtype), torch.randn(N, D, dtype=dtype)
    with pytest.raises(ValueError, match="differ in shape or dtype") as e:
        getattr(fastclip, cls)(rank=rank, world_size=world, backend="torch", **kw)(img, txt, 10.0, -1.0)
    msg = str(e.value)
    assert f"rank 0: image_features ({N}, {D}), text_features ({N}, {D}), float32" in msg \
        and f"rank 1: image_features ({N}, {D}), text_features ({N}, {D}), float64" in msg, msg


@pytest.mark.parametrize("cls, kw", CASES, ids=[f"{c}-{kw}" for c, kw in CASES])
def test_ranks_with_different_dtypes_raise_everywhere(cls, kw):
    run_ranks(WORLD, _rank, cls, kw, timeout=30.0)
