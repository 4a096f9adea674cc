"""The C++ autograd nodes of the one-block paths (csrc/autograd/one_block.cpp): an eager CPU call small enough
takes them (one node), and they equal the float64 reference in the loss and every gradient, for every
reduction, with and without bias, for any gradient the loss receives, and under no_grad / inference_mode."""
import pytest
import torch

import gdrd_fast
from gdrd_fast import backends, reference

pytestmark = pytest.mark.skipif(backends.compiled_op("feature_regression_one_block") is None,
                                reason="this build of gdrd_fast._C has no one-block nodes")
REDUCTIONS = ("mean", "sum", "none")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def _grads(loss, leaves, upstream):
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted, upstream)


def _close(actual, expected, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 7, 3, 2), (9, 7)], ids=["map", "vector"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_feature_regression_node_equals_the_float64_reference(dtype, reduction, shape, with_bias):
    g = torch.Generator().manual_seed(11)
    ct = 5
    student = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    teacher = torch.randn(shape[0], ct, *shape[2:], generator=g).to(dtype)
    weight = torch.randn(ct, shape[1], generator=g).to(dtype).requires_grad_()
    bias = torch.randn(ct, generator=g).to(dtype).requires_grad_() if with_bias else None
    loss = gdrd_fast.feature_regression_loss(student, teacher, weight, bias, reduction=reduction)
    assert "FeatureRegressionNode" in loss.grad_fn.name()
    upstream = torch.randn(loss.shape, generator=g).to(loss.dtype) * 3  # not 1: the factor is read, not assumed
    grads = _grads(loss, [student, weight, bias], upstream)
    s64, w64 = student.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    expected = reference.feature_regression_loss(s64, teacher.double(), w64, b64, reduction=reduction)
    expected_grads = _grads(expected, [s64, w64, b64], upstream.double())
    assert loss.dtype == (dtype if reduction == "none" else (torch.float64 if dtype == torch.float64 else torch.float32))
    _close(loss, expected, dtype)
    for actual, wanted, leaf in zip(grads, expected_grads, [t for t in (student, weight, bias) if t is not None]):
        assert actual.dtype == leaf.dtype and actual.shape == leaf.shape
        _close(actual, wanted, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("positive_grad", [False, True])
def test_infonce_node_equals_the_float64_reference(dtype, reduction, positive_grad):
    g = torch.Generator().manual_seed(12)
    query = torch.randn(7, 5, generator=g).to(dtype).requires_grad_()
    positive = torch.randn(7, 5, generator=g).to(dtype).requires_grad_(positive_grad)
    bank = torch.randn(13, 5, generator=g).to(dtype)
    loss = gdrd_fast.infonce_bank_loss(query, positive, bank, temperature=0.3, reduction=reduction)
    assert "InfoNCENode" in loss.grad_fn.name()
    upstream = torch.randn(loss.shape, generator=g).to(loss.dtype) * 3
    grads = _grads(loss, [query, positive], upstream)
    q64 = query.detach().double().requires_grad_()
    p64 = positive.detach().double().requires_grad_(positive_grad)
    expected = reference.infonce_bank_loss(q64, p64, bank.double(), temperature=0.3, reduction=reduction)
    expected_grads = _grads(expected, [q64, p64], upstream.double())
    _close(loss, expected, dtype)
    for actual, wanted in zip(grads, expected_grads):
        assert actual.dtype == dtype
        _close(actual, wanted, dtype)


def test_nodes_run_without_autograd_and_record_nothing():
    student, teacher, weight = torch.randn(3, 4, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(2, 4, requires_grad=True)
    query, positive, bank = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), torch.randn(6, 4)
    with_grad = (gdrd_fast.feature_regression_loss(student, teacher, weight),
                 gdrd_fast.infonce_bank_loss(query, positive, bank))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            losses = (gdrd_fast.feature_regression_loss(student, teacher, weight),
                      gdrd_fast.infonce_bank_loss(query, positive, bank))
        for loss, expected in zip(losses, with_grad):
            assert loss.grad_fn is None and not loss.requires_grad
            torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)


def test_a_call_above_one_block_or_compiled_takes_the_python_path():
    big = torch.randn(600, 8, requires_grad=True)  # B x Ct > one block of 2^18 errors
    teacher, weight = torch.randn(600, 512), torch.randn(512, 8)
    assert "FeatureRegressionNode" not in gdrd_fast.feature_regression_loss(big, teacher, weight).grad_fn.name()
    query, positive = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4)
    bank = torch.randn(20000, 4)  # more rows than one block holds
    assert "InfoNCENode" not in gdrd_fast.infonce_bank_loss(query, positive, bank).grad_fn.name()


