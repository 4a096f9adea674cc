"""docs/design/adding-an-op.md is complete: its blocks, applied to a temporary copy of the repository and
nothing else, add a working op that the generic tests (test_dispatch, test_layers) then cover."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from import_graph import ROOT

RECIPE = os.path.join(ROOT, "docs", "design", "adding-an-op.md")
BLOCK = re.compile(r'<!-- recipe: (\S+) (new|append|after "([^"]+)") -->\n```python\n(.*?)```', re.S)


def recipe_blocks() -> list[tuple[str, str, str | None, str]]:
    """(file, how, anchor line, code) for every block the recipe marks with a file."""
    return [(path, how.split(" ")[0], anchor, code) for path, how, anchor, code in BLOCK.findall(open(RECIPE).read())]


def apply(root: str, blocks) -> None:
    for path, how, anchor, code in blocks:
        target = os.path.join(root, path)
        if how == "new":
            assert not os.path.exists(target), f"the recipe creates {path}, which exists"
            text = code
        else:
            text = open(target).read()
            if how == "append":
                text = text.rstrip("\n") + "\n\n\n" + code
            else:
                assert text.count(anchor + "\n") == 1, f"{path} has no single line {anchor!r}"
                text = text.replace(anchor + "\n", anchor + "\n" + code)
        with open(target, "w") as f:
            f.write(text)


def test_the_recipe_marks_every_step_of_a_torch_only_op():
    files = {path for path, *_ in recipe_blocks()}
    assert files == {"gdrd_fast/reference.py", "gdrd_fast/ops/my_loss.py", "gdrd_fast/functional.py",
                     "tests/lib/op_registry.py"}


@pytest.mark.slow
def test_an_op_added_by_the_recipe_alone_passes_the_generic_tests(tmp_path):
    copy = str(tmp_path / "repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "demo_assets")
    for part in ("gdrd_fast", "kernels", "csrc", "tests/lib", "tests/conftest.py", "pyproject.toml"):
        source, target = os.path.join(ROOT, part), os.path.join(copy, part)
        if os.path.isdir(source):
            shutil.copytree(source, target, ignore=ignore)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(source, target)
    apply(copy, recipe_blocks())
    env = dict(os.environ, PYTHONPATH=copy)
    tests = subprocess.run([sys.executable, "-m", "pytest", "tests/lib/test_dispatch.py", "tests/lib/test_layers.py",
                            "-q", "-p", "no:cacheprovider", "-x"], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "my_loss" in subprocess.run(
        [sys.executable, "-m", "pytest", "tests/lib/test_dispatch.py", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=300).stdout
    # the op itself: float64-exact against its reference with gradients, opcheck, compiled without graph breaks
    check = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch
        from gdrd_fast import functional, reference
        from gdrd_fast.ops import my_loss as ops
        x, t = torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.randn(5, 7, dtype=torch.float64)
        for backend in ("auto", "chunked", "torch"):
            got = functional.my_loss(x, t, scale=0.3, backend=backend)
            want = reference.my_loss_rows(x, t, scale=0.3).mean()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
        assert torch.autograd.gradcheck(lambda x: functional.my_loss(x, t, reduction="none"), (x,))
        torch.library.opcheck(ops.my_loss_op, (x, t, 0.3, "chunked", True))
        step = torch.compile(lambda x: functional.my_loss(x, t), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(step(x), functional.my_loss(x, t))
        print("ok")
    """)], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert check.stdout.strip().endswith("ok"), check.stdout[-2000:] + check.stderr[-3000:]
