"""benchmarks/gpu/run.sh runs only on the GPU machine, whose minutes are few: what can be checked here is.
Its syntax; that its phases' predicted times fit the 8-minute run; the wheel folder it reads being ignored by
git and filled by make; the correctness verdict it writes before any benchmark (benchmarks/gpu/verdict.py)
from the test outcomes written as each test reports (tests/conftest.py, GDRD_GPU_OUTCOMES), after a crash too;
that on a GPU no GPU test would skip; the Triton warm-up's cache being hit by a later process
(benchmarks/gpu/warmup.py). The whole script is rehearsed offline by `make gpu-rehearsal`."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu import verdict
from gdrd_fast import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")


def test_gpu_script_parses_and_is_executable():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = subprocess.run([bash, "-n", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_predicted_phases_fit_the_budget_and_the_budget_fits_8_minutes():
    with open(SCRIPT) as f:
        script = f.read()
    predicted = {k: int(v) for k, v in re.findall(r"PREDICT_(\w+)=(\d+)", script)}
    assert set(predicted) == {"BUILD", "WARMUP", "TESTS", "BENCH", "COMPILE", "REPORT"}
    budget = int(re.search(r"BUDGET=\$\{GDRD_GPU_BUDGET_S:-(\d+)\}", script).group(1))
    assert sum(predicted.values()) <= budget
    # a phase is stopped 20 s after its SIGINT at the latest; the report may take 30 s past the deadline
    assert "timeout -s INT -k 20" in script and budget + 20 + 30 <= 8 * 60
    # correctness before any benchmark
    assert script.index('phase "correctness') < script.index('phase "benchmarks')


def test_carried_wheels_stay_out_of_git_and_make_fills_them():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert ".whl/" in f.read().split()
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert "gpu-wheels:" in makefile and "-d .whl" in makefile and "--python-version 3.12" in makefile


def _write_events(path, events):
    """An outcomes file as tests/conftest.py appends it: one JSON object a line."""
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)


def _collected(nodeid, op, kernel, dtype):
    return {"event": "collected", "nodeid": nodeid, "op": op, "kernel": kernel, "dtype": dtype}


def _ran(nodeid, outcome="passed", message="", when="call"):
    return [{"event": "start", "nodeid": nodeid},
            {"event": "outcome", "nodeid": nodeid, "when": when, "outcome": outcome, "message": message,
             "seconds": 0.1}]


def _session(tmp_path, results, finished=True, collected=None):
    """(path of an outcomes file, its verdict) for {nodeid: outcome} of triton tests of op 'infonce'/'crd'."""
    ids = {f"tests/lib/test_{op}.py::test[{d}]": (op, d) for op in ("infonce", "crd") for d in verdict.DTYPES}
    ids["tests/lib/test_crd.py::test[other]"] = ("crd", "other")
    events = [_collected(nodeid, op, "triton", d) for nodeid, (op, d) in ids.items()][:collected]
    for nodeid in ids:
        if nodeid in results:
            events += _ran(nodeid, *results[nodeid]) if results[nodeid] else _ran(nodeid)[:1]
            if nodeid in results and results[nodeid][-1:] == ("teardown",):  # its call passed first
                events.insert(-1, {**events[-1], "when": "call", "outcome": "passed", "message": ""})
    if finished:
        events.append({"event": "finished", "exitstatus": 0})
    path = tmp_path / "outcomes.jsonl"
    _write_events(path, events)
    return path, verdict.verdict(*verdict.read_outcomes(str(path))), list(ids)


def test_verdict_passes_only_when_every_test_passed(tmp_path):
    ids = _session(tmp_path, {})[2]
    path, result, _ = _session(tmp_path, {nodeid: ("passed",) for nodeid in ids})
    assert result["status"] == "PASS" and result["counts"] == {"passed": len(ids)} and not result["notes"]
    row = {r["op"]: r for r in result["table"]}["crd"]
    assert row["other"] == "1/1" and row["bfloat16"] == "1/1"


def test_verdict_fails_with_the_error_text(tmp_path):
    ids = _session(tmp_path, {})[2]
    message = "RuntimeError: CUDA error: an illegal memory access was encountered"
    results = {nodeid: ("passed",) for nodeid in ids}
    results[ids[2]] = ("failed", message)
    results[ids[0]] = ("error", "AttributeError: 'cuBLASModule' object has no attribute 'allow_tf32'", "teardown")
    path, result, _ = _session(tmp_path, results)
    assert result["status"] == "FAIL"
    assert f"{ids[2]}: failed {message}" in result["not_passed"]
    assert any(p.startswith(f"{ids[0]}: error AttributeError") for p in result["not_passed"])  # after its pass
    assert "infonce/triton: bfloat16" in result["dtypes_not_proven"]
    text = "\n".join(verdict.markdown(result, "H100"))
    assert "Correctness on H100: FAIL" in text and message in text
    assert "| infonce | triton |  | 0/1 | 1/1 | 0/1 |  |" in text  # float64 | float32 | float16 | bfloat16 | other


def test_verdict_is_incomplete_after_a_skip_a_crash_or_a_cut_and_lists_what_ran(tmp_path):
    ids = _session(tmp_path, {})[2]
    everything = {nodeid: ("passed",) for nodeid in ids}
    skipped = dict(everything, **{ids[-1]: ("skipped", "needs a CUDA GPU", "setup")})
    assert _session(tmp_path, skipped)[1]["status"] == "INCOMPLETE"
    # a crash in the third test: two ran, the third started and never reported, the session never finished
    crashed = {ids[0]: ("passed",), ids[1]: ("passed",), ids[2]: ()}
    result = _session(tmp_path, crashed, finished=False)[1]
    assert result["status"] == "INCOMPLETE" and result["ran"] == sorted(ids[:2])
    assert result["counts"] == {"passed": 2, "did not finish": 1, "not run": len(ids) - 3}
    assert any("did not finish" in note for note in result["notes"])
    text = "\n".join(verdict.markdown(result, "H100"))
    assert "Ran to the end (2):" in text and f"- `{ids[1]}`" in text
    # a torn last line (the crash came while it was written) is left out, and said
    path = tmp_path / "outcomes.jsonl"
    with open(path, "a") as f:
        f.write('{"event": "outcome", "nodeid": "tests/lib/te')
    outcomes, notes = verdict.read_outcomes(str(path))
    assert verdict.verdict(outcomes, notes)["ran"] == sorted(ids[:2]) and any("cut" in n for n in notes)
    # a resumed session appends after the torn line: that one line is lost, the rest is read
    with open(path, "a") as f:
        f.writelines(json.dumps(e) + "\n" for e in [{"event": "start", "nodeid": ids[3]}, *_ran(ids[4])])
    outcomes, notes = verdict.read_outcomes(str(path))
    assert verdict.verdict(outcomes, notes)["ran"] == sorted([*ids[:2], ids[4]])
    assert any("unreadable" in n for n in notes)


def test_verdict_is_incomplete_for_a_missing_or_empty_file(tmp_path):
    missing = verdict.verdict(*verdict.read_outcomes(str(tmp_path / "none.jsonl")))
    assert missing["status"] == "INCOMPLETE" and "did not start" in missing["notes"][0] and missing["ran"] == []
    (tmp_path / "empty.jsonl").write_text("")
    empty = verdict.verdict(*verdict.read_outcomes(str(tmp_path / "empty.jsonl")))
    assert empty["status"] == "INCOMPLETE" and "names no GPU test" in empty["notes"][0]
    written = verdict.write(str(tmp_path / "none.jsonl"), [str(tmp_path / "out")], str(tmp_path / "copy.json"))
    assert written["status"] == "INCOMPLETE"
    assert json.loads((tmp_path / "copy.json").read_text())["status"] == "INCOMPLETE"
    assert [p.suffix for p in sorted((tmp_path / "out").iterdir())] == [".json", ".md"]


def test_verdict_needs_every_low_precision_dtype(tmp_path):
    ids = _session(tmp_path, {})[2]
    no_bf16 = {nodeid: ("passed",) for nodeid in ids if not nodeid.startswith("tests/lib/test_infonce.py::test[bf")}
    result = _session(tmp_path, no_bf16)[1]
    assert result["status"] == "INCOMPLETE" and result["dtypes_not_proven"] == ["infonce/triton: bfloat16"]


def _pytest_gpu_tests(outcomes, *args, **env):
    env = dict(os.environ, GDRD_GPU_OUTCOMES=str(outcomes), **env,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "tests/lib/test_infonce.py", "-m", "cuda", "-q",
                           "-p", "no:cacheprovider", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these tests run for real (run.sh)")
def test_gpu_test_outcomes_are_written_as_each_test_reports(tmp_path):
    outcomes = tmp_path / "outcomes.jsonl"
    out = _pytest_gpu_tests(outcomes)
    assert out.returncode == 0, out.stdout + out.stderr
    collected, _ = verdict.read_outcomes(str(outcomes))
    assert collected and {v["op"] for v in collected.values()} == {"infonce"}
    assert {v["dtype"] for v in collected.values()} == set(verdict.DTYPES)
    assert {v["outcome"] for v in collected.values()} == {"skipped"}  # no GPU here: never a pass
    assert {v["message"] for v in collected.values()} == {"Skipped: needs a CUDA GPU: run benchmarks/gpu/run.sh on the GPU machine"}
    result = verdict.write(str(outcomes), [str(tmp_path)])
    assert result["status"] == "INCOMPLETE" and result["counts"] == {"skipped": len(collected)}
    assert any(p.name.endswith("_correctness.md") for p in tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these tests run for real (run.sh)")
def test_a_crash_keeps_what_ran_and_the_next_session_resumes_past_it(tmp_path):
    outcomes = tmp_path / "outcomes.jsonl"
    crashed = _pytest_gpu_tests(outcomes, "-p", "no:faulthandler", GDRD_GPU_INJECT="crash@3")
    assert crashed.returncode == -signal.SIGSEGV, crashed.stdout + crashed.stderr
    tests, notes = verdict.read_outcomes(str(outcomes))
    result = verdict.verdict(tests, notes)
    assert result["status"] == "INCOMPLETE" and len(result["ran"]) == 2 and result["counts"]["did not finish"] == 1
    resumed = _pytest_gpu_tests(outcomes, GDRD_GPU_RESUME="1", GDRD_GPU_INJECT="crash@3")  # no second crash
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    tests, notes = verdict.read_outcomes(str(outcomes))
    assert not notes and verdict.verdict(tests)["counts"] == {"skipped": len(tests) - 1, "did not finish": 1}


# collected as on the GPU machine (torch.cuda.is_available() true), nothing run: the skip marks each GPU test
# carries there, and any pytest.skip / importorskip in its body
_AS_IF_CUDA = """
import inspect, json, os, re
import pytest, torch
torch.cuda.is_available = lambda: True

