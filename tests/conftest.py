"""Test set-up: Triton kernels run through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so it is decided here from the presence of an NVIDIA
device node rather than from torch.cuda (which would import more than we want first).
"""
import glob
import os
import random
import zlib

if "TRITON_INTERPRET" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
# Fresh inputs every run, reproducible on demand: FASTCLIP_TEST_SEED=<the seed in the header> replays a run.
BASE_SEED = int(os.environ.get("FASTCLIP_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"fastclip: FASTCLIP_TEST_SEED={BASE_SEED}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
    yield
