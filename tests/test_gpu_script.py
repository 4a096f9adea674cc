"""benchmarks/gpu/run.sh cannot be run here (no GPU), but a broken script would waste a GPU session:
its syntax, the wheel folder it reads being ignored by git, and the Makefile target that fills it."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")


def test_gpu_script_parses_and_is_executable():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = subprocess.run([bash, "-n", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_carried_wheels_stay_out_of_git_and_make_fills_them():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert ".whl/" in f.read().split()
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert "gpu-wheels:" in makefile and "-d .whl" in makefile and "--python-version 3.12" in makefile
