import importlib.util
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
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu/run.sh on the GPU machine")
    # an optional package: the GPU machine, for one, has no diffusers
    no_diffusers = pytest.mark.skip(reason="needs the optional package diffusers: pip install 'gdrd_fast[demo]'")
    has_gpu = torch.cuda.is_available()
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
        if "diffusers" in item.keywords and not has_diffusers:
            item.add_marker(no_diffusers)


# benchmarks/gpu/run.sh sets GDRD_GPU_OUTCOMES: every GPU test's kernel, dtype and outcome go there as JSON,
# from which benchmarks/gpu/verdict.py writes the correctness verdict of the run.
_OUTCOMES_PATH = os.environ.get("GDRD_GPU_OUTCOMES")
_outcomes: dict[str, dict] = {}


def _gpu_test_info(item) -> dict:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    dtypes = [str(v).replace("torch.", "") for v in params.values() if isinstance(v, torch.dtype)]
    kernel = "triton" if "triton" in item.keywords else str(params.get("backend", "cuda"))
    return {"op": item.module.__name__.removeprefix("test_"), "kernel": kernel,
            "dtype": dtypes[0] if dtypes else "", "outcome": "not run", "message": ""}


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    if _OUTCOMES_PATH:
        _outcomes.update({item.nodeid: _gpu_test_info(item) for item in session.items if "cuda" in item.keywords})


def pytest_runtest_logreport(report):
    info = _outcomes.get(report.nodeid)
    if info is None or (report.when != "call" and report.passed):
        return
    if report.failed:
        info["outcome"] = "failed" if report.when == "call" else "error"
        info["message"] = report.longreprtext.strip().splitlines()[-1][:300] if report.longreprtext else ""
    elif report.skipped:
        info["outcome"], info["message"] = "skipped", str(report.longrepr[-1] if report.longrepr else "")[:300]
    elif info["outcome"] == "not run":
        info["outcome"] = "passed"


def pytest_sessionfinish(session):
    if _OUTCOMES_PATH:
        import json
        with open(_OUTCOMES_PATH, "w") as f:
            json.dump(_outcomes, f, indent=1)
