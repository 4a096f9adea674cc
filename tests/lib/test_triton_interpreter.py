"""Runs tests/lib/interpreter/interp_*.py (Triton kernels on CPU tensors) in a process with TRITON_INTERPRET=1.

Triton decides at import whether kernels are interpreted or compiled, and this session compiles them
(tests/lib/test_triton_static.py), so the interpreter tests get their own pytest process.
"""
import glob
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter runs on numpy

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FILES = sorted(glob.glob(os.path.join(HERE, "interpreter", "interp_*.py")))


@pytest.mark.triton
@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_triton_kernels_in_the_interpreter(path):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-2000:]
