"""benchmarks/gpu/run.sh runs only on the GPU machine, whose minutes are few: what can be checked here is.
Its syntax; that its phases' predicted times fit the 8-minute run; the wheel folder it reads being ignored by
git and filled by make; the correctness verdict it writes before any benchmark (benchmarks/gpu/verdict.py)
and the test outcomes it is made from (tests/conftest.py, GDRD_GPU_OUTCOMES). The whole script was dry-run
on CPU with a stub nvidia-smi (README, "Tests and the GPU script")."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu import verdict

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
    assert set(predicted) == {"BUILD", "TESTS", "BENCH", "COMPILE", "REPORT"}
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


def _outcome(op, kernel, dtype, outcome="passed"):
    return {"op": op, "kernel": kernel, "dtype": dtype, "outcome": outcome, "message": ""}


def test_verdict_passes_only_when_every_kernel_passed_in_every_dtype():
    full = {f"{op}-{d}": _outcome(op, "triton", d) for op in ("infonce", "relational") for d in verdict.DTYPES}
    full["crd-kernels"] = _outcome("crd_kernels", "cuda", "")
    assert verdict.verdict(full)["status"] == "PASS"

    failed = dict(full, **{"relational-bfloat16": _outcome("relational", "triton", "bfloat16", "failed")})
    result = verdict.verdict(failed)
    assert result["status"] == "FAIL" and "relational/triton: bfloat16" in result["dtypes_not_proven"]

    skipped = dict(full, **{"crd-kernels": _outcome("crd_kernels", "cuda", "", "skipped")})
    assert verdict.verdict(skipped)["status"] == "INCOMPLETE"
    no_bf16 = {k: v for k, v in full.items() if k != "infonce-bfloat16"}
    result = verdict.verdict(no_bf16)
    assert result["status"] == "INCOMPLETE" and result["dtypes_not_proven"] == ["infonce/triton: bfloat16"]
    assert verdict.verdict({})["status"] == "INCOMPLETE"
    text = "\n".join(verdict.markdown(verdict.verdict(failed), "H100"))
    assert "Correctness on H100: FAIL" in text and "| relational | triton | 1/1 | 1/1 | 0/1 |  |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these tests run for real (run.sh)")
def test_gpu_test_outcomes_are_collected_per_kernel_and_dtype(tmp_path):
    outcomes = tmp_path / "outcomes.json"
    env = dict(os.environ, GDRD_GPU_OUTCOMES=str(outcomes),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/lib/test_infonce.py", "-m", "cuda", "-q",
                          "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(outcomes) as f:
        collected = json.load(f)
    assert collected and {v["op"] for v in collected.values()} == {"infonce"}
    assert {v["dtype"] for v in collected.values()} == set(verdict.DTYPES)
    assert {v["outcome"] for v in collected.values()} == {"skipped"}  # no GPU here: never a pass
    result = verdict.write(str(outcomes), [str(tmp_path)])
    assert result["status"] == "INCOMPLETE" and result["counts"] == {"skipped": len(collected)}
    assert any(p.name.endswith("_correctness.md") for p in tmp_path.iterdir())
