import os

import pytest
import torch

# A fixed seed by default, so every run draws the same inputs. GDRD_TEST_SEED=<int> sets another (also to
# replay a failure: the seed is shown with it); GDRD_TEST_SEED=random draws a fresh one for every test (fuzzing).
_SEED = os.environ.get("GDRD_TEST_SEED", "0")


@pytest.fixture(autouse=True)
def _seeded(request):
    seed = int.from_bytes(os.urandom(4), "little") if _SEED == "random" else int(_SEED)
    torch.manual_seed(seed)
    request.node.add_report_section("call", "torch seed", f"GDRD_TEST_SEED={seed}")
    yield


def pytest_report_header(config):
    return f"torch seed: GDRD_TEST_SEED={_SEED} (an int, or 'random' to fuzz)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu/run.sh on the GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