def test_the_nodes_refuse_an_unknown_reduction_code():
    node = backends.compiled_op("infonce_bank_one_block")
    with pytest.raises(RuntimeError, match="reduction code must be 0"):
        node(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3), 1.0, 7)


def test_a_conv_weight_goes_to_the_node_as_it_is_and_gets_its_own_shape_back():
    """FeatureRegressionLoss passes its 1x1 Conv2d weight [Ct, Cs, 1, 1]: no flatten node in the graph."""
    torch.manual_seed(3)
    module = gdrd_fast.FeatureRegressionLoss(6, 5).double()
    student, teacher = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 5, 4, 4).double()
    loss = module(student, teacher)
    assert "FeatureRegressionNode" in loss.grad_fn.name()
    grads = torch.autograd.grad(loss, [student, module.adapter.weight, module.adapter.bias])
    w = module.adapter.weight.detach().flatten(1).requires_grad_()
    s, b = student.detach().requires_grad_(), module.adapter.bias.detach().requires_grad_()
    expected = reference.feature_regression_loss(s, teacher, w, b)
    expected_grads = torch.autograd.grad(expected, [s, w, b])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert grads[1].shape == module.adapter.weight.shape
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual.reshape(wanted.shape), wanted, rtol=1e-12, atol=1e-12)


def _node_losses():
    """(loss, leaves) of each node, fresh: feature regression with bias, InfoNCE with a positive that learns."""
    g = torch.Generator().manual_seed(5)
    student, weight = torch.randn(3, 4, 2, 2, generator=g, requires_grad=True), torch.randn(2, 4, generator=g, requires_grad=True)
    bias = torch.randn(2, generator=g, requires_grad=True)
    regression = gdrd_fast.feature_regression_loss(student, torch.randn(3, 2, 2, 2, generator=g), weight, bias)
    query, positive = torch.randn(3, 4, generator=g, requires_grad=True), torch.randn(3, 4, generator=g, requires_grad=True)
    infonce = gdrd_fast.infonce_bank_loss(query, positive, torch.randn(6, 4, generator=g))
    return [(regression, [student, weight, bias]), (infonce, [query, positive])]


def test_a_second_backward_needs_retain_graph_and_then_gives_the_same_gradients():
    for loss, leaves in _node_losses():
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="already ran and freed its buffers"):
            torch.autograd.grad(loss, leaves)


def test_a_second_derivative_is_refused_not_silently_wrong():
    for loss, leaves in _node_losses():
        with pytest.raises(RuntimeError, match="second derivative"):
            torch.autograd.grad(loss, leaves, create_graph=True)


def test_an_input_changed_in_place_before_the_backward_is_an_error():
    """The node keeps the student and weight themselves (no copy): their version counters guard them."""
    (loss, (student, weight, bias)), _ = _node_losses()
    with torch.no_grad():
        weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_node_links_only_what_needs_a_gradient_and_backward_fills_grad():
    """Leaves that ask for no gradient get none, and .backward() accumulates into .grad as for any node."""
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)
    weight, bias = torch.randn(2, 4, generator=g, requires_grad=True), torch.randn(2, generator=g)
    loss = gdrd_fast.feature_regression_loss(student, teacher, weight, bias)
    assert "FeatureRegressionNode" in loss.grad_fn.name()
    loss.backward()
    loss2 = gdrd_fast.feature_regression_loss(student, teacher, weight, bias)
    loss2.backward()
    expected = torch.autograd.grad(reference.feature_regression_loss(student, teacher, weight, bias), weight)[0]
    torch.testing.assert_close(weight.grad, 2 * expected, rtol=1e-6, atol=1e-6)
    assert student.grad is None and bias.grad is None
