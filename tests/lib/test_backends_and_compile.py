"""Backend discovery, graceful degradation, env report, custom-op checks and torch.compile."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gdrd_fast
from gdrd_fast import backends
from gdrd_fast.ops import infonce as infonce_ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_import_and_losses_work_without_compiled_parts_triton_or_diffusers():
    out = _run("""
        import sys
        for name in ("gdrd_fast._C", "gdrd_fast._C_cuda", "triton", "diffusers"):
            sys.modules[name] = None  # as if not installed / not built
        import torch, gdrd_fast
        from gdrd_fast.ops import crd_nce
        q = torch.randn(3, 4)
        print(float(gdrd_fast.infonce_bank_loss(q, q, torch.randn(9, 4))))
        print(float(gdrd_fast.crd_nce_loss(q, torch.randn(9, 4), torch.randint(9, (3, 5)), log_z=1.0)))
        print(crd_nce.IMPLS.resolve("auto", q.device, q.dtype))
        print(gdrd_fast.env_report())
        try:
            gdrd_fast.crd_nce_loss(q, torch.randn(9, 4), torch.randint(9, (3, 5)), log_z=1.0, backend="cpu")
        except RuntimeError as e:
            print("ERR", e)
    """)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2] == "torch"
    assert "cpu_extension" in out.stdout and "missing" in out.stdout and "triton" in out.stdout
    assert any(l.startswith("ERR") and "C++ CPU extension" in l for l in lines)


def test_env_report_and_cli():
    report = gdrd_fast.env_report(as_text=False)
    for key in ("torch", "cpu_extension", "cuda_extension", "triton", "triton_interpreter", "cuda_devices"):
        assert key in report
    out = _run("import runpy, sys; sys.argv = ['gdrd_fast', 'env']; runpy.run_module('gdrd_fast', run_name='__main__')")
    assert out.returncode == 0 and "cpu_extension" in out.stdout, out.stderr


@pytest.mark.skipif(os.environ.get("GDRD_REQUIRE_CPU_EXT") != "1", reason="set in CI, where the build must succeed")
def test_ci_build_has_the_cpu_extension():
    assert backends.cpu_extension() is not None, backends.extension_error("gdrd_fast._C")


def test_auto_backend_picks_the_chunked_path_on_cpu():
    assert infonce_ops.IMPLS.resolve("auto", torch.device("cpu"), torch.float32, d=16) == "chunked"
    assert "torch" in infonce_ops.IMPLS.available(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_grad", [True, False])
def test_infonce_custom_op_passes_opcheck(dtype, need_grad):
    q = torch.randn(5, 7, dtype=dtype, requires_grad=need_grad)
    p = torch.randn(5, 7, dtype=dtype, requires_grad=need_grad)
    bank = torch.randn(33, 7, dtype=dtype)
    torch.library.opcheck(infonce_ops.infonce_bank_op, (q, p, bank, 0.1, "chunked", need_grad))


def test_compiled_model_has_no_graph_break_on_the_loss():
    torch._dynamo.reset()
    bank = torch.randn(100, 16)

    def step(x, proj):
        q = torch.nn.functional.normalize(x @ proj, dim=1)
        return gdrd_fast.infonce_bank_loss(q, q.roll(1, 0), bank, temperature=0.1, backend="chunked")

    proj = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(6, 8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, proj)
    loss.backward()
    grad = proj.grad.clone()
    proj.grad = None
    step(x, proj).backward()
    torch.testing.assert_close(loss, step(x, proj))
    torch.testing.assert_close(grad, proj.grad)


CPU_BACKENDS = ["torch", "auto", pytest.param("cpu", marks=pytest.mark.skipif(
    backends.cpu_extension() is None, reason="needs the C++ extension gdrd_fast._C"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_losses_compile_with_fullgraph(backend):
    """Backends are resolved outside the graph (no importlib, no .item()): fullgraph=True holds for every
    loss, and the compiled loss and gradients equal eager."""
    torch._dynamo.reset()
    memory, idx = torch.randn(30, 8), torch.randint(30, (4, 6))
    teacher, weight = torch.randn(4, 3), torch.randn(3, 8)

    def step(anchor):
        anchor = torch.nn.functional.normalize(anchor, dim=1)
        return (gdrd_fast.crd_nce_loss(anchor, memory, idx, temperature=0.1, log_z=2.0, backend=backend)
                + gdrd_fast.infonce_bank_loss(anchor, anchor.roll(1, 0), memory, temperature=0.1, backend=backend)
                + gdrd_fast.feature_regression_loss(anchor, teacher, weight, backend=backend))

    anchor = torch.randn(4, 8, requires_grad=True)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(anchor)
    (grad,) = torch.autograd.grad(loss, anchor)
    eager = step(anchor)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, torch.autograd.grad(eager, anchor)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_crd_module_compiles_with_fullgraph_and_matches_eager(backend):
    """CRDLoss under torch.compile(fullgraph=True): Z estimated on the first step without a host sync
    (no .item()), frozen after, banks updated; loss, gradients and state equal the eager module's."""
    torch._dynamo.reset()
    eager = gdrd_fast.CRDLoss(8, 7, n_data=30, feat_dim=4, nce_k=5, backend=backend)
    module = gdrd_fast.CRDLoss(8, 7, n_data=30, feat_dim=4, nce_k=5, backend=backend)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        f_s, f_t, idx = torch.randn(4, 8), torch.randn(4, 7), torch.randperm(30)[:4]
        contrast_idx = torch.cat([idx[:, None], torch.randint(30, (4, 5))], 1)
        got, want = compiled(f_s, f_t, idx, contrast_idx), eager(f_s, f_t, idx, contrast_idx)
        torch.testing.assert_close(got, want)
        grads = torch.autograd.grad(got, [module.embed_s.linear.weight])
        torch.testing.assert_close(grads[0], torch.autograd.grad(want, [eager.embed_s.linear.weight])[0])
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value)
