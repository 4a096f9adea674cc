"""The install: core dependencies (torch and numpy only), the build's errors, and env_report's reasons."""
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch

from gdrd_fast import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _core_closure() -> set[str]:
    """The distributions that `pip install gdrd_fast` without extras brings: torch and numpy with their own
    requirements (markers evaluated here, no extras)."""
    requirements = pytest.importorskip("packaging.requirements")
    seen, todo = set(), ["torch", "numpy"]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = requirements.Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_core_dependencies_are_torch_and_numpy_only():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in project["dependencies"]}
    assert names == {"torch", "numpy"}
    app = {re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in project["optional-dependencies"]["app"]}
    assert {"tqdm", "pyyaml", "matplotlib", "pillow"} <= app


def test_losses_run_with_only_torch_and_numpy_importable():
    """Every module outside torch's and numpy's own requirements is made unimportable (also triton, which
    only CUDA builds of torch bring), then each loss runs forward and backward."""
    allowed = _core_closure() - {"triton"}
    blocked = sorted({module for module, dists in metadata.packages_distributions().items()
                      if not any(_canonical(d) in allowed for d in dists)
                      and module != "gdrd_fast" and not module.startswith(("__editable__", "_distutils_hack"))}
                     | {"triton"})
    assert {"triton", "pytest"} <= set(blocked)
    code = textwrap.dedent(f"""
        import sys
        BLOCKED = {blocked!r}
        sys.modules.update(dict.fromkeys(BLOCKED))  # None: `import x` raises ImportError, find_spec says absent
        import torch
        import torch.nn.functional as F
        import gdrd_fast

        def check(name, loss, *leaves):
            loss.backward()
            assert torch.isfinite(loss) and loss.item() != 0, (name, loss)
            assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves), name
            print(name, float(loss))

        torch.manual_seed(0)
        q = F.normalize(torch.randn(6, 16), dim=1).requires_grad_()
        pos, bank = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(40, 16), dim=1)
        check("infonce", gdrd_fast.infonce_bank_loss(q, pos, bank), q)

        crd = gdrd_fast.CRDLoss(s_dim=12, t_dim=20, n_data=50, feat_dim=8, nce_k=16)
        f_s = torch.randn(6, 12, requires_grad=True)
        check("crd", crd(f_s, torch.randn(6, 20), torch.randperm(50)[:6]), f_s)

        rcd = gdrd_fast.RelationalContrastiveLoss(embed_dim=16, num_negatives=8, queue_size=32, n_data=100)
        for step in range(6):  # the queue fills after 4 batches of 8; the loss is 0 until then
            e_s = F.normalize(torch.randn(8, 16), dim=1).requires_grad_()
            loss = rcd(F.normalize(torch.randn(8, 16), dim=1), e_s, labels=torch.randint(100, (8,)))
        check("relational", loss, e_s)

        regress = gdrd_fast.FeatureRegressionLoss(cs=4, ct=6)
        student = torch.randn(2, 4, 5, 5, requires_grad=True)
        check("feature_regression", regress(student, torch.randn(2, 6, 5, 5)), student)

        queue = gdrd_fast.MemoryQueue(size=32, dim=16, with_labels=True)
        queue.push_(torch.randn(20, 16), labels=torch.randint(5, (20,)))
        assert queue.sample_negatives(torch.randint(5, (3,)), k=4).shape == (3, 4)
        print(gdrd_fast.env_report())
        loaded = [m for m in BLOCKED if sys.modules.get(m) is not None]
        assert not loaded, loaded
    """)
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env_vars,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("infonce", "crd", "relational", "feature_regression"):
        assert re.search(rf"^{name} -?\d", out.stdout, flags=re.M), out.stdout


def _run_setup(monkeypatch, argv, block=(), setuptools_version=None):
    for name in block:
        monkeypatch.setitem(sys.modules, name, None)
    if setuptools_version:
        import setuptools
        monkeypatch.setattr(setuptools, "__version__", setuptools_version)
    monkeypatch.setattr(sys, "argv", ["setup.py", *argv])
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")


