"""The README's Python snippets run as written, and the Quickstart shows what it claims: every op prints a
finite, non-zero loss and gradient (CRRCD's included: its example fills the queue before it is distilled)."""
import contextlib
import io
import math
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
QUICKSTART_OPS = ("InfoNCE", "CRD", "CRRCD", "feature regression")


def _python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_python_snippets_run():
    blocks = _python_blocks()
    assert blocks, "the README has no Python snippet"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    printed = out.getvalue()
    pattern = r"^(.+?) loss (\S+), \|grad [^|]+\| (\S+)$"  # "<op> loss <value>, |grad <input>| <norm>"
    losses = {name: (float(loss), float(grad)) for name, loss, grad in re.findall(pattern, printed, flags=re.M)}
    assert sorted(losses) == sorted(QUICKSTART_OPS), printed
    for name, (loss, grad) in losses.items():
        assert math.isfinite(loss) and loss > 0, f"{name}: loss {loss}"
        assert math.isfinite(grad) and grad > 0, f"{name}: gradient norm {grad}"
    assert "negatives (64, 512, 128)" in printed
