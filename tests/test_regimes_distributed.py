"""Ranks whose features differ in dtype (2 gloo processes): every rank raises a ValueError naming each rank's
dtype, for every loss and distributed mode; nobody waits forever in a collective.

One spawn runs every case (process start-up dominates); each worker reports per case. The parent bounds the whole
run, so a hang fails the test instead of stalling the suite.
"""
import os
import pickle
import tempfile
import time
import traceback

import pytest
import torch

WORLD, N, D = 2, 3, 5
CASES = [("ContrastiveLoss", {}), ("ContrastiveLoss", {"local_loss": True, "gather_with_grad": True}),
         ("ContrastiveLoss", {"dist_impl": "ring"}), ("SigLIPLoss", {}), ("SigLIPLoss", {"dist_impl": "shift"}),
         ("SigLIPLoss", {"dist_impl": "ring"})]
DTYPE_OF_RANK = (torch.float32, torch.float64)


def _worker(rank, store, out_dir):
    import datetime

    import torch.distributed as dist

    import fastclip

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    dtype = DTYPE_OF_RANK[rank]
    results = {}
    for cls, kw in CASES:
        img, txt = torch.randn(N, D, dtype=dtype), torch.randn(N, D, dtype=dtype)
        try:
            getattr(fastclip, cls)(rank=rank, world_size=WORLD, backend="torch", **kw)(img, txt, 10.0, -1.0)
            results[(cls, str(kw))] = "did not raise"
        except ValueError as e:
            results[(cls, str(kw))] = str(e)
        except Exception:
            results[(cls, str(kw))] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch
def test_ranks_with_different_dtypes_raise_everywhere():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=False)
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("a rank hung: the dtype mismatch was not detected before a collective")
        per_rank = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
    for r, results in enumerate(per_rank):
        for case, msg in results.items():
            assert "differ in shape or dtype" in msg and "rank 0:" in msg and "float32" in msg \
                and "float64" in msg, f"rank {r}, {case}: {msg}"