def test_build_without_torch_stops_with_the_commands_to_run(monkeypatch):
    with pytest.raises(SystemExit) as exc:
        _run_setup(monkeypatch, ["dist_info"], block=("torch", "torch.utils"))
    message = str(exc.value)
    assert "torch is not importable" in message and "python -m pip install torch numpy ninja" in message
    assert "--no-build-isolation" in message


def test_build_with_old_or_missing_setuptools_says_how_to_upgrade(monkeypatch):
    with pytest.raises(SystemExit) as exc:
        _run_setup(monkeypatch, ["dist_info"], setuptools_version="65.5.0")
    assert "setuptools >= 77" in str(exc.value) and "pip install --upgrade 'setuptools>=77'" in str(exc.value)
    with pytest.raises(ImportError, match=r"lacks: run `python -m pip install --upgrade 'setuptools>=77'`"):
        _run_setup(monkeypatch, ["dist_info"], block=("setuptools", "setuptools.build_meta"))


@pytest.fixture
def record(tmp_path, monkeypatch):
    path = tmp_path / "_build.json"
    monkeypatch.setattr(env, "_BUILD_RECORD", str(path))
    return path


def test_env_report_says_why_the_cuda_extension_is_absent(record, monkeypatch):
    from gdrd_fast import backends
    monkeypatch.setattr(backends, "cpu_extension", lambda: object())
    monkeypatch.setattr(backends, "cuda_extension", lambda: None)
    monkeypatch.setattr(backends, "extension_error", lambda name: f"ModuleNotFoundError: No module named {name!r}")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert env.why_missing("gdrd_fast._C_cuda") == f"not built: torch {torch.__version__} is a CPU-only build"
    report = env.env_report(as_text=False)
    assert "CPU-only" in report["cuda_extension"] and "No module named" not in report["cuda_extension"]

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    record.write_text('{"gdrd_fast._C_cuda": "build failed with RuntimeError: Error compiling objects"}')
    assert env.why_missing("gdrd_fast._C_cuda").startswith("build failed with RuntimeError")

    record.unlink()
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(env.shutil, "which", lambda name: None)
    assert "no CUDA toolkit" in env.why_missing("gdrd_fast._C_cuda")


def test_env_report_says_when_a_built_extension_no_longer_imports(record, monkeypatch):
    from gdrd_fast import backends
    monkeypatch.setattr(backends, "extension_error", lambda name: "ImportError: undefined symbol: _ZN3c10")
    record.write_text('{"gdrd_fast._C": "built against torch 2.11.0"}')
    reason = env.why_missing("gdrd_fast._C")
    assert "built against torch 2.11.0, but it does not import" in reason and "undefined symbol" in reason
    assert "pip install -e . --no-build-isolation" in reason


def test_make_reuses_the_setup_until_an_input_or_a_pin_changes(tmp_path):
    """`make demo` after `make test` must not set up again; a changed source or pin must. The venv's
    python and gdrd-fast are stubs that log their calls."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    venv, calls = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "gdrd-fast"):
        stub = venv / "bin" / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        stub.chmod(0o755)

    def demo(*args) -> list[str]:
        calls.write_text("")
        out = subprocess.run([make, "demo", f"VENV={venv}", "TORCH=torch==2.13.0", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return calls.read_text().splitlines()

    first = demo()
    assert any("pip install" in c and "torch==2.13.0" in c for c in first) and first[-1].startswith("gdrd-fast demo")
    assert demo() == ["gdrd-fast demo"]  # set up: straight to the demo
    assert any("pip install" in c for c in demo("-W", "csrc/ops.cpp"))  # a changed source rebuilds
    assert demo() == ["gdrd-fast demo"]
    assert any("torch==2.11.0" in c for c in demo("TORCH=torch==2.11.0"))  # a changed pin sets up again
