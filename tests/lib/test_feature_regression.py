"""feature_regression_loss fast paths against the float64 reference (chunked CPU path here, Triton on a
GPU; the Triton kernels also run on CPU in tests/lib/interpreter/interp_feature_regression.py), plus the
custom ops' opcheck, torch.compile without graph breaks and the reductions."""
import pytest
import torch

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import feature_regression as fr_ops
from feature_regression_cases import SIZES, check_feature_regression


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,cs,ct,spatial", SIZES)
def test_cpu_backend_matches_float64(b, cs, ct, spatial, dtype):
    check_feature_regression("cpu", b, cs, ct, spatial, dtype, "cpu")


@pytest.mark.parametrize("b,cs,ct,spatial", [(6, 11, 7, None), (3, 9, 13, (5, 3)), (3, 9, 13, (9, 8))])
def test_cpu_backend_keeps_the_error_only_within_one_chunk(b, cs, ct, spatial, monkeypatch):
    """At the one-chunk limit the forward keeps its error (the backward skips a GEMM); one element over, it
    keeps nothing and the backward recomputes: both match float64 for the loss and every gradient, with
    maps of a few pixels and of many."""
    p = 1 if spatial is None else spatial[0] * spatial[1]
    x, t, w = torch.randn(b, cs, p), torch.randn(b, ct, p), torch.randn(ct, cs)
    for limit, kept in ((b * ct * p, (b, ct, p)), (b * ct * p - 1, (0,))):
        monkeypatch.setattr(fr_ops, "_CHUNK_ELEMENTS", limit)
        assert fr_ops.feature_regression_op(x, t, w, None, "chunked")[1].shape == kept
        check_feature_regression("cpu", b, cs, ct, spatial, torch.float32, "cpu")


def test_cpu_backend_without_bias_and_in_several_chunks(monkeypatch):
    monkeypatch.setattr(fr_ops, "_CHUNK_ELEMENTS", 40)  # many (sample, pixel) blocks on a small input
    check_feature_regression("cpu", 7, 6, 9, (5, 3), torch.float32, "cpu", with_bias=False)
    check_feature_regression("cpu", 7, 6, 9, (5, 3), torch.float32, "cpu")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_match_the_reference(reduction):
    x, t, w, bias = torch.randn(4, 6, 3, 3), torch.randn(4, 5, 3, 3), torch.randn(5, 6), torch.randn(5)
    fast = gdrd_fast.feature_regression_loss(x, t, w, bias, reduction=reduction, backend="cpu")
    torch.testing.assert_close(fast, reference.feature_regression_loss(x, t, w, bias, reduction=reduction))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_ops_pass_opcheck(with_bias, dtype):
    x = torch.randn(3, 5, 7, dtype=dtype, requires_grad=True)
    t = torch.randn(3, 4, 7, dtype=dtype)
    w = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, requires_grad=True) if with_bias else None
    torch.library.opcheck(fr_ops.feature_regression_op, (x, t, w, bias, "cpu"))
    plain = [v.detach() if v is not None else None for v in (x, t, w, bias)]  # runs inside backward: no grad
    kept_error = fr_ops.feature_regression_op(*plain, "cpu")[1]
    assert kept_error.shape == (3, 4, 7)  # one chunk: the forward keeps its error
    for kept in (kept_error, kept_error.new_empty(0)):  # the error kept, or recomputed
        torch.library.opcheck(fr_ops.feature_regression_backward_op,
                              (torch.rand(3, dtype=dtype), *plain, kept, "cpu"))


def test_compiled_step_has_no_graph_break():
    torch._dynamo.reset()
    adapter = gdrd_fast.FeatureRegressionLoss(6, 5, backend="cpu")
    x, t = torch.randn(3, 6, 4, 4, requires_grad=True), torch.randn(3, 5, 4, 4)

    def step(x, t):
        return adapter(torch.relu(x), t) * 3

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t)
    loss.backward()
    grads = (x.grad.clone(), adapter.adapter.weight.grad.clone(), adapter.adapter.bias.grad.clone())
    x.grad = None
    adapter.zero_grad()
    expected = step(x, t)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, (x.grad, adapter.adapter.weight.grad, adapter.adapter.bias.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,cs,ct,spatial", SIZES + [(64, 512, 512, (8, 8)), (256, 128, 96, (16, 16))])
def test_triton_backend_on_gpu_matches_float64(b, cs, ct, spatial, dtype):
    check_feature_regression("triton", b, cs, ct, spatial, dtype, "cuda")