@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    from _pytest.skipping import evaluate_skip_marks
    found = {}
    for item in session.items:
        if "cuda" in item.keywords:
            mark = evaluate_skip_marks(item)
            body = re.findall(r"(?:pytest\\.skip|importorskip)\\((.*)", inspect.getsource(item.function))
            found[item.nodeid] = [mark.reason] if mark else body
    with open(os.environ["AS_IF_CUDA_OUT"], "w") as f:
        json.dump(found, f)
"""


@pytest.mark.skipif(os.environ.get("GDRD_REQUIRE_CPU_EXT") != "1" and backends.cpu_extension() is None,
                    reason="the GPU tests of the compiled kernels need gdrd_fast._C (CI builds it)")
def test_on_a_gpu_no_gpu_test_would_skip(tmp_path):
    (tmp_path / "as_if_cuda.py").write_text(_AS_IF_CUDA)
    env = dict(os.environ, AS_IF_CUDA_OUT=str(tmp_path / "found.json"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "-p", "as_if_cuda"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "found.json") as f:
        found = json.load(f)
    assert len(found) >= 187, len(found)
    skipping = {nodeid: reasons for nodeid, reasons in found.items() if reasons}
    assert not skipping, skipping


_WARM_ONE = """
import json, os, sys
from benchmarks.gpu import warmup
name, variant, seconds, error = warmup._compile((90, 0, "multiple of 16"))
assert not error, error
print(json.dumps(sorted(os.listdir(os.environ["TRITON_CACHE_DIR"]))))
"""


def test_the_warm_up_compiles_for_sm90_into_a_cache_the_next_process_hits(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    runs = [subprocess.run([sys.executable, "-c", _WARM_ONE], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    first, second = (json.loads(r.stdout.splitlines()[-1]) for r in runs)
    assert first and second == first  # the second process compiled nothing new: every entry was hit
    compiled = [name for d in first for name in os.listdir(tmp_path / "cache" / d)]
    assert any(name.endswith(".cubin") for name in compiled), compiled  # sm_90 machine code, not just IR


def test_inf_cl_gets_a_head_dim_that_fits_every_benchmarked_gpu_size():
    from benchmarks import test_bench_infonce as bench
    for *_, d in bench.SIZES["cuda"].values():
        head_dim = bench.inf_cl_head_dim(d)
        assert d % head_dim == 0 and head_dim in (16, 32, 64, 128, 256), (d, head_dim)
    assert bench.inf_cl_head_dim(128) == 128 and bench.inf_cl_head_dim(512) == 256
    with pytest.raises(ValueError, match="D=100"):
        bench.inf_cl_head_dim(100)
