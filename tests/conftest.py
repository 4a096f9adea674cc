import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run (ops.md section 7); the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.add_report_section("call", "torch seed", str(seed))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu/run.sh on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
