import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run (ops.md section 7); the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                call.excinfo.value.args = (*call.excinfo.value.args, f"[torch seed {value}]") \
                    if call.excinfo.value.args else (f"[torch seed {value}]",)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu/run.sh on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
