import importlib.util
import json
import os
import signal
import time

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
    if _OUTCOMES_PATH:
        _record_gpu_tests(config, items)


# benchmarks/gpu/run.sh sets GDRD_GPU_OUTCOMES: every GPU test's kernel, dtype and outcome are appended there as
# JSON lines the moment pytest reports them (and each test's start before it runs), so that a crash or a cut
# keeps what ran; benchmarks/gpu/verdict.py reads them into the correctness verdict of the run.
# GDRD_GPU_RESUME=1: the GPU tests that already started in an earlier run into the same file are deselected,
# so that a run restarted after a crash goes on past the test that crashed.
# GDRD_GPU_INJECT=crash@N,hang@M: the N-th GPU test crashes (SIGSEGV) and the M-th hangs at setup, counted
# over the resumed runs too, to rehearse those cases without a GPU (benchmarks/gpu/rehearse.sh).
_OUTCOMES_PATH = os.environ.get("GDRD_GPU_OUTCOMES")
_gpu_tests: set[str] = set()
_earlier_starts: list[int] = []  # GPU tests started by the runs before this one (GDRD_GPU_RESUME)


def _record(**event):
    with open(_OUTCOMES_PATH, "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _dtypes(value):
    if isinstance(value, torch.dtype):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _dtypes(v)


def _gpu_test_info(item) -> dict:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    floating = [d for v in params.values() for d in _dtypes(v) if d.is_floating_point]
    kernel = "triton" if "triton" in item.keywords else str(params.get("backend", "cuda"))
    return {"op": item.module.__name__.removeprefix("test_"), "kernel": kernel,
            "dtype": str(floating[0]).removeprefix("torch.") if floating else "other"}


def _started_before() -> set[str]:
    if not (os.environ.get("GDRD_GPU_RESUME") == "1" and os.path.exists(_OUTCOMES_PATH)):
        return set()
    with open(_OUTCOMES_PATH) as f:
        lines = f.read().split("\n")
    return {e["nodeid"] for e in map(_event, lines) if e.get("event") == "start"}


def _event(line: str) -> dict:
    """One line of the outcomes file; {} for a line a crash tore while it was written."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}


def _record_gpu_tests(config, items):
    done = _started_before()
    _earlier_starts.append(len(done))
    if done:
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = [item for item in items if item.nodeid not in done]
    for item in items:
        if "cuda" in item.keywords:
            _gpu_tests.add(item.nodeid)
            _record(event="collected", nodeid=item.nodeid, **_gpu_test_info(item))


_INJECT = os.environ.get("GDRD_GPU_INJECT", "")
_gpu_tests_started: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.nodeid not in _gpu_tests:
        return
    _record(event="start", nodeid=item.nodeid)
    position = sum(_earlier_starts) + len(_gpu_tests_started) + 1
    for action, _, at in (injection.partition("@") for injection in _INJECT.split(",") if injection):
        if int(at) == position:
            if action == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(3600)
    _gpu_tests_started.append(item.nodeid)


def _message(report) -> str:
    """The error's own text (\"RuntimeError: CUDA error: ...\"), not the location line pytest ends with."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.strip()[:300]
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[-1])[:300]
    lines = [line for line in str(report.longrepr or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def pytest_runtest_logreport(report):
    if report.nodeid not in _gpu_tests or (report.when != "call" and report.passed):
        return
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    else:
        outcome = "skipped" if report.skipped else "passed"
    _record(event="outcome", nodeid=report.nodeid, when=report.when, outcome=outcome, message=_message(report),
            seconds=round(report.duration, 3))


def pytest_sessionfinish(session, exitstatus):
    if _OUTCOMES_PATH:
        _record(event="finished", exitstatus=int(exitstatus))
